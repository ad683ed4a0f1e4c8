"""API keys and roles: who may call which route of the HTTP API.

A key is 32 random bytes (``aip_`` + URL-safe base64), shown once when it is created; what is
stored is its SHA-256, its name and its role, so a copy of the store (a backup, a Kubernetes
Secret, a log line) never lets anyone call the API. A salted slow hash (bcrypt, argon2) would
add nothing for keys with 256 bits of entropy and would cost milliseconds per request.

Keys come from two places, both read where the application runs:

- the key file of the storage root, ``security/api_keys.json`` (``aiplatform keys create /
  list / revoke``), re-read by every replica every few seconds, so a revoked key stops working
  without a redeploy;
- ``AIPLATFORM_API_KEYS``: ``name:role:sha256`` entries separated by commas (``aiplatform keys
  create --print-entry`` prints one), for a Secret mounted as an environment variable.

Roles are ordered: ``reader`` (recommendations, similar items) < ``writer`` (events, and what a
reader may) < ``admin`` (models, experiments, and everything else).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import IntEnum

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError, NotFoundError, UserInputError

KEYS_ENV = "AIPLATFORM_API_KEYS"
KEY_PREFIX = "aip_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Role(IntEnum):
    """What a key may do; a higher role may do everything a lower one may."""

    reader = 1
    writer = 2
    admin = 3

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value.strip().lower()]
        except KeyError:
            raise UserInputError(f"role {value!r}: expected one of reader, writer, admin") from None


@dataclass(frozen=True)
class ApiKey:
    """A key as stored: never the key itself."""

    name: str
    role: Role
    sha256: str
    created_at: str = ""
    created_by: str = ""
    source: str = "file"  # "file" or "env"

    def as_json(self) -> dict:
        return {"name": self.name, "role": self.role.name, "sha256": self.sha256,
                "created_at": self.created_at, "created_by": self.created_by}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def keys_path(home: str) -> str:
    return storage.join(home, "security", "api_keys.json")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserInputError(f"key name {name!r}: 1-64 letters, digits, '_', '.' or '-', starting with a "
                             "letter or digit")
    return name


def parse_env_keys(raw: str) -> list[ApiKey]:
    """``name:role:sha256,…`` (the form of ``AIPLATFORM_API_KEYS``); a bad entry is a ConfigError
    that names it, so a typo in a Secret fails the deploy instead of locking everyone out."""
    out = []
    for n, entry in enumerate(e.strip() for e in raw.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3 or not _SHA256.match(parts[2].strip().lower()):
            raise ConfigError(f"{KEYS_ENV} entry {n + 1}: expected name:role:sha256 (64 hex digits), got "
                              f"{entry[:40]!r}; `aiplatform keys create --print-entry` prints one")
        name, role, digest = (p.strip() for p in parts)
        try:
            out.append(ApiKey(_check_name(name), Role.parse(role), digest.lower(), source="env"))
        except UserInputError as exc:
            raise ConfigError(f"{KEYS_ENV} entry {n + 1}: {exc}") from None
    return out


class KeyStore:
    """The keys of one storage root (its key file) plus those of ``AIPLATFORM_API_KEYS``."""

    def __init__(self, home: str, env: str | None = None) -> None:
        self.home = home
        self.path = keys_path(home)
        self.env_keys = parse_env_keys(os.environ.get(KEYS_ENV, "") if env is None else env)

    def file_keys(self) -> list[ApiKey]:
        data = storage.read_json(self.path, default={"keys": []})
        try:
            return [ApiKey(k["name"], Role[k["role"]], k["sha256"], k.get("created_at", ""),
                           k.get("created_by", "")) for k in data.get("keys", [])]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{self.path}: not a key file ({exc!r}); restore it or delete it and create "
                              "keys again with `aiplatform keys create`") from None

    def all(self) -> list[ApiKey]:
        return self.file_keys() + self.env_keys

    def create(self, name: str, role: Role, created_by: str = "") -> tuple[str, ApiKey]:
        """A new key for ``name``: the key (to show once) and what was stored."""
        keys = self.file_keys()
        if any(k.name == _check_name(name) for k in keys + self.env_keys):
            raise UserInputError(f"a key named {name!r} exists: revoke it first (aiplatform keys revoke {name}) "
                                 "or choose another name")
        key = new_key()
        stored = ApiKey(name, role, hash_key(key), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        created_by)
        self._write(keys + [stored])
        return key, stored

    def revoke(self, name: str) -> ApiKey:
        keys = self.file_keys()
        found = next((k for k in keys if k.name == name), None)
        if found is None:
            where = " (it comes from AIPLATFORM_API_KEYS: remove it there)" if any(
                k.name == name for k in self.env_keys) else ""
            raise NotFoundError(f"no key named {name!r} in {self.path}{where}; `aiplatform keys list` shows them")
        self._write([k for k in keys if k.name != name])
        return found

    def _write(self, keys: list[ApiKey]) -> None:
        storage.write_json(self.path, {"keys": [k.as_json() for k in keys]})


class Authenticator:
    """Maps a presented key to its stored entry, in constant time per candidate."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_hash = {k.sha256: k for k in keys}

    def __len__(self) -> int:
        return len(self._by_hash)

    def keys(self) -> list[ApiKey]:
        return list(self._by_hash.values())

    def identify(self, presented: str | None) -> ApiKey | None:
        if not presented:
            return None
        digest = hash_key(presented)
        found = self._by_hash.get(digest)
        # the dict lookup is on a hash of the key, so its timing says nothing about the key
        return found if found is not None and hmac.compare_digest(found.sha256, digest) else None
