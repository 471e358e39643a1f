"""TLS contexts against a real TLS server on 127.0.0.1, and every failure explained by its label.

The archive side is a blocking TLS server on a thread (like a foreign archive would be); the
proxy side is asyncio, as in the relay. Each server takes exactly one connection, so no test
sleeps or polls; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy import certs, tls
from proxy.config import Address, UpstreamTLS
from proxy.errors import ProxyError

WAIT = 10.0  # seconds; generous for a loaded 2-core machine, never reached when things work


@dataclass(frozen=True)
class PKI:
    good: dict[str, Path]  # the CA the proxy trusts
    rogue: dict[str, Path]  # another CA with the same kind of certificates
    expired: tuple[Path, Path]  # from the trusted CA, but expired


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    good = certs.init(tmp_path_factory.mktemp("good"))
    rogue = certs.init(tmp_path_factory.mktemp("rogue"))
    expired = certs.issue(
        good["ca"].parent, tmp_path_factory.mktemp("expired"), "localhost", ["localhost", "127.0.0.1"],
        client=False, days=-1,
    )
    return PKI(good, rogue, expired)


@dataclass
class ServerResult:
    handshake_ok: bool = False
    error: BaseException | None = None
    peer_cn: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


@contextmanager
def tls_archive(ctx: ssl.SSLContext | None) -> Iterator[tuple[int, ServerResult]]:
    """Serve one connection: handshake (unless ctx is None: plain TCP), echo one read, close."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    port = listener.getsockname()[1]
    result = ServerResult()

    def run() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            result.error = exc
            result.done.set()
            return
        conn.settimeout(WAIT)
        try:
            if ctx is None:
                conn.recv(1024)
                conn.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")  # what a plain DICOM port says
                return
            with ctx.wrap_socket(conn, server_side=True) as tls_conn:
                result.handshake_ok = True
                der = tls_conn.getpeercert(binary_form=True)
                if der:
                    names = x509.load_der_x509_certificate(der).subject
                    result.peer_cn = str(names.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
                data = tls_conn.recv(1024)
                if data:
                    tls_conn.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            result.error = exc
        finally:
            conn.close()
            result.done.set()

    thread = threading.Thread(target=run, name=f"tls-archive-{port}", daemon=True)
    thread.start()
    try:
        yield port, result
    finally:
        listener.close()
        thread.join(WAIT)
        assert not thread.is_alive()


async def connect(
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str = "localhost",
    *,
    send: bytes | None = b"ping",
) -> bytes:
    """Connect as the relay would; with send=None only read (to learn a TLS 1.3 rejection)."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname
        )
        try:
            if send is not None:
                writer.write(send)
                await writer.drain()
            return await reader.read(1024)
        finally:
            writer.close()
            # The server may already be gone; the test is about what happened before.
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def failure(
    port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost", *, send: bytes | None = b"ping"
) -> tuple[str, str]:
    with pytest.raises((ssl.SSLError, OSError)) as info:
        await connect(port, ctx, server_hostname, send=send)
    return tls.describe_upstream_error(info.value, Address("127.0.0.1", port), server_name=server_hostname)


def archive(
    pki_files: dict[str, Path],
    tweak: Callable[[ssl.SSLContext], None] | None = None,
    *,
    client_ca: Path | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    ctx = tls.server_context(
        pki_files["archive"], pki_files["archive_key"], client_ca=client_ca, require_client_cert=require_client_cert
    )
    if tweak is not None:
        tweak(ctx)
    return ctx


# --------------------------------------------------------------------------- contexts


def test_upstream_context_profile(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.options & ssl.OP_NO_COMPRESSION
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all("ECDHE" in name and "GCM" in name for name in tls12), tls12
    assert ctx.cert_store_stats()["x509_ca"] == 1


def test_upstream_context_without_ca_uses_the_system_store() -> None:
    ctx = tls.upstream_context(UpstreamTLS())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_server_context_profile(pki: PKI) -> None:
    ctx = tls.server_context(pki.good["archive"], pki.good["archive_key"], client_ca=pki.good["ca"],
                             require_client_cert=True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_COMPRESSION
    optional = tls.server_context(pki.good["archive"], pki.good["archive_key"], client_ca=pki.good["ca"])
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    with pytest.raises(ProxyError):
        tls.server_context(pki.good["archive"], pki.good["archive_key"], require_client_cert=True)


def test_encrypted_key_raises_instead_of_prompting(pki: PKI, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.good["proxy_key"].read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"hunter22"),
    ))
    with pytest.raises(ProxyError) as info:
        tls.upstream_context(UpstreamTLS(cert=pki.good["proxy"], key=encrypted))
    assert "hunter22" not in str(info.value)


# --------------------------------------------------------------------------- real handshakes


async def test_connects_and_verifies(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], server_name="localhost"))
    with tls_archive(archive(pki.good)) as (port, server):
        assert await connect(port, ctx) == b"ping"
    assert server.handshake_ok and server.error is None


async def test_connects_by_ip_address_san(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    with tls_archive(archive(pki.good)) as (port, _):
        assert await connect(port, ctx, "127.0.0.1") == b"ping"


async def test_mutual_tls_presents_the_proxy_certificate(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], cert=pki.good["proxy"], key=pki.good["proxy_key"]))
    server_ctx = archive(pki.good, client_ca=pki.good["ca"], require_client_cert=True)
    with tls_archive(server_ctx) as (port, server):
        assert await connect(port, ctx) == b"ping"
    assert server.peer_cn == "dicom-proxy"


async def test_wrong_ca_is_unknown_ca(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    with tls_archive(archive(pki.rogue)) as (port, _):
        label, words = await failure(port, ctx)
    assert label == "unknown_ca"
    assert words.startswith("the archive's certificate is signed by an unknown CA (unable to get local issuer")


async def test_wrong_server_name_is_hostname_mismatch(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], server_name="pacs.example"))
    with tls_archive(archive(pki.good)) as (port, _):
        label, words = await failure(port, ctx, "pacs.example")
    assert label == "hostname_mismatch"
    assert words.startswith("the archive's certificate does not match the host name 'pacs.example'")


async def test_expired_certificate(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    cert, key = pki.expired
    with tls_archive(tls.server_context(cert, key)) as (port, _):
        label, words = await failure(port, ctx)
    assert (label, words) == ("expired", "the archive's certificate has expired (certificate has expired)")


async def test_self_signed_certificate(pki: PKI) -> None:
    ca_as_server = tls.server_context(pki.rogue["ca"], pki.rogue["ca_key"])
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    with tls_archive(ca_as_server) as (port, _):
        label, _ = await failure(port, ctx)
    assert label == "self_signed"


def _tls11_only(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1  # an old archive
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_old_tls_archive_is_protocol_version(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    try:
        server_ctx = archive(pki.good, _tls11_only)
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot even configure a TLS 1.1 server")
    with tls_archive(server_ctx) as (port, _):
        label, words = await failure(port, ctx)
    assert label == "protocol_version"
    assert words.startswith("the archive only speaks an older TLS version than TLS 1.2")


async def test_no_common_version_is_protocol_version(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx = archive(pki.good, lambda c: setattr(c, "maximum_version", ssl.TLSVersion.TLSv1_2))
    with tls_archive(server_ctx) as (port, _):
        label, _ = await failure(port, ctx)
    assert label == "protocol_version"


async def test_missing_client_certificate_tls13_is_learned_on_read(pki: PKI) -> None:
    """TLS 1.3: the client's handshake completes before the server judges it; the alert comes on read.

    Nothing is written first: data the server never reads would turn its close into a reset
    that can overtake the alert.
    """
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    server_ctx = archive(pki.good, client_ca=pki.good["ca"], require_client_cert=True)
    with tls_archive(server_ctx) as (port, server):
        label, words = await failure(port, ctx, send=None)
    assert not server.handshake_ok
    assert label == "peer_rejected_certificate"
    assert "requires a client certificate" in words


async def test_client_certificate_from_untrusted_ca_tls13(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], cert=pki.rogue["proxy"], key=pki.rogue["proxy_key"]))
    server_ctx = archive(pki.good, client_ca=pki.good["ca"], require_client_cert=True)
    with tls_archive(server_ctx) as (port, _):
        label, words = await failure(port, ctx, send=None)
    assert label == "peer_rejected_certificate"
    assert "does not trust the CA of the proxy's client certificate" in words


async def test_missing_client_certificate_tls12_is_a_handshake_failure(pki: PKI) -> None:
    """TLS 1.2 servers answer with a generic alert during the handshake; the words name the likely cause."""
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    server_ctx = archive(pki.good, lambda c: setattr(c, "maximum_version", ssl.TLSVersion.TLSv1_2),
                         client_ca=pki.good["ca"], require_client_cert=True)
    with tls_archive(server_ctx) as (port, _):
        label, words = await failure(port, ctx)
    assert label == "handshake_failure"
    assert "client certificate" in words


async def test_plain_dicom_port_is_not_tls(pki: PKI) -> None:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    with tls_archive(None) as (port, _):
        label, words = await failure(port, ctx)
    assert label == "not_tls"
    assert "plain DICOM port" in words


async def test_closed_port_is_refused() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ctx = tls.upstream_context(UpstreamTLS())
    label, words = await failure(port, ctx)
    assert (label, words) == ("refused", f"connection refused by 127.0.0.1:{port} (is the archive running?)")


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("exc", "label"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "refused"),
        (TimeoutError(), "timeout"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "dns"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "unreachable"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "unreachable"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "reset"),
        (OSError(errno.EMFILE, "Too many open files"), "other"),
    ],
)
def test_describe_connect_error_labels(exc: BaseException, label: str) -> None:
    got, words = tls.describe_connect_error(exc, Address("pacs.example", 2762))
    assert got == label and got in tls.CONNECT_ERROR_LABELS
    assert "pacs.example" in words


def test_describe_tls_error_labels_are_from_the_fixed_set() -> None:
    samples: list[BaseException] = [ssl.SSLEOFError(8, "EOF"), ConnectionResetError(), ValueError("x")]
    for exc in samples:
        label, words = tls.describe_tls_error(exc)
        assert label in tls.TLS_ERROR_LABELS and words


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"\x16\x03\x01\x02\x00", True),  # TLS 1.0-1.3 ClientHello record header
        (b"\x16\x03\x03", True),
        (b"\x16\x03\x00", True),  # SSL 3.0 record version: still TLS-shaped
        (b"\x16\x03\x05", False),
        (b"\x01\x00\x00\x00\x00\xcd", False),  # A-ASSOCIATE-RQ
        (b"\x16\x03", False),  # too short to tell
        (b"", False),
    ],
)
def test_sniff_tls_client_hello(first: bytes, expected: bool) -> None:
    assert tls.sniff_tls_client_hello(first) is expected
