"""User Identity Negotiation (PS3.7 D.3.3.7): what the proxy sends upstream, and what it checks.

Pure core (DESIGN.md section 1): no sockets, no event loop, no clock and no environment reads.
The shell injects them: `BuildContext.now` / `VerifyContext.now` (an aware datetime), a randomness
source for JWT ids and SAML ids, and `Sources` (the process environment as a mapping, a cache of
secret files that re-reads a file when it changes, and the optional Kerberos backend from
proxy.identity_kerberos). Files are read through pathlib only.

Three jobs, in the order the relay needs them:

1. `screen(policy, rq, ctx)`: the listener's `client_identity` policy applied to the 0x58 the
   modality sent (pass, strip, replace, verify) -> the RQ to go on with, the IdentityFacts the rules
   see, or a failure the relay answers with A-ASSOCIATE-RJ 1/2/1.
2. `build(profile, ctx)` + `inject(rq, item)`: the proxy's own identity (types 1-5) put into the
   User Information item, replacing any other 0x58, with every 16-bit length checked.
3. `finish_ac(ac, plan)`: the A-ASSOCIATE-AC's 0x59 made truthful for the modality
   (standards.md 6.5): stripped when it answers the proxy's identity, added when the proxy itself
   verified the modality's identity, and `require_response` enforced.

Secrets (passcodes, tokens, keys, assertions) never appear in a repr or an exception: only their
type and length. Exceptions that could carry one are raised `from None`. This module does not log
(importing logging would start threading); the relay logs what it did, by type and length.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from proxy.dul.constants import ITEM_HEADER_LENGTH, MAX_ITEM_LENGTH, UserIdentityType
from proxy.dul.items import UserIdentityACSubItem, UserIdentityRQSubItem, UserInformationItem
from proxy.dul.pdus import AAssociateAC, AAssociateRQ
from proxy.errors import ProxyError
from proxy.errors import SafeValueError as SafeValueError
from proxy.passcodes import SALT_BYTES as SALT_BYTES  # re-exported: the CLI and config use them from here
from proxy.passcodes import SCRYPT_N as SCRYPT_N
from proxy.passcodes import SCRYPT_P as SCRYPT_P
from proxy.passcodes import SCRYPT_R as SCRYPT_R
from proxy.passcodes import PasscodeHash as PasscodeHash
from proxy.passcodes import check_passcode as check_passcode
from proxy.passcodes import hash_passcode_line as hash_passcode_line
from proxy.passcodes import parse_passcode_file as parse_passcode_file
from proxy.policy.model import IdentityFacts

# --------------------------------------------------------------------------- errors

Reject = tuple[int, int, int]
REJECT_IDENTITY: Reject = (1, 2, 1)
"""PS3.7 D.3.3.7.3: a user identity that fails is rejected-permanent, source ACSE, no reason."""
REJECT_UNMAPPED: Reject = (1, 1, 3)
"""The calling AE title has no user name in a profile's `ae_map` and no template to fall back on."""
REJECT_UNAVAILABLE: Reject = (2, 3, 1)
"""A secret, key or Kerberos ticket could not be had right now: transient, an admin can fix it."""
REJECT_TOO_LARGE: Reject = (1, 3, 2)
"""The identity does not fit the 16-bit lengths of PS3.8: local-limit-exceeded, permanently."""


class IdentityError(ProxyError):
    """An identity could not be built, injected or checked. `reject` is the A-ASSOCIATE-RJ
    (result, source, reason) the relay should answer with. The message never holds a secret."""

    def __init__(self, message: str, reject: Reject = REJECT_UNAVAILABLE) -> None:
        super().__init__(message)
        self.reject = reject


class IdentitySizeError(IdentityError):
    """A 0x58 sub-item or the User Information item would pass 65,535 bytes (PS3.8 9.3.2.3)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, REJECT_TOO_LARGE)


# --------------------------------------------------------------------------- user name templates

TEMPLATE_FIELDS = ("calling_ae", "called_ae")


def check_template(text: str) -> str:
    """Validate a user name template: literal text and `{calling_ae}` / `{called_ae}` only
    (`{{` and `}}` for braces). ValueError in admin words otherwise."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"template {text!r}: {exc} (write '{{{{' or '}}}}' for a literal brace)") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            raise ValueError(f"template {text!r}: unknown placeholder {{{name}}} (allowed: {fields})")
    return text


@dataclass(frozen=True)
class UserTemplate:
    """Who the proxy says the user is: `ae_map[calling AE]` when the calling AE title is in the
    table, else `template` rendered with the association's AE titles. An AE title in neither is
    refused (REJECT_UNMAPPED: calling-AE-title-not-recognized)."""

    template: str | None = None  # checked with check_template()
    ae_map: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # stripped AE -> user

    def render(self, calling_ae: str, called_ae: str) -> str:
        mapped = self.ae_map.get(calling_ae.strip(" "))
        if mapped is not None:
            return mapped
        if self.template is None:
            raise IdentityError(f"calling AE title {calling_ae.strip()!r} has no user name in 'ae_map' "
                                "and the profile has no template to fall back on", REJECT_UNMAPPED)
        value = self.template.format(calling_ae=calling_ae.strip(" "), called_ae=called_ae.strip(" "))
        if not value:
            raise IdentityError("the user name template rendered an empty user name", REJECT_UNMAPPED)
        return value


# --------------------------------------------------------------------------- profiles (proxy.yaml `identities:`)

