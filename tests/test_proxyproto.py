"""PROXY protocol v1/v2 parser (proxy.proxyproto): golden bytes, byte-at-a-time, errors, fuzz,
the socket reader, listener config, and a cross-check against a real HAProxy (send-proxy,
send-proxy-v2, CRC32C, IPv6) including a DICOM C-ECHO tcp-check through it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import proxyproto
from proxy.config import load_text
from proxy.dul.dimse import parse_command_set
from proxy.dul.pdus import AAssociateRQ, AReleaseRQ, PDataTF, parse_pdu
from proxy.errors import ConfigErrors
from proxy.proxyproto import HeaderReader, ProxyHeader, ProxyProtocolError, crc32c, is_trusted, parse
from tests.peers import LOOPBACK, Peer, free_port, require_module, require_tool, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
SIG = proxyproto.V2_SIGNATURE


# --------------------------------------------------------------------------- builders


def v1(protocol: str, src: str = "", dst: str = "", sport: int = 0, dport: int = 0) -> bytes:
    if protocol == "UNKNOWN":
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def v2(
    command: int = 1,
    family: int = 0x11,
    src: str = "192.0.2.1",
    dst: str = "198.51.100.7",
    sport: int = 50123,
    dport: int = 104,
    tlvs: list[tuple[int, bytes]] | None = None,
    crc: bool = False,
) -> bytes:
    if family == 0x11:
        block = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack(">HH", sport, dport)
    elif family == 0x21:
        block = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack(">HH", sport, dport)
    elif family == 0x31:
        block = b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")
    else:
        block = b""
    body = block + b"".join(struct.pack(">BH", kind, len(value)) + value for kind, value in tlvs or [])
    if crc:
        body += struct.pack(">BH", 0x03, 4) + b"\0\0\0\0"
    header = SIG + bytes([0x20 | command, family]) + struct.pack(">H", len(body)) + body
    if crc:
        header = header[:-4] + struct.pack(">I", crc32c(header))
    return header


# --------------------------------------------------------------------------- golden bytes

GOLDEN: list[tuple[str, bytes, ProxyHeader]] = [
    (
        "v1 TCP4",
        b"PROXY TCP4 192.0.2.10 198.51.100.7 50123 104\r\n",
        ProxyHeader(version=1, source=("192.0.2.10", 50123), destination=("198.51.100.7", 104), consumed=46),
    ),
    (
        "v1 TCP6",
        b"PROXY TCP6 2001:db8::10 2001:DB8:0:0::1 0 65535\r\n",
        ProxyHeader(version=1, source=("2001:db8::10", 0), destination=("2001:db8::1", 65535), consumed=49),
    ),
    (
        "v1 TCP6 with an IPv4-mapped source",
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
        ProxyHeader(version=1, source=("::ffff:c000:201", 1), destination=("::1", 2), consumed=37),
    ),
    ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n", ProxyHeader(version=1, source=None, destination=None, consumed=15)),
    (
        "v1 UNKNOWN with ignored addresses, the longest line",
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" 65535 65535\r\n",
        ProxyHeader(version=1, source=None, destination=None, consumed=107),
    ),
    (
        "v2 PROXY TCP4",
        bytes.fromhex("0d0a0d0a000d0a515549540a" "21" "11" "000c" "c0000201" "c6336407" "c3cb" "0068"),
        ProxyHeader(version=2, source=("192.0.2.1", 50123), destination=("198.51.100.7", 104), consumed=28),
    ),
    (
        "v2 PROXY TCP6",
        bytes.fromhex(
            "0d0a0d0a000d0a515549540a" "21" "21" "0024"
            "20010db8000000000000000000000010" "20010db8000000000000000000000001" "c3cb" "0068"
        ),
        ProxyHeader(version=2, source=("2001:db8::10", 50123), destination=("2001:db8::1", 104), consumed=52),
    ),
    (
        "v2 LOCAL (a health check by the balancer)",
        bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000"),
        ProxyHeader(version=2, source=None, destination=None, consumed=16, local=True),
    ),
    (
        "v2 LOCAL with a family and addresses, all ignored",
        bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "11" "000c" "7f000001" "7f000001" "0001" "0002"),
        ProxyHeader(version=2, source=None, destination=None, consumed=28, local=True),
    ),
    (
        "v2 PROXY UNSPEC",
        bytes.fromhex("0d0a0d0a000d0a515549540a" "21" "00" "0000"),
        ProxyHeader(version=2, source=None, destination=None, consumed=16),
    ),
    (
        "v2 PROXY TCP4 with TLVs: ALPN, AUTHORITY, NOOP",
        bytes.fromhex(
            "0d0a0d0a000d0a515549540a" "21" "11" "0027" "c0000201" "c6336407" "c3cb" "0068"
            "010008" "6469636f6d2f3130"  # ALPN "dicom/10"
            "020007" "706163732e6578"  # AUTHORITY "pacs.ex"
            "040003" "000000"  # NOOP
        ),
        ProxyHeader(
            version=2,
            source=("192.0.2.1", 50123),
            destination=("198.51.100.7", 104),
            consumed=55,
            tlvs=((0x01, b"dicom/10"), (0x02, b"pacs.ex"), (0x04, b"\0\0\0")),
        ),
    ),
]


@pytest.mark.parametrize(("name", "data", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_whole(name: str, data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected
    assert expected.consumed == len(data)


@pytest.mark.parametrize(("name", "data", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_with_trailing_client_bytes(name: str, data: bytes, expected: ProxyHeader) -> None:
    rq_start = b"\x01\x00\x00\x00\x00\xbc" + b"\x00" * 64
    header = parse(data + rq_start)
    assert header == expected
    assert (data + rq_start)[header.consumed :] == rq_start


@pytest.mark.parametrize(("name", "data", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_byte_at_a_time(name: str, data: bytes, expected: ProxyHeader) -> None:
    for end in range(len(data)):
        assert parse(data[:end]) is None, f"a {end}-byte prefix must ask for more"
    reader = HeaderReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None
    got = reader.feed(data[-1:] + b"\x01\x00")
    assert got == (expected, b"\x01\x00")


def test_v2_against_the_spec_builder() -> None:
    assert v2() == GOLDEN[5][1]
    assert v2(command=0, family=0, tlvs=[]) == GOLDEN[7][1]


def test_v2_unix_family_has_no_source() -> None:
    header = parse(v2(family=0x31))
    assert header == ProxyHeader(version=2, source=None, destination=None, consumed=16 + 216)


def test_tlv_lookup() -> None:
    header = GOLDEN[-1][2]
    assert header.tlv(0x02) == b"pacs.ex"
    assert header.tlv(0x20) is None


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 / iSCSI check value
    assert crc32c(b"") == 0


def test_v2_crc32c_is_verified() -> None:
    good = v2(tlvs=[(0x05, b"unique-id")], crc=True)
    header = parse(good)
    assert header is not None and header.tlv(0x03) == good[-4:]
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    with pytest.raises(ProxyProtocolError, match="CRC32C mismatch"):
        parse(bad)
    flipped = bytearray(good)
    flipped[17] ^= 0x01  # a source address bit
    with pytest.raises(ProxyProtocolError, match="CRC32C mismatch"):
        parse(bytes(flipped))


# --------------------------------------------------------------------------- errors

ERRORS: list[tuple[str, bytes, str]] = [
    ("an A-ASSOCIATE-RQ, no header", b"\x01\x00\x00\x00\x00\xbc\x00\x01", "A-ASSOCIATE-RQ.*send-proxy-v2"),
    ("a TLS ClientHello, no header", b"\x16\x03\x01\x02\x00\x01\x00\x01", "TLS ClientHello"),
    ("HTTP", b"GET / HTTP/1.1\r\n", "expected a PROXY protocol header"),
    ("lower case", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "expected a PROXY protocol header"),
    ("not quite the v2 signature", b"\r\n\r\n\x00\r\nQUIX", "expected a PROXY protocol header"),
    ("v1 unknown protocol", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "'UDP4' is not TCP4"),
    ("v1 empty protocol", b"PROXY \r\n", "'' is not TCP4"),
    ("v1 UNKNOWN glued", b"PROXY UNKNOWNX\r\n", "'UNKNOWNX'"),
    ("v1 too few fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs 4 fields"),
    ("v1 double space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "needs 4 fields"),
    ("v1 IPv6 in TCP4", b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an IPv4 address"),
    ("v1 IPv4 in TCP6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6 address"),
    ("v1 leading zero octet", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "not an IPv4 address"),
    ("v1 octet out of range", b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", "destination address"),
    ("v1 IPv6 scope id", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an IPv6 address"),
    ("v1 port too large", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port"),
    ("v1 port leading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n", "destination port"),
    ("v1 negative port", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "source port"),
    ("v1 bare LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "byte 0x0a"),
    ("v1 CR not followed by LF", b"PROXY TCP4 1.2.3.4\r5", "byte 0x0d"),
    ("v1 NUL", b"PROXY TCP4\x00", "byte 0x00"),
    ("v1 non-ASCII", "PROXY TCP4 é".encode(), "byte 0xc3"),
    ("v1 no CRLF in 107 bytes", b"PROXY UNKNOWN " + b"x" * 100, "no CRLF within 107 bytes"),
    ("v1 108-byte line", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "no CRLF within 107 bytes"),
    ("v2 version 1", SIG + b"\x11\x11\x00\x0c", "version 1"),
    ("v2 version 3", SIG + b"\x31\x11\x00\x0c", "version 3"),
    ("v2 command 2", SIG + b"\x22\x11\x00\x0c", "command 2"),
    ("v2 UDP over IPv4", SIG + b"\x21\x12\x00\x0c" + bytes(12), "0x12 \\(UDP over IPv4\\)"),
    ("v2 UNIX datagram", SIG + b"\x21\x32\x00\x00", "UNIX datagram"),
    ("v2 unknown family", SIG + b"\x21\x41\x00\x00", "0x41 \\(unknown\\)"),
    ("v2 INET too short", SIG + b"\x21\x11\x00\x08" + bytes(8), "too short for the TCP over IPv4"),
    ("v2 INET6 too short", SIG + b"\x21\x21\x00\x0c" + bytes(12), "too short for the TCP over IPv6"),
    ("v2 oversized length", SIG + b"\x21\x11\x08\x01", "declares 2049 bytes"),
    ("v2 maximum length", SIG + b"\x21\x11\xff\xff", "declares 65535 bytes"),
    ("v2 TLV header cut", SIG + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00", "cut short"),
    ("v2 TLV overruns", SIG + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05\x00", "declares 5 bytes"),
    ("v2 CRC32C wrong size", SIG + b"\x21\x00\x00\x05" + b"\x03\x00\x02\x00\x00", "CRC32C TLV has 2 bytes"),
]


@pytest.mark.parametrize(("name", "data", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name: str, data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse(data)


def test_oversized_v2_is_refused_from_the_16_byte_header() -> None:
    """Lengths are checked before buffering: the length field alone decides."""
    with pytest.raises(ProxyProtocolError, match="declares"):
        parse(SIG + b"\x21\x11\x10\x00")
    assert parse(SIG + b"\x21\x11\x10\x00", max_v2_length=0x1000) is None
    with pytest.raises(ProxyProtocolError, match="at most 12 accepted"):
        parse(v2(tlvs=[(4, b"x")]), max_v2_length=12)


def test_garbage_is_refused_early() -> None:
    """A v1 line is refused at its first bad byte, not after 107 bytes of waiting."""
    with pytest.raises(ProxyProtocolError):
        parse(b"PROXY \x01")
    with pytest.raises(ProxyProtocolError):
        parse(b"PROXX")
    assert parse(b"PROX") is None
    assert parse(b"\r\n\r\n\x00") is None


def test_header_reader_refuses_garbage_and_reuse() -> None:
    reader = HeaderReader()
    with pytest.raises(ProxyProtocolError):
        reader.feed(b"\x01\x00\x00\x00")
    reader = HeaderReader()
    assert reader.feed(v1("UNKNOWN")) == (ProxyHeader(1, None, None, 15), b"")
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    if header is not None:
        assert 15 <= header.consumed <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_after_each_prefix(tail: bytes) -> None:
    """Valid starts followed by anything: still only a header, None or ProxyProtocolError."""
    for start in (b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", SIG, SIG + b"\x21\x11", SIG + b"\x21\x21\x00\x24"):
        with contextlib.suppress(ProxyProtocolError):
            parse(start + tail)


ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x20, 0x30, 0xE0]), st.binary(max_size=40)),
                     max_size=4)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    sport, dport = draw(ports), draw(ports)
    if kind in ("v1-4", "v2-4"):
        src, dst = draw(ipv4s), draw(ipv4s)
    else:
        src, dst = draw(ipv6s), draw(ipv6s)
    if kind == "v1-unknown":
        data = v1("UNKNOWN")
        return data, ProxyHeader(1, None, None, len(data))
    if kind.startswith("v1"):
        data = v1("TCP4" if kind == "v1-4" else "TCP6", src, dst, sport, dport)
        return data, ProxyHeader(1, (src, sport), (dst, dport), len(data))
    if kind == "v2-local":
        data = v2(command=0, family=0, tlvs=[])
        return data, ProxyHeader(2, None, None, len(data), local=True)
    tlvs = draw(tlv_lists)
    crc = draw(st.booleans())
    data = v2(family=0x11 if kind == "v2-4" else 0x21, src=src, dst=dst, sport=sport, dport=dport, tlvs=tlvs, crc=crc)
    all_tlvs = tuple(tlvs) + (((0x03, data[-4:]),) if crc else ())
    return data, ProxyHeader(2, (src, sport), (dst, dport), len(data), tlvs=all_tlvs)


@settings(max_examples=300, deadline=None)
@given(valid_headers(), st.binary(max_size=64), st.integers(1, 40))
def test_roundtrip_and_prefix_invariant(case: tuple[bytes, ProxyHeader], tail: bytes, chunk: int) -> None:
    """parse() recovers what was built; every proper prefix asks for more (so a reader may
    consume it all); any split of header + client bytes gives the same header and the same rest."""
    data, expected = case
    assert parse(data + tail) == expected
    for end in range(len(data)):
        assert parse(data[:end]) is None
    reader = HeaderReader()
    stream = data + tail
    result = None
    for i in range(0, len(stream), chunk):
        result = reader.feed(stream[i : i + chunk])
        if result is not None:
            rest = result[1] + stream[i + chunk :]
            assert result[0] == expected
            assert rest == tail
            break
    assert result is not None


# --------------------------------------------------------------------------- trust


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.0.5.10", True),
        ("10.0.6.1", False),
        ("::ffff:10.0.5.10", True),  # a dual-stack listener
        ("2001:db8::7", True),
        ("2001:db8:1::7", False),
        ("fe80::1%eth0", False),
        ("not an address", False),
        ("127.0.0.1", False),
    ],
)
def test_is_trusted(peer: str, trusted: bool) -> None:
    networks = [ipaddress.ip_network("10.0.5.0/24"), ipaddress.ip_network("2001:db8::/64")]
    assert is_trusted(peer, networks) is trusted


# --------------------------------------------------------------------------- read_header on a socket


async def _reader_case(chunks: list[bytes], delay: float = 0.01) -> tuple[ProxyHeader | Exception, bytes]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)

    async def send() -> None:
        for chunk in chunks:
            await loop.sock_sendall(theirs, chunk)
            await asyncio.sleep(delay)
        theirs.shutdown(socket.SHUT_WR)

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(5):
            try:
                got: ProxyHeader | Exception = await proxyproto.read_header(loop, ours)
            except ProxyProtocolError as exc:
                got = exc
            await sender
            rest = bytearray()
            while chunk := await loop.sock_recv(ours, 4096):
                rest += chunk
        return got, bytes(rest)
    finally:
        ours.close()
        theirs.close()


async def test_read_header_consumes_exactly_the_header() -> None:
    header = v2(tlvs=[(0x05, b"abc")], crc=True)
    data = header + b"\x16\x03\x01TLS-CLIENT-HELLO"
    got, rest = await _reader_case([data[:5], data[5:17], data[17:30], data[30:]])
    assert isinstance(got, ProxyHeader) and got.source == ("192.0.2.1", 50123)
    assert rest == b"\x16\x03\x01TLS-CLIENT-HELLO"


async def test_read_header_v1_in_one_read_with_data_behind() -> None:
    data = v1("TCP4", "192.0.2.9", "192.0.2.1", 40000, 104) + b"\x01\x00rest"
    got, rest = await _reader_case([data])
    assert isinstance(got, ProxyHeader) and got.source == ("192.0.2.9", 40000)
    assert rest == b"\x01\x00rest"


async def test_read_header_byte_by_byte() -> None:
    data = v1("TCP6", "2001:db8::1", "2001:db8::2", 1, 2) + b"X"
    got, rest = await _reader_case([data[i : i + 1] for i in range(len(data))], delay=0.001)
    assert isinstance(got, ProxyHeader) and got.destination == ("2001:db8::2", 2)
    assert rest == b"X"


async def test_read_header_peer_closes_early() -> None:
    got, _rest = await _reader_case([b"PROXY TCP4 1.2"])
    assert isinstance(got, ProxyProtocolError)
    assert "closed after 14 byte(s)" in str(got)


async def test_read_header_garbage() -> None:
    got, _rest = await _reader_case([b"\x01\x00\x00\x00\x00\x10"])
    assert isinstance(got, ProxyProtocolError)
    assert "A-ASSOCIATE-RQ" in str(got)


# --------------------------------------------------------------------------- listener config

LISTENER_CONFIG = """\
listeners:
  - name: behind-haproxy
    address: 127.0.0.1:0
{extra}
upstreams:
  pacs: {{address: "127.0.0.1:11112"}}
