"""A throw-away development PKI, so the demo and the tests use real chains, never disabled checks.

RSA 2048 keys and SHA-256 signatures throughout: dcmtk's BCP 195 profiles refuse smaller RSA
keys and weaker hashes, and the same certificates must work against it. Keys are unencrypted
PKCS#8 PEM, mode 0600. Not for production: a site brings its own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import ProxyError

__all__ = ["CA", "CA_CERT", "CA_KEY", "PKIExistsError", "init", "issue", "load_ca", "load_certificate"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
RSA_BITS = 2048
ORGANISATION = "dicom-tls-proxy development"
_BACKDATE = datetime.timedelta(hours=1)  # tolerate a peer whose clock is slightly behind

# name -> (CN, SANs, client-only). Server certificates also allow client auth, because the
# proxy presents the same certificate on both sides and an archive may dial back.
_LEAVES: dict[str, tuple[str, list[str], bool]] = {
    "archive": ("localhost", ["localhost", "127.0.0.1", "::1"], False),
    "proxy": ("dicom-proxy", ["localhost", "127.0.0.1"], False),
    "modality": ("MODALITY01", [], True),
}


class PKIExistsError(ProxyError, FileExistsError):
    """Refuse to replace keys silently: a regenerated CA invalidates every issued certificate."""


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey


def init(directory: Path, *, days: int = 90, force: bool = False) -> dict[str, Path]:
    """Create a CA and the archive, proxy and modality certificates in `directory`.

    Returns {"ca": ..., "ca_key": ..., "archive": ..., "archive_key": ..., "proxy": ...,
    "proxy_key": ..., "modality": ..., "modality_key": ...}. Each call makes a new CA with a
    unique name, so a second directory is a different, untrusted PKI (what the tests need).
    """
    directory = Path(directory)
    targets = [directory / CA_CERT, directory / CA_KEY]
    for name in _LEAVES:
        targets += [directory / f"{name}.pem", directory / f"{name}.key"]
    _refuse_existing(targets, force)
    directory.mkdir(parents=True, exist_ok=True)

    ca = _make_ca(days)
    out = {"ca": directory / CA_CERT, "ca_key": directory / CA_KEY}
    _write_cert(out["ca"], ca.cert)
    _write_key(out["ca_key"], ca.key)
    for name, (cn, sans, client) in _LEAVES.items():
        cert_path, key_path = _issue_with(ca, directory, name, cn, sans, client=client, days=days)
        out[name] = cert_path
        out[f"{name}_key"] = key_path
    return out


def issue(
    ca_dir: Path,
    out_dir: Path,
    cn: str,
    sans: list[str],
    *,
    client: bool,
    days: int,
    name: str | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue one certificate from the CA in `ca_dir`; return (cert path, key path).

    `client=True` makes a client-only certificate (a modality); otherwise server and client auth.
    `sans` entries are DNS names or IP addresses ("DNS:" / "IP:" prefixes are accepted).
    `days` may be negative, and `not_before`/`not_after` override the window, so tests can
    build expired and not-yet-valid certificates. Files are `<name>.pem`/`<name>.key`, the
    name defaulting to a file-safe form of `cn`.
    """
    ca = load_ca(Path(ca_dir))
    stem = name or _file_stem(cn)
    out_dir = Path(out_dir)
    _refuse_existing([out_dir / f"{stem}.pem", out_dir / f"{stem}.key"], force)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _issue_with(
        ca, out_dir, stem, cn, sans, client=client, days=days, not_before=not_before, not_after=not_after
    )


def load_certificate(path: Path) -> x509.Certificate:
    """The first PEM certificate in `path`."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_ca(ca_dir: Path) -> CA:
    """The CA certificate and key written by init()."""
    cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ProxyError(f"{ca_dir / CA_KEY} is not an RSA key")
    return CA(cert, key)


# --------------------------------------------------------------------------- internals


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise PKIExistsError(f"refusing to overwrite {names} (use force to replace them)")


def _file_stem(cn: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", cn).strip("-.").lower()
    return stem or "cert"


def _window(
    days: int, not_before: datetime.datetime | None, not_after: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    end = not_after or now + datetime.timedelta(days=days)
    start = not_before or min(now, end) - _BACKDATE
    if start >= end:
        raise ValueError("the certificate would end before it starts")
    return start, end


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _make_ca(days: int) -> CA:
    key = _new_key()
    # A unique CN: two dev CAs with one name would make "wrong CA" look like a bad signature.
    name = _name(f"dicom-tls-proxy dev CA {secrets.token_hex(4)}")
    start, end = _window(days, None, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(cert, key)


def _general_names(sans: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for entry in sans:
        kind, sep, value = entry.partition(":")
        if sep and kind.upper() in ("DNS", "IP"):
            entry = value
            if kind.upper() == "DNS":
                out.append(x509.DNSName(entry))
                continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            out.append(x509.DNSName(entry))
    return out


def _issue_with(
    ca: CA,
    out_dir: Path,
    stem: str,
    cn: str,
    sans: list[str],
    *,
    client: bool,
    days: int,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    key = _new_key()
    start, end = _window(days, not_before, not_after)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_general_names(sans)), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    """Create the file 0600 from the start: a chmod after writing leaves a window."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
        fh.write(data)
