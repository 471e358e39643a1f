"""Key material and small helpers shared by the identity tests (made once per session: RSA is slow)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from proxy.dul.items import (
    ImplementationClassUIDSubItem,
    MaximumLengthSubItem,
    UserIdentityRQSubItem,
    UserInformationItem,
)
from proxy.dul.pdus import AAssociateRQ, parse_pdu
from tests.peers import associate_rq_bytes

NOW = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
HMAC_SECRET = b"k" * 24 + b"-hs256-secret-material-0123456789"


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey
    rsa_small: rsa.RSAPrivateKey
    ec384: ec.EllipticCurvePrivateKey
    ec_other: ec.EllipticCurvePrivateKey  # not the verifier's key


@cache
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(65537, 2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
        rsa_small=rsa.generate_private_key(65537, 1024),
        ec384=ec.generate_private_key(ec.SECP384R1()),
        ec_other=ec.generate_private_key(ec.SECP256R1()),
    )


def private_pem(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def broken_pem(marker: str) -> bytes:
    """A PEM private key made at test time whose base64 body is replaced by `marker`: it looks like
    a key, fails to parse, and its content (the marker) must never be echoed."""
    lines = private_pem(keys().ec).splitlines()
    return b"\n".join([lines[0], marker.encode(), lines[-1], b""])


def public_pem(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


def self_signed(key: rsa.RSAPrivateKey, cn: str = "dicom-proxy saml") -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def write(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def counter_random() -> Any:
    """A deterministic randomness source: n bytes of a running counter."""
    counter = itertools.count(1)

    def random(n: int) -> bytes:
        return next(counter).to_bytes(n, "big")

    return random


# ---------------------------------------------------------------------------- independent JWS checks


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode_and_check(token: bytes, key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify a compact JWS with `cryptography` directly (not with proxy.identity) and return
    (header, claims). `key` is a private key (its public half is used) or HMAC secret bytes."""
    head, body, sig = token.decode("ascii").split(".")
    header, claims = json.loads(unb64url(head)), json.loads(unb64url(body))
    signing_input, signature = f"{head}.{body}".encode(), unb64url(sig)
    alg = header["alg"]
    if alg == "HS256":
        assert hmac.compare_digest(hmac.new(key, signing_input, hashlib.sha256).digest(), signature)
    elif alg == "RS256":
        key.public_key().verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        assert len(signature) == 64
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        key.public_key().verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    elif alg == "EdDSA":
        key.public_key().verify(signature, signing_input)
    else:
        raise AssertionError(f"unexpected alg {alg}")
    return header, claims


def sign_token(header: dict[str, Any], claims: dict[str, Any], key: Any) -> bytes:
    """A JWS made by the test itself (for the verify paths), independent of proxy.identity."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}".encode()
    alg = header["alg"]
    if alg == "HS256":
        signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    elif alg == "RS256":
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif alg == "EdDSA":
        signature = key.sign(signing_input)
    else:
        signature = b""
    return signing_input + b"." + b64url(signature).encode()


# ---------------------------------------------------------------------------- associations


def rq(calling: str = "CT01", called: str = "PACS", identity: UserIdentityRQSubItem | None = None) -> AAssociateRQ:
    pdu = parse_pdu(associate_rq_bytes(called=called, calling=calling))
    assert isinstance(pdu, AAssociateRQ)
    if identity is not None:
        info = pdu.user_information or UserInformationItem((MaximumLengthSubItem(16384),
                                                            ImplementationClassUIDSubItem("1.2.3")))
        pdu = pdu.with_user_information(info.replace(UserIdentityRQSubItem, identity))
    return pdu
