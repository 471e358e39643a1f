"""TLS for both legs: contexts per PS3.15 Annex B profile, certificate identity, pins, expiry, and
failures explained in plain words.

Every profile (PROFILES) means: TLS 1.2 or newer (never 1.0/1.1), AEAD or the one legacy suite
the profile names, no compression, no renegotiation, OpenSSL security level 2 (RSA and DH keys of
2048 bits or more, ECC of 224 or more, as dcmtk and RFC 9325 insist), certificates verified.
A TLS failure at 3 a.m. must tell the admin which side to fix, so the error helpers map OpenSSL's
codes to a small fixed set of labels (safe for metrics) and a sentence (for logs). They never
quote key material, passphrases or file contents.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import os
import socket
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy.config import (
    DEFAULT_TLS_PROFILE,
    Address,
    CertPin,
    ListenerTLS,
    ProxyConfig,
    TLSProfileName,
    UpstreamTLS,
    cert_name_key,
    read_passphrase,
)
from proxy.errors import ProxyError
from proxy.policy.model import CertFacts

__all__ = [
    "CONNECT_ERROR_LABELS",
    "EXPIRY_WARNING_WINDOW",
    "PROFILES",
    "TLS12_CIPHERS",
    "TLS_ERROR_LABELS",
    "CipherSuite",
    "ConfiguredCertificate",
    "ResumingClientContext",
    "TLSProfile",
    "apply_profile",
    "bound_ae_titles",
    "cert_facts",
    "cert_facts_from_der",
    "certificate_expiry",
    "check_pin",
    "configured_certificates",
    "describe_connect_error",
    "describe_listener_tls_error",
    "describe_pin_mismatch",
    "describe_plain_dicom_on_tls",
    "describe_tls_error",
    "describe_upstream_error",
    "expiry_warnings",
    "listener_context",
    "peer_certificate",
    "profile_context",
    "server_context",
    "sniff_plain_dicom_on_tls",
    "sniff_tls_client_hello",
    "upstream_context",
]

# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class CipherSuite:
    iana: str  # the RFC name, as PS3.15 and dcmtk's +cs write it
    openssl: str  # the name OpenSSL's cipher strings use


_ECDHE_ECDSA_AES256 = CipherSuite("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384")
_ECDHE_RSA_AES256 = CipherSuite("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384")
_ECDHE_ECDSA_AES128 = CipherSuite("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256")
_ECDHE_RSA_AES128 = CipherSuite("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256")
_DHE_RSA_AES256 = CipherSuite("TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "DHE-RSA-AES256-GCM-SHA384")
_DHE_RSA_AES128 = CipherSuite("TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "DHE-RSA-AES128-GCM-SHA256")
_RSA_AES128_CBC_SHA = CipherSuite("TLS_RSA_WITH_AES_128_CBC_SHA", "AES128-SHA")

_ECDHE_GCM = (_ECDHE_ECDSA_AES256, _ECDHE_RSA_AES256, _ECDHE_ECDSA_AES128, _ECDHE_RSA_AES128)
_DHE_GCM = (_DHE_RSA_AES256, _DHE_RSA_AES128)
TLS13_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256")
"""OpenSSL 3's TLS 1.3 defaults (Python's ssl cannot narrow them); all three are in PS3.15 B.12."""


@dataclass(frozen=True)
class TLSProfile:
    """One PS3.15 Annex B profile as the proxy implements it (on both legs, client and server)."""

    name: TLSProfileName
    standard: str  # the PS3.15 section and title it follows
    minimum: ssl.TLSVersion
    maximum: ssl.TLSVersion
    tls12_suites: tuple[CipherSuite, ...]  # preference order, strongest first; () when TLS 1.2 is off
    tls13_suites: tuple[str, ...]  # () when TLS 1.3 is off
    notes: str  # how it differs from dcmtk's list for the same profile, and why

    @property
    def versions(self) -> tuple[str, ...]:
        names = {ssl.TLSVersion.TLSv1_2: "TLS 1.2", ssl.TLSVersion.TLSv1_3: "TLS 1.3"}
        return tuple(text for version, text in names.items() if self.minimum <= version <= self.maximum)

    @property
    def cipher_string(self) -> str:
        """For SSLContext.set_ciphers (TLS 1.2 suites; security level 2 applies to all versions)."""
        suites = self.tls12_suites or _ECDHE_GCM  # OpenSSL wants a non-empty list even for TLS 1.3 only
        return ":".join(s.openssl for s in suites) + ":@SECLEVEL=2"

    @property
    def uses_dhe(self) -> bool:
        return any(s.openssl.startswith("DHE-") for s in self.tls12_suites)


PROFILES: Mapping[str, TLSProfile] = MappingProxyType({
    "bcp195-nd": TLSProfile(
        name="bcp195-nd",
        standard="PS3.15 B.10 Non-downgrading BCP 195 (suites as B.12 BCP 195 RFC 8996/9325)",
        minimum=ssl.TLSVersion.TLSv1_2,
        maximum=ssl.TLSVersion.TLSv1_3,
        tls12_suites=_ECDHE_GCM,
        tls13_suites=TLS13_SUITES,
        notes="dcmtk's +py also lists TLS_DHE_RSA_WITH_AES_{128,256}_GCM; left out as RFC 9325 4.1 advises and "
        "as dcmtk's own B.12 list does. Every dcmtk profile offers ECDHE-RSA-AES-GCM, so +py/+px/+pz peers connect.",
    ),
    "bcp195": TLSProfile(
        name="bcp195",
        standard="PS3.15 B.9 BCP 195 (modernised: no TLS 1.0/1.1, no 3DES)",
        minimum=ssl.TLSVersion.TLSv1_2,
        maximum=ssl.TLSVersion.TLSv1_3,
        tls12_suites=(*_ECDHE_GCM, *_DHE_GCM, _RSA_AES128_CBC_SHA),
        tls13_suites=TLS13_SUITES,
        notes="B.9 lets TLS fall back to 1.0 and lists TLS_RSA_WITH_3DES_EDE_CBC_SHA: both dropped (RFC 8996 "
        "forbids TLS 1.0/1.1; OpenSSL 3 ships no 3DES TLS suite; 64-bit blocks, Sweet32). Kept for old peers: "
        "DHE-RSA-AES-GCM (RFC 7919 ffdhe2048 group) and TLS_RSA_WITH_AES_128_CBC_SHA (static RSA: no forward "
        "secrecy, RFC 9325 SHOULD NOT) as the last choice. ECDSA-ECDHE suites added as in B.11/B.12.",
    ),
    "bcp195-ex": TLSProfile(
        name="bcp195-ex",
        standard="PS3.15 B.11 Extended BCP 195",
        minimum=ssl.TLSVersion.TLSv1_2,
        maximum=ssl.TLSVersion.TLSv1_2,
        tls12_suites=(*_ECDHE_GCM, *_DHE_GCM),
        tls13_suites=(),
        notes="TLS 1.2 only, as dcmtk's +pz (it disables TLS 1.3 for this profile); the same six GCM suites as "
        "dcmtk. DHE uses the 2048-bit RFC 7919 group, ECDHE curves of 256 bits or more, as B.11 requires.",
    ),
    "tls13-only": TLSProfile(
        name="tls13-only",
        standard="PS3.15 B.12/B.13 with TLS 1.2 switched off (a site policy, not a profile of its own)",
        minimum=ssl.TLSVersion.TLSv1_3,
        maximum=ssl.TLSVersion.TLSv1_3,
        tls12_suites=(),
        tls13_suites=TLS13_SUITES,
        notes="Only for peers known to speak TLS 1.3 (dcmtk 3.6.7's +py/+px do; +pz does not).",
    ),
})
"""Each profile's versions and suites; the README table is generated from the same facts."""

