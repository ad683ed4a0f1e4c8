"""The Ray node certificate that the manifests' init containers issue from the cluster CA."""

import ipaddress
import stat

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from aiplatform.security import node_cert


@pytest.fixture()
def ca_dir(tmp_path):
    ca = trustme.CA()
    folder = tmp_path / "ca"
    folder.mkdir()
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    ca.private_key_pem.write_to_path(str(folder / "ca.key"))
    return folder


def test_the_pod_certificate_is_signed_by_the_ca_for_its_ip_and_namespace(ca_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("POD_IP", "10.4.0.17")
    monkeypatch.setenv("POD_NAMESPACE", "aiplatform")
    monkeypatch.setenv("FQ_RAY_IP", "recommender-head-svc.aiplatform.svc.cluster.local")
    out = tmp_path / "tls"
    assert node_cert.main(["--ca-dir", str(ca_dir), "--out", str(out)]) == 0

    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if another key signed it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.4.0.17"),
                                                              ipaddress.ip_address("127.0.0.1")}
    names = set(san.get_values_for_type(x509.DNSName))
    assert {"localhost", "recommender-head-svc.aiplatform.svc.cluster.local",
            "*.aiplatform.svc.cluster.local", "*.aiplatform.svc"} <= names
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()


def test_explicit_names_replace_the_defaults(ca_dir, tmp_path):
    out = tmp_path / "tls"
    node_cert.main(["--ca-dir", str(ca_dir), "--out", str(out), "--ip", "127.0.0.1", "--dns", "node-a"])
    san = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-a"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_a_missing_ca_or_a_bad_ip_says_what_to_mount(tmp_path, ca_dir):
    with pytest.raises(SystemExit, match="ca.crt not found: mount the CA Secret"):
        node_cert.main(["--ca-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "tls")])
    with pytest.raises(SystemExit, match="'not-an-ip' is not an IP address"):
        node_cert.main(["--ca-dir", str(ca_dir), "--out", str(tmp_path / "tls"), "--ip", "not-an-ip"])
