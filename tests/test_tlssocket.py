"""proxy.tlssocket against a real TLS peer (a standard-library SSLSocket in a thread): every byte
arrives in order through backpressure both ways, and each way of ending reports exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from proxy import tls, tlssocket
from proxy.config import UpstreamTLS
from tests.conftest import Pki
from tests.peers import LOOPBACK, tls_server_context


@dataclass
class Recorder(asyncio.Protocol):
    """Collects what the transport reports, in order."""

    events: list[str] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    writable: asyncio.Event = field(default_factory=asyncio.Event)
    on_data: Callable[[Recorder, bytes], None] | None = None
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append("made")
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            self.on_data(self, data)

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def pause_writing(self) -> None:
        self.events.append("pause_writing")
        self.writable.clear()

    def resume_writing(self) -> None:
        self.events.append("resume_writing")
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set()


@contextmanager
def tls_peer(pki: Pki, serve: Callable[[ssl.SSLSocket], None]) -> Iterator[tuple[int, threading.Thread]]:
    """A TLS server on 127.0.0.1 that runs `serve` on its one connection in a thread."""
    ctx = tls_server_context(pki.archive_cert, pki.archive_key, pki.ca)
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]

    def run() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls_conn:
            serve(tls_conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield port, thread
    finally:
        listener.close()
        thread.join(10)


async def connect(pki: Pki, port: int, protocol: Recorder) -> tlssocket.TLSSocketTransport:
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.ca, cert=pki.proxy_cert, key=pki.proxy_key))
    loop = asyncio.get_running_loop()
    sock = socket.create_connection((LOOPBACK, port))
    sock.setblocking(False)
    tls_sock = await asyncio.wait_for(tlssocket.open_tls(loop, sock, ctx, "localhost"), 10)
    return tlssocket.TLSSocketTransport(loop, tls_sock, protocol)


def _read_all(conn: ssl.SSLSocket, digest: hashlib._Hash, *, slow: bool = False) -> int:
    total = 0
    while True:
        data = conn.recv(4096 if slow else 1 << 16)
        if not data:
            return total
        digest.update(data)
        total += len(data)
        if slow and total < (1 << 20):
            threading.Event().wait(0.001)  # a slow archive for the first MiB: the kernel buffers fill


async def test_a_large_write_to_a_slow_peer_arrives_whole_and_in_order(dev_certs: Pki) -> None:
    payload = os.urandom(1 << 20) * 24  # 24 MiB in 128 KiB writes: far more than the socket buffers
    got = hashlib.sha256()
    counted: list[int] = []
    with tls_peer(dev_certs, lambda conn: counted.append(_read_all(conn, got, slow=True))) as (port, thread):
        protocol = Recorder()
        transport = await connect(dev_certs, port, protocol)
        transport.set_write_buffer_limits(high=256 * 1024)
        view = memoryview(payload)
        for offset in range(0, len(payload), 128 * 1024):
            chunk = bytearray(view[offset : offset + 128 * 1024])
            transport.write(chunk)
            chunk[:] = b"\0" * len(chunk)  # the transport must not keep a reference to what it was given
            await asyncio.wait_for(protocol.writable.wait(), 20)  # flow control, as the relay obeys it
        transport.close()
        await asyncio.wait_for(protocol.lost.wait(), 20)
        await asyncio.to_thread(thread.join, 20)
    assert counted == [len(payload)]
    assert got.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert "pause_writing" in protocol.events and "resume_writing" in protocol.events
    assert protocol.events[-1] == "lost" and protocol.events.count("lost") == 1


async def test_reading_paused_in_data_received_loses_nothing_when_resumed(dev_certs: Pki) -> None:
    payload = os.urandom(1 << 20) * 8

    def send(conn: ssl.SSLSocket) -> None:
        conn.sendall(payload)
        conn.unwrap()  # close_notify, then wait for the proxy's

    with tls_peer(dev_certs, send) as (port, _thread):
        loop = asyncio.get_running_loop()

        def pause_a_moment(protocol: Recorder, _data: bytes) -> None:
            assert protocol.transport is not None
            protocol.transport.pause_reading()  # as the relay does when the other side is full
            loop.call_later(0.002, protocol.transport.resume_reading)

        protocol = Recorder(on_data=pause_a_moment)
        await connect(dev_certs, port, protocol)
        await asyncio.wait_for(protocol.lost.wait(), 20)
    assert bytes(protocol.received) == payload
    assert protocol.events == ["made", "eof", "lost"]


@pytest.mark.parametrize("how", ["close", "abort", "peer_closes"])
async def test_each_ending_reports_connection_lost_once(dev_certs: Pki, how: str) -> None:
    seen: list[bytes] = []

    def serve(conn: ssl.SSLSocket) -> None:
        if how == "peer_closes":
            conn.sendall(b"bye")
            return  # the context manager closes the socket (no close_notify)
        try:
            seen.append(conn.recv(100))
            seen.append(conn.recv(100))  # b"" after the proxy's close_notify or close
        except (ssl.SSLError, OSError):
            seen.append(b"<reset>")

    with tls_peer(dev_certs, serve) as (port, thread):
        protocol = Recorder()
        transport = await connect(dev_certs, port, protocol)
        if how != "peer_closes":
            transport.write(b"hello")
            getattr(transport, how)()
            assert transport.is_closing()
        await asyncio.wait_for(protocol.lost.wait(), 10)
        await asyncio.sleep(0)  # a second connection_lost would be scheduled by now
        await asyncio.to_thread(thread.join, 10)
    assert protocol.events.count("lost") == 1
    if how == "close":
        assert seen == [b"hello", b""]  # everything written before close() arrives, then a clean end
    elif how == "peer_closes":
        assert bytes(protocol.received) == b"bye"
        assert protocol.events == ["made", "eof", "lost"]
    transport.write(b"after the end")  # ignored, never raises


async def test_a_failed_handshake_leaves_no_socket_open(dev_certs: Pki, other_ca_certs: Pki) -> None:
    """The peer's certificate is from another CA: open_tls raises and closes what it wrapped."""

    ctx = tls_server_context(other_ca_certs.archive_cert, other_ca_certs.archive_key, other_ca_certs.ca)
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]

    def run() -> None:
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client_ctx = tls.upstream_context(UpstreamTLS(ca=dev_certs.ca))
    sock = socket.create_connection((LOOPBACK, port))
    sock.setblocking(False)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(tlssocket.open_tls(asyncio.get_running_loop(), sock, client_ctx, "localhost"), 10)
    assert sock.fileno() == -1  # wrap_socket took the descriptor; open_tls closed it
    listener.close()
    await asyncio.to_thread(thread.join, 10)