TLS12_CIPHERS = PROFILES[DEFAULT_TLS_PROFILE].cipher_string
"""The default profile's OpenSSL cipher string (kept for callers of the first release)."""

# RFC 7919 ffdhe2048 (`openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048`): a
# published 2048-bit safe-prime group, so DHE needs no locally generated (and unchecked) parameters.
_FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def _profile(name: str) -> TLSProfile:
    profile = PROFILES.get(name)
    if profile is None:
        raise ProxyError(f"unknown TLS profile {name!r} (expected one of: {', '.join(PROFILES)})")
    return profile


def _load_ffdhe2048(ctx: ssl.SSLContext) -> None:
    # SSLContext.load_dh_params only takes a path; the file lives for the duration of this call.
    with tempfile.TemporaryDirectory(prefix="dicomproxy-dh-") as folder:
        path = os.path.join(folder, "ffdhe2048.pem")
        with open(path, "wb") as fh:
            fh.write(_FFDHE2048_PEM)
        ctx.load_dh_params(path)


def apply_profile(ctx: ssl.SSLContext, profile: str, *, server_side: bool) -> ssl.SSLContext:
    """Restrict `ctx` (a PROTOCOL_TLS_CLIENT or _SERVER context) to `profile`; returns `ctx`."""
    p = _profile(profile)
    ctx.minimum_version = p.minimum
    ctx.maximum_version = p.maximum
    ctx.set_ciphers(p.cipher_string)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if server_side:
        # BCP 195 (and dcmtk): the server picks the strongest suite both sides have, in our order.
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        if p.uses_dhe:
            _load_ffdhe2048(ctx)
    return ctx


