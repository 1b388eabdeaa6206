"""Sign in with an API key, sign out. The JSON API keeps its X-API-Key header; only the pages
use the session cookie, and the key itself never leaves this exchange."""

from __future__ import annotations

import re
import secrets
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse

from service.auth import key_matches
from service.errors import ApiError
from service.ui.deps import checked_session, current_session, page, signer
from service.ui.session import COOKIE, LOGIN_COOKIE, csrf_ok, delete_cookie, key_id, set_cookie

router = APIRouter(prefix="/ui", include_in_schema=False)


def _safe_next(next_url: str | None) -> str:
    """Only our own pages: an open redirect would make the sign-in page a phishing tool. The
    value arrives decoded (query, then form): decoding it again turned a filter's `a%26b` into
    `a&b`. Backslashes and control characters, which browsers bend into other URLs, are refused."""
    target = next_url or ""
    if not target.startswith("/ui/") or "\\" in target or any(ord(c) < 32 or ord(c) == 127 for c in target):
        return "/ui/upload"
    return target


@router.get("/login")
async def login_page(request: Request, next: str | None = None, error: str | None = None):  # noqa: A002
    # the browser's token while it holds one: each load drew a new one over the cookie, so of two
    # tabs showing the sign-in page, the first to be sent was refused as expired (an audit)
    held = request.cookies.get(LOGIN_COOKIE, "")
    token = held if re.fullmatch(r"[A-Za-z0-9_-]{16,64}", held) else secrets.token_urlsafe(16)
    response = page(request, "login.html", None, csrf=token, next=next or "", error=error)
    set_cookie(response, request, LOGIN_COOKIE, token, 600)
    return response


@router.post("/login")
async def login(request: Request, api_key: str = Form(""), csrf: str = Form(""), next: str = Form("")):  # noqa: A002
    settings = request.app.state.settings
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE, ""), csrf):
        return RedirectResponse(f"/ui/login?error=expired&next={quote(next, safe='')}", status_code=303)
    if not (settings.auth_disabled or key_matches(settings.api_keys, api_key)):
        return RedirectResponse(f"/ui/login?error=bad_key&next={quote(next, safe='')}", status_code=303)
    who = key_id(api_key) if api_key else "anonymous"
    response = RedirectResponse(_safe_next(next), status_code=303)
    held = signer(request).read(request.cookies.get(COOKIE))
    if held is None or held.who != who:  # a second tab signing in with the same key keeps the session:
        # a new one had changed the CSRF token under the first tab, whose next decision got 403 (an audit)
        set_cookie(response, request, COOKIE, signer(request).issue(who), int(settings.session_max_age_s))
    delete_cookie(response, request, LOGIN_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request):
    """A live session signs out with its CSRF token (no other site may sign a reviewer out) and
    is revoked, so a copy of its cookie opens nothing; an expired or revoked one is simply
    cleared: it answered with a bare 401 and kept its cookie."""
    try:
        session = await checked_session(request, current_session(request))
    except ApiError as e:
        if e.status != 401:  # a live session with a wrong token: refused as any POST
            raise
        # not live now, but signed by us (its key taken out of the settings): revoked all the
        # same, or a copy of its cookie opened the pages again once the key was back (an audit).
        # No CSRF check: it ends a session that opens nothing at present
        dormant = signer(request).read(request.cookies.get(COOKIE))
        if dormant is not None:
            signer(request).revoke(dormant)
    else:
        signer(request).revoke(session)  # a copy of the cookie signs in no more
    response = RedirectResponse("/ui/login", status_code=303)
    delete_cookie(response, request, COOKIE)
    return response
