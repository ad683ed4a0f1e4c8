"""A Ray node's TLS certificate, issued at pod start by the cluster's own CA.

Ray encrypts its gRPC traffic between processes and nodes when ``RAY_USE_TLS=1``; every node
then needs a certificate for the address others dial, which on Kubernetes is the pod's IP, known
only when the pod starts. The manifests run this module in an init container: it reads the CA
from a Secret and writes the node's key and certificate to a volume the Ray container reads::

    python -m aiplatform.security.node_cert --ca-dir /etc/ray/ca --out /etc/ray/tls

It uses ``cryptography`` (the library behind most Python TLS tooling) rather than an ``openssl``
binary, which slim images do not ship, so the image that runs Ray also issues its certificate.
"""

import argparse
import datetime as dt
import ipaddress
import os
import socket
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365  # a pod lives far shorter; the CA's own validity bounds it anyway


def _names(ips: list[str], dns: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for ip in dict.fromkeys(ips):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise SystemExit(f"node_cert: {ip!r} is not an IP address (--ip / $POD_IP)") from exc
    out.extend(x509.DNSName(name) for name in dict.fromkeys(dns) if name)
    return out


def issue(ca_cert: x509.Certificate, ca_key, ips: list[str], dns: list[str],
          now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a certificate for ``ips``/``dns`` signed by the CA, both PEM.

    Server and client usage both: Ray's processes dial each other with the same certificate."""
    now = now or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or ips or ["ray-node"])[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # clock skew between nodes
        .not_valid_after(min(now + dt.timedelta(days=VALID_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_names(ips, dns)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def default_dns_names(env: "os._Environ[str] | dict[str, str]") -> list[str]:
    """The names other nodes may dial this one by: its host name, localhost, KubeRay's head
    service name (``FQ_RAY_IP``, set in worker pods) and every service of the pod's namespace
    (the head's service name is generated per cluster: a RayJob's cluster gets a new one)."""
    names = [socket.gethostname(), "localhost"]
    fq = env.get("FQ_RAY_IP", "").strip()
    if fq and not _is_ip(fq):
        names.append(fq)
    namespace = env.get("POD_NAMESPACE", "").strip()
    if namespace:
        names += [f"*.{namespace}.svc.cluster.local", f"*.{namespace}.svc"]
    return names


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _read_ca(ca_dir: Path) -> tuple[x509.Certificate, object, bytes]:
    cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    for path in (cert_path, key_path):
        if not path.is_file():
            raise SystemExit(f"node_cert: {path} not found: mount the CA Secret (keys ca.crt and ca.key) there "
                             "(cluster/README.md, 'TLS')")
    ca_pem = cert_path.read_bytes()
    return (x509.load_pem_x509_certificate(ca_pem),
            serialization.load_pem_private_key(key_path.read_bytes(), password=None), ca_pem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Issue this Ray node's TLS certificate from the cluster CA.")
    parser.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.crt and ca.key")
    parser.add_argument("--out", type=Path, required=True, help="folder to write tls.crt, tls.key, ca.crt")
    parser.add_argument("--ip", action="append", default=[], help="an IP SAN (default: $POD_IP and 127.0.0.1)")
    parser.add_argument("--dns", action="append", default=[], help="a DNS SAN (default: the host name, localhost)")
    args = parser.parse_args(argv)
    ips = args.ip or [ip for ip in (os.environ.get("POD_IP", ""), "127.0.0.1") if ip]
    dns = args.dns or default_dns_names(os.environ)
    ca_cert, ca_key, ca_pem = _read_ca(args.ca_dir)
    cert_pem, key_pem = issue(ca_cert, ca_key, ips, dns)
    args.out.mkdir(parents=True, exist_ok=True)
    key_path = args.out / "tls.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    (args.out / "tls.crt").write_bytes(cert_pem)
    (args.out / "ca.crt").write_bytes(ca_pem)
    print(f"node_cert: wrote {args.out}/tls.crt for {', '.join(ips + dns)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
