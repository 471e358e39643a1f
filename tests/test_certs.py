"""The development PKI: right files, right extensions, chains that verify, keys kept private."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import certs
from proxy.errors import ProxyError

LEAVES = ("archive", "proxy", "modality")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return certs.init(tmp_path_factory.mktemp("pki"))


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(c: x509.Certificate) -> str:
    return str(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    public = issuer.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert child.signature_hash_algorithm is not None
    try:
        public.verify(child.signature, child.tbs_certificate_bytes, padding.PKCS1v15(), child.signature_hash_algorithm)
    except Exception:
        return False
    return True


def sans(c: x509.Certificate) -> tuple[list[str], list[str]]:
    ext = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]


def test_init_writes_every_file(pki: dict[str, Path]) -> None:
    folder = pki["ca"].parent
    expected = {"ca.pem", "ca.key"} | {f"{n}.pem" for n in LEAVES} | {f"{n}.key" for n in LEAVES}
    assert {p.name for p in folder.iterdir()} == expected
    assert set(pki) == {"ca", "ca_key"} | set(LEAVES) | {f"{n}_key" for n in LEAVES}
    assert all(p.parent == folder and p.is_file() for p in pki.values())


def test_keys_are_private_unencrypted_pkcs8_rsa_2048(pki: dict[str, Path]) -> None:
    for name in ("ca", *LEAVES):
        path = pki[f"{name}_key"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        assert data == pkcs8  # PKCS#8 (not the traditional RSA format), unencrypted
        public = cert(pki[name]).public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.public_numbers() == key.public_key().public_numbers()


def test_ca_extensions(pki: dict[str, Path]) -> None:
    ca = cert(pki["ca"])
    assert ca.subject == ca.issuer and signed_by(ca, ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)


@pytest.mark.parametrize(
    ("name", "common_name", "dns", "ips", "usages"),
    [
        ("archive", "localhost", ["localhost"], ["127.0.0.1", "::1"], {"server", "client"}),
        ("proxy", "dicom-proxy", ["localhost"], ["127.0.0.1"], {"server", "client"}),
        ("modality", "MODALITY01", None, None, {"client"}),
    ],
)
def test_leaf_certificates(
    pki: dict[str, Path], name: str, common_name: str, dns: list[str] | None, ips: list[str] | None,
    usages: set[str],
) -> None:
    ca, leaf = cert(pki["ca"]), cert(pki[name])
    assert cn(leaf) == common_name
    assert leaf.issuer == ca.subject and signed_by(leaf, ca)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    names = {ExtendedKeyUsageOID.SERVER_AUTH: "server", ExtendedKeyUsageOID.CLIENT_AUTH: "client"}
    assert {names[o] for o in eku} == usages
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    if dns is None:
        with pytest.raises(x509.ExtensionNotFound):
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    else:
        assert sans(leaf) == (dns, ips)
    now = datetime.datetime.now(datetime.UTC)
    assert leaf.not_valid_before_utc < now < leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc - now < datetime.timedelta(days=91)


def test_chain_verifies_with_openssl_policy(pki: dict[str, Path]) -> None:
    """The same check a TLS client does: the archive certificate chains to the CA, for localhost."""
    from cryptography.x509.verification import PolicyBuilder, Store

    store = Store([cert(pki["ca"])])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost"))
    chain = verifier.verify(cert(pki["archive"]), [])
    assert chain[-1] == cert(pki["ca"])
    ip_verifier = PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(ipaddress.ip_address("::1")))
    ip_verifier.verify(cert(pki["archive"]), [])


def test_refuses_to_overwrite(pki: dict[str, Path]) -> None:
    folder = pki["ca"].parent
    before = pki["ca"].read_bytes()
    with pytest.raises(certs.PKIExistsError) as info:
        certs.init(folder)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, ProxyError)
    assert "ca.pem" in str(info.value)
    assert pki["ca"].read_bytes() == before


def test_refuses_even_if_only_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "modality.key").write_text("keep me")
    with pytest.raises(certs.PKIExistsError):
        certs.init(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["modality.key"]


def test_force_replaces_with_a_new_ca(tmp_path: Path) -> None:
    first = certs.init(tmp_path)
    old_ca = cert(first["ca"])
    second = certs.init(tmp_path, force=True)
    new_ca = cert(second["ca"])
    assert new_ca.subject != old_ca.subject  # unique names: a stale chain fails as "unknown CA"
    assert signed_by(cert(second["archive"]), new_ca)


def test_issue_from_existing_ca(pki: dict[str, Path], tmp_path: Path) -> None:
    path, key = certs.issue(pki["ca"].parent, tmp_path, "CT 01", ["DNS:ct01.example", "IP:10.0.0.7"],
                            client=False, days=5)
    assert (path.name, key.name) == ("ct-01.pem", "ct-01.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf = cert(path)
    assert cn(leaf) == "CT 01" and signed_by(leaf, cert(pki["ca"]))
    assert sans(leaf) == (["ct01.example"], ["10.0.0.7"])
    with pytest.raises(certs.PKIExistsError):
        certs.issue(pki["ca"].parent, tmp_path, "CT 01", [], client=True, days=5)


def test_issue_expired_and_not_yet_valid(pki: dict[str, Path], tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    old, _ = certs.issue(pki["ca"].parent, tmp_path, "localhost", ["localhost"], client=False, days=-1,
                         name="expired")
    assert cert(old).not_valid_after_utc < now
    assert cert(old).not_valid_before_utc < cert(old).not_valid_after_utc
    later, _ = certs.issue(pki["ca"].parent, tmp_path, "localhost", ["localhost"], client=False, days=9,
                           name="later", not_before=now + datetime.timedelta(days=1))
    assert cert(later).not_valid_before_utc > now
    with pytest.raises(ValueError):
        certs.issue(pki["ca"].parent, tmp_path, "x", [], client=True, days=1, name="bad",
                    not_before=now + datetime.timedelta(days=3))
