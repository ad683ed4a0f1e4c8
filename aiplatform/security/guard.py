"""The check every HTTP route makes: which key was presented, and may its role call this route.

A ``KeyGuard`` lives in each serving replica. It holds the keys the application was deployed
with (``AIPLATFORM_API_KEYS``, resolved once where the application was built) and re-reads the
storage root's key file every ``refresh_s`` seconds in a background thread, so ``aiplatform
keys create`` and ``revoke`` take effect on running replicas without a redeploy. A refresh that
fails keeps the last good keys (a storage hiccup must not lock every client out) and says so.
"""

from __future__ import annotations

import logging
import threading

from aiplatform.security.keys import ApiKey, Authenticator, KeyStore, Role

log = logging.getLogger(__name__)

AUTH_MODES = ("keys", "off")
ANONYMOUS = ApiKey(name="anonymous", role=Role.admin, sha256="", source="auth off")


class Denied(Exception):
    """Why a request may not pass: ``status`` 401 (no or unknown key) or 403 (role too low)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyGuard:
    """Authenticates and authorises requests for one replica (``mode`` ``keys`` or ``off``)."""

    def __init__(self, home: str, mode: str = "keys", env_keys: list[ApiKey] | None = None,
                 refresh_s: float = 5.0) -> None:
        if mode not in AUTH_MODES:
            raise ValueError(f"auth mode {mode!r}: expected one of {AUTH_MODES}")
        self.mode = mode
        self._store = KeyStore(home, env="")
        self._env_keys = list(env_keys or [])
        self._auth = Authenticator(self._env_keys)
        self._stop = threading.Event()
        if mode == "keys":
            self.refresh()
            threading.Thread(target=self._refresh_loop, args=(refresh_s,), daemon=True,
                             name="aiplatform-keys").start()

    @property
    def open(self) -> bool:
        return self.mode == "off"

    def refresh(self) -> None:
        try:
            self._auth = Authenticator(self._store.file_keys() + self._env_keys)
        except Exception as exc:  # keep serving with the keys we had
            log.warning("could not re-read the API keys at %s (keeping the %d known): %s",
                        self._store.path, len(self._auth), exc)

    def _refresh_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()

    def keys(self) -> list[ApiKey]:
        """The keys admitted now (a browser session is checked against these on every request,
        so a revoked key ends its sessions too)."""
        return self._auth.keys()

    def check(self, authorization: str | None, role: Role) -> ApiKey:
        """The caller's key if it may act as ``role``; else raise ``Denied``."""
        if self.open:
            return ANONYMOUS
        token = bearer_token(authorization)
        if token is None:
            raise Denied(401, "missing API key: send `Authorization: Bearer <key>` (create a key with "
                              "`aiplatform keys create --role reader`)")
        key = self._auth.identify(token)
        if key is None:
            raise Denied(401, "unknown or revoked API key: check the key, or create one with "
                              "`aiplatform keys create`")
        if key.role < role:
            raise Denied(403, f"key {key.name!r} has role {key.role.name}; this route needs {role.name} or higher")
        return key
