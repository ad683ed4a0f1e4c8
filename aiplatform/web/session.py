"""Browser sessions of the pages: signed cookies and CSRF tokens.

Why a signed cookie rather than the API key: an admin key in a browser would be readable by any
script on the page and would outlive the tab. Signing in trades the key for a cookie that holds
only the key's *name*, role and SHA-256 (never the key), signed with a secret kept under the
storage root (``security/web_session_secret.json``), so every replica of the application
verifies the cookies of the others. On every request the session is checked against the keys
the replica admits now: revoking the key ends its sessions within the key file's refresh.

The cookie is HttpOnly (no script reads it), SameSite=Strict for the console (no other site can
make the browser send it) and Secure when the page was requested over HTTPS. Every form carries
a CSRF token: an HMAC of the session's random id under the same secret (a session-bound token),
checked in constant time, so a form posted from elsewhere is refused even if a browser ignored
SameSite. Signing in issues a new session id (no session fixation).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from aiplatform.core import storage
from aiplatform.security.keys import ApiKey, Role

SECRET_FILE = ("security", "web_session_secret.json")
CONSOLE_COOKIE = "aip_console"
SHOP_COOKIE = "aip_shop"
CONSOLE_MAX_AGE_S = 8 * 3600
"""A console session lasts a working day; signing in again is one paste of the key."""
SHOP_MAX_AGE_S = 30 * 86400


def secret_path(root: str) -> str:
    return storage.join(root, *SECRET_FILE)


def load_secret(root: str) -> bytes:
    """The storage root's session secret, created (32 random bytes) the first time.

    Written then read back: when two replicas start at once and both create one, both end up
    with whichever write landed last, so a cookie signed by one verifies in the other."""
    path = secret_path(root)
    found = storage.read_json(path)
    if not found or not found.get("secret"):
        storage.write_json(path, {"secret": secrets.token_hex(32),
                                  "note": "signs the console's session cookies; delete it to end every session"})
        if not storage.is_uri(path):
            os.chmod(path, 0o600)
        found = storage.read_json(path)
    return bytes.fromhex(found["secret"])


@dataclass
class Session:
    """What a cookie carries: a random id (the CSRF token's seed) and, once signed in, the key's
    name, role and SHA-256; ``visitor`` is the storefront's anonymous shopper id."""

    sid: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    key_name: str = ""
    role: int = 0
    sha256: str = ""
    visitor: str = ""

    @property
    def signed_in(self) -> bool:
        return bool(self.key_name)

    def as_dict(self) -> dict[str, Any]:
        return {"sid": self.sid, "key": self.key_name, "role": self.role, "sha": self.sha256, "visitor": self.visitor}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Session:
        return cls(sid=str(data["sid"]), key_name=str(data.get("key") or ""), role=int(data.get("role") or 0),
                   sha256=str(data.get("sha") or ""), visitor=str(data.get("visitor") or ""))


class SessionCodec:
    """Signs and verifies session cookies and derives their CSRF tokens (one secret)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the session secret must be at least 16 bytes")
        self._secret = secret
        self._serializers = {name: URLSafeTimedSerializer(secret, salt=f"aiplatform-{name}", signer_kwargs={
            "digest_method": hashlib.sha256}) for name in (CONSOLE_COOKIE, SHOP_COOKIE)}

    def dumps(self, cookie: str, session: Session) -> str:
        return self._serializers[cookie].dumps(session.as_dict())

    def loads(self, cookie: str, value: str | None, max_age_s: int) -> Session | None:
        """The session of a cookie value; None when absent, tampered with, malformed or older
        than ``max_age_s``."""
        if not value:
            return None
        try:
            data = self._serializers[cookie].loads(value, max_age=max_age_s)
            return Session.from_dict(data)
        except (BadSignature, KeyError, TypeError, ValueError):
            return None

    def csrf_token(self, session: Session) -> str:
        return hmac.new(self._secret, f"csrf:{session.sid}".encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: Session | None, token: str | None) -> bool:
        if session is None or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session), token)


def signed_in(key: ApiKey) -> Session:
    """A fresh session (new id) for a key that just signed in."""
    return Session(key_name=key.name, role=int(key.role), sha256=key.sha256)


def current_key(session: Session | None, admitted: list[ApiKey]) -> ApiKey | None:
    """The key a signed-in session stands for, if the replica still admits it with that name
    and hash (a revoked or replaced key ends the session); its role is the key's role now."""
    if session is None or not session.signed_in:
        return None
    for key in admitted:
        if key.name == session.key_name and hmac.compare_digest(key.sha256, session.sha256):
            return key
    return None


def cookie_options(https: bool, max_age_s: int, same_site: str) -> dict[str, Any]:
    """``Response.set_cookie`` arguments: HttpOnly always, Secure over HTTPS."""
    return {"max_age": max_age_s, "httponly": True, "secure": https, "samesite": same_site, "path": "/"}


__all__ = ["CONSOLE_COOKIE", "CONSOLE_MAX_AGE_S", "SHOP_COOKIE", "SHOP_MAX_AGE_S", "Role", "Session", "SessionCodec",
           "cookie_options", "current_key", "load_secret", "secret_path", "signed_in"]
