"""API keys in the X-API-Key header (or `Authorization: Bearer`, what Prometheus and most
HTTP clients send without custom headers), compared in constant time. /metrics also takes
the scrape-only keys (CERVIXQC_METRICS_KEYS)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError
from service.schemas import ErrorResponse

_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of the keys in CERVIXQC_API_KEYS(_FILE)")
_bearer = HTTPBearer(auto_error=False, description="The same keys as X-API-Key, as `Authorization: Bearer <key>`")


def key_matches(valid_keys: list[str], key: str) -> bool:
    """Compared against every key (no early exit), so timing says nothing about which matched."""
    given, ok = key.encode(), False
    for valid in valid_keys:
        ok |= hmac.compare_digest(given, valid.encode())
    return ok


def _check(valid_keys: list[str], request: Request, key: str | None,
           bearer: HTTPAuthorizationCredentials | None) -> None:
    if request.app.state.settings.auth_disabled:
        return
    given = key if key is not None else bearer.credentials if bearer is not None else None
    if given is None:
        raise ApiError(401, "unauthorized", "missing X-API-Key header (or Authorization: Bearer)",
                       {"WWW-Authenticate": "APIKey"})
    if not key_matches(valid_keys, given):
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "APIKey"})


def require_api_key(request: Request, key: Annotated[str | None, Depends(_header)],
                    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    _check(request.app.state.settings.api_keys, request, key, bearer)


def require_metrics_key(request: Request, key: Annotated[str | None, Depends(_header)],
                        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    settings = request.app.state.settings
    _check(settings.api_keys + settings.metrics_keys, request, key, bearer)


ApiKey = Depends(require_api_key)
MetricsKey = Depends(require_metrics_key)
# what every keyed route may answer, for its OpenAPI entry (clients are generated from it)
UNAUTHORIZED: dict[int | str, dict] = {401: {"model": ErrorResponse, "description": "missing or invalid X-API-Key"}}
