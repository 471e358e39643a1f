"""`dicom-proxy certs issue`: per-device certificates from the development CA, checked with
`openssl verify` (an independent verifier) and never overwritten without --force."""

from __future__ import annotations

import datetime
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import certs, cli, tls
from tests.peers import require_tool

WAIT = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return certs.init(tmp_path_factory.mktemp("ca"))["ca"].parent


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def openssl_verify(ca: Path, cert: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("openssl"), "verify", "-CAfile", str(ca), "-purpose", purpose, str(cert)],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["certs", "issue", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_issue_a_client_certificate_for_a_modality(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "--ca", str(ca_dir), "--cn", "CT 01", "--san", "ct01.ward.example",
        "--san", "IP:10.0.0.7,DNS:ct01", "--client", "--days", "7", "--out", str(tmp_path / "devices"),
    )  # fmt: skip
    assert (code, err) == (0, "")
    cert_path, key_path = tmp_path / "devices" / "ct-01.pem", tmp_path / "devices" / "ct-01.key"
    assert f"     certificate: {cert_path}\n             key: {key_path}\n" in out
    assert f"ca: {ca_dir / 'ca.pem'}" in out and "client authentication only" in out
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    cert = load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "CT 01"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ct01.ward.example", "ct01"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=6) < lifetime <= datetime.timedelta(days=7)

    facts = tls.cert_facts_from_der(cert.public_bytes(serialization.Encoding.DER))
    assert (facts.subject_cn, facts.sans) == ("CT 01", ("ct01.ward.example", "ct01", "10.0.0.7"))

    assert openssl_verify(ca_dir / "ca.pem", cert_path, "sslclient").returncode == 0
    refused = openssl_verify(ca_dir / "ca.pem", cert_path, "sslserver")
    assert refused.returncode != 0 and "unsuitable certificate purpose" in refused.stdout + refused.stderr


def test_default_is_a_server_and_client_certificate_next_to_the_ca(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = certs.init(tmp_path_factory.mktemp("own-ca"))["ca"].parent
    code, out, _ = run(capsys, "--ca", str(ca), "--cn", "pacs.example", "--san", "pacs.example", "--name", "pacs")
    assert code == 0 and "server and client authentication" in out
    cert_path = ca / "pacs.pem"
    assert (ca / "pacs.key").is_file()
    usages = set(load(cert_path).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for purpose in ("sslserver", "sslclient"):
        assert openssl_verify(ca / "ca.pem", cert_path, purpose).returncode == 0


def test_refuses_to_overwrite_without_force(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--ca", str(ca_dir), "--cn", "US01", "--client", "--out", str(tmp_path))
    assert run(capsys, *argv)[0] == 0
    before = (tmp_path / "us01.pem").read_bytes(), (tmp_path / "us01.key").read_bytes()
    code, out, err = run(capsys, *argv)
    assert (code, out) == (1, "")
    assert err.startswith("error: refusing to overwrite ") and "(use --force to replace them)" in err
    assert ((tmp_path / "us01.pem").read_bytes(), (tmp_path / "us01.key").read_bytes()) == before
    assert run(capsys, *argv, "--force")[0] == 0
    assert (tmp_path / "us01.pem").read_bytes() != before[0]


def test_warns_when_the_certificate_outlives_the_ca(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--ca", str(ca_dir), "--cn", "MR01", "--client", "--days", "400", "--out", str(tmp_path))
    assert code == 0 and err.startswith("warning: the CA expires on ")


def test_missing_ca_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--ca", str(tmp_path / "nowhere"), "--cn", "X")
    assert (code, out) == (1, "")
    assert err.startswith(f"error: cannot use the CA in {tmp_path / 'nowhere'}") and "certs init" in err
    assert list(tmp_path.iterdir()) == []
    assert run(capsys, "--ca", str(tmp_path), "--cn", "X", "--days", "0")[0] == 2
    assert run(capsys, "--ca", str(tmp_path), "--cn", "  ")[0] == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["certs", "issue", "--ca", str(tmp_path)])  # --cn is required
    assert info.value.code == 2
    capsys.readouterr()


def test_the_installed_command_line(ca_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "certs", "issue", "--ca", str(ca_dir), "--cn", "ws01", "--client",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=WAIT, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"certificate: {tmp_path / 'ws01.pem'}" in done.stdout
    assert openssl_verify(ca_dir / "ca.pem", tmp_path / "ws01.pem", "sslclient").returncode == 0
