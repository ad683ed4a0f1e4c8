"""HTTPS settings: the certificate and key are checked before anything starts, and the
listener probe tells TLS from plain HTTP."""

import socket
import ssl
import threading

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aiplatform.core.errors import ConfigError
from aiplatform.core.settings import Settings
from aiplatform.core.tls import speaks_tls, tls_files
from aiplatform.serving.config import AppArgs, serve_config


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tmp = tmp_path_factory.mktemp("tls")
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp / "other-key.pem").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp / "encrypted-key.pem").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    return tmp


def test_no_files_means_no_tls():
    assert tls_files(None, None) is None
    assert tls_files("", "  ") is None


def test_a_good_pair_is_accepted_as_absolute_paths(pem, monkeypatch):
    monkeypatch.chdir(pem)
    files = tls_files("cert.pem", "key.pem")
    assert files.certfile == str(pem / "cert.pem") and files.keyfile == str(pem / "key.pem")
    assert files.http_options() == {"ssl_certfile": str(pem / "cert.pem"), "ssl_keyfile": str(pem / "key.pem")}


@pytest.mark.parametrize("cert, key, words", [
    ("cert.pem", None, ["certificate is set but not the key", "--tls-key"]),
    (None, "key.pem", ["key is set but not the certificate", "--tls-cert"]),
    ("missing.pem", "key.pem", ["missing.pem", "no such file"]),
    ("cert.pem", "other-key.pem", ["cannot be used together", "the key must be the certificate's"]),
    ("cert.pem", "encrypted-key.pem", ["encrypted-key.pem", "is encrypted", "openssl pkey"]),
])
def test_a_bad_pair_is_refused_naming_the_file_and_the_fix(pem, cert, key, words):
    with pytest.raises(ConfigError) as info:
        tls_files(cert and str(pem / cert), key and str(pem / key))
    for word in words:
        assert word in str(info.value)


def test_serve_build_paths_are_the_clusters_and_are_not_read_here():
    files = tls_files("/etc/aiplatform/tls/tls.crt", "/etc/aiplatform/tls/tls.key", check=False)
    config = serve_config(AppArgs(), tls=files)
    assert config["http_options"]["ssl_certfile"] == "/etc/aiplatform/tls/tls.crt"
    assert config["http_options"]["ssl_keyfile"] == "/etc/aiplatform/tls/tls.key"
    assert "ssl_certfile" not in serve_config(AppArgs())["http_options"]


def test_a_certificate_chooses_the_python_proxy(monkeypatch):
    for var in ("AIPLATFORM_SERVE_INGRESS", "AIPLATFORM_TLS_CERTFILE", "AIPLATFORM_TLS_KEYFILE"):
        monkeypatch.delenv(var, raising=False)
    assert Settings.load().ingress() == "haproxy"
    monkeypatch.setenv("AIPLATFORM_TLS_CERTFILE", "/c.pem")
    monkeypatch.setenv("AIPLATFORM_TLS_KEYFILE", "/k.pem")
    assert Settings.load().ingress() == "proxy"


def _serve_once(wrap) -> tuple[int, threading.Thread]:
    """A listener on 127.0.0.1 that accepts connections (wrapped in TLS when ``wrap`` is given)
    until it is closed; returns its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        with server:
            server.settimeout(10)
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    if wrap is not None:
                        with wrap.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(1)
                    else:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def test_the_probe_tells_tls_from_plain_http(pem):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pem / "cert.pem"), str(pem / "key.pem"))
    port, thread = _serve_once(context)
    assert speaks_tls("127.0.0.1", port)
    thread.join(10)
    port, thread = _serve_once(None)
    assert not speaks_tls("127.0.0.1", port)
    thread.join(10)