JsonValue: TypeAlias = "str | int | float | bool | list[JsonValue] | dict[str, JsonValue] | None"
JwtAlgorithm = Literal["RS256", "ES256", "EdDSA", "HS256"]
JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = ("RS256", "ES256", "EdDSA", "HS256")
RESERVED_CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti")
"""Set by the proxy for every minted token; `claims:` may not override them."""
DEFAULT_TTL = 300


@dataclass(frozen=True, kw_only=True)
class _Profile:
    name: str
    positive_response: bool = False  # ask the acceptor for a 0x59
    require_response: bool = False  # fail the association when no 0x59 comes back (implies asking)

    identity_type: UserIdentityType = UserIdentityType.USERNAME  # overridden per class

    @property
    def blocking(self) -> bool:
        """True when build() may wait on the network (run it in a worker thread)."""
        return False


@dataclass(frozen=True, kw_only=True)
class UsernameProfile(_Profile):
    """Type 1: a user name, no proof."""

    user: UserTemplate
    identity_type: UserIdentityType = UserIdentityType.USERNAME


@dataclass(frozen=True, kw_only=True)
class PasscodeProfile(_Profile):
    """Type 2: a user name and a passcode from a file (re-read when it changes) or an environment
    variable; never from proxy.yaml or a rule file."""

    user: UserTemplate
    passcode_file: Path | None = None
    passcode_env: str | None = None
    identity_type: UserIdentityType = UserIdentityType.USERNAME_PASSCODE


@dataclass(frozen=True, kw_only=True)
class JwtProfile(_Profile):
    """Type 5: a JWT minted per association (`key` PEM private key for RS256/ES256/EdDSA, or
    `secret_file` for HS256) or a static token from `token_file`, re-read when it changes."""

    algorithm: JwtAlgorithm | None = None  # None only with token_file
    key: Path | None = None
    secret_file: Path | None = None
    token_file: Path | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    subject: UserTemplate | None = None
    ttl: int = DEFAULT_TTL  # seconds from iat to exp
    key_id: str | None = None  # `kid` header
    claims: Mapping[str, JsonValue] = field(default_factory=lambda: MappingProxyType({}))
    identity_type: UserIdentityType = UserIdentityType.JWT


@dataclass(frozen=True, kw_only=True)
class SamlMint:
    """A SAML 2.0 assertion minted per association and signed (enveloped XML signature) with
    `key`/`cert` through the optional `signxml` package (proxy.identity_saml)."""

    key: Path
    cert: Path
    issuer: str
    audience: tuple[str, ...]
    subject: UserTemplate
    ttl: int = DEFAULT_TTL
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, kw_only=True)
class SamlProfile(_Profile):
    """Type 4: the assertion in `assertion_file` (re-read when it changes), or one minted by `mint`."""

    assertion_file: Path | None = None
    mint: SamlMint | None = None
    identity_type: UserIdentityType = UserIdentityType.SAML


@dataclass(frozen=True, kw_only=True)
class KerberosProfile(_Profile):
    """Type 3: a GSS-API (Kerberos 5) initial context token for `service`, from credentials got
    with the client `keytab`. A new token for every association: acceptors keep a replay cache."""

    service: str  # krb5 principal, e.g. dicom/pacs.example.org@EXAMPLE.ORG
    keytab: Path
    principal: str | None = None  # the proxy's client principal; None = the keytab's first
    renew_before: float = 300.0  # get fresh credentials when fewer seconds than this are left
    identity_type: UserIdentityType = UserIdentityType.KERBEROS

    @property
    def blocking(self) -> bool:
        return True


IdentityProfile = UsernameProfile | PasscodeProfile | JwtProfile | SamlProfile | KerberosProfile
PROFILE_TYPES: Mapping[str, UserIdentityType] = MappingProxyType(
    {
        "username": UserIdentityType.USERNAME,
        "username_passcode": UserIdentityType.USERNAME_PASSCODE,
        "kerberos": UserIdentityType.KERBEROS,
        "saml": UserIdentityType.SAML,
        "jwt": UserIdentityType.JWT,
    }
)


# --------------------------------------------------------------------------- client identity policy (listener)

ClientIdentityMode = Literal["pass", "replace", "strip", "verify"]
CLIENT_IDENTITY_MODES: tuple[ClientIdentityMode, ...] = ("pass", "replace", "strip", "verify")
DEFAULT_LEEWAY = 30.0


@dataclass(frozen=True, kw_only=True)
class JwtCheck:
    """How a modality's JWT is verified: one of `public_key` (PEM), `jwks` (a JWKS file, re-read
    when it changes) or `secret_file` (HS256). Claims: exp required; nbf and iat checked when
    present; iss and aud when configured; all with `leeway` seconds."""

    public_key: Path | None = None
    jwks: Path | None = None
    secret_file: Path | None = None
    algorithms: tuple[JwtAlgorithm, ...] = ()  # () = what the key type allows
    issuer: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()
    leeway: float = DEFAULT_LEEWAY
    username_claim: str = "sub"


@dataclass(frozen=True, kw_only=True)
class KerberosCheck:
    """A modality's Kerberos token, accepted with the proxy's service `keytab`."""

    keytab: Path
    principal: str | None = None  # the service principal to accept for; None = any in the keytab


