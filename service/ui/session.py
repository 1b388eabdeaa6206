"""Browser sessions: an API key is exchanged once for a signed cookie.

The cookie holds the key's id (sha256 prefix, never the key), an expiry and a random nonce,
signed with HMAC-SHA256 under a secret kept in STATE_DIR (0600), so sessions survive a
restart and a secret leaked with a backup only signs sessions, never opens the JSON API.
Stdlib hmac rather than itsdangerous: it is 20 lines and one dependency fewer for the image.

CSRF: every POST under /ui carries a token derived from the session's nonce (form field
`csrf` or header `X-CSRF-Token`), so a page on another origin cannot post as the user even
where SameSite is not honoured. The sign-in form, before any session exists, uses a
double-submit cookie instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response

from pipelines.outputs import write_atomically

log = logging.getLogger(__name__)

COOKIE = "cervixqc_session"
LOGIN_COOKIE = "cervixqc_login_csrf"


def key_id(key: str) -> str:
    """What decisions record as 'who': enough to tell keys apart, useless to an attacker."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def load_secret(path: Path) -> bytes:
    """The signing secret, made once (0600) and kept beside the job database. An operator's
    own secret shorter than 32 bytes is refused (it used to be replaced without a word), and
    one that others may read is made private (0600) with a warning: anyone who reads it can
    sign a session."""
    if path.is_file():
        secret = path.read_bytes().strip()
        if secret and len(secret) < 32:
            raise ValueError(f"the session secret in {path} is {len(secret)} bytes; it needs at least 32 "
                             "(delete the file and the service makes one)")
        if secret:
            if path.stat().st_mode & 0o077:
                try:
                    os.chmod(path, 0o600)
                    log.warning("the session secret file was readable by others: made private (0600)")
                except OSError:
                    log.warning("the session secret file is readable by others and cannot be made private")
            return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48).encode()

    def private(tmp: Path) -> None:  # 0600 from its first byte
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(secret)

    write_atomically(path, private)  # written in place, a crash left it empty (an audit)
    return secret


@dataclass(frozen=True)
class Session:
    who: str
    expires: float
    nonce: str
    csrf: str


class RevokedSessions:
    """Sessions signed out before they expire, by nonce, until they would have expired: the
    cookie is signed, not stored, so without this a copy of it (a shared computer's browser
    profile, a proxy log) opened the pages for the rest of its 8 hours after sign-out."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._db().execute("CREATE TABLE IF NOT EXISTS revoked (nonce TEXT PRIMARY KEY, expires REAL NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        return db

    def revoke(self, nonce: str, expires: float) -> None:
        db = self._db()
        db.execute("DELETE FROM revoked WHERE expires < ?", (time.time(),))  # kept small: the expired go
        db.execute("INSERT OR REPLACE INTO revoked VALUES (?, ?)", (nonce, expires))

    def __contains__(self, nonce: str) -> bool:
        return self._db().execute("SELECT 1 FROM revoked WHERE nonce = ?", (nonce,)).fetchone() is not None


class SessionSigner:
    def __init__(self, secret: bytes, max_age_s: float, revoked: RevokedSessions | None = None) -> None:
        self.secret, self.max_age_s, self.revoked = secret, max_age_s, revoked

    def revoke(self, session: Session) -> None:
        if self.revoked is not None:
            self.revoked.revoke(session.nonce, session.expires)

    def _mac(self, payload: bytes) -> str:
        return hmac.new(self.secret, payload, hashlib.sha256).hexdigest()

    def csrf_for(self, nonce: str) -> str:
        return self._mac(b"csrf|" + nonce.encode())

    def issue(self, who: str) -> str:
        """A new session's cookie value."""
        nonce = secrets.token_urlsafe(16)
        expires = time.time() + self.max_age_s
        payload = base64.urlsafe_b64encode(json.dumps({"who": who, "exp": expires, "n": nonce}).encode())
        return f"{payload.decode()}.{self._mac(payload)}"

    def read(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        payload, mac = cookie.rsplit(".", 1)
        # as bytes: compare_digest refuses non-ASCII text with a TypeError, and a cookie of
        # other characters answered every page with a 500 instead of the sign-in page
        if not hmac.compare_digest(mac.encode("utf-8", "surrogateescape"), self._mac(payload.encode(
                "utf-8", "surrogateescape")).encode()):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload.encode()))
            who, expires, nonce = str(data["who"]), float(data["exp"]), str(data["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < time.time() or (self.revoked is not None and nonce in self.revoked):
            return None
        return Session(who, expires, nonce, self.csrf_for(nonce))


def cookie_path(request: Request) -> str:
    """The pages' folder as the browser sees it: under a proxy's prefix, a cookie for `/ui` was
    never sent back, and no one could sign in."""
    return request.scope.get("root_path", "") + "/ui"


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
    """HttpOnly and SameSite=Strict always; Secure whenever the page came over HTTPS (behind a
    proxy, uvicorn trusts its X-Forwarded-Proto from FORWARDED_ALLOW_IPS: README, "Behind a
    reverse proxy")."""
    response.set_cookie(name, value, max_age=max_age, path=cookie_path(request), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def delete_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path=cookie_path(request))


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())