def profile_context(profile: str, server_side: bool) -> ssl.SSLContext:
    """A new context restricted to `profile`, with no certificates loaded.

    Client contexts verify the server's chain and host name (PROTOCOL_TLS_CLIENT defaults); server
    contexts ask for no client certificate until listener_context/server_context say so.
    """
    protocol = ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
    return apply_profile(ssl.SSLContext(protocol), profile, server_side=server_side)


TLS_ERROR_LABELS = (
    "unknown_ca",
    "hostname_mismatch",
    "expired",
    "not_yet_valid",
    "self_signed",
    "weak_certificate",
    "protocol_version",
    "no_shared_cipher",
    "peer_rejected_certificate",
    "no_client_certificate",
    "pin_mismatch",
    "not_tls",
    "handshake_failure",
    "other",
)
"""Every label describe_tls_error() (and the pin and plain-DICOM helpers) return, so metrics can
initialise them all at start."""

CONNECT_ERROR_LABELS = ("refused", "timeout", "unreachable", "dns", "reset", "other")
"""Every label describe_connect_error() returns."""


def _no_password() -> bytes:
    raise ProxyError("the private key is encrypted; set 'passphrase_file' or use an unencrypted key")


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None, passphrase_file: Path | None) -> None:
    """load_cert_chain with the passphrase read from a file (never a prompt, never in a message)."""
    if passphrase_file is None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None, password=_no_password)
        return
    try:
        password = read_passphrase(passphrase_file)
    except OSError as exc:
        raise ProxyError(f"cannot read the passphrase file {passphrase_file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ProxyError(f"cannot use the passphrase file: {exc}") from None
    try:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None, password=password)
    except ssl.SSLError:
        # OpenSSL only says "PEM lib": ask cryptography whether the passphrase is what is wrong.
        if not _decrypts(key or cert, password):
            raise ProxyError(
                f"cannot decrypt the private key {key or cert} with the passphrase in {passphrase_file} "
                "(wrong passphrase?)"
            ) from None  # no chained context: nothing about the key or passphrase beyond this sentence
        raise


def _decrypts(key: Path, password: bytes) -> bool:
    """False only if `key` is an encrypted PEM key that `password` does not open."""
    try:
        data = key.read_bytes()
        serialization.load_pem_private_key(data, password=password)
    except (TypeError, OSError, UnsupportedAlgorithm):  # not encrypted, unreadable, exotic: not the passphrase
        return True
    except ValueError:
        return b"ENCRYPTED" not in data
    return True