@dataclass(frozen=True, kw_only=True)
class ClientIdentityPolicy:
    """`client_identity:` of a listener: what the proxy does with the 0x58 a modality sends.

    * pass (default): forward it untouched; rules see its type and (types 1, 2) its user name,
      unverified. A rule's `identity:` replaces it.
    * strip: remove it; rules see no identity.
    * replace: remove it and inject the profile `identity` (a rule's `identity:` wins).
    * verify: check it (JWT, passcode, Kerberos; other types fail); rules see the verified user.
      `required` (default true) refuses associations without one; `forward` (default false) sends
      the verified item upstream too. The default keeps a bearer token meant for the proxy away
      from the archive; the proxy then answers a requested positive response itself.
    """

    mode: ClientIdentityMode = "pass"
    identity: str | None = None  # replace: the profile injected instead
    required: bool = True
    forward: bool = False
    jwt: JwtCheck | None = None
    passcodes: Path | None = None  # `username:scrypt$N$r$p$salt$hash` lines (hash_passcode_line)
    kerberos: KerberosCheck | None = None

    @property
    def blocking(self) -> bool:
        """True when screen() may take long (scrypt, Kerberos): run it in a worker thread."""
        return self.mode == "verify" and (self.passcodes is not None or self.kerberos is not None)


# --------------------------------------------------------------------------- injected services

_T = TypeVar("_T")


class Secret:
    """Bytes that must not be shown: repr and str give the length only."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"<secret {len(self._value)} bytes>"

    __str__ = __repr__


class FileCache:
    """Files read once and again whenever they change (inode, size, mtime or ctime differ), each
    parsed once per version. Rotating a key, token or assertion file needs no reload."""

    def __init__(self) -> None:
        self._entries: dict[tuple[Path, str], tuple[tuple[int, int, int, int], Any]] = {}

    def load(self, path: Path, what: str, parse: Callable[[bytes], _T]) -> _T:
        """`parse(content)` for the current version of `path`. IdentityError (no content in the
        message) when the file cannot be read or `parse` raises ValueError/TypeError."""
        try:
            st = path.stat()
        except OSError as exc:
            raise IdentityError(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        key = (path, what)
        cached = self._entries.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1]  # type: ignore[no-any-return]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
        try:
            value = parse(data)
        except IdentityError as exc:
            raise IdentityError(f"{what} {path}: {exc}", exc.reject) from None
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            detail = str(exc) if isinstance(exc, SafeValueError) else type(exc).__name__
            raise IdentityError(f"{what} {path} is not usable ({detail})") from None
        self._entries[key] = (signature, value)
        return value


class KerberosBackend(Protocol):
    """proxy.identity_kerberos.GssapiBackend implements it; tests may pass a fake."""

    def initiate(self, profile: KerberosProfile) -> bytes:
        """A fresh GSS-API initial context token for profile.service (IdentityError on failure)."""
        ...

    def accept(self, check: KerberosCheck, token: bytes) -> tuple[str, bytes]:
        """(initiator principal, response token) or IdentityError (REJECT_IDENTITY) when invalid."""
        ...


@dataclass
class Sources:
    """Long-lived state the shell makes once per configuration: `env` (os.environ), the secret
    file cache and the optional Kerberos backend. Safe to share between associations."""

    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    files: FileCache = field(default_factory=FileCache)
    kerberos: KerberosBackend | None = None

    def __repr__(self) -> str:
        return f"Sources(env=<{len(self.env)} variables>, kerberos={type(self.kerberos).__name__})"


@dataclass(frozen=True)
class BuildContext:
    """One association as build() needs it. `now` must be timezone-aware; `random(n)` returns n
    unpredictable bytes (os.urandom / secrets.token_bytes in the shell)."""

    calling_ae: str
    called_ae: str
    now: datetime
    random: Callable[[int], bytes]
    sources: Sources = field(default_factory=Sources)


@dataclass(frozen=True)
class VerifyContext:
    now: datetime  # timezone-aware
    sources: Sources = field(default_factory=Sources)


# --------------------------------------------------------------------------- secrets from files and env


def _strip_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


def secret_from_file(data: bytes) -> Secret:
    value = _strip_newline(data)
    if not value:
        raise SafeValueError("the file is empty")
    return Secret(value)


def _passcode(profile: PasscodeProfile, sources: Sources) -> bytes:
    if profile.passcode_file is not None:
        return sources.files.load(profile.passcode_file, "passcode file", secret_from_file).reveal()
    name = profile.passcode_env or ""
    value = sources.env.get(name)
    if not value:
        raise IdentityError(f"environment variable {name} (passcode of identity {profile.name!r}) is not set "
                            "or empty")
    return value.encode("utf-8")


def _encode_user(value: str) -> bytes:
    return value.encode("utf-8")


# --------------------------------------------------------------------------- JWT (RFC 7515/7519), cryptography only

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
MIN_RSA_BITS = 2048
MIN_HMAC_SECRET = 32
"""RFC 7518 3.2: an HS256 key must be at least as long as the hash output (256 bits)."""
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise SafeValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SafeValueError("not base64url") from None


def _json(obj: Mapping[str, JsonValue]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def algorithm_for_key(key: PrivateKey | PublicKey) -> JwtAlgorithm:
    """The JWS algorithm a key is used with, or SafeValueError saying why the key is unsuitable."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SafeValueError(f"an RSA key of {key.key_size} bits is too small (at least {MIN_RSA_BITS})")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise SafeValueError(f"EC curve {key.curve.name} is not supported (ES256 needs P-256)")
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey | ed448.Ed448PrivateKey
                  | ed448.Ed448PublicKey):
        return "EdDSA"
    raise SafeValueError(f"a {type(key).__name__} cannot sign JWTs (use RSA, EC P-256 or Ed25519)")


