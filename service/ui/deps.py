"""What every /ui route depends on: the signed-in session, the CSRF check, templates."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from service.errors import ApiError
from service.jobs.reviews import CLASS_WORDS, CLASSES
from service.media_type import FORM, MULTIPART, media_type
from service.root_path import route_path
from service.ui.session import COOKIE, Session, SessionSigner, csrf_ok, key_id

HERE = Path(__file__).parent
# the scripts' and styles' content in their URLs (`?v=`): a browser that kept an older common.js
# beside a newer item.js after an upgrade broke the image page until a hard reload
STATIC_VERSION = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((HERE / "static").iterdir())
                                         if p.is_file())).hexdigest()[:12]
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals.update(words=CLASS_WORDS, classes=CLASSES, static_v=STATIC_VERSION)


def when(t: float | None) -> Markup:
    """A time as the pages show it, in UTC as the exports write it: the pages showed none (two
    runs over one folder told apart by their ids alone, a decision without its time)."""
    if not t:
        return Markup("")
    at = datetime.fromtimestamp(t, timezone.utc)
    return Markup('<time datetime="{}">{}</time>').format(at.isoformat(timespec="seconds"),
                                                          at.strftime("%Y-%m-%d %H:%M UTC"))


templates.env.filters["when"] = when


class SignInNeeded(Exception):
    """A page asked for without a session: answered with a redirect to the sign-in page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def signer(request: Request) -> SessionSigner:
    return request.app.state.session_signer


def wants_page(request: Request) -> bool:
    """A browser opening a page (a link, the address bar), not a script's request."""
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def browser_form(request: Request) -> bool:
    """A page's own form sent by a browser (Apply, Cancel, Start job, sign out): its refusal is
    shown as a page too. An expired session, Apply on a job running again or a full quarantine
    answered the form with raw JSON (an audit). The pages' scripts send JSON, and keep it."""
    return (request.method == "POST" and media_type(request) in (FORM, MULTIPART)
            and "text/html" in request.headers.get("accept", ""))


def current_session(request: Request) -> Session:
    """A page without a session redirects to sign-in; a script's request (JSON, POST) gets 401.
    A session stands only while the key it signed in with is still configured: the signing
    secret outlives restarts, so without this check a key taken out of CERVIXQC_API_KEYS kept
    its pages open until the cookie expired (8 h)."""
    session = signer(request).read(request.cookies.get(COOKIE))
    settings = request.app.state.settings
    if session is not None and (settings.auth_disabled or session.who in {key_id(k) for k in settings.api_keys}):
        return session
    if wants_page(request):
        target = route_path(request.scope) + (f"?{request.url.query}" if request.url.query else "")
        raise SignInNeeded(quote(target, safe=""))
    raise ApiError(401, "unauthorized", "sign in at /ui/login first")


async def checked_session(request: Request, session: Annotated[Session, Depends(current_session)]) -> Session:
    """For every POST: the session plus its CSRF token, from the X-CSRF-Token header (scripts)
    or the `csrf` form field (plain forms)."""
    given = request.headers.get("x-csrf-token")
    if given is None and media_type(request) == FORM:
        given = (await request.form()).get("csrf")  # type: ignore[assignment]
    if not csrf_ok(session.csrf, given):
        raise ApiError(403, "csrf", "missing or wrong CSRF token: reload the page and try again")
    return session


UiSession = Annotated[Session, Depends(current_session)]
UiPost = Annotated[Session, Depends(checked_session)]


def page(request: Request, name: str, session: Session | None, status_code: int = 200, **context: object):
    base = request.scope.get("root_path", "")  # every link's prefix: service/root_path.py
    # no-store: PageHeaders
    return templates.TemplateResponse(request, name, {"session": session, "base": base, **context},
                                      status_code=status_code)