class ResumingClientContext(ssl.SSLContext):
    """A client context that offers the last session it was given, so a new association to the same
    archive resumes TLS (one round trip and no certificate checks) instead of a full handshake.

    The relay's own TLS leg (proxy.tlssocket) passes `session` to `wrap_socket`; asyncio streams
    (the health probes) do not expose `session=`, but build their SSLObject through `wrap_bio`,
    which offers it too. The relay stores `session` after the first exchange on a connection: TLS
    1.3 tickets arrive after the handshake. OpenSSL falls back to a full handshake when the archive
    no longer accepts it.
    A resumed session keeps the archive's certificate, so check_pin() works on it too.
    """

    session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session=session or self.session
        )


def upstream_context(tls: UpstreamTLS) -> ResumingClientContext:
    """Client context for connecting to an archive; pass server_hostname when connecting.

    The profile comes from `tls.profile`. With `insecure_skip_verify` neither the chain nor the
    host name is checked (the config loader warns; pins, if any, are still checked by the relay
    with check_pin()). Raises ssl.SSLError/OSError if a file cannot be used, and ProxyError for an
    encrypted key without a usable passphrase (OpenSSL would otherwise prompt on the terminal).
    """
    ctx = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    apply_profile(ctx, tls.profile, server_side=False)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True  # IP addresses are matched against IP SANs, names against DNS SANs
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert is not None:
        _load_chain(ctx, tls.cert, tls.key, tls.passphrase_file)
    return ctx


def server_context(
    cert: Path,
    key: Path,
    *,
    client_ca: Path | None = None,
    require_client_cert: bool = False,
    profile: str = DEFAULT_TLS_PROFILE,
    passphrase_file: Path | None = None,
) -> ssl.SSLContext:
    """Server context for `profile` (TLS listeners, and tests' archives).

    With `client_ca` a client certificate is asked for and verified when offered (CERT_OPTIONAL);
    `require_client_cert` makes it mandatory (CERT_REQUIRED, mutual TLS, the PS3.15 norm) and
    needs `client_ca`.
    """
    if require_client_cert and client_ca is None:
        raise ProxyError("require_client_cert needs client_ca to verify the client certificates")
    ctx = profile_context(profile, server_side=True)
    _load_chain(ctx, cert, key, passphrase_file)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def listener_context(tls: ListenerTLS) -> ssl.SSLContext:
    """The server context of a TLS listener: its certificate, profile and client-certificate policy."""
    return server_context(
        tls.cert,
        tls.key,
        client_ca=tls.client_ca,
        require_client_cert=tls.require_client_cert,
        profile=tls.profile,
        passphrase_file=tls.passphrase_file,
    )


# --------------------------------------------------------------------------- first bytes


def sniff_tls_client_hello(first: bytes) -> bool:
    """True if the first bytes look like a TLS record carrying a handshake (needs 3 bytes).

    0x16 is not a PDU type, so a plain DICOM listener can tell a TLS client apart and say so.
    """
    return len(first) >= 3 and first[0] == 0x16 and first[1] == 0x03 and first[2] <= 0x04


_ASSOCIATE_RQ_MIN_LENGTH = 68
"""Protocol version (2) + reserved (2) + called AE (16) + calling AE (16) + reserved (32): PS3.8 9.3.2."""


def sniff_plain_dicom_on_tls(first: bytes) -> bool:
    """True if the first bytes on a TLS listener are a plaintext A-ASSOCIATE-RQ header (needs 6).

    PDU type 0x01, a reserved 0x00, then a big-endian length of at least the RQ's fixed part. A TLS
    ClientHello starts with 0x16, so one peeked PDU header tells the two apart.
    """
    if len(first) < 6 or first[0] != 0x01 or first[1] != 0x00:
        return False
    return int.from_bytes(first[2:6], "big") >= _ASSOCIATE_RQ_MIN_LENGTH


def describe_plain_dicom_on_tls(listener: str | None = None) -> tuple[str, str]:
    """(label, sentence) for a modality that sent plaintext DICOM to a TLS listener."""
    where = f"TLS listener {listener!r}" if listener else "a TLS listener"
    return (
        "not_tls",
        f"the client sent a plaintext DICOM A-ASSOCIATE-RQ to {where}: enable TLS on the device, or point it "
        "at a plaintext listener",
    )


