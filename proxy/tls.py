"""TLS contexts for the BCP 195 non-downgrading profile, and failures explained in plain words.

Both sides: TLS 1.2 or newer, TLS 1.2 suites limited to ECDHE with AES-GCM (the four suites
dcmtk uses for PS3.15 B.10/B.12), TLS 1.3 suites left at OpenSSL's defaults (all allowed by
B.12), no compression, no renegotiation, certificates always verified. A TLS failure at 3 a.m.
must tell the admin which side to fix, so the error helpers map OpenSSL's codes to a small
fixed set of labels (safe for metrics) and a sentence (for logs). They never quote key
material or file contents.
"""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path

from proxy.config import Address, UpstreamTLS
from proxy.errors import ProxyError

__all__ = [
    "CONNECT_ERROR_LABELS",
    "TLS12_CIPHERS",
    "TLS_ERROR_LABELS",
    "describe_connect_error",
    "describe_tls_error",
    "describe_upstream_error",
    "server_context",
    "sniff_tls_client_hello",
    "upstream_context",
]

TLS12_CIPHERS = "ECDHE+AESGCM"
"""ECDHE-{RSA,ECDSA}-AES{128,256}-GCM: the PS3.15 B.12 TLS 1.2 suites (standards.md section 7)."""

TLS_ERROR_LABELS = (
    "unknown_ca",
    "hostname_mismatch",
    "expired",
    "not_yet_valid",
    "self_signed",
    "protocol_version",
    "no_shared_cipher",
    "peer_rejected_certificate",
    "not_tls",
    "handshake_failure",
    "other",
)
"""Every label describe_tls_error() returns, so metrics can initialise them all at start."""

CONNECT_ERROR_LABELS = ("refused", "timeout", "unreachable", "dns", "reset", "other")
"""Every label describe_connect_error() returns."""


def _no_password() -> bytes:
    raise ProxyError("the private key is encrypted; the proxy needs an unencrypted key")


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


class ResumingClientContext(ssl.SSLContext):
    """A client context that offers the last session it was given, so a new association to the same
    archive resumes TLS (one round trip and no certificate checks) instead of a full handshake.

    asyncio does not expose `session=`, but it builds its SSLObject through `wrap_bio`. The relay
    stores `session` after the first exchange on a connection: TLS 1.3 tickets arrive after the
    handshake. OpenSSL falls back to a full handshake when the archive no longer accepts it.
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

    Raises ssl.SSLError/OSError if a file cannot be used, and ProxyError for an encrypted key
    (OpenSSL would otherwise prompt on the terminal).
    """
    ctx = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert is not None:
        key = str(tls.key) if tls.key is not None else None
        ctx.load_cert_chain(str(tls.cert), key, password=_no_password)
    return ctx


def server_context(
    cert: Path, key: Path, *, client_ca: Path | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """Server context with the same floor and suites (tests' archives, later TLS listeners).

    With `client_ca` a client certificate is verified when offered; `require_client_cert`
    makes it mandatory (mutual TLS, the PS3.15 norm) and needs `client_ca`.
    """
    if require_client_cert and client_ca is None:
        raise ProxyError("require_client_cert needs client_ca to verify the client certificates")
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def sniff_tls_client_hello(first: bytes) -> bool:
    """True if the first bytes look like a TLS record carrying a handshake (needs 3 bytes).

    0x16 is not a PDU type, so a plain DICOM listener can tell a TLS client apart and say so.
    """
    return len(first) >= 3 and first[0] == 0x16 and first[1] == 0x03 and first[2] <= 0x04


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
# Alerts the server sends when it did not like the certificate we presented (or its absence).
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
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})


def describe_tls_error(
    exc: BaseException, *, peer: str = "the archive", server_name: str | None = None
) -> tuple[str, str]:
    """(label, sentence) for a TLS failure; the label is one of TLS_ERROR_LABELS.

    `peer` names the other side in the sentence; `server_name` is the name we checked the
    certificate against (OpenSSL's message has it too, but not always).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _describe_verify(exc, peer, server_name)
    if isinstance(exc, ssl.SSLError):
        return _describe_ssl(exc, peer)
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "handshake_failure", f"{peer} reset the connection during the TLS handshake"
    if isinstance(exc, EOFError):
        return "handshake_failure", f"{peer} closed the connection during the TLS handshake"
    return "other", f"TLS failed: {_plain(exc)}"


def _describe_verify(
    exc: ssl.SSLCertVerificationError, peer: str, server_name: str | None
) -> tuple[str, str]:
    code = getattr(exc, "verify_code", None)
    detail = str(getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or "verification failed")
    whose = f"{peer}'s certificate"
    if code in (_UNABLE_TO_GET_ISSUER_CERT, _UNABLE_TO_GET_ISSUER_CERT_LOCALLY, _UNABLE_TO_VERIFY_LEAF_SIGNATURE):
        return "unknown_ca", f"{whose} is signed by an unknown CA ({detail}); check the 'ca' file"
    if code == _CERT_SIGNATURE_FAILURE:
        return "unknown_ca", f"{whose} is not signed by the trusted CA ({detail}); check the 'ca' file"
    if code == _SELF_SIGNED_CERT_IN_CHAIN:
        return "unknown_ca", f"{whose} chains to an unknown CA that we do not trust ({detail}); check the 'ca' file"
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
    if code == _INVALID_PURPOSE:
        return "other", f"{whose} is not allowed for TLS server use ({detail})"
    return "other", f"{whose} failed verification ({detail})"


def _describe_ssl(exc: ssl.SSLError, peer: str) -> tuple[str, str]:
    reason = str(getattr(exc, "reason", None) or "")  # absent on SSLError built by hand
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "handshake_failure", f"{peer} closed the connection during the TLS handshake"
    if reason in _PROTOCOL_REASONS:
        return "protocol_version", f"{peer} only speaks an older TLS version than TLS 1.2 ({reason})"
    if reason in _CIPHER_REASONS:
        return "no_shared_cipher", f"{peer} and the proxy share no TLS cipher suite ({reason})"
    if reason in _REJECTED_REASONS:
        return "peer_rejected_certificate", _rejected_words(reason, peer)
    if reason in _NOT_TLS_REASONS:
        return "not_tls", f"{peer} did not answer with TLS; is this a plain DICOM port? ({reason})"
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        # TLS 1.2 servers send this one alert for several causes; name the likely ones.
        return (
            "handshake_failure",
            f"{peer} aborted the TLS handshake: it may require a client certificate or share no "
            f"cipher suite with the proxy ({reason})",
        )
    return "other", f"TLS failed: {reason or _plain(exc)}"


def _rejected_words(reason: str, peer: str) -> str:
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return f"{peer} requires a client certificate and the proxy sent none; set 'cert' and 'key'"
    if reason == "TLSV1_ALERT_UNKNOWN_CA":
        return f"{peer} does not trust the CA of the proxy's client certificate ({reason})"
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        return f"{peer} says the proxy's client certificate has expired ({reason})"
    return f"{peer} rejected the proxy's client certificate ({reason})"


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
    exc: BaseException, address: Address | str | None = None, *, server_name: str | None = None
) -> tuple[str, str]:
    """One call for the relay: TLS problems go to describe_tls_error, the rest to connect."""
    if isinstance(exc, ssl.SSLError):
        return describe_tls_error(exc, server_name=server_name)
    return describe_connect_error(exc, address)


def _plain(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
