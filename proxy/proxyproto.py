"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt), receiver side.

A load balancer in TCP mode (HAProxy `send-proxy` / `send-proxy-v2`) writes one header at the
very start of each connection, before the client's first byte, telling who the client really
is. The parser is sans-I/O: `parse(buffer)` looks at the bytes received so far and returns

* a ProxyHeader, whose `consumed` bytes are the header (the rest is the client's data, e.g. the
  A-ASSOCIATE-RQ or the TLS ClientHello);
* None: the bytes so far are a proper prefix of a header, send more. Every byte of such a
  buffer belongs to the header, so a reader may consume all of it (read_header() relies on it);
* or raises ProxyProtocolError: not a header, a broken one, or one larger than we accept.

Version 1, text, at most 107 bytes with the CRLF (section 2.1)::

    PROXY TCP4 192.0.2.10 198.51.100.7 50123 104\\r\\n
    PROXY TCP6 2001:db8::10 2001:db8::1 50123 104\\r\\n
    PROXY UNKNOWN[ anything]\\r\\n                      (use the real connection's addresses)

Version 2, binary (section 2.2)::

    off 0   12 bytes  signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    off 12  u8        version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY)
    off 13  u8        family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) | transport (low: 1 STREAM)
    off 14  u16 BE    length of what follows
    off 16            INET: src 4, dst 4, sport 2, dport 2 (12 bytes)
                      INET6: src 16, dst 16, sport 2, dport 2 (36 bytes)
                      UNIX: src 108, dst 108 (216 bytes)
    then              TLVs: type u8, length u16 BE, value (skipped; CRC32C 0x03 is verified)

LOCAL (a health check by the balancer itself), UNSPEC, UNIX and UNKNOWN headers carry no client
address: `source` is None and the real peer (the balancer) stands for the client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.errors import ProxyError

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "HeaderReader",
    "Network",
    "ProxyHeader",
    "ProxyProtocolError",
    "crc32c",
    "is_trusted",
    "parse",
    "read_header",
]