# --------------------------------------------------------------------------- peer certificates


def peer_certificate(peer: ssl.SSLObject | ssl.SSLSocket | bytes | None) -> bytes | None:
    """The peer's leaf certificate as DER, from a TLS connection or as given."""
    if peer is None or isinstance(peer, bytes):
        return peer
    return peer.getpeercert(binary_form=True)


def _pin_digests(der: bytes) -> dict[str, str]:
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {"cert": hashlib.sha256(der).hexdigest(), "spki": hashlib.sha256(spki).hexdigest()}


def check_pin(peer: ssl.SSLObject | ssl.SSLSocket | bytes | None, pin: CertPin | Iterable[CertPin]) -> bool:
    """True if the peer's leaf certificate matches `pin` (or any of several pins).

    The relay calls it after the upstream handshake (also after a resumed one), when
    `upstream.tls.pin_sha256` is not empty, and aborts the connection on False (label
    "pin_mismatch", see describe_pin_mismatch). `peer` is the SSLObject (transport extra
    "ssl_object"), an SSLSocket, or the DER bytes. No certificate means False. An empty pin list is
    a programming error (ValueError), never "anything goes".
    """
    pins = (pin,) if isinstance(pin, CertPin) else tuple(pin)
    if not pins:
        raise ValueError("check_pin needs at least one pin")
    der = peer_certificate(peer)
    if not der:
        return False
    digests = _pin_digests(der)
    return any(digests[p.kind] == p.sha256 for p in pins)


def describe_pin_mismatch(
    peer: ssl.SSLObject | ssl.SSLSocket | bytes | None, *, peer_name: str = "the archive"
) -> tuple[str, str]:
    """(label, sentence) when check_pin() said no; names the digests the peer actually has."""
    der = peer_certificate(peer)
    if not der:
        return "pin_mismatch", f"{peer_name} presented no certificate to compare with 'pin_sha256'"
    digests = _pin_digests(der)
    return (
        "pin_mismatch",
        f"{peer_name}'s certificate matches none of the pins in 'pin_sha256' (it has cert:{digests['cert']}, "
        f"spki:{digests['spki']}); if it was renewed on purpose, update the pin",
    )


