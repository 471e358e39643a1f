"""TLS legs on a non-blocking ssl.SSLSocket, as an asyncio Transport: the connection to a TLS
archive, and connections accepted on a TLS listener.

asyncio's own TLS transport runs OpenSSL on memory BIOs: each relayed byte is encrypted into one
buffer, copied out as a new bytes object, then copied again into the kernel, with a Python state
machine around every write (bench/out/profile-w1: about 40 % of the proxy's CPU in a C-STORE
stream). Here OpenSSL reads and writes the socket itself, as stunnel does: SSL_write encrypts
straight into the socket, SSL_read decrypts straight from it.

Write semantics follow OpenSSL's non-blocking rules (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, no
partial writes): a write that would block is kept as an owned copy and retried with at least the
same bytes when the socket is writable; later writes are appended behind it, so order holds.
Nothing handed to write() is referenced after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
"""Decrypted bytes gathered per readiness event before data_received (one TLS record is 16 KiB)."""
SHUTDOWN_GRACE = 2.0
"""After our close_notify, how long we wait for the peer's before closing the socket."""
FLUSH_DEADLINE = 10.0
"""After close(), how long pending writes may wait for a peer that stopped reading."""

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    future: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not future.done():
            future.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, done)
    try:
        await future
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def open_tls(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    context: ssl.SSLContext,
    server_hostname: str | None,
    session: ssl.SSLSession | None = None,
    *,
    server_side: bool = False,
) -> ssl.SSLSocket:
    """The TLS handshake on a connected non-blocking socket (the caller bounds it with a timeout),
    as the client of an archive or, with `server_side`, as the server of a TLS listener.
    ssl.SSLError (certificate, version, cipher) or OSError as the handshake fails."""
    if server_side:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    else:
        tls = context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False,
                                  session=session)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await _ready(loop, tls.fileno(), write=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, tls.fileno(), write=True)
    except BaseException:
        tls.close()  # wrap_socket took over the file descriptor from `sock`
        raise


_local = threading.local()