def parse_pem_private_key(data: bytes) -> object:
    """An unencrypted PEM private key of any type, or SafeValueError saying why not."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SafeValueError("the key is encrypted; store it unencrypted and protect it with file "
                              "permissions") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SafeValueError("not a PEM private key") from None


def load_private_key(data: bytes) -> PrivateKey:
    """A PEM private key usable for JWS (unencrypted), or SafeValueError."""
    key = parse_pem_private_key(data)
    if not isinstance(key, PrivateKey):
        raise SafeValueError(f"a {type(key).__name__} cannot sign JWTs (use RSA, EC P-256 or Ed25519)")
    algorithm_for_key(key)
    return key


def load_public_key(data: bytes) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise SafeValueError("not a PEM public key") from None
    if not isinstance(key, PublicKey):
        raise SafeValueError(f"a {type(key).__name__} cannot verify JWTs")
    algorithm_for_key(key)
    return key


def load_hmac_secret(data: bytes) -> Secret:
    secret = secret_from_file(data)
    if len(secret) < MIN_HMAC_SECRET:
        raise SafeValueError(f"an HS256 secret needs at least {MIN_HMAC_SECRET} bytes, the file holds "
                              f"{len(secret)}")
    return secret


SigningKey = PrivateKey | Secret
VerifyingKey = PublicKey | Secret


def jws_sign(algorithm: JwtAlgorithm, key: SigningKey, data: bytes) -> bytes:
    if algorithm == "HS256":
        if not isinstance(key, Secret):
            raise IdentityError("HS256 needs a secret, not a private key")
        return hmac.new(key.reveal(), data, hashlib.sha256).digest()
    if isinstance(key, Secret) or algorithm_for_key(key) != algorithm:
        raise IdentityError(f"the key does not fit algorithm {algorithm}")
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return key.sign(data)


def jws_verify(algorithm: JwtAlgorithm, key: VerifyingKey, data: bytes, signature: bytes) -> bool:
    """True when `signature` is valid; False for a wrong signature or a key of another kind."""
    if algorithm == "HS256":
        if not isinstance(key, Secret):
            return False  # never accept an HMAC made with a public key (algorithm confusion)
        return hmac.compare_digest(hmac.new(key.reveal(), data, hashlib.sha256).digest(), signature)
    if isinstance(key, Secret):
        return False
    try:
        if algorithm_for_key(key) != algorithm:
            return False
    except ValueError:
        return False
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 64:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
            key.verify(der, data, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def mint_jwt(
    algorithm: JwtAlgorithm,
    key: SigningKey,
    claims: Mapping[str, JsonValue],
    *,
    key_id: str | None = None,
) -> bytes:
    """The compact serialization `header.payload.signature` (ASCII) of a signed JWT."""
    header: dict[str, JsonValue] = {"alg": algorithm, "typ": "JWT"}
    if key_id is not None:
        header["kid"] = key_id
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}".encode("ascii")
    return signing_input + b"." + b64url(jws_sign(algorithm, key, signing_input)).encode("ascii")


def jwt_claims(profile: JwtProfile, context: BuildContext) -> dict[str, JsonValue]:
    """The claims of a minted token: iss, sub, aud, iat, nbf, exp, jti, then the extra claims."""
    now = _epoch(context.now)
    claims: dict[str, JsonValue] = {}
    if profile.issuer is not None:
        claims["iss"] = profile.issuer
    if profile.subject is not None:
        claims["sub"] = profile.subject.render(context.calling_ae, context.called_ae)
    if profile.audience:
        claims["aud"] = profile.audience[0] if len(profile.audience) == 1 else list(profile.audience)
    claims.update(iat=now, nbf=now, exp=now + profile.ttl, jti=b64url(context.random(16)))
    for name, value in profile.claims.items():
        if name not in RESERVED_CLAIMS:
            claims[name] = value
    return claims


def _epoch(now: datetime) -> int:
    if now.tzinfo is None:
        raise IdentityError("the clock given to the identity code must be timezone-aware")
    return int(now.timestamp())


def split_jwt(token: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """(header, payload, signing input, signature) of a compact JWS, or SafeValueError. The
    message says what is malformed, never what the token holds."""
    try:
        text = token.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SafeValueError("the token is not ASCII") from None
    if text[:7].lower() == "bearer ":
        text = text[7:].strip()
    parts = text.split(".")
    if len(parts) != 3:
        raise SafeValueError(f"a compact JWS has 3 parts, this token has {len(parts)}")
    decoded = []
    for label, part in zip(("header", "payload"), parts[:2], strict=True):
        try:
            value = json.loads(b64url_decode(part))
        except (ValueError, RecursionError):
            raise SafeValueError(f"the JWT {label} is not base64url JSON") from None
        if not isinstance(value, dict):
            raise SafeValueError(f"the JWT {label} is not a JSON object")
        decoded.append(value)
    signature = b64url_decode(parts[2])
    return decoded[0], decoded[1], f"{parts[0]}.{parts[1]}".encode("ascii"), signature


# --------------------------------------------------------------------------- JWKS


def parse_jwks(data: bytes) -> tuple[tuple[str | None, JwtAlgorithm, PublicKey], ...]:
    """(kid, algorithm, key) of every signing key in a JWKS (RFC 7517) we can use: RSA (RS256),
    EC P-256 (ES256), OKP Ed25519/Ed448 (EdDSA). Keys for encryption or of other kinds are skipped."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise SafeValueError("not JSON") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise SafeValueError("no 'keys' list (a JWKS is {\"keys\": [...]})")
    out: list[tuple[str | None, JwtAlgorithm, PublicKey]] = []
    for index, jwk in enumerate(keys):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
        try:
            key = _jwk_public_key(jwk)
        except SafeValueError as exc:
            raise SafeValueError(f"key {index} ({kid or 'no kid'}): {exc}") from None
        if key is None:
            continue
        algorithm = algorithm_for_key(key)
        if jwk.get("alg") not in (None, algorithm):
            continue  # a key published for another algorithm
        out.append((kid, algorithm, key))
    if not out:
        raise SafeValueError("no usable signing key (RSA, EC P-256, Ed25519)")
    return tuple(out)


def _jwk_int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise SafeValueError(f"member {name!r} missing")
    return int.from_bytes(b64url_decode(value), "big")


def _jwk_public_key(jwk: Mapping[str, Any]) -> PublicKey | None:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    try:
        if kty == "RSA":
            return rsa.RSAPublicNumbers(_jwk_int(jwk, "e"), _jwk_int(jwk, "n")).public_key()
        if kty == "EC" and crv == "P-256":
            numbers = ec.EllipticCurvePublicNumbers(_jwk_int(jwk, "x"), _jwk_int(jwk, "y"), ec.SECP256R1())
            return numbers.public_key()
        if kty == "OKP" and crv in ("Ed25519", "Ed448"):
            x = jwk.get("x")
            if not isinstance(x, str):
                raise SafeValueError("member 'x' missing")
            raw = b64url_decode(x)
            if crv == "Ed25519":
                return ed25519.Ed25519PublicKey.from_public_bytes(raw)
            return ed448.Ed448PublicKey.from_public_bytes(raw)
    except SafeValueError:
        raise
    except (ValueError, UnsupportedAlgorithm):
        raise SafeValueError("invalid key values") from None
    return None


def public_jwk(key: PublicKey, kid: str | None = None) -> dict[str, JsonValue]:
    """The JWK of a public key (for tests and for admins who publish the proxy's key)."""
    out: dict[str, JsonValue]
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        out = {"kty": "RSA", "n": b64url(_int_bytes(numbers.n)), "e": b64url(_int_bytes(numbers.e))}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        point = key.public_numbers()
        out = {"kty": "EC", "crv": "P-256", "x": b64url(point.x.to_bytes(32, "big")),
               "y": b64url(point.y.to_bytes(32, "big"))}
    else:
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        out = {"kty": "OKP", "crv": "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448",
               "x": b64url(raw)}
    out["use"] = "sig"
    out["alg"] = algorithm_for_key(key)
    if kid is not None:
        out["kid"] = kid
    return out


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


# --------------------------------------------------------------------------- build and inject


def build(profile: IdentityProfile, context: BuildContext) -> UserIdentityRQSubItem:
    """The 0x58 sub-item for one association. IdentityError (with its `reject`) when a secret is
    missing, the calling AE has no user, or a token cannot be made; nothing secret in the message."""
    item = _build(profile, context)
    if len(item.primary) > MAX_ITEM_LENGTH or len(item.secondary) > MAX_ITEM_LENGTH:
        raise IdentitySizeError(
            f"identity {profile.name!r}: the {_type_name(item.identity_type)} field is "
            f"{max(len(item.primary), len(item.secondary)):,} bytes, over the 65,535-byte limit of PS3.7 D.3.3.7"
        )
    return item


def _build(profile: IdentityProfile, context: BuildContext) -> UserIdentityRQSubItem:
    ask = profile.positive_response or profile.require_response
    sources = context.sources
    if isinstance(profile, UsernameProfile):
        user = profile.user.render(context.calling_ae, context.called_ae)
        return UserIdentityRQSubItem(UserIdentityType.USERNAME, ask, _encode_user(user))
    if isinstance(profile, PasscodeProfile):
        user = profile.user.render(context.calling_ae, context.called_ae)
        return UserIdentityRQSubItem(UserIdentityType.USERNAME_PASSCODE, ask, _encode_user(user),
                                     _passcode(profile, sources))
    if isinstance(profile, JwtProfile):
        return UserIdentityRQSubItem(UserIdentityType.JWT, ask, _jwt_token(profile, context))
    if isinstance(profile, SamlProfile):
        return UserIdentityRQSubItem(UserIdentityType.SAML, ask, _saml_assertion(profile, context))
    if sources.kerberos is None:
        raise IdentityError(f"identity {profile.name!r} is of type kerberos but Kerberos support is not "
                            "available (install the 'kerberos' extra: python-gssapi)")
    return UserIdentityRQSubItem(UserIdentityType.KERBEROS, ask, sources.kerberos.initiate(profile))


def _jwt_token(profile: JwtProfile, context: BuildContext) -> bytes:
    files = context.sources.files
    if profile.token_file is not None:
        return files.load(profile.token_file, "token file", _static_token_at(context.now)).reveal()
    algorithm = profile.algorithm or "HS256"
    key: SigningKey
    if profile.secret_file is not None:
        key = files.load(profile.secret_file, "JWT secret file", load_hmac_secret)
    elif profile.key is not None:
        key = files.load(profile.key, "JWT key", load_private_key)
    else:  # the loader never builds such a profile
        raise IdentityError(f"identity {profile.name!r} has no key, secret_file or token_file")
    return mint_jwt(algorithm, key, jwt_claims(profile, context), key_id=profile.key_id)


def _static_token_at(now: datetime) -> Callable[[bytes], Secret]:
    """A parser for a static token file: the token (surrounding whitespace removed), checked to be a
    compact JWS; one whose `exp` has passed is refused, so the log says why the archive would refuse."""

    def parse(data: bytes) -> Secret:
        token = data.strip()
        if not token:
            raise SafeValueError("the file is empty")
        _header, payload, _input, _sig = split_jwt(token)
        exp = payload.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool) and exp < _epoch(now):
            raise SafeValueError(f"the token expired {_epoch(now) - int(exp)} s ago")
        return Secret(token)

    return parse


