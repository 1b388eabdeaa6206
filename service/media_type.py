"""A request's media type, read one way for every route. Media types are case-insensitive
(RFC 9110 8.3.1): the form check compared the raw header with `startswith`, so a sign-out
or Apply whose client wrote `Application/x-www-form-urlencoded` had its `csrf` field unread
and was refused 403, where the JSON and page checks lower-cased it."""

from __future__ import annotations

from starlette.requests import Request

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
JSON = "application/json"


def media_type(request: Request) -> str:
    """The Content-Type without its parameters (charset, boundary), lower case; '' if none."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()