default_upstream: pacs
"""


def _load_listener(extra: str) -> Any:
    return load_text(LISTENER_CONFIG.format(extra=extra)).listeners[0]


def _errors(extra: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_text(LISTENER_CONFIG.format(extra=extra))
    return [str(e) for e in info.value.errors]


def test_listener_defaults_have_no_proxy_protocol() -> None:
    listener = _load_listener("")
    assert listener.proxy_protocol is False
    assert listener.trusted_proxies == ()


def test_listener_proxy_protocol_with_trusted_networks() -> None:
    listener = _load_listener(
        "    proxy_protocol: true\n    trusted_proxies: [10.0.5.10, 10.0.6.0/24, \"2001:db8::/64\", 10.0.5.10/32]"
    )
    assert listener.proxy_protocol is True
    assert listener.trusted_proxies == (
        ipaddress.ip_network("10.0.5.10/32"),
        ipaddress.ip_network("10.0.6.0/24"),
        ipaddress.ip_network("2001:db8::/64"),
    )  # duplicates folded
    one = _load_listener("    proxy_protocol: true\n    trusted_proxies: 10.0.5.10")
    assert one.trusted_proxies == (ipaddress.ip_network("10.0.5.10/32"),)


@pytest.mark.parametrize(
    ("extra", "where", "message"),
    [
        ("    proxy_protocol: true", "proxy.yaml:4:5", "has 'proxy_protocol: true' but no 'trusted_proxies'"),
        ("    trusted_proxies: [10.0.0.0/8]", "proxy.yaml:4:5", "has no effect without 'proxy_protocol: true'"),
        ("    proxy_protocol: false\n    trusted_proxies: [10.0.0.0/8]", "proxy.yaml:5:5", "has no effect"),
        ("    proxy_protocol: yes\n    trusted_proxies: [10.0.0.0/8]", "proxy.yaml:4:21", "must be true or false"),
        ("    proxy_protocol: true\n    trusted_proxies: [10.0.0.1/8]", "proxy.yaml:5:23",
         "'10.0.0.1/8' is not an IP address or CIDR network: write 10.0.0.0/8 for the network, or 10.0.0.1 for"),
        ("    proxy_protocol: true\n    trusted_proxies: [haproxy.example]", "proxy.yaml:5:23",
         "'haproxy.example' is not an IP address"),
        ("    proxy_protocol: true\n    trusted_proxies: []", "proxy.yaml:5:22", "must not be an empty list"),
        ("    proxy_protocol: true\n    trusted_proxies: [8]", "proxy.yaml:5:23", "must be a string"),
        ("    proxy_protocol: true\n    trusted_proxies: {a: 1}", "proxy.yaml:5:22", "must be a list"),
        ("    proxy_protocol: true\n    trusted_proxy: [10.0.0.1]", "proxy.yaml:5:5", "unknown key 'trusted_proxy'"),
    ],
)
def test_listener_proxy_protocol_errors(extra: str, where: str, message: str) -> None:
    errors = _errors(extra)
    assert any(e.startswith(f"{where}: error: ") and message in e for e in errors), errors


def test_listener_trusting_everyone_warns() -> None:
    config = load_text(LISTENER_CONFIG.format(extra="    proxy_protocol: true\n    trusted_proxies: [\"::/0\"]"))
    assert any("trusts PROXY headers from every address (::/0)" in w for w in config.warnings)


# --------------------------------------------------------------------------- HAProxy health check bytes
# The README's "Scaling out behind HAProxy" tcp-check sends these, one line per part, so that an admin
# can change the AE titles (fixed 16-byte, space-padded fields: no length changes).

HC_ASSOCIATE_RQ = [
    ("A-ASSOCIATE-RQ: type 01, length 0xcb, protocol version 1", "0100000000cb00010000"),
    ("called AE title 'PACS' (16 bytes, space-padded)", "50414353202020202020202020202020"),
    ("calling AE title 'HAPROXY-CHECK'", "484150524f58592d434845434b202020"),
    ("32 reserved bytes", "00" * 32),
    ("application context 1.2.840.10008.3.1.1.1", "10000015312e322e3834302e31303030382e332e312e312e31"),
    (
        "presentation context 1: Verification, Implicit VR Little Endian",
        "2000002e01000000" "30000011312e322e3834302e31303030382e312e31" "40000011312e322e3834302e31303030382e312e32",
    ),
    (
        "user information: max length 16384, implementation class UID 2.25.334927767609596677975082085150820385188",
        "50000038" "5100000400004000"
        "5200002c322e32352e333334393237373637363039353936363737393735303832303835313530383230333835313838",
    ),
]
HC_ECHO_RQ = (
    "P-DATA-TF: C-ECHO-RQ, message ID 1, on context 1",
    "04000000004a0000004601030000000004000000380000000000020012000000312e322e3834302e31303030382e312e31"
    "00000000010200000030000000100102000000010000000008020000000101",
)
HC_RELEASE_RQ = ("A-RELEASE-RQ", "050000000004" "00000000")
HC_EXPECT_AC = "^02"  # rbinary on the hex of the answer: an A-ASSOCIATE-AC (an RJ starts with 03)
HC_EXPECT_SUCCESS = "00000009020000000000"  # binary: (0000,0900) Status, US, length 2, value 0000
HC_EXPECT_RP = "^06"  # rbinary: A-RELEASE-RP


def healthcheck_lines() -> list[str]:
    # `default`: the server line's options, so `check-send-proxy` applies (a bare `tcp-check connect`
    # sends no PROXY header); `linger`: close with a FIN after the A-RELEASE-RP, not a reset.
    lines = ["option tcp-check", "tcp-check connect default linger"]
    for comment, hexdata in HC_ASSOCIATE_RQ:
        lines.append(f"# {comment}")
        lines.append(f"tcp-check send-binary {hexdata}")
    lines.append(f"tcp-check expect rbinary {HC_EXPECT_AC} comment A-ASSOCIATE-AC")
    lines.append(f"# {HC_ECHO_RQ[0]}")
    lines.append(f"tcp-check send-binary {HC_ECHO_RQ[1]}")
    lines.append(f"tcp-check expect binary {HC_EXPECT_SUCCESS} comment C-ECHO-RSP\\ status\\ 0000")
    lines.append(f"# {HC_RELEASE_RQ[0]}")
    lines.append(f"tcp-check send-binary {HC_RELEASE_RQ[1]}")
    lines.append(f"tcp-check expect rbinary {HC_EXPECT_RP} comment A-RELEASE-RP")
    return lines


def test_healthcheck_bytes_are_valid_dicom() -> None:
    rq = parse_pdu(bytes.fromhex("".join(h for _c, h in HC_ASSOCIATE_RQ)))
    assert isinstance(rq, AAssociateRQ)
    assert rq.called_ae.strip() == "PACS" and rq.calling_ae.strip() == "HAPROXY-CHECK"
    assert rq.application_context == "1.2.840.10008.3.1.1.1"
    (context,) = rq.presentation_contexts
    assert (context.context_id, context.abstract_syntax, context.transfer_syntaxes) == (
        1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",))
    assert rq.max_length == 16384
    pdata = parse_pdu(bytes.fromhex(HC_ECHO_RQ[1]))
    assert isinstance(pdata, PDataTF)
    (pdv,) = list(pdata.pdvs())
    assert pdv.context_id == 1 and pdv.is_command and pdv.is_last
    command = parse_command_set(pdv.fragment)
    assert command.command_field == 0x0030 and command.message_id == 1
    assert command.affected_sop_class_uid == "1.2.840.10008.1.1"
    assert isinstance(parse_pdu(bytes.fromhex(HC_RELEASE_RQ[1])), AReleaseRQ)


def test_readme_healthcheck_matches_the_tested_bytes() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    if "Scaling out behind HAProxy" not in readme:
        pytest.skip("README has no 'Scaling out behind HAProxy' section yet")
    for line in healthcheck_lines():
        if line.startswith("tcp-check"):
            assert line in readme, f"README's haproxy.cfg lacks the tested line: {line}"


# --------------------------------------------------------------------------- real HAProxy


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder for UNIX sockets (sun_path is 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="hap-") as folder:
        yield Path(folder)


class HAProxy:
    def __init__(self, peer: Peer, stats: Path) -> None:
        self.peer = peer
        self.stats = stats

    def command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(text.encode() + b"\n")
            out = bytearray()
            while chunk := sock.recv(65536):
                out += chunk
        return out.decode()

    def server_status(self, backend: str, server: str = "s") -> dict[str, str]:
        lines = self.command("show stat").splitlines()
        names = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(names, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname") == server:
                return row
        raise AssertionError(f"no server {backend}/{server} in:\n" + "\n".join(lines))


def start_haproxy(tmp_path: Path, short_tmp: Path, body: str) -> HAProxy:
    binary = require_tool("haproxy")
    stats = short_tmp / "stats.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n"
        f"    stats socket {stats} level admin\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 2s\n"
        "    timeout client 10s\n"
        "    timeout server 10s\n"
        "    timeout check 2s\n"
        + body
    )
    check = Peer("haproxy-check", [binary, "-c", "-f", str(config)], tmp_path / "haproxy-check.log").start()
    assert check.wait(20) == 0, check.log_text()
    peer = Peer("haproxy", [binary, "-db", "-f", str(config)], tmp_path / "haproxy.log").start()
    wait_until(stats.exists, 10, "haproxy's stats socket", peer=peer)
    return HAProxy(peer, stats)


class Receiver:
    """What the proxy will do on a proxy_protocol listener: accept, read_header(), then the rest."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.got: list[tuple[ProxyHeader, tuple[str, int], bytes]] = []

    async def serve_one(self) -> tuple[ProxyHeader, tuple[str, int], bytes]:
        loop = asyncio.get_running_loop()
        conn, peer = await loop.sock_accept(self.sock)
        with conn:
            conn.setblocking(False)
            header = await proxyproto.read_header(loop, conn)
            data = await loop.sock_recv(conn, 100)
            await loop.sock_sendall(conn, b"OK " + data)
        result = (header, peer, data)
        self.got.append(result)
        return result