def _saml_assertion(profile: SamlProfile, context: BuildContext) -> bytes:
    files = context.sources.files
    if profile.assertion_file is not None:
        return files.load(profile.assertion_file, "SAML assertion file", assertion_from_file).reveal()
    mint = profile.mint
    if mint is None:  # the loader never builds such a profile
        raise IdentityError(f"identity {profile.name!r} has neither assertion_file nor a key to sign with")
    from proxy.identity_saml import load_signing_key, mint_assertion

    key = files.load(mint.key, "SAML signing key", load_signing_key)
    cert = files.load(mint.cert, "SAML signing certificate", bytes)
    return mint_assertion(mint, context, key, cert)


def assertion_from_file(data: bytes) -> Secret:
    body = data.strip()
    if not body:
        raise SafeValueError("the file is empty")
    if not body.lstrip(b"\xef\xbb\xbf").startswith(b"<"):
        raise SafeValueError("the file does not hold XML (a SAML assertion starts with '<')")
    return Secret(body)


def _type_name(identity_type: int) -> str:
    names = {1: "username", 2: "passcode", 3: "Kerberos ticket", 4: "SAML assertion", 5: "JWT"}
    return names.get(identity_type, f"type {identity_type}")


def _user_information_size(info: UserInformationItem) -> int:
    """Bytes after the 0x50 item's length field, computed without encoding the secrets."""
    total = 0
    for item in info.items:
        if isinstance(item, UserIdentityRQSubItem):
            total += ITEM_HEADER_LENGTH + 2 + 2 + len(item.primary) + 2 + len(item.secondary)
        else:
            total += len(item.encode())
    return total