def cert_facts_from_der(der: bytes) -> CertFacts:
    """Subject CN, SANs as text, issuer (RFC 4514) and SHA-256 fingerprint of a DER certificate."""
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    if isinstance(cn, bytes):
        cn = cn.decode("utf-8", "replace")
    sans: list[str] = []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        sans += ext.get_values_for_type(x509.DNSName)
        sans += [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
        sans += ext.get_values_for_type(x509.UniformResourceIdentifier)
        sans += ext.get_values_for_type(x509.RFC822Name)
    return CertFacts(
        subject_cn=cn,
        sans=tuple(sans),
        issuer=cert.issuer.rfc4514_string(),
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
    )


def cert_facts(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> CertFacts | None:
    """Facts of the peer's certificate, or None when there is none or it was not verified.

    Call it after the handshake on a listener connection (transport extra "ssl_object"). A
    certificate is only returned when the context verifies certificates (CERT_OPTIONAL or
    CERT_REQUIRED): OpenSSL fails the handshake for a bad one, so what is left is trusted.
    """
    if ssl_object is None or ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return cert_facts_from_der(der) if der else None


def bound_ae_titles(bind_ae: Mapping[str, frozenset[str]], facts: CertFacts | None) -> frozenset[str] | None:
    """The calling AE titles a client certificate may use on a listener with `bind_ae`.

    None: the listener has no bind_ae, so any AE title is allowed. Otherwise the union of the AE
    titles of every key matching the certificate's CN or any SAN (compared as cert_name_key()
    does: IP addresses canonical, names without regard to case). A certificate that matches no
    key, or no certificate at all, gets the empty set: only listed devices may associate. The relay
    rejects a calling AE outside the set with A-ASSOCIATE-RJ 1/1/3 (calling AE not recognised).
    """
    if not bind_ae:
        return None
    if facts is None:
        return frozenset()
    names = [facts.subject_cn] if facts.subject_cn else []
    names += facts.sans
    allowed: set[str] = set()
    for name in names:
        allowed |= bind_ae.get(cert_name_key(name), frozenset())
    return frozenset(allowed)


# --------------------------------------------------------------------------- expiry


EXPIRY_WARNING_WINDOW = datetime.timedelta(days=30)


@dataclass(frozen=True)
class ConfiguredCertificate:
    role: str  # "listener", "upstream_client" or "ca"
    name: str  # listener or upstream name; for CA files "listener:<name>" or "upstream:<name>"
    path: Path


def configured_certificates(config: ProxyConfig) -> tuple[ConfiguredCertificate, ...]:
    """Every certificate file the config names, as (role, name, path), for expiry warnings and the
    `dicomproxy_tls_certificate_expiry_timestamp_seconds{role,name}` gauge. The system trust store
    (an upstream without 'ca') is not listed."""
    out: list[ConfiguredCertificate] = []
    for listener in config.listeners:
        if listener.tls is None:
            continue
        out.append(ConfiguredCertificate("listener", listener.name, listener.tls.cert))
        if listener.tls.client_ca is not None:
            out.append(ConfiguredCertificate("ca", f"listener:{listener.name}", listener.tls.client_ca))
    for name, upstream in config.upstreams.items():
        if upstream.tls is None:
            continue
        if upstream.tls.cert is not None:
            out.append(ConfiguredCertificate("upstream_client", name, upstream.tls.cert))
        if upstream.tls.ca is not None:
            out.append(ConfiguredCertificate("ca", f"upstream:{name}", upstream.tls.ca))
    return tuple(out)


def certificate_expiry(path: Path) -> datetime.datetime:
    """The earliest notAfter (UTC, aware) of the PEM certificates in `path`: a chain or CA bundle
    stops working, at least in part, when its first certificate expires.

    Raises OSError if unreadable and ValueError if there is no PEM certificate in it.
    """
    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    return min(c.not_valid_after_utc for c in certs)


def expiry_warnings(
    config: ProxyConfig,
    *,
    now: datetime.datetime | None = None,
    within: datetime.timedelta = EXPIRY_WARNING_WINDOW,
) -> list[str]:
    """One sentence per configured certificate that has expired or expires within `within`
    (and per file that can no longer be read); the relay logs them at start and on reload."""
    now = now or datetime.datetime.now(datetime.UTC)
    warnings: list[str] = []
    for item in configured_certificates(config):
        what = f"{item.role} certificate of {item.name} ({item.path})"
        try:
            expiry = certificate_expiry(item.path)
        except (OSError, ValueError) as exc:
            warnings.append(f"cannot read the {what}: {_plain(exc)}")
            continue
        when = expiry.strftime("%Y-%m-%d %H:%M UTC")
        if expiry <= now:
            warnings.append(f"the {what} has EXPIRED on {when}")
        elif expiry - now <= within:
            days = (expiry - now).days
            warnings.append(f"the {what} expires on {when} (in {days} day{'s' if days != 1 else ''})")
    return warnings


# --------------------------------------------------------------------------- explaining failures

# X509_V_ERR_* codes (OpenSSL include/openssl/x509_vfy.h)
_UNABLE_TO_GET_ISSUER_CERT = 2
_CERT_SIGNATURE_FAILURE = 7
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_DEPTH_ZERO_SELF_SIGNED_CERT = 18
_SELF_SIGNED_CERT_IN_CHAIN = 19
_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
_INVALID_PURPOSE = 26
_HOSTNAME_MISMATCH = 62
_IP_ADDRESS_MISMATCH = 64
_EE_KEY_TOO_SMALL = 66
_CA_KEY_TOO_SMALL = 67
_CA_MD_TOO_WEAK = 68

_PROTOCOL_REASONS = frozenset(
    {
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNSUPPORTED_PROTOCOL",
        "VERSION_TOO_LOW",
        "VERSION_TOO_HIGH",
        "NO_PROTOCOLS_AVAILABLE",
        "TLSV1_ALERT_INAPPROPRIATE_FALLBACK",
    }
)
_CIPHER_REASONS = frozenset({"NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE", "NO_SUITABLE_SIGNATURE_ALGORITHM"})
# Alerts a peer sends when it did not like the certificate we presented (or its absence).
_REJECTED_REASONS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
    }
)
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"}
)
_NO_CLIENT_CERT_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE"})


