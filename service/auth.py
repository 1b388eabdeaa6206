"""API keys in the X-API-Key header, compared in constant time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.errors import ApiError
from service.schemas import ErrorResponse

_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of the keys in CERVIXQC_API_KEYS(_FILE)")


def key_matches(valid_keys: list[str], key: str) -> bool:
    """Compared against every key (no early exit), so timing says nothing about which matched."""
    given, ok = key.encode(), False
    for valid in valid_keys:
        ok |= hmac.compare_digest(given, valid.encode())
    return ok


def require_api_key(request: Request, key: Annotated[str | None, Depends(_header)]) -> None:
    settings = request.app.state.settings
    if settings.auth_disabled:
        return
    if key is None:
        raise ApiError(401, "unauthorized", "missing X-API-Key header", {"WWW-Authenticate": "APIKey"})
    if not key_matches(settings.api_keys, key):
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "APIKey"})


ApiKey = Depends(require_api_key)
# what every keyed route may answer, for its OpenAPI entry (clients are generated from it)
UNAUTHORIZED: dict[int | str, dict] = {401: {"model": ErrorResponse, "description": "missing or invalid X-API-Key"}}