async def test_close_gives_up_on_a_peer_that_never_reads(dev_certs: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pending writes wait at most FLUSH_DEADLINE after close(): an association can always end."""
    monkeypatch.setattr(tlssocket, "FLUSH_DEADLINE", 0.3)
    release = threading.Event()
    with tls_peer(dev_certs, lambda _conn: release.wait(20)) as (port, thread):
        protocol = Recorder()
        transport = await connect(dev_certs, port, protocol)
        for _ in range(64):
            transport.write(bytes(1 << 20))  # far more than the socket buffers hold
        assert transport.get_write_buffer_size() > 0
        transport.close()
        await asyncio.wait_for(protocol.lost.wait(), 10)
        release.set()
        await asyncio.to_thread(thread.join, 10)
    assert protocol.events.count("lost") == 1


async def test_extra_info_as_asyncio_names_it(dev_certs: Pki) -> None:
    with tls_peer(dev_certs, lambda conn: conn.recv(1)) as (port, thread):
        protocol = Recorder()
        transport = await connect(dev_certs, port, protocol)
        assert transport.get_extra_info("peername") == (LOOPBACK, port)
        assert transport.get_extra_info("cipher")[1] in ("TLSv1.2", "TLSv1.3")
        subject = dict(pair[0] for pair in transport.get_extra_info("peercert")["subject"])
        assert subject["commonName"]  # the archive's verified certificate, decoded on demand
        assert isinstance(transport.get_extra_info("ssl_object"), ssl.SSLSocket)
        assert transport.get_extra_info("nonsense", "default") == "default"
        transport.write(b"x")
        transport.close()
        await asyncio.wait_for(protocol.lost.wait(), 10)
        await asyncio.to_thread(thread.join, 10)
