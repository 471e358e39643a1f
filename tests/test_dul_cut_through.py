"""PDUFramer cut-through: a P-DATA-TF PDU that is one data-set PDV is passed on as its bytes arrive
(P_DATA_HEAD, then P_DATA_REST frames), everything else is framed whole as before, and the bytes
that come out are the bytes that went in, in order, however the stream is cut."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dul.framer import P_DATA_HEAD, P_DATA_REST, Frame, PDUFramer
from proxy.errors import RemotePDUError
from tests import golden as g


def pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    body = b"".join(struct.pack(">IBB", 2 + len(frag), ctx, ctrl) + frag for ctx, ctrl, frag in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


DATA = pdata((1, 0x00, bytes(range(256)) * 40))  # one data fragment, 10 KiB: may be cut through
LAST = pdata((1, 0x02, b"\x55" * 5000))  # the last data fragment of a data set: also
COMMAND = pdata((1, 0x03, b"\x10" * 80))  # a command fragment: always whole (metrics, DIMSE rules)
TWO_PDVS = pdata((1, 0x00, b"a" * 3000), (1, 0x02, b"b" * 3000))  # two PDVs: always whole
STREAM = [COMMAND, DATA, DATA, LAST, TWO_PDVS, COMMAND, g.A_RELEASE_RQ, DATA, g.A_RELEASE_RP]


def run(framer: PDUFramer, pieces: list[bytes]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for piece in pieces:
        out.extend((f.pdu_type, bytes(f.data)) for f in framer.feed(piece))
    return out


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, offset = [], 0
    for size in sizes:
        pieces.append(data[offset : offset + size])
        offset += size
    pieces.append(data[offset:])
    return pieces


def check(frames: list[tuple[int, bytes]], stream: list[bytes]) -> None:
    """Re-assemble: every PDU of `stream` in order, each either whole or HEAD + RESTs."""
    pdus: list[bytes] = []
    open_pdu: bytearray | None = None
    for pdu_type, data in frames:
        if pdu_type == P_DATA_REST:
            assert open_pdu is not None, "a P_DATA_REST without a P_DATA_HEAD"
            open_pdu += data
            continue
        if open_pdu is not None:
            pdus.append(bytes(open_pdu))
            open_pdu = None
        if pdu_type == P_DATA_HEAD:
            assert data[0] == 0x04 and len(data) >= 12
            open_pdu = bytearray(data)
        else:
            assert pdu_type == data[0]
            pdus.append(data)
    if open_pdu is not None:
        pdus.append(bytes(open_pdu))
    assert pdus == stream


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=9000), max_size=40))
def test_any_cutting_gives_back_the_same_pdus(sizes: list[int]) -> None:
    raw = b"".join(STREAM)
    framer = PDUFramer(sniff_foreign=False)
    framer.cut_through = True
    frames = run(framer, cut(raw, sizes))
    check(frames, STREAM)
    assert not framer.mid_pdu and framer.buffered == 0
    heads = [data for t, data in frames if t == P_DATA_HEAD]
    assert all(h[11] & 0x01 == 0 for h in heads)  # only data fragments are ever cut through
    whole_or_head = [t for t, _ in frames if t in (0x04, P_DATA_HEAD)]
    assert len(whole_or_head) == sum(1 for p in STREAM if p[0] == 0x04)  # one per P-DATA-TF PDU


@pytest.mark.parametrize("pdu", [COMMAND, TWO_PDVS])
@pytest.mark.parametrize("at", [6, 11, 12, 13, 100])
def test_pdus_that_need_a_look_inside_are_never_cut_through(pdu: bytes, at: int) -> None:
    framer = PDUFramer(sniff_foreign=False)
    framer.cut_through = True
    frames = run(framer, [pdu[:at], pdu[at:]])
    assert frames == [(0x04, pdu)]


@pytest.mark.parametrize("at", [6, 11, 12, 13, 4000])
def test_a_bulk_pdu_cut_by_a_read_is_passed_on_at_once(at: int) -> None:
    framer = PDUFramer(sniff_foreign=False)
    framer.cut_through = True
    first = [Frame(t, memoryview(d)) for t, d in run(framer, [DATA[:at]])]
    if at < 12:  # the PDV header is not complete: nothing can be judged yet
        assert first == [] and framer.buffered == at and not framer.mid_pdu
    else:
        assert [f.pdu_type for f in first] == [P_DATA_HEAD] and bytes(first[0].data) == DATA[:at]
        assert framer.mid_pdu and framer.buffered == 0  # nothing was gathered: no copy of the body
    rest = run(framer, [DATA[at:] + COMMAND])
    check([(f.pdu_type, bytes(f.data)) for f in first] + rest, [DATA, COMMAND])
    assert not framer.mid_pdu


def test_without_cut_through_nothing_changes() -> None:
    framer = PDUFramer(sniff_foreign=False)
    assert run(framer, [DATA[:100], DATA[100:]]) == [(0x04, DATA)]


def test_a_bad_header_after_a_cut_through_pdu_is_still_refused() -> None:
    framer = PDUFramer(sniff_foreign=False)
    framer.cut_through = True
    assert [t for t, _ in run(framer, [DATA[:500]])] == [P_DATA_HEAD]
    frames = framer.feed(DATA[500:] + b"\x09\x00\x00\x00\x00\x04")  # unknown PDU type 0x09
    assert [f.pdu_type for f in frames] == [P_DATA_REST]
    assert isinstance(framer.error, RemotePDUError)


def test_random_streams_of_many_pdus() -> None:
    rng = random.Random(7)
    stream = [rng.choice([DATA, LAST, COMMAND, TWO_PDVS]) for _ in range(300)]
    raw = b"".join(stream)
    sizes = [rng.choice([1, 7, 12, 1000, 16384, 65536]) for _ in range(len(raw) // 1000)]
    framer = PDUFramer(sniff_foreign=False)
    framer.cut_through = True
    check(run(framer, cut(raw, sizes)), stream)
