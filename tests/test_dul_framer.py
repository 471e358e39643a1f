"""PDUFramer: golden PDUs fed whole, a byte at a time, in random chunks, with trailing bytes and
back to back; declared lengths judged from the 6-byte header alone; TLS/HTTP recognised at the
stream start; and the MALFORMED table run through the whole sans-I/O pipeline."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest

from proxy.dul.constants import DEFAULT_MAX_ASSOCIATE_LENGTH, DEFAULT_MAX_PDU_LENGTH
from proxy.dul.framer import ForeignProtocolError, Frame, PDUFramer
from proxy.dul.machine import Action, Side, State, advance
from proxy.dul.pdus import parse_pdu
from proxy.errors import RemotePDUError
from tests import golden as g

GOLDEN = list(g.GOLDEN_PDUS.items())
STREAM = [  # a plausible requestor->proxy and proxy->requestor mix, all in one stream for the framer
    g.A_ASSOCIATE_RQ,
    g.A_ASSOCIATE_AC,
    g.P_DATA_TF,
    g.P_DATA_TF,
    g.A_RELEASE_RQ,
    g.A_RELEASE_RP,
    g.A_ASSOCIATE_RJ,
    g.A_ABORT,
]


def _chunks(data: bytes, rng: random.Random, max_size: int) -> Iterator[bytes]:
    offset = 0
    while offset < len(data):
        size = rng.randint(0, max_size)  # empty reads included
        yield data[offset : offset + size]
        offset += size


def _feed_all(framer: PDUFramer, pieces: Iterator[bytes] | list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for piece in pieces:
        out.extend(bytes(f.data) for f in framer.feed(piece))
    return out


# ------------------------------------------------------------------------------- golden PDUs


@pytest.mark.parametrize(("name", "raw"), GOLDEN)
@pytest.mark.parametrize("sniff", [True, False])
def test_whole(name: str, raw: bytes, sniff: bool) -> None:
    framer = PDUFramer(sniff_foreign=sniff)
    frames = framer.feed(raw)
    assert len(frames) == 1
    frame = frames[0]
    assert isinstance(frame, Frame)
    assert isinstance(frame.data, memoryview)
    assert (frame.pdu_type, bytes(frame.data)) == (raw[0], raw)
    assert framer.buffered == 0
    assert parse_pdu(frame.data).encode() == raw


@pytest.mark.parametrize(("name", "raw"), GOLDEN)
@pytest.mark.parametrize("sniff", [True, False])
def test_one_byte_at_a_time(name: str, raw: bytes, sniff: bool) -> None:
    framer = PDUFramer(sniff_foreign=sniff)
    for i in range(len(raw) - 1):
        assert framer.feed(raw[i : i + 1]) == []
        assert framer.buffered == i + 1
    (frame,) = framer.feed(raw[-1:])
    assert bytes(frame.data) == raw
    assert framer.buffered == 0


@pytest.mark.parametrize(("name", "raw"), GOLDEN)
def test_random_chunkings(name: str, raw: bytes) -> None:
    rng = random.Random(name)
    for _ in range(30):
        framer = PDUFramer()
        assert _feed_all(framer, _chunks(raw, rng, max(1, len(raw) // 3))) == [raw]
        assert framer.buffered == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings_of_a_stream(seed: int) -> None:
    rng = random.Random(seed)
    pdus = [rng.choice(STREAM) for _ in range(12)]
    stream = b"".join(pdus)
    framer = PDUFramer()
    assert _feed_all(framer, _chunks(stream, rng, rng.choice([3, 17, 200, 1000]))) == pdus
    assert framer.buffered == 0


@pytest.mark.parametrize(("name", "raw"), GOLDEN)
def test_trailing_bytes_stay_buffered_then_complete_the_next_pdu(name: str, raw: bytes) -> None:
    for follower in (g.A_RELEASE_RQ, g.A_ASSOCIATE_AC, g.P_DATA_TF):
        for cut in (1, 5, 6, 7, len(follower) - 1):
            framer = PDUFramer()
            frames = framer.feed(raw + follower[:cut])
            assert [bytes(f.data) for f in frames] == [raw]
            assert framer.buffered == cut
            (nxt,) = framer.feed(follower[cut:])
            assert bytes(nxt.data) == follower
            assert framer.buffered == 0


@pytest.mark.parametrize("sniff", [True, False])
def test_several_pdus_in_one_feed(sniff: bool) -> None:
    stream = b"".join(STREAM)
    framer = PDUFramer(sniff_foreign=sniff)
    frames = framer.feed(stream)
    assert [f.pdu_type for f in frames] == [p[0] for p in STREAM]
    assert [bytes(f.data) for f in frames] == STREAM
    assert framer.buffered == 0


def test_several_pdus_then_a_partial_one() -> None:
    framer = PDUFramer()
    frames = framer.feed(g.A_ASSOCIATE_RQ + g.P_DATA_TF + g.A_ABORT[:4])
    assert [bytes(f.data) for f in frames] == [g.A_ASSOCIATE_RQ, g.P_DATA_TF]
    assert framer.buffered == 4
    frames = framer.feed(g.A_ABORT[4:] + g.A_RELEASE_RQ)
    assert [bytes(f.data) for f in frames] == [g.A_ABORT, g.A_RELEASE_RQ]


def test_a_read_that_ends_inside_the_next_header_after_a_buffered_pdu() -> None:
    framer = PDUFramer()
    assert framer.feed(g.P_DATA_TF[:50]) == []
    frames = framer.feed(g.P_DATA_TF[50:] + g.A_RELEASE_RQ[:3])
    assert [bytes(f.data) for f in frames] == [g.P_DATA_TF]
    assert framer.buffered == 3
    assert [bytes(f.data) for f in framer.feed(g.A_RELEASE_RQ[3:])] == [g.A_RELEASE_RQ]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_buffer_type(kind: type) -> None:
    stream = b"".join(STREAM)
    framer = PDUFramer()
    out: list[bytes] = []
    for i in range(0, len(stream), 37):
        out.extend(bytes(f.data) for f in framer.feed(kind(stream[i : i + 37])))
    assert out == STREAM


def test_empty_feeds_change_nothing() -> None:
    framer = PDUFramer()
    assert framer.feed(b"") == []
    assert framer.feed(g.A_ABORT[:3]) == []
    assert framer.feed(b"") == []
    assert framer.buffered == 3
    assert [bytes(f.data) for f in framer.feed(g.A_ABORT[3:])] == [g.A_ABORT]


def test_p_data_with_an_empty_body_is_framed_and_left_to_the_parser() -> None:
    framer = PDUFramer()
    (frame,) = framer.feed(b"\x04\x00\x00\x00\x00\x00")
    with pytest.raises(RemotePDUError, match="without any PDV"):
        parse_pdu(frame.data)


# ------------------------------------------------------------------------------- zero copy


def test_whole_pdus_in_one_read_are_views_of_that_read() -> None:
    framer = PDUFramer()
    framer.feed(g.A_ASSOCIATE_RQ)  # the stream has started
    read = g.P_DATA_TF + g.P_DATA_TF + g.A_RELEASE_RQ
    frames = framer.feed(read)
    assert len(frames) == 3
    assert all(f.data.obj is read for f in frames)


def test_without_sniffing_even_the_first_pdu_is_a_view() -> None:
    read = bytearray(g.A_ASSOCIATE_RQ + g.P_DATA_TF)
    frames = PDUFramer(sniff_foreign=False).feed(read)
    assert all(f.data.obj is read for f in frames)
    read[-1] ^= 0xFF  # a view: the caller must not reuse its buffer while frames are alive
    assert frames[1].data[-1] == g.P_DATA_TF[-1] ^ 0xFF


def test_a_pdu_cut_by_a_read_is_copied_once() -> None:
    framer = PDUFramer(sniff_foreign=False)
    first = bytearray(g.P_DATA_TF[:40])
    framer.feed(first)
    (frame,) = framer.feed(g.P_DATA_TF[40:])
    assert frame.data.obj is not first
    first[:] = bytes(40)  # the framer kept its own copy of the first part
    assert bytes(frame.data) == g.P_DATA_TF


# ------------------------------------------------------------------------------- declared lengths


@pytest.mark.parametrize("header", [b"\x04\x00\xff\xff\xff\xff", b"\x01\x00\xff\xff\xff\xff"])
def test_huge_declared_length_is_rejected_at_the_sixth_byte(header: bytes) -> None:
    framer = PDUFramer()
    for i in range(5):
        assert framer.feed(header[i : i + 1]) == []
    with pytest.raises(RemotePDUError) as info:
        framer.feed(header[5:6])  # the 6th byte: no body byte was ever sent
    assert (info.value.source, info.value.reason) == (2, 6)
    assert not isinstance(info.value, ForeignProtocolError)
    with pytest.raises(RemotePDUError):
        PDUFramer().feed(header)  # the whole header in one read


@pytest.mark.parametrize("split", [0, 1, 3, 5, 6])
def test_huge_length_after_a_valid_pdu_in_the_same_stream(split: int) -> None:
    """The bad header is refused with no body byte read, whether the P-DATA-TF before it ended in an
    earlier read or in the same one (then the PDUs before it come out first and `framer.error` holds the refusal)."""
    header = b"\x04\x00\xff\xff\xff\xff"
    framer = PDUFramer()
    framer.feed(g.A_ASSOCIATE_RQ)
    stream = g.P_DATA_TF + header
    cut = len(g.P_DATA_TF) + split
    if split < 6:
        frames = framer.feed(stream[:cut])
        assert [bytes(f.data) for f in frames] == [g.P_DATA_TF]
        assert framer.buffered == split
        with pytest.raises(RemotePDUError, match="4294967295"):
            framer.feed(stream[cut:])
    else:
        with pytest.raises(RemotePDUError, match="4294967295"):
            framer.feed(stream)
            framer.feed(b"")


def test_max_pdata_length_boundary() -> None:
    limit = 130  # the golden P-DATA-TF declares exactly 130
    assert int.from_bytes(g.P_DATA_TF[2:6], "big") == limit
    (frame,) = PDUFramer(max_pdata_length=limit).feed(g.P_DATA_TF)
    assert bytes(frame.data) == g.P_DATA_TF
    framer = PDUFramer(max_pdata_length=limit - 1)
    with pytest.raises(RemotePDUError, match=r"130 bytes, over the maximum length of 129") as info:
        framer.feed(g.P_DATA_TF[:6])
    assert (info.value.source, info.value.reason) == (2, 6)


def test_default_limits() -> None:
    framer = PDUFramer()
    assert (framer.max_pdata_length, framer.max_associate_length) == (
        DEFAULT_MAX_PDU_LENGTH,
        DEFAULT_MAX_ASSOCIATE_LENGTH,
    )
    assert framer.feed(b"\x04\x00" + DEFAULT_MAX_PDU_LENGTH.to_bytes(4, "big")) == []
    with pytest.raises(RemotePDUError):
        PDUFramer().feed(b"\x04\x00" + (DEFAULT_MAX_PDU_LENGTH + 1).to_bytes(4, "big"))
    assert PDUFramer().feed(b"\x01\x00" + DEFAULT_MAX_ASSOCIATE_LENGTH.to_bytes(4, "big")) == []
    with pytest.raises(RemotePDUError):
        PDUFramer().feed(b"\x01\x00" + (DEFAULT_MAX_ASSOCIATE_LENGTH + 1).to_bytes(4, "big"))


@pytest.mark.parametrize("raw", [g.A_ASSOCIATE_RQ, g.A_ASSOCIATE_AC])
def test_max_associate_length_boundary(raw: bytes) -> None:
    declared = len(raw) - 6
    assert PDUFramer(max_associate_length=declared).feed(raw)[0].data.tobytes() == raw
    with pytest.raises(RemotePDUError, match=rf"declares {declared} bytes, outside 68\.\.{declared - 1}") as info:
        PDUFramer(max_associate_length=declared - 1).feed(raw[:6])
    assert (info.value.source, info.value.reason) == (2, 6)


def test_associate_limit_does_not_apply_to_p_data_and_vice_versa() -> None:
    framer = PDUFramer(max_pdata_length=200, max_associate_length=1000)
    stream = g.A_ASSOCIATE_RQ + g.P_DATA_TF
    assert [bytes(f.data) for f in framer.feed(stream)] == [g.A_ASSOCIATE_RQ, g.P_DATA_TF]


def test_lowering_max_pdata_length_applies_to_the_next_header() -> None:
    """The relay lowers the limit once the association is negotiated."""
    framer = PDUFramer()
    framer.feed(g.A_ASSOCIATE_RQ)
    framer.feed(g.P_DATA_TF[:3])
    framer.max_pdata_length = 100
    with pytest.raises(RemotePDUError, match="over the maximum length of 100"):
        framer.feed(g.P_DATA_TF[3:])


@pytest.mark.parametrize("pdu_type", [0x03, 0x05, 0x06, 0x07])
@pytest.mark.parametrize("length", [0, 3, 5, 0xFFFFFFFF])
def test_fixed_size_pdus_must_declare_4(pdu_type: int, length: int) -> None:
    with pytest.raises(RemotePDUError, match=f"declares length {length}, expected 4") as info:
        PDUFramer().feed(bytes((pdu_type, 0)) + length.to_bytes(4, "big"))
    assert (info.value.source, info.value.reason) == (2, 6)


@pytest.mark.parametrize("pdu_type", [0x01, 0x02])
@pytest.mark.parametrize("length", [0, 4, 67])
def test_associate_pdus_must_declare_at_least_68(pdu_type: int, length: int) -> None:
    with pytest.raises(RemotePDUError) as info:
        PDUFramer().feed(bytes((pdu_type, 0)) + length.to_bytes(4, "big"))
    assert (info.value.source, info.value.reason) == (2, 6)


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x10, 0x80, 0xFF])
def test_unknown_type_is_rejected_at_the_header(pdu_type: int) -> None:
    framer = PDUFramer()
    header = bytes((pdu_type, 0, 0, 0, 0, 4))
    framer.feed(header[:5])
    with pytest.raises(RemotePDUError, match=f"0x{pdu_type:02X}") as info:
        framer.feed(header[5:])
    assert (info.value.source, info.value.reason) == (2, 1)


# ------------------------------------------------------------------------------- foreign protocols


def test_tls_client_hello() -> None:
    with pytest.raises(ForeignProtocolError) as info:
        PDUFramer().feed(g.TLS_CLIENT_HELLO)
    assert info.value.protocol == "tls"
    assert isinstance(info.value, RemotePDUError)
    assert (info.value.source, info.value.reason) == (2, 1)


def test_tls_client_hello_one_byte_at_a_time() -> None:
    framer = PDUFramer()
    assert framer.feed(g.TLS_CLIENT_HELLO[:1]) == []
    assert framer.buffered == 1
    with pytest.raises(ForeignProtocolError) as info:
        framer.feed(g.TLS_CLIENT_HELLO[1:2])
    assert info.value.protocol == "tls"


@pytest.mark.parametrize(
    "request_line",
    [b"GET / HTTP/1.1", b"POST /x", b"PUT /x", b"HEAD /", b"OPTIONS *", b"DELETE /x", b"PATCH /x", b"CONNECT a:1"],
)
def test_http_request(request_line: bytes) -> None:
    raw = request_line + b"\r\nHost: x\r\n\r\n"
    with pytest.raises(ForeignProtocolError) as info:
        PDUFramer().feed(raw)
    assert info.value.protocol == "http"
    framer = PDUFramer()
    for i in range(3):
        assert framer.feed(raw[i : i + 1]) == []
    with pytest.raises(ForeignProtocolError):
        framer.feed(raw[3:4])  # decided at the 4th byte


@pytest.mark.parametrize("raw", [b"get / http/1.1\r\n\r\n", b"GETX / HTTP/1.1", b"Hello, world"])
def test_text_that_is_not_an_http_method_is_an_unknown_pdu(raw: bytes) -> None:
    with pytest.raises(RemotePDUError) as info:
        PDUFramer().feed(raw)
    assert not isinstance(info.value, ForeignProtocolError)
    assert (info.value.source, info.value.reason) == (2, 1)


def test_short_text_waits_for_four_bytes() -> None:
    framer = PDUFramer()
    assert framer.feed(b"GE") == []
    assert framer.feed(b"") == []
    assert framer.buffered == 2
    with pytest.raises(ForeignProtocolError):
        framer.feed(b"T /")


def test_sniffing_off_treats_tls_as_an_unknown_pdu() -> None:
    """The upstream leg (sniff_foreign=False): a 0x16 is just an unknown PDU type."""
    with pytest.raises(RemotePDUError) as info:
        PDUFramer(sniff_foreign=False).feed(g.TLS_CLIENT_HELLO)
    assert not isinstance(info.value, ForeignProtocolError)
    assert info.value.reason == 1
    with pytest.raises(RemotePDUError) as info:
        PDUFramer(sniff_foreign=False).feed(g.HTTP_GET)
    assert not isinstance(info.value, ForeignProtocolError)


@pytest.mark.parametrize("foreign", [g.TLS_CLIENT_HELLO, g.HTTP_GET])
def test_only_the_stream_start_is_sniffed(foreign: bytes) -> None:
    framer = PDUFramer()
    framer.feed(g.A_ASSOCIATE_RQ)
    with pytest.raises(RemotePDUError) as info:
        framer.feed(foreign)
    assert not isinstance(info.value, ForeignProtocolError)
    assert info.value.reason == 1


def test_0x16_followed_by_a_non_tls_byte_is_dicom_framing() -> None:
    framer = PDUFramer()
    assert framer.feed(b"\x16") == []
    with pytest.raises(RemotePDUError) as info:
        framer.feed(b"\x00\x00\x00\x00\x04")
    assert not isinstance(info.value, ForeignProtocolError)
    assert info.value.reason == 1


# ------------------------------------------------------------------------------- MALFORMED table


def sans_io_outcome(raw: bytes, chunk: int) -> tuple[str, int | None, int | None, str]:
    """What the relay's pure core makes of `raw` as a requestor's first bytes, in the relay's order:
    framer, then the state table (Sta2), then parse_pdu of the A-ASSOCIATE-RQ."""
    framer = PDUFramer()
    frames: list[Frame] = []
    try:
        for i in range(0, len(raw), chunk):
            frames.extend(framer.feed(raw[i : i + chunk]))
    except ForeignProtocolError as exc:
        return ("foreign", None, None, exc.protocol)
    except RemotePDUError as exc:
        return ("framer", exc.source, exc.reason, str(exc))
    if not frames:
        return ("incomplete", None, None, "")
    frame = frames[0]
    try:
        action, _next = advance(State.STA2_AWAITING_RQ, Side.REQUESTOR, frame.pdu_type)
    except RemotePDUError as exc:
        return ("machine", exc.source, exc.reason, str(exc))
    if action is Action.CLOSE:
        return ("machine", None, None, "")
    assert action is Action.ASSOCIATE
    try:
        parse_pdu(frame.data)
    except RemotePDUError as exc:
        return ("parse", exc.source, exc.reason, str(exc))
    return ("associate", None, None, "")


def test_malformed_table_is_large_and_names_are_unique() -> None:
    assert len(g.MALFORMED) >= 20
    assert len({c.name for c in g.MALFORMED}) == len(g.MALFORMED)
    assert {c.stage for c in g.MALFORMED} == {"framer", "parse", "machine", "foreign", "incomplete"}
    for case in g.MALFORMED:
        assert (case.source is None) == (case.reason is None)
        assert case.source in (None, 2)


@pytest.mark.parametrize("case", g.MALFORMED, ids=lambda c: c.name)
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_malformed_first_bytes(case: g.Malformed, chunk: int) -> None:
    stage, source, reason, message = sans_io_outcome(case.raw, chunk)
    assert (stage, source, reason) == (case.stage, case.source, case.reason)
    assert re.search(case.match, message), message


@pytest.mark.parametrize("case", [c for c in g.MALFORMED if c.stage == "framer"], ids=lambda c: c.name)
def test_framer_cases_are_decided_by_the_header_alone(case: g.Malformed) -> None:
    with pytest.raises(RemotePDUError) as info:
        PDUFramer().feed(case.raw[:6])
    assert (info.value.source, info.value.reason) == (case.source, case.reason)


def test_the_golden_rq_passes_the_pipeline() -> None:
    assert sans_io_outcome(g.A_ASSOCIATE_RQ, 5)[0] == "associate"
    assert sans_io_outcome(g.A_ASSOCIATE_RQ_UNKNOWN_ITEMS, 1 << 20)[0] == "associate"


def test_pdus_before_a_bad_header_in_the_same_read_are_delivered() -> None:
    """Whether an upstream A-ABORT is relayed with its own source/reason, or replaced by our 2/1, must
    not depend on TCP segmentation: the frames before the bad header come out, the error follows."""
    framer = PDUFramer()
    framer.feed(g.A_ASSOCIATE_RQ)
    frames = framer.feed(g.A_ABORT + b"\x08\x00\x00\x00\x00\x04")
    assert [bytes(f.data) for f in frames] == [g.A_ABORT]
    with pytest.raises(RemotePDUError) as info:
        framer.feed(b"")
    assert info.value.reason == 1
