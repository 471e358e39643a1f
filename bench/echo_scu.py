"""A minimal Verification SCU on a raw (optionally TLS) socket, for timing association setup.

One association is: TCP connect (+ TLS handshake when a context is given), A-ASSOCIATE-RQ,
A-ASSOCIATE-AC, C-ECHO-RQ/RSP, A-RELEASE-RQ/RP, close. The bench process runs it in-process, so
the numbers exclude the process start-up an echoscu-per-association loop would be dominated by.
Setup time is measured from before connect() to the moment the A-ASSOCIATE-AC is complete.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"
APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPL_CLASS_UID = b"1.2.826.0.1.3680043.9.7433.1.1"
IMPL_VERSION = b"BENCH_ECHO_1"


class EchoError(RuntimeError):
    pass


@dataclass(frozen=True)
class EchoTiming:
    setup: float  # connect (+ TLS) + RQ -> AC, seconds
    echo: float  # C-ECHO-RQ -> RSP
    total: float  # connect -> transport closed after A-RELEASE-RP
    tls_version: str | None
    cipher: str | None
    resumed: bool | None


def _uid(value: bytes) -> bytes:
    return value + b"\0" if len(value) % 2 else value


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(calling: str, called: str, max_pdu: int) -> bytes:
    pc = _item(
        0x20,
        struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, VERIFICATION) + _item(0x40, IMPLICIT_LE),
    )
    user = _item(
        0x50,
        _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPL_CLASS_UID) + _item(0x55, IMPL_VERSION),
    )
    body = (
        struct.pack(">HH", 1, 0)
        + _ae(called)
        + _ae(calling)
        + bytes(32)
        + _item(0x10, APP_CONTEXT)
        + pc
        + user
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _element(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, elem, len(value)) + value


def echo_rq_pdu(message_id: int) -> bytes:
    elements = (
        _element(0, 0x0002, _uid(VERIFICATION))
        + _element(0, 0x0100, struct.pack("<H", 0x0030))
        + _element(0, 0x0110, struct.pack("<H", message_id & 0xFFFF))
        + _element(0, 0x0800, struct.pack("<H", 0x0101))
    )
    command = _element(0, 0x0000, struct.pack("<I", len(elements))) + elements
    pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command  # context 1, command, last fragment
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


RELEASE_RQ = struct.pack(">BBII", 0x05, 0, 4, 0)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EchoError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    pdu_type, _r, length = struct.unpack(">BBI", _recv_exact(sock, 6))
    return pdu_type, _recv_exact(sock, length)


def _check_ac(body: bytes) -> None:
    off = 68  # protocol version, reserved, AE titles, 32 reserved bytes
    while off + 4 <= len(body):
        item_type, _r, length = struct.unpack_from(">BBH", body, off)
        if item_type == 0x21:
            context_id, result = body[off + 4], body[off + 6]
            if context_id == 1:
                if result != 0:
                    raise EchoError(f"Verification presentation context refused (result {result})")
                return
        off += 4 + length
    raise EchoError("A-ASSOCIATE-AC without presentation context 1")


def _echo_status(body: bytes) -> int:
    # P-DATA-TF body: PDV length (4), context id, control header, then the command set
    command = body[6:]
    off = 0
    while off + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, off)
        if (group, elem) == (0, 0x0900):
            status: int = struct.unpack_from("<H", command, off + 8)[0]
            return status
        off += 8 + length
    raise EchoError("C-ECHO-RSP without a Status")


def echo_once(
    host: str,
    port: int,
    *,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    calling: str = "BENCHSCU",
    called: str = "ANY-SCP",
    max_pdu: int = 131072,
    message_id: int = 1,
    timeout: float = 30.0,
) -> EchoTiming:
    t0 = time.perf_counter()
    raw = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname=server_hostname)
        sock.sendall(associate_rq(calling, called, max_pdu))
        pdu_type, body = _recv_pdu(sock)
        if pdu_type != 0x02:
            raise EchoError(f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}")
        _check_ac(body)
        t_setup = time.perf_counter()
        sock.sendall(echo_rq_pdu(message_id))
        pdu_type, body = _recv_pdu(sock)
        if pdu_type != 0x04:
            raise EchoError(f"expected P-DATA-TF, got PDU type 0x{pdu_type:02X}")
        status = _echo_status(body)
        if status != 0:
            raise EchoError(f"C-ECHO status 0x{status:04X}")
        t_echo = time.perf_counter()
        sock.sendall(RELEASE_RQ)
        pdu_type, _body = _recv_pdu(sock)
        if pdu_type != 0x06:
            raise EchoError(f"expected A-RELEASE-RP, got PDU type 0x{pdu_type:02X}")
        version = cipher = None
        resumed = None
        if isinstance(sock, ssl.SSLSocket):
            version = sock.version()
            info = sock.cipher()
            cipher = info[0] if info else None
            resumed = sock.session_reused
    finally:
        sock.close()
    t_end = time.perf_counter()
    return EchoTiming(t_setup - t0, t_echo - t_setup, t_end - t0, version, cipher, resumed)