def describe_tls_error(
    exc: BaseException,
    *,
    peer: str | None = None,
    server_name: str | None = None,
    server_side: bool = False,
    profile: str | None = None,
) -> tuple[str, str]:
    """(label, sentence) for a TLS failure; the label is one of TLS_ERROR_LABELS.

    `server_side=False` (default): the proxy was the TLS client of an archive ("the archive").
    `server_side=True`: a client failed the handshake of a TLS listener ("the client").
    `peer` overrides the name of the other side; `server_name` is the name we checked the
    certificate against; `profile` (the profile in force) makes version and cipher failures
    name what the proxy allowed.
    """
    who = peer or ("the client" if server_side else "the archive")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _describe_verify(exc, who, server_name, server_side)
    if isinstance(exc, ssl.SSLError):
        return _describe_ssl(exc, who, server_side, profile)
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "handshake_failure", f"{who} reset the connection during the TLS handshake"
    if isinstance(exc, EOFError):
        return "handshake_failure", f"{who} closed the connection during the TLS handshake"
    return "other", f"TLS failed: {_plain(exc)}"


def describe_listener_tls_error(exc: BaseException, profile: str | None = None) -> tuple[str, str]:
    """describe_tls_error for a client failing a TLS listener's handshake ("the client ...")."""
    return describe_tls_error(exc, server_side=True, profile=profile)


def _describe_verify(
    exc: ssl.SSLCertVerificationError, peer: str, server_name: str | None, server_side: bool
) -> tuple[str, str]:
    code = getattr(exc, "verify_code", None)
    detail = str(getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or "verification failed")
    whose = f"{peer}'s certificate"
    ca_key = "'client_ca' file of the listener" if server_side else "'ca' file"
    if code in (_UNABLE_TO_GET_ISSUER_CERT, _UNABLE_TO_GET_ISSUER_CERT_LOCALLY, _UNABLE_TO_VERIFY_LEAF_SIGNATURE):
        return "unknown_ca", f"{whose} is signed by an unknown CA ({detail}); check the {ca_key}"
    if code == _CERT_SIGNATURE_FAILURE:
        return "unknown_ca", f"{whose} is not signed by the trusted CA ({detail}); check the {ca_key}"
    if code == _SELF_SIGNED_CERT_IN_CHAIN:
        return "unknown_ca", f"{whose} chains to an unknown CA that we do not trust ({detail}); check the {ca_key}"
    if code == _DEPTH_ZERO_SELF_SIGNED_CERT:
        return "self_signed", f"{whose} is self-signed and not trusted ({detail})"
    if code == _CERT_HAS_EXPIRED:
        return "expired", f"{whose} has expired ({detail})"
    if code == _CERT_NOT_YET_VALID:
        return "not_yet_valid", f"{whose} is not valid yet (check the clocks) ({detail})"
    if code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
        name = f" {server_name!r}" if server_name else ""
        return (
            "hostname_mismatch",
            f"{whose} does not match the host name{name} ({detail}); set 'server_name' to a name "
            "the certificate carries",
        )
    if code in (_EE_KEY_TOO_SMALL, _CA_KEY_TOO_SMALL, _CA_MD_TOO_WEAK):
        return (
            "weak_certificate",
            f"{whose} chain uses a key or signature hash that the TLS profiles refuse ({detail}); RSA and DH "
            "keys need 2048 bits or more, ECC keys 224, signatures SHA-256 or better",
        )
    if code == _INVALID_PURPOSE:
        use = "client" if server_side else "server"
        return "other", f"{whose} is not allowed for TLS {use} use ({detail})"
    return "other", f"{whose} failed verification ({detail})"


def _allowed_versions(profile: str | None) -> str | None:
    if profile is None:
        return None
    try:
        p = _profile(profile)
    except ProxyError:
        return None
    return f"profile {p.name!r} allows {' and '.join(p.versions)} only"