def inject(rq: AAssociateRQ, item: UserIdentityRQSubItem) -> AAssociateRQ:
    """`rq` with `item` as its only 0x58 (replacing the modality's, at its place; else appended to
    the User Information item). The codec re-encodes every length. IdentitySizeError, with the
    sizes and no content, when a field or the whole 0x50 item would pass 65,535 bytes."""
    for label, value in (("primary", item.primary), ("secondary", item.secondary)):
        if len(value) > MAX_ITEM_LENGTH:
            raise IdentitySizeError(f"the {_type_name(item.identity_type)} {label} field is {len(value):,} bytes, "
                                    f"over the 65,535-byte limit of a 0x58 field")
    info = rq.user_information or UserInformationItem(())
    updated = info.replace(UserIdentityRQSubItem, item)
    size = _user_information_size(updated)
    if size > MAX_ITEM_LENGTH:
        others = size - (ITEM_HEADER_LENGTH + 6 + len(item.primary) + len(item.secondary))
        raise IdentitySizeError(
            f"the User Information item would be {size:,} bytes, over the 65,535-byte limit: the "
            f"{_type_name(item.identity_type)} identity takes {size - others:,} bytes and the modality's other "
            f"sub-items {others:,}"
        )
    return rq.with_user_information(updated)


def remove_identity(rq: AAssociateRQ) -> AAssociateRQ:
    """`rq` without a 0x58 (unchanged when it has none)."""
    info = rq.user_information
    if info is None or info.find(UserIdentityRQSubItem) is None:
        return rq
    return rq.with_user_information(info.replace(UserIdentityRQSubItem, None))


def strip_response(ac: AAssociateAC) -> AAssociateAC:
    """`ac` without a 0x59 (unchanged when it has none)."""
    info = ac.user_information
    if info is None or info.find(UserIdentityACSubItem) is None:
        return ac
    return ac.with_user_information(info.replace(UserIdentityACSubItem, None))


def add_response(ac: AAssociateAC, server_response: bytes) -> AAssociateAC:
    """`ac` with one 0x59 holding `server_response` (empty for types 1, 2 and 5)."""
    if len(server_response) > MAX_ITEM_LENGTH - 2:
        raise IdentitySizeError(f"the server response is {len(server_response):,} bytes, over the 0x59 limit")
    info = ac.user_information or UserInformationItem(())
    updated = info.replace(UserIdentityACSubItem, UserIdentityACSubItem(server_response))
    if _user_information_size(updated) > MAX_ITEM_LENGTH:
        raise IdentitySizeError("the A-ASSOCIATE-AC User Information item would pass 65,535 bytes")
    return ac.with_user_information(updated)


# --------------------------------------------------------------------------- verify (client_identity: verify)


@dataclass(frozen=True)
class Verified:
    facts: IdentityFacts  # type and the verified user (JWT subject, passcode user, Kerberos principal)
    response: bytes = field(default=b"", repr=False)  # 0x59 server response (Kerberos: the AP-REP)


@dataclass(frozen=True)
class Refused:
    reason: str  # for the log; secret-free
    reject: Reject = REJECT_IDENTITY


