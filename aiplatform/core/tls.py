"""HTTPS for the served API: the certificate and key files, checked before anything starts.

Ray Serve terminates TLS in its Python proxy (``http_options.ssl_certfile`` / ``ssl_keyfile``).
Its HAProxy ingress (Ray 2.60) serves plain HTTP only, so a server with TLS runs the Python
proxy, and after start-up the port is probed with a real handshake: a proxy that kept speaking
plain HTTP (a cluster started earlier with another ingress) is refused instead of serving
cleartext to clients that asked for HTTPS.

The files are loaded with :mod:`ssl` here, so a missing file, a key that does not match the
certificate or a password-protected key fails with a message naming the file, not as a proxy
that never comes up.
"""

import os
import socket
import ssl
from dataclasses import dataclass

from aiplatform.core.errors import ConfigError

CERT_ENV = "AIPLATFORM_TLS_CERTFILE"
KEY_ENV = "AIPLATFORM_TLS_KEYFILE"


@dataclass(frozen=True)
class TlsFiles:
    """PEM certificate (chain) and private key of the HTTPS listener."""

    certfile: str
    keyfile: str

    def http_options(self) -> dict[str, str]:
        """Serve's ``http_options`` entries that turn its proxy's listener into HTTPS."""
        return {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile}


def tls_files(certfile: str | None, keyfile: str | None, *, check: bool = True) -> TlsFiles | None:
    """``TlsFiles`` for the pair (``None`` when neither is given).

    ``check`` loads both into an SSL context here: on the machine that serves, a problem is a
    ``ConfigError`` now. ``serve build`` passes ``check=False``: its paths are the cluster's."""
    certfile, keyfile = (certfile or "").strip() or None, (keyfile or "").strip() or None
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        given, missing = ("certificate", "key") if certfile else ("key", "certificate")
        raise ConfigError(f"TLS needs both a certificate and a key: the {given} is set but not the {missing} "
                          f"(--tls-cert/--tls-key, or {CERT_ENV}/{KEY_ENV})")
    files = TlsFiles(os.path.abspath(certfile) if check else certfile, os.path.abspath(keyfile) if check else keyfile)
    if check:
        _load(files)
    return files


def _load(files: TlsFiles) -> None:
    for label, path in (("certificate", files.certfile), ("key", files.keyfile)):
        if not os.path.isfile(path):
            raise ConfigError(f"TLS {label} {path}: no such file (a PEM file; --tls-cert/--tls-key)")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"TLS {label} {path}: not readable by this user")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A callback instead of a prompt: Serve's proxy cannot type a password either.
        context.load_cert_chain(files.certfile, files.keyfile, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS certificate {files.certfile} and key {files.keyfile} cannot be used together "
                          f"({exc.reason or exc}): both must be PEM, and the key must be the certificate's "
                          "and not encrypted") from exc
    except _EncryptedKey as exc:
        raise ConfigError(f"TLS key {files.keyfile} is encrypted: give an unencrypted PEM key (e.g. "
                          "`openssl pkey -in KEY -out PLAIN`), readable only by the serving user") from exc


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey()


def speaks_tls(host: str, port: int, timeout_s: float = 5.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake (the certificate is not verified here:
    this asks what the listener speaks, not whom to trust)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except (ssl.SSLError, OSError):
        return False