def _describe_ssl(exc: ssl.SSLError, peer: str, server_side: bool, profile: str | None) -> tuple[str, str]:
    reason = str(getattr(exc, "reason", None) or "")  # absent on SSLError built by hand
    allowed = _allowed_versions(profile)
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "handshake_failure", f"{peer} closed the connection during the TLS handshake"
    if reason in _PROTOCOL_REASONS:
        if allowed is not None:
            return "protocol_version", f"{peer} and the proxy share no TLS version: {allowed} ({reason})"
        if server_side:
            return "protocol_version", f"{peer} only offered TLS versions the listener refuses ({reason})"
        return "protocol_version", f"{peer} only speaks an older TLS version than TLS 1.2 ({reason})"
    if reason in _CIPHER_REASONS:
        hint = f"; the proxy uses profile {profile!r}" if allowed is not None else ""
        return "no_shared_cipher", f"{peer} and the proxy share no TLS cipher suite{hint} ({reason})"
    if reason in _NO_CLIENT_CERT_REASONS:
        return (
            "no_client_certificate",
            f"{peer} sent no certificate, but the listener requires one (require_client_cert); install a "
            f"client certificate on the device ({reason})",
        )
    if reason in _REJECTED_REASONS:
        return "peer_rejected_certificate", _rejected_words(reason, peer, server_side)
    if reason in _NOT_TLS_REASONS:
        if server_side:
            return "not_tls", f"{peer} did not start TLS; is the device set up for plain DICOM? ({reason})"
        return "not_tls", f"{peer} did not answer with TLS; is this a plain DICOM port? ({reason})"
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        if server_side:
            return "handshake_failure", f"{peer} aborted the TLS handshake ({reason})"
        # TLS 1.2 servers send this one alert for several causes; name the likely ones.
        return (
            "handshake_failure",
            f"{peer} aborted the TLS handshake: it may require a client certificate or share no "
            f"cipher suite with the proxy ({reason})",
        )
    return "other", f"TLS failed: {reason or _plain(exc)}"


def _rejected_words(reason: str, peer: str, server_side: bool) -> str:
    ours = "the listener's certificate" if server_side else "the proxy's client certificate"
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return f"{peer} requires a client certificate and the proxy sent none; set 'cert' and 'key'"
    if reason == "TLSV1_ALERT_UNKNOWN_CA":
        if server_side:
            return (f"{peer} does not trust the CA of the listener's certificate; install that CA on the device "
                    f"({reason})")
        return f"{peer} does not trust the CA of the proxy's client certificate ({reason})"
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        return f"{peer} says {ours} has expired ({reason})"
    return f"{peer} rejected {ours} ({reason})"


def describe_connect_error(exc: BaseException, address: Address | str | None = None) -> tuple[str, str]:
    """(label, sentence) for a failed TCP connect; the label is one of CONNECT_ERROR_LABELS."""
    where = str(address) if address is not None else "the archive"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", f"connection refused by {where} (is the archive running?)"
    if isinstance(exc, TimeoutError):
        return "timeout", f"no answer from {where} within the connect timeout"
    if isinstance(exc, socket.gaierror):
        host = address.host if isinstance(address, Address) else where
        return "dns", f"cannot resolve the host name of {host} ({exc.strerror or exc})"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return "reset", f"{where} reset the connection"
    if isinstance(exc, OSError) and exc.errno in (
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.EADDRNOTAVAIL,
    ):
        return "unreachable", f"{where} is unreachable ({exc.strerror})"
    return "other", f"cannot connect to {where}: {_plain(exc)}"


def describe_upstream_error(
    exc: BaseException,
    address: Address | str | None = None,
    *,
    server_name: str | None = None,
    profile: str | None = None,
) -> tuple[str, str]:
    """One call for the relay: TLS problems go to describe_tls_error, the rest to connect."""
    if isinstance(exc, ssl.SSLError):
        return describe_tls_error(exc, server_name=server_name, profile=profile)
    return describe_connect_error(exc, address)


def _plain(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