def verify(policy: ClientIdentityPolicy, item: UserIdentityRQSubItem, context: VerifyContext) -> Verified | Refused:
    """Check a modality's 0x58 against the listener's `client_identity` settings."""
    kind = item.identity_type
    try:
        if kind == UserIdentityType.JWT and policy.jwt is not None:
            return Verified(IdentityFacts(kind, verify_jwt(policy.jwt, item.primary, context)))
        if kind == UserIdentityType.USERNAME_PASSCODE and policy.passcodes is not None:
            return Verified(IdentityFacts(kind, _verify_passcode(policy.passcodes, item, context)))
        if kind == UserIdentityType.KERBEROS and policy.kerberos is not None:
            if context.sources.kerberos is None:
                return Refused("Kerberos support is not available (install python-gssapi)")
            principal, response = context.sources.kerberos.accept(policy.kerberos, item.primary)
            return Verified(IdentityFacts(kind, principal), response)
    except IdentityError as exc:
        return Refused(str(exc), exc.reject)
    return Refused(f"user identity type {kind} ({_type_name(kind)}) cannot be verified on this listener")


def _verify_passcode(path: Path, item: UserIdentityRQSubItem, context: VerifyContext) -> str:
    table = context.sources.files.load(path, "passcode hash file", parse_passcode_file)
    try:
        username = item.primary.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError("the user name is not UTF-8", REJECT_IDENTITY) from None
    if not item.secondary:
        raise IdentityError(f"user {username!r} sent an empty passcode", REJECT_IDENTITY)
    if not check_passcode(table, username, item.secondary):
        raise IdentityError(f"wrong passcode or unknown user {username!r}", REJECT_IDENTITY)
    return username


def _verification_keys(check: JwtCheck, files: FileCache) -> tuple[tuple[str | None, JwtAlgorithm, VerifyingKey], ...]:
    if check.secret_file is not None:
        return ((None, "HS256", files.load(check.secret_file, "JWT secret file", load_hmac_secret)),)
    if check.public_key is not None:
        key = files.load(check.public_key, "JWT public key", load_public_key)
        return ((None, algorithm_for_key(key), key),)
    if check.jwks is not None:
        return files.load(check.jwks, "JWKS file", parse_jwks)
    raise IdentityError("no JWT verification key configured")


def verify_jwt(check: JwtCheck, token: bytes, context: VerifyContext) -> str:
    """The verified user (the `username_claim`, default `sub`) of a JWT, or IdentityError
    (REJECT_IDENTITY) naming what failed: format, algorithm, signature or a claim."""

    def fail(reason: str) -> IdentityError:
        return IdentityError(f"JWT refused: {reason}", REJECT_IDENTITY)

    try:
        header, payload, signing_input, signature = split_jwt(token)
    except SafeValueError as exc:
        raise fail(str(exc)) from None
    algorithm = header.get("alg")
    if "crit" in header:
        raise fail("the header has 'crit' extensions, which are not supported")
    keys = _verification_keys(check, context.sources.files)
    allowed = check.algorithms or tuple(dict.fromkeys(alg for _kid, alg, _key in keys))
    if not isinstance(algorithm, str) or algorithm not in allowed:
        shown = algorithm if isinstance(algorithm, str) and len(algorithm) <= 16 else "?"
        raise fail(f"algorithm {shown!r} is not accepted (allowed: {', '.join(allowed)})")
    kid = header.get("kid")
    candidates = [k for k in keys if k[1] == algorithm]
    if isinstance(kid, str) and any(k[0] is not None for k in candidates):
        candidates = [k for k in candidates if k[0] == kid]
        if not candidates:
            raise fail("no key with the token's 'kid'")
    if not any(jws_verify(algorithm, key, signing_input, signature) for _kid, _alg, key in candidates):
        raise fail("the signature does not verify")
    now = _epoch(context.now)
    leeway = check.leeway

    def number(name: str) -> float | None:
        value = payload.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail(f"claim {name!r} is not a number")
        return float(value)

    exp = number("exp")
    if exp is None:
        raise fail("no 'exp' claim (tokens without an expiry are not accepted)")
    if now > exp + leeway:
        raise fail(f"expired {int(now - exp)} s ago")
    nbf = number("nbf")
    if nbf is not None and now + leeway < nbf:
        raise fail(f"not valid for another {int(nbf - now)} s ('nbf')")
    iat = number("iat")
    if iat is not None and now + leeway < iat:
        raise fail(f"issued {int(iat - now)} s in the future ('iat')")
    if check.issuer:
        iss = payload.get("iss")
        if iss not in check.issuer:
            raise fail(f"issuer {_short(iss)} is not accepted")
    if check.audience:
        aud = payload.get("aud")
        listed = aud if isinstance(aud, list) else [aud]
        auds = {a for a in listed if isinstance(a, str)}
        if not auds & set(check.audience):
            raise fail(f"audience {_short(aud)} is not accepted (expected {', '.join(check.audience)})")
    user = payload.get(check.username_claim)
    if not isinstance(user, str) or not user:
        raise fail(f"claim {check.username_claim!r} is missing or not a string")
    return user