Endpoint = tuple[str, int]


async def _through(frontend: Endpoint, receiver: Receiver) -> tuple[ProxyHeader, Endpoint, Endpoint]:
    task = asyncio.create_task(receiver.serve_one())
    reader, writer = await asyncio.open_connection(*frontend)
    client = writer.get_extra_info("sockname")[:2]
    writer.write(b"\x01\x00dicom")
    await writer.drain()
    assert await reader.read(100) == b"OK \x01\x00dicom"
    writer.close()
    header, peer, data = await task
    assert data == b"\x01\x00dicom"
    return header, peer, client


async def test_haproxy_send_proxy_headers(tmp_path: Path, short_tmp: Path) -> None:
    receiver = Receiver()
    ports = {name: free_port() for name in ("v2", "v1", "crc", "v2six", "v1six")}
    body = ""
    for name, port in ports.items():
        bind = f"[::1]:{port}" if name.endswith("six") else f"{LOOPBACK}:{port}"
        option = {"v2": "send-proxy-v2", "v1": "send-proxy", "crc": "send-proxy-v2 proxy-v2-options crc32c",
                  "v2six": "send-proxy-v2", "v1six": "send-proxy"}[name]
        body += (f"frontend fe_{name}\n    bind {bind}\n    default_backend be_{name}\n"
                 f"backend be_{name}\n    server s {LOOPBACK}:{receiver.port} {option}\n")
    haproxy = start_haproxy(tmp_path, short_tmp, body)
    try:
        for name, port in ports.items():
            host = "::1" if name.endswith("six") else LOOPBACK
            header, peer, client = await _through((host, port), receiver)
            assert header.version == (1 if name.startswith("v1") else 2), name
            assert header.local is False
            assert header.source == (client[0], client[1]), name  # the client, not HAProxy
            assert header.destination == (host, port), name
            assert peer[0] == LOOPBACK and peer[1] != client[1]  # the real peer is HAProxy
            if name == "crc":
                assert header.tlv(0x03) is not None  # verified by parse()
    finally:
        haproxy.peer.stop()
        receiver.sock.close()