def _scratch() -> memoryview:
    """One decrypt buffer per thread (per event loop) for every connection: _read_ready hands
    out an owned copy before anything else runs, so 1,000 associations hold 256 KiB, not 256 MiB."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_CHUNK))
    return view


class TLSSocketTransport(asyncio.Transport):
    """A connected, handshaken SSLSocket driven by the loop's reader/writer callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._loop = loop
        self._tls = tls
        self._fd = tls.fileno()
        self._protocol = protocol
        self._pending = bytearray()  # plaintext SSL_write has not taken yet (an owned copy)
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._writer = False
        self._reader = False
        self._reading_paused = False
        self._protocol_paused = False
        self._closing = False  # close() called: flush, close_notify, then close
        self._shutdown_sent = False
        self._lost = False
        self._timer: asyncio.TimerHandle | None = None
        self._extra: dict[str, Any] = {
            "socket": tls,
            "peername": _peername(tls),
            "sockname": tls.getsockname(),
            "ssl_object": tls,
            "sslcontext": tls.context,
        }
        protocol.connection_made(self)
        if not self._closing and not self._reading_paused:
            self._add_reader()
            self._loop.call_soon(self._read_ready)  # records OpenSSL may already hold

    # ---- asyncio.BaseTransport -----------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in _ON_DEMAND and name not in self._extra and not self._lost:
            # asyncio's names, decoded only when asked for (getpeercert() parses the certificate)
            self._extra[name] = getattr(self._tls, _ON_DEMAND[name])()
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Flush what is pending, send close_notify, then close once the peer answers (or after
        SHUTDOWN_GRACE): the way asyncio's TLS transport ends a connection."""
        if self._closing or self._lost:
            return
        self._closing = True
        if not self._pending:
            self._shutdown()
        else:
            self._timer = self._loop.call_later(FLUSH_DEADLINE, self._finish, None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ---- reading -------------------------------------------------------------------------------
    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    def pause_reading(self) -> None:
        if self._reading_paused or self._lost:
            return
        self._reading_paused = True
        self._remove_reader()

    def resume_reading(self) -> None:
        if not self._reading_paused or self._lost:
            return
        self._reading_paused = False
        self._add_reader()
        self._loop.call_soon(self._read_ready)  # decrypted bytes may wait inside OpenSSL

    def _add_reader(self) -> None:
        if not self._reader and not self._lost:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reader = True

    def _remove_reader(self) -> None:
        if self._reader:
            self._loop.remove_reader(self._fd)
            self._reader = False

    def _read_ready(self) -> None:
        if self._lost or (self._reading_paused and not self._closing):
            return
        if self._pending:  # a write that waited for the peer (a TLS 1.3 key update) may go now
            self._flush()
        view = _scratch()
        size = 0
        eof = False
        try:
            # SSL_read decrypts one record (16 KiB at most) per call, straight into our buffer
            while size < READ_CHUNK:
                n = self._tls.recv_into(view[size:])
                if not n:
                    eof = True
                    break
                size += n
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:
            self._add_writer()
        except (ssl.SSLError, OSError) as exc:
            if size and not self._closing:
                self._protocol.data_received(bytes(view[:size]))
            self._fatal(exc)
            return
        if self._closing and self._shutdown_sent:
            if eof:
                self._finish(None)  # the peer's close_notify (or FIN) after ours: done
            return  # Sta13: what arrives after our close is drained and dropped
        if size:
            # an owned copy: the relay may keep views of what it is given (a PDU cut by the read)
            self._protocol.data_received(bytes(view[:size]))
        if eof and not self._lost:
            if self._closing:  # data_received closed us and the peer is gone too: nothing to wait for
                self._finish(None)
                return
            self._remove_reader()
            keep_open = self._protocol.eof_received()
            if not keep_open or self.is_closing():
                self.close()
                self._finish(None)
        elif size >= READ_CHUNK and not self._lost and not self._reading_paused:
            self._loop.call_soon(self._read_ready)  # more may sit decrypted in OpenSSL

    # ---- writing -------------------------------------------------------------------------------
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low
        self._control_protocol()

    def get_write_buffer_size(self) -> int:
        return len(self._pending)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost or self._closing or not data:
            return
        if self._pending:
            self._pending += data
            self._control_protocol()
            return
        try:
            sent = self._tls.send(data)
        except _WANT as exc:
            # OpenSSL may have sent some records already; the retry must start with these same bytes
            self._pending += data
            if isinstance(exc, ssl.SSLWantWriteError):
                self._add_writer()
            self._control_protocol()
            return
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        if sent < len(data):  # only with SSL_MODE_ENABLE_PARTIAL_WRITE; handled all the same
            self._pending += memoryview(data)[sent:]
            self._add_writer()
            self._control_protocol()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close (close_notify ends both directions for OpenSSL)

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    def _add_writer(self) -> None:
        if not self._writer and not self._lost:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer = True

    def _remove_writer(self) -> None:
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False

    def _write_ready(self) -> None:
        if self._lost:
            return
        if self._pending:
            self._flush()
        else:
            self._remove_writer()
            self._loop.call_soon(self._read_ready)  # a read that had to write first

    def _flush(self) -> None:
        try:
            sent = self._tls.send(self._pending)
        except ssl.SSLWantWriteError:
            self._add_writer()
            return
        except ssl.SSLWantReadError:
            self._remove_writer()
            return  # _read_ready retries
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        del self._pending[:sent]
        if self._pending:
            self._add_writer()
            self._control_protocol()
            return
        self._remove_writer()
        self._control_protocol()
        if self._closing and not self._shutdown_sent:
            self._shutdown()

    def _control_protocol(self) -> None:
        size = len(self._pending)
        if not self._protocol_paused and size > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()
        elif self._protocol_paused and size <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()

    # ---- ending --------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        self._shutdown_sent = True
        # SSL_shutdown sends close_notify; want-read (the peer's has not come yet) is the normal answer
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self._tls.unwrap()
        self._remove_writer()
        self._reading_paused = False
        self._add_reader()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(SHUTDOWN_GRACE, self._finish, None)

    def abort(self) -> None:
        self._finish(None)

    def _fatal(self, exc: BaseException) -> None:
        log.debug("TLS connection to %s ended: %s", self._extra.get("peername"), exc)
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = True
        self._remove_reader()
        self._remove_writer()
        self._pending = bytearray()
        with contextlib.suppress(OSError):
            self._tls.close()
        self._loop.call_soon(self._connection_lost, exc if isinstance(exc, Exception) else None)

    def _connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = _DETACHED  # break the transport <-> protocol cycle at once, as asyncio does
            self._extra.clear()


_DETACHED = asyncio.Protocol()
_ON_DEMAND = {"peercert": "getpeercert", "cipher": "cipher", "compression": "compression"}


def _peername(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None