V1_PREFIX = b"PROXY "
MAX_V1_LENGTH = 107
"""Section 2.1: the longest v1 line ("PROXY UNKNOWN" plus two IPv6 addresses and ports), CRLF included."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16
MAX_V2_LENGTH = 2048
"""The largest v2 address block + TLVs we buffer. The spec allows 65535; HAProxy's own TLVs
(ALPN, authority, unique id up to 128 bytes, SSL with CN and cipher) fit in a few hundred bytes."""

_V2_ADDRESS_LENGTH = {0x11: 12, 0x21: 36, 0x31: 216}
_V2_FAMILY_NAMES = {
    0x00: "UNSPEC",
    0x11: "TCP over IPv4",
    0x12: "UDP over IPv4",
    0x21: "TCP over IPv6",
    0x22: "UDP over IPv6",
    0x31: "UNIX stream",
    0x32: "UNIX datagram",
}
PP2_TYPE_CRC32C = 0x03
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocolError(ProxyError):
    """The connection did not start with a valid PROXY protocol header; close it, send nothing."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header. `source`/`destination` are (ip, port) as the client and the balancer's
    frontend saw them, with the ip in canonical text form; None when the header carries none
    (LOCAL, UNKNOWN, UNSPEC, UNIX): then use the connection's own peer address."""

    version: int  # 1 or 2
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    consumed: int  # header length in bytes: strip these, the rest is the client's data
    local: bool = False  # v2 LOCAL command (the balancer's own connection, e.g. a health check)
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 type-length-values, in order (CRC32C verified)

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of `tlv_type`, if any (e.g. 0x02 AUTHORITY = TLS SNI)."""
        return next((value for kind, value in self.tlvs if kind == tlv_type), None)


def parse(buffer: bytes | bytearray | memoryview, *, max_v2_length: int = MAX_V2_LENGTH) -> ProxyHeader | None:
    """A header from the start of `buffer`, None when more bytes are needed, or ProxyProtocolError."""
    data = bytes(buffer[: max(V2_HEADER_LENGTH + max_v2_length, MAX_V1_LENGTH)])
    if not data:
        return None
    head = data[: len(V2_SIGNATURE)]
    if V2_SIGNATURE.startswith(head):
        return _parse_v2(data, max_v2_length)
    head = data[: len(V1_PREFIX)]
    if V1_PREFIX.startswith(head):
        return _parse_v1(data)
    raise ProxyProtocolError(f"expected a PROXY protocol header, got {_describe_start(data)}")


def _describe_start(data: bytes) -> str:
    shown = data[:8].hex(" ")
    if data[0] == 0x01:
        return (f"bytes {shown} (an A-ASSOCIATE-RQ: the balancer sends no PROXY header; add send-proxy-v2 "
                "to its server line, or remove proxy_protocol from this listener)")
    if data[0] == 0x16:
        return (f"bytes {shown} (a TLS ClientHello: the balancer sends no PROXY header; add send-proxy-v2 "
                "to its server line)")
    return f"bytes {shown}"


# --------------------------------------------------------------------------- version 1


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0 and len(data) >= MAX_V1_LENGTH:
        raise ProxyProtocolError(f"PROXY v1 header has no CRLF within {MAX_V1_LENGTH} bytes")
    line = data[:end] if end >= 0 else data
    for offset, byte in enumerate(line):
        # The line is printable US-ASCII; a lone CR only counts once we know no LF follows it.
        if not 0x20 <= byte <= 0x7E and not (byte == 0x0D and offset == len(data) - 1):
            raise ProxyProtocolError(f"PROXY v1 header has byte 0x{byte:02x} at offset {offset} "
                                     "(expected printable ASCII up to CRLF)")
    if end < 0:
        return None
    consumed = end + 2
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        return ProxyHeader(version=1, source=None, destination=None, consumed=consumed)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"PROXY v1 protocol {protocol.decode('ascii')!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyProtocolError(f"PROXY v1 {protocol.decode('ascii')} line needs 4 fields after the protocol, "
                                 f"separated by single spaces; got {len(fields) - 2}")
    v6 = protocol == b"TCP6"
    src = _v1_address(fields[2], v6, "source address")
    dst = _v1_address(fields[3], v6, "destination address")
    sport = _v1_port(fields[4], "source port")
    dport = _v1_port(fields[5], "destination port")
    return ProxyHeader(version=1, source=(src, sport), destination=(dst, dport), consumed=consumed)


def _v1_address(raw: bytes, v6: bool, what: str) -> str:
    text = raw.decode("ascii")
    shape = _V1_IPV6 if v6 else _V1_IPV4
    try:
        if not shape.fullmatch(raw):
            raise ValueError(text)
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv6Address(text) if v6 else ipaddress.IPv4Address(text)
        )
    except ValueError:
        kind = "IPv6" if v6 else "IPv4"
        raise ProxyProtocolError(f"PROXY v1 {what} {text!r} is not an {kind} address") from None
    return str(address)


def _v1_port(raw: bytes, what: str) -> int:
    if not _V1_PORT.fullmatch(raw) or int(raw) > 65535:
        raise ProxyProtocolError(f"PROXY v1 {what} {raw.decode('ascii')!r} is not a number from 0 to 65535")
    return int(raw)


# --------------------------------------------------------------------------- version 2


def _parse_v2(data: bytes, max_length: int) -> ProxyHeader | None:
    if len(data) < V2_HEADER_LENGTH:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family = data[13]
    (length,) = struct.unpack_from(">H", data, 14)
    if version != 2:
        raise ProxyProtocolError(f"PROXY v2 header has version {version} (expected 2)")
    if command not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2 header has command {command} (expected 0 LOCAL or 1 PROXY)")
    if length > max_length:
        raise ProxyProtocolError(f"PROXY v2 header declares {length} bytes of addresses and TLVs "
                                 f"(at most {max_length} accepted)")
    consumed = V2_HEADER_LENGTH + length
    if len(data) < consumed:
        return None
    block = data[V2_HEADER_LENGTH:consumed]
    if command == 0:
        # LOCAL: the balancer's own connection; the spec says to ignore the family and the block.
        return ProxyHeader(version=2, source=None, destination=None, consumed=consumed, local=True)
    if family not in _V2_ADDRESS_LENGTH and family != 0x00:
        name = _V2_FAMILY_NAMES.get(family, "unknown")
        raise ProxyProtocolError(f"PROXY v2 family/transport 0x{family:02x} ({name}) is not supported "
                                 "(DICOM runs over TCP)")
    address_length = _V2_ADDRESS_LENGTH.get(family, 0)
    if length < address_length:
        raise ProxyProtocolError(f"PROXY v2 header is {length} bytes long, too short for the "
                                 f"{_V2_FAMILY_NAMES[family]} addresses ({address_length} bytes)")
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if family == 0x11:
        src4, dst4, sport, dport = struct.unpack_from(">4s4sHH", block)
        source = (str(ipaddress.IPv4Address(src4)), sport)
        destination = (str(ipaddress.IPv4Address(dst4)), dport)
    elif family == 0x21:
        src6, dst6, sport, dport = struct.unpack_from(">16s16sHH", block)
        source = (str(ipaddress.IPv6Address(src6)), sport)
        destination = (str(ipaddress.IPv6Address(dst6)), dport)
    tlvs = _parse_tlvs(data, V2_HEADER_LENGTH + address_length, consumed)
    return ProxyHeader(version=2, source=source, destination=destination, consumed=consumed, tlvs=tlvs)


def _parse_tlvs(data: bytes, start: int, end: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset = start
    while offset < end:
        if end - offset < 3:
            raise ProxyProtocolError(f"PROXY v2 TLV at offset {offset} is cut short ({end - offset} bytes left)")
        kind = data[offset]
        (length,) = struct.unpack_from(">H", data, offset + 1)
        value_start = offset + 3
        if value_start + length > end:
            raise ProxyProtocolError(f"PROXY v2 TLV 0x{kind:02x} at offset {offset} declares {length} bytes, "
                                     f"only {end - value_start} left in the header")
        value = data[value_start : value_start + length]
        if kind == PP2_TYPE_CRC32C:
            _check_crc(data[:end], value_start, value)
        tlvs.append((kind, value))
        offset = value_start + length
    return tuple(tlvs)


def _check_crc(header: bytes, at: int, value: bytes) -> None:
    if len(value) != 4:
        raise ProxyProtocolError(f"PROXY v2 CRC32C TLV has {len(value)} bytes (expected 4)")
    zeroed = header[:at] + b"\0\0\0\0" + header[at + 4 :]
    expected = crc32c(zeroed)
    (got,) = struct.unpack(">I", value)
    if got != expected:
        raise ProxyProtocolError(f"PROXY v2 CRC32C mismatch (header says {got:08x}, computed {expected:08x})")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 3720 B.4), as PP2_TYPE_CRC32C uses it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------- trust and readers


def is_trusted(peer_ip: str, trusted: Iterable[Network]) -> bool:
    """Whether a connection's real peer address is one of the `trusted_proxies` networks.
    IPv4-mapped IPv6 peers (a dual-stack listener) count as their IPv4 address."""
    try:
        address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


class HeaderReader:
    """For an asyncio Protocol: feed() the first reads until the header is complete.

    Returns None while more bytes are needed, then (header, the bytes after it) once; raises
    ProxyProtocolError on anything else. Buffers at most one header plus one read.
    """

    def __init__(self, *, max_v2_length: int = MAX_V2_LENGTH) -> None:
        self._buffer = bytearray()
        self._max_v2_length = max_v2_length
        self.header: ProxyHeader | None = None

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        if self.header is not None:
            raise RuntimeError("the PROXY header was already read; feed the DICOM framer instead")
        self._buffer += data
        header = parse(self._buffer, max_v2_length=self._max_v2_length)
        if header is None:
            return None
        self.header = header
        rest = bytes(self._buffer[header.consumed :])
        self._buffer.clear()
        return header, rest


async def read_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, *, max_v2_length: int = MAX_V2_LENGTH
) -> ProxyHeader:
    """Read exactly the PROXY header from a non-blocking accepted socket, and not one byte more,
    so that a TLS handshake (or a peek) can start right after it. Bound it with asyncio.timeout.

    Raises ProxyProtocolError on a bad header or when the peer closes first; OSError as is.
    """
    limit = V2_HEADER_LENGTH + max_v2_length
    taken = bytearray()
    while True:
        await _readable(loop, sock)
        peeked = sock.recv(limit - len(taken), socket.MSG_PEEK)
        if not peeked:
            raise ProxyProtocolError(
                f"the connection closed after {len(taken)} byte(s), before a complete PROXY header"
            )
        header = parse(taken + peeked, max_v2_length=max_v2_length)
        # A None from parse() means every byte so far is header: take them all, wait for more.
        want = len(peeked) if header is None else header.consumed - len(taken)
        while want > 0:
            chunk = sock.recv(want)
            if not chunk:  # pragma: no cover - the bytes were just peeked
                raise ProxyProtocolError("the connection closed in the middle of the PROXY header")
            taken += chunk
            want -= len(chunk)
        if header is not None:
            return header


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