def _short(value: object) -> str:
    """A claim value for a log line: quoted, and cut short (claims are not secret, but unbounded)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- the relay's three steps


@dataclass(frozen=True)
class Screened:
    """screen()'s answer. On `failure` the relay rejects with `reject` and sends nothing upstream."""

    rq: AAssociateRQ  # the RQ to go on with (the modality's 0x58 kept or removed)
    facts: IdentityFacts | None  # AssociationFacts.user_identity for the rules
    failure: str | None = None  # secret-free reason
    reject: Reject = REJECT_IDENTITY
    client_sent: bool = False  # the modality's RQ carried a 0x58
    client_asked: bool = False  # ... with positive-response-requested
    forwarded: bool = False  # that 0x58 is still in `rq`
    profile: str | None = None  # mode replace: the profile to inject when no rule names one
    local_response: bytes | None = field(default=None, repr=False)  # verified here and asked for: the 0x59 we owe


def unverified_facts(item: UserIdentityRQSubItem) -> IdentityFacts:
    """What the rules see of an unverified 0x58: its type, and for types 1 and 2 the user name."""
    username = item.primary.decode("utf-8", "replace") if item.identity_type in (1, 2) else None
    return IdentityFacts(item.identity_type, username)


def screen(policy: ClientIdentityPolicy, rq: AAssociateRQ, context: VerifyContext) -> Screened:
    """Apply a listener's `client_identity` policy to the modality's A-ASSOCIATE-RQ."""
    info = rq.user_information
    item = info.find(UserIdentityRQSubItem) if info is not None else None
    sent = item is not None
    asked = item is not None and item.positive_response_requested
    if policy.mode == "pass":
        return Screened(rq, unverified_facts(item) if item else None, client_sent=sent, client_asked=asked,
                        forwarded=sent)
    if policy.mode in ("strip", "replace"):
        profile = policy.identity if policy.mode == "replace" else None
        return Screened(remove_identity(rq), None, client_sent=sent, client_asked=asked, profile=profile)
    if item is None:
        if policy.required:
            return Screened(rq, None, failure="the listener requires a verified user identity and the modality "
                                              "sent none")
        return Screened(rq, None)
    outcome = verify(policy, item, context)
    if isinstance(outcome, Refused):
        return Screened(rq, None, failure=outcome.reason, reject=outcome.reject, client_sent=True, client_asked=asked)
    if policy.forward:
        return Screened(rq, outcome.facts, client_sent=True, client_asked=asked, forwarded=True)
    return Screened(remove_identity(rq), outcome.facts, client_sent=True, client_asked=asked,
                    local_response=outcome.response if asked else None)


@dataclass(frozen=True)
class ResponsePlan:
    """What finish_ac() needs to know about the RQ that went upstream."""

    forwarded_client: bool = False  # the modality's own 0x58 went upstream: its 0x59 is the modality's
    injected: bool = False  # the proxy's 0x58 went upstream
    require_response: bool = False  # ... and its profile insists on a 0x59
    local_response: bytes | None = field(default=None, repr=False)  # a 0x59 the proxy answers itself


def plan(screened: Screened, profile: IdentityProfile | None) -> ResponsePlan:
    """The ResponsePlan after screen() and, when `profile` is not None, inject()."""
    if profile is not None:
        return ResponsePlan(injected=True, require_response=profile.require_response,
                            local_response=screened.local_response)
    return ResponsePlan(forwarded_client=screened.forwarded, local_response=screened.local_response)


def finish_ac(ac: AAssociateAC, response_plan: ResponsePlan) -> AAssociateAC:
    """The AC as the modality must see it (standards.md 6.3/6.5):

    * the modality's own 0x58 went upstream: the upstream's 0x59 answers it; pass it on;
    * otherwise any 0x59 answers the proxy's identity (or nothing): remove it, and add the proxy's
      own answer when the proxy verified the modality's identity and the modality asked for one.

    IdentityError (REJECT_IDENTITY) when the injected profile has `require_response` and the
    upstream sent no 0x59: the relay aborts the upstream association and rejects the modality.
    """
    has = ac.user_information is not None and ac.user_information.find(UserIdentityACSubItem) is not None
    if response_plan.injected and response_plan.require_response and not has:
        raise IdentityError("the upstream accepted the association without confirming the proxy's user identity "
                            "(no 0x59 in the A-ASSOCIATE-AC) and the profile sets require_response",
                            REJECT_IDENTITY)
    if response_plan.forwarded_client:
        return ac
    ac = strip_response(ac)
    if response_plan.local_response is not None:
        ac = add_response(ac, response_plan.local_response)
    return ac


__all__ = [
    "CLIENT_IDENTITY_MODES",
    "JWT_ALGORITHMS",
    "PROFILE_TYPES",
    "REJECT_IDENTITY",
    "REJECT_TOO_LARGE",
    "REJECT_UNAVAILABLE",
    "REJECT_UNMAPPED",
    "BuildContext",
    "ClientIdentityPolicy",
    "FileCache",
    "IdentityError",
    "IdentityProfile",
    "IdentitySizeError",
    "JwtCheck",
    "JwtProfile",
    "KerberosBackend",
    "KerberosCheck",
    "KerberosProfile",
    "PasscodeProfile",
    "Refused",
    "ResponsePlan",
    "SamlMint",
    "SamlProfile",
    "Screened",
    "Secret",
    "Sources",
    "UserTemplate",
    "UsernameProfile",
    "Verified",
    "VerifyContext",
    "add_response",
    "build",
    "check_passcode",
    "check_template",
    "finish_ac",
    "hash_passcode_line",
    "inject",
    "mint_jwt",
    "parse_jwks",
    "parse_passcode_file",
    "plan",
    "remove_identity",
    "screen",
    "split_jwt",
    "strip_response",
    "unverified_facts",
    "verify",
    "verify_jwt",
]
