"""The API's own documentation, behind the same keys as the API.

The design brief asks for a key on everything but health, and the OpenAPI document lists every
route, parameter and path rule of a site's service. So `/openapi.json` takes the X-API-Key
header (what scripts and generated clients send), and the pages that render it live under
`/ui/`, where the browser's signed-in session cookie reaches them (the cookie's path is
`/ui`, and a browser cannot add a header to a page it navigates to). `/docs` and `/redoc`
stay as the addresses people type: they redirect there, and sign-in comes first where
needed. Swagger UI and ReDoc load from the assets packaged in fastapi-offline: FastAPI's own
pages fetch them from a CDN, and at an offline screening site they rendered blank.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from service.auth import ApiKey
from service.ui.deps import UiSession

ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/static-offline-docs"

router = APIRouter(include_in_schema=False)


def _openapi(request: Request) -> JSONResponse:
    """Under a proxy's prefix the document names it as its server: Swagger's "Try it out" and
    generated clients called /v1/... outside the proxy's location (FastAPI adds it only for
    its own openapi route)."""
    doc, root = request.app.openapi(), request.scope.get("root_path", "")
    return JSONResponse({**doc, "servers": [{"url": root}]} if root else doc)


@router.get("/openapi.json", dependencies=[ApiKey])
def openapi_for_scripts(request: Request) -> JSONResponse:
    return _openapi(request)


@router.get("/ui/openapi.json")
def openapi_for_pages(request: Request, _: UiSession) -> JSONResponse:
    return _openapi(request)


@router.get("/docs")
def docs_address() -> RedirectResponse:
    return RedirectResponse("/ui/docs", status_code=307)


@router.get("/redoc")
def redoc_address() -> RedirectResponse:
    return RedirectResponse("/ui/redoc", status_code=307)


@router.get("/ui/docs")
def swagger_page(request: Request, _: UiSession) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(openapi_url=f"{root}/ui/openapi.json", title="cervixqc - Swagger UI",
                               swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png")


@router.get("/ui/redoc")
def redoc_page(request: Request, _: UiSession) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(openapi_url=f"{root}/ui/openapi.json", title="cervixqc - ReDoc",
                          redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js", with_google_fonts=False,
                          redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png")