@pytest.fixture
def verification_scp() -> Iterator[int]:
    """A plaintext pynetdicom Verification SCP (any called AE title), standing in for the archive."""
    require_module("pynetdicom")
    from pynetdicom import AE

    ae = AE(ae_title="PACS")
    ae.require_called_aet = False
    ae.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False)
    assert server is not None
    yield port
    server.shutdown()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except ConnectionError:
        pass
    finally:
        dst.close()


class StandIn:
    """A stand-in for the proxy on a proxy_protocol listener: read the header, then relay bytes."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.headers: list[ProxyHeader] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = HeaderReader()
        rest = b""
        while True:
            data = await reader.read(4096)
            if not data:
                writer.close()
                return
            got = headers.feed(data)
            if got is not None:
                header, rest = got
                self.headers.append(header)
                break
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream)
        up_writer.write(rest)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def test_haproxy_dicom_echo_health_check(tmp_path: Path, short_tmp: Path, verification_scp: int) -> None:
    """The README's tcp-check (A-ASSOCIATE-RQ, C-ECHO, A-RELEASE) against a real DICOM SCP, directly
    and through a PROXY-protocol receiver; checks arrive as v2 LOCAL, clients as PROXY."""
    stand_in = StandIn(verification_scp)
    await stand_in.start()
    check = "\n".join(f"    {line}" for line in healthcheck_lines())
    front = free_port()
    body = (
        f"backend be_direct\n{check}\n    server s {LOOPBACK}:{verification_scp} check inter 300ms rise 1 fall 1\n"
        f"backend be_proxied\n{check}\n"
        f"    server s {LOOPBACK}:{stand_in.port} send-proxy-v2 check check-send-proxy inter 300ms rise 1 fall 1\n"
        f"frontend fe\n    bind {LOOPBACK}:{front}\n    default_backend be_proxied\n"
    )
    haproxy = start_haproxy(tmp_path, short_tmp, body)
    try:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 10
        while True:
            direct = await loop.run_in_executor(None, haproxy.server_status, "be_direct")
            proxied = await loop.run_in_executor(None, haproxy.server_status, "be_proxied")
            if all(row["check_status"].lstrip("* ") == "L7OK" and row["status"] == "UP" for row in (direct, proxied)):
                break
            assert time.monotonic() < deadline, (direct, proxied, haproxy.peer.log_text())
            await asyncio.sleep(0.2)
        assert stand_in.headers and all(h.local and h.version == 2 for h in stand_in.headers)

        # A real C-ECHO from a client through HAProxy: the receiver learns the client's address.
        from pynetdicom import AE

        def echo() -> int:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate(LOOPBACK, front, ae_title="PACS")
            assert assoc.is_established
            status = assoc.send_c_echo()
            assoc.release()
            return int(status.Status)

        assert await loop.run_in_executor(None, echo) == 0
        proxied_headers = [h for h in stand_in.headers if not h.local]
        assert len(proxied_headers) == 1
        assert proxied_headers[0].source is not None and proxied_headers[0].source[0] == LOOPBACK
        assert proxied_headers[0].destination == (LOOPBACK, front)
    finally:
        haproxy.peer.stop()
        if stand_in.server is not None:
            stand_in.server.close()


def test_haproxy_check_fails_on_a_rejecting_scp(tmp_path: Path, short_tmp: Path) -> None:
    """An archive that rejects the association (called AE unknown) is marked DOWN, not UP."""
    require_module("pynetdicom")
    from pynetdicom import AE

    ae = AE(ae_title="PACS")
    ae.require_called_aet = True  # 'PACS' is right; the check below calls 'NOTHERE'
    ae.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False)
    assert server is not None
    check = "\n".join(f"    {line}" for line in healthcheck_lines())
    wrong = check.replace("50414353202020202020202020202020", "4e4f5448455245" + "20" * 9)  # 'NOTHERE'
    body = (f"backend be_ok\n{check}\n    server s {LOOPBACK}:{port} check inter 300ms rise 1 fall 1\n"
            f"backend be_rejected\n{wrong}\n    server s {LOOPBACK}:{port} check inter 300ms rise 1 fall 1\n")
    haproxy = start_haproxy(tmp_path, short_tmp, body)
    try:
        wait_until(lambda: haproxy.server_status("be_ok")["check_status"].lstrip("* ") == "L7OK", 10, "be_ok L7OK",
                   peer=haproxy.peer)
        wait_until(lambda: haproxy.server_status("be_rejected")["status"] == "DOWN", 10, "be_rejected DOWN",
                   peer=haproxy.peer)
        assert re.match(r"L7", haproxy.server_status("be_rejected")["check_status"])
    finally:
        haproxy.peer.stop()
        server.shutdown()


# --------------------------------------------------------------------------- the real proxy behind HAProxy




def _raw_rq(port: int, prefix: bytes, calling: str = "RAWSCU") -> bytes:
    """Connect, send `prefix` + an A-ASSOCIATE-RQ, read the answer PDU whole and return its type
    byte (b'' when the proxy closed without a PDU)."""
    from tests.peers import associate_rq_bytes, read_pdu

    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(prefix + associate_rq_bytes(called="PACS", calling=calling))
        try:
            pdu_type, _body = read_pdu(sock)
        except (EOFError, ConnectionResetError):
            return b""
        if pdu_type == 0x02:
            sock.sendall(bytes.fromhex(HC_RELEASE_RQ[1]))
            read_pdu(sock)
        return bytes([pdu_type])


def test_proxy_behind_haproxy(tmp_path: Path, short_tmp: Path, verification_scp: int, dev_certs: Any) -> None:
    """HAProxy (send-proxy-v2, the README's C-ECHO tcp-check) in front of `dicom-proxy run` with
    proxy_protocol listeners, plaintext and TLS: checks go UP, a client's C-ECHO passes, the PROXY
    source is what rules see, untrusted peers and missing headers are closed without a byte."""
    from tests.peers import tls_client_context

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\ndefault: reject\nrules:\n"
        "  - {name: modalities, match: {source: [192.0.2.0/24, 127.0.0.1]}, action: accept, upstream: pacs}\n"
    )
    plain, tls_port, untrusted = free_port(), free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"listeners:\n"
        f"  - {{name: lb, address: '{LOOPBACK}:{plain}', proxy_protocol: true, trusted_proxies: [127.0.0.1]}}\n"
        f"  - name: lb-tls\n    address: '{LOOPBACK}:{tls_port}'\n    proxy_protocol: true\n"
        f"    trusted_proxies: [127.0.0.0/8]\n"
        f"    tls: {{cert: '{dev_certs.proxy_cert}', key: '{dev_certs.proxy_key}'}}\n"
        f"  - {{name: elsewhere, address: '{LOOPBACK}:{untrusted}', proxy_protocol: true,"
        f" trusted_proxies: [192.0.2.0/24]}}\n"
        f"upstreams:\n  pacs: {{address: '{LOOPBACK}:{verification_scp}'}}\n"
        f"default_upstream: pacs\nrules: [{rules}]\n"
    )
    import sys

    proxy = Peer("proxy", [sys.executable, "-m", "proxy", "run", "-c", str(config)], tmp_path / "proxy.log",
                 cwd=REPO_ROOT).start()
    haproxy = None
    try:
        from tests.peers import wait_for_line

        wait_for_line(proxy, r"listening on .*elsewhere", 15)
        # Direct, with crafted headers: the PROXY source decides the rule, the log names the client.
        assert _raw_rq(plain, v1("TCP4", "192.0.2.77", "127.0.0.1", 4242, plain)) == b"\x02"
        wait_for_line(proxy, r"192\.0\.2\.77:4242", 10)
        assert _raw_rq(plain, v2(src="198.51.100.1", dst="127.0.0.1", sport=555, dport=plain)) == b"\x03"
        wait_for_line(proxy, r"198\.51\.100\.1:555.*rejected", 10)
        assert _raw_rq(plain, b"") == b""  # no header from a trusted proxy: closed, nothing sent
        wait_for_line(proxy, r"A-ASSOCIATE-RQ: the balancer sends no PROXY header", 10)
        assert _raw_rq(untrusted, v1("TCP4", "192.0.2.77", "127.0.0.1", 4242, untrusted)) == b""
        wait_for_line(proxy, r"not in trusted_proxies", 10)

        check = "\n".join(f"    {line}" for line in healthcheck_lines())
        front, front_tls = free_port(), free_port()
        haproxy = start_haproxy(tmp_path, short_tmp, (
            f"frontend fe\n    bind {LOOPBACK}:{front}\n    default_backend proxies\n"
            f"frontend fe_tls\n    bind {LOOPBACK}:{front_tls}\n    default_backend proxies_tls\n"
            f"backend proxies\n{check}\n"
            f"    server s {LOOPBACK}:{plain} send-proxy-v2 check check-send-proxy inter 300ms rise 1 fall 1\n"
            f"backend proxies_tls\n"
            f"    server s {LOOPBACK}:{tls_port} send-proxy-v2\n"
        ))
        wait_until(lambda: haproxy is not None and haproxy.server_status("proxies")["check_status"].lstrip("* ")
                   == "L7OK", 10, "the C-ECHO health check through the proxy", peer=haproxy.peer)

        from pynetdicom import AE

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate(LOOPBACK, front, ae_title="PACS")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        ctx = tls_client_context(dev_certs.ca, dev_certs.modality_cert, dev_certs.modality_key)
        assoc = ae.associate(LOOPBACK, front_tls, ae_title="PACS", tls_args=(ctx, "localhost"))
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
    finally:
        if haproxy is not None:
            haproxy.peer.stop()
        assert proxy.stop(15) == 0, proxy.log_text()
