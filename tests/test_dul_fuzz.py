"""The codec's fuzz-proven invariant (DESIGN.md habit 5): whatever bytes a peer sends, in whatever
reads, the framer and the parsers produce PDUs or RemotePDUError, never any other exception; and a
PDU that parses re-encodes to bytes that parse to the same value."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.dul.constants import PDUType
from proxy.dul.framer import PDUFramer
from proxy.dul.pdus import PDU, PDataTF, check_pdvs, iter_pdvs, parse_pdu
from proxy.errors import RemotePDUError
from tests import golden as g

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 1 << 24
PDU_TYPES = frozenset(int(t) for t in PDUType)


def _roundtrip(pdu: PDU) -> None:
    encoded = pdu.encode()
    again = parse_pdu(encoded)
    assert again == pdu
    assert again.encode() == encoded
    if isinstance(pdu, PDataTF):
        assert isinstance(again, PDataTF)
        assert [p.fragment.tobytes() for p in pdu.pdvs()] == [p.fragment.tobytes() for p in again.pdvs()]


def _parse_frame(data: memoryview) -> PDU | None:
    """parse_pdu (and the PDV walk for P-DATA-TF); None when it is a RemotePDUError."""
    try:
        pdu = parse_pdu(data)
        if isinstance(pdu, PDataTF):
            check_pdvs(memoryview(pdu.data))
            for pdv in iter_pdvs(data[6:]):
                assert isinstance(pdv.fragment, memoryview)
    except RemotePDUError as exc:
        assert exc.source in (0, 2)
        assert 0 <= exc.reason <= 6
        assert str(exc)
        return None
    _roundtrip(pdu)
    return pdu


def _unlimited() -> PDUFramer:
    return PDUFramer(max_pdata_length=BIG, max_associate_length=BIG)


def _run_stream(data: bytes, sizes: list[int], framer: PDUFramer) -> list[PDU | None]:
    """Feed `data` cut after each size in `sizes` (the rest in one last read); parse every frame."""
    out: list[PDU | None] = []
    offset = 0
    try:
        for size in [*sizes, len(data)]:
            piece = data[offset : offset + size]
            offset += size
            for frame in framer.feed(piece):
                assert frame.pdu_type in PDU_TYPES
                assert frame.data[0] == frame.pdu_type
                assert len(frame.data) == 6 + int.from_bytes(frame.data[2:6], "big")
                out.append(_parse_frame(frame.data))
            if offset >= len(data):
                break
    except RemotePDUError:
        pass
    return out


chunk_sizes = st.lists(st.integers(min_value=0, max_value=64), max_size=40)
framers: st.SearchStrategy[Callable[[], PDUFramer]] = st.builds(
    lambda sniff, pdata, assoc: (
        lambda: PDUFramer(sniff_foreign=sniff, max_pdata_length=pdata, max_associate_length=assoc)
    ),
    st.booleans(),
    st.sampled_from([0, 1, 16, 200, BIG]),
    st.sampled_from([68, 300, BIG]),
)


# ------------------------------------------------------------------------------- raw bytes


stream_starts = st.sampled_from([b"", b"", b"", b"\x16", b"\x16\x03", b"GET ", b"PO", b"G", b"\x01\x00"])


@FUZZ
@given(start=stream_starts, data=st.binary(max_size=600), sizes=chunk_sizes, make=framers)
def test_any_bytes_any_chunking(start: bytes, data: bytes, sizes: list[int], make: Callable[[], PDUFramer]) -> None:
    framer = make()
    _run_stream(start + data, sizes, framer)
    assert framer.buffered >= 0


@FUZZ
@given(data=st.binary(max_size=300))
def test_parse_pdu_on_any_bytes(data: bytes) -> None:
    _parse_frame(memoryview(data))


# ------------------------------------------------------------------------------- framed bytes


def _header(pdu_type: int, body: bytes) -> bytes:
    return bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + body


def _item(item_type: int, body: bytes, reserved: int = 0) -> bytes:
    return bytes((item_type, reserved)) + len(body[:0xFFFF]).to_bytes(2, "big") + body[:0xFFFF]


ITEM_TYPES = [0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59]


def _prefixed(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


# plausible bodies for the structured sub-items, so the inner fields get exercised, not just the header
short = st.binary(max_size=12)
u32 = st.builds(lambda v: v.to_bytes(4, "big"), st.integers(0, 2**32 - 1))
prefixed_then_tail = st.builds(lambda u, r: _prefixed(u) + r, short, st.binary(max_size=3))  # 0x54, 0x56
common_ext = st.builds(  # 0x57: related block built from entries, or left random
    lambda a, b, rel, raw, use_raw, tail: (
        _prefixed(a) + _prefixed(b) + _prefixed(raw if use_raw else b"".join(_prefixed(r) for r in rel)) + tail
    ),
    short,
    short,
    st.lists(short, max_size=3),
    short,
    st.booleans(),
    st.sampled_from([b"", b"", b"\x00"]),
)
identity_rq = st.builds(  # 0x58
    lambda t, p, a, b, tail: bytes((t, p)) + _prefixed(a) + _prefixed(b) + tail,
    st.integers(0, 255),
    st.integers(0, 255),
    short,
    short,
    st.sampled_from([b"", b"", b"\x00"]),
)
identity_ac = st.builds(lambda v, tail: _prefixed(v) + tail, short, st.sampled_from([b"", b"", b"\x00"]))  # 0x59
any_body = st.one_of(short, u32, prefixed_then_tail, common_ext, identity_rq)

# each type with bodies shaped for it most of the time, so the inner fields are reached
SHAPED_BODIES: dict[int, st.SearchStrategy[bytes]] = {
    0x10: short,
    0x30: short,
    0x40: short,
    0x51: st.one_of(u32, short),
    0x52: short,
    0x53: st.one_of(st.binary(min_size=4, max_size=4), short),
    0x54: prefixed_then_tail,
    0x55: short,
    0x56: prefixed_then_tail,
    0x57: common_ext,
    0x58: identity_rq,
    0x59: identity_ac,
}
reserved_bytes = st.sampled_from([0, 0, 1, 0xFF])
shaped_leaves = st.one_of(
    *(
        st.builds(_item, st.just(t), st.one_of(body, body, any_body), reserved_bytes)
        for t, body in SHAPED_BODIES.items()
    )
)
leaf_items = st.one_of(
    shaped_leaves,
    st.builds(_item, st.integers(0, 255), any_body, reserved_bytes),
)


def _container(kind: int, context_id: int, result: int, children: list[bytes]) -> bytes:
    prefix = bytes((context_id, 0, result, 0)) if kind in (0x20, 0x21) else b""
    return _item(kind, prefix + b"".join(children))


user_info_items = st.builds(lambda subs: _item(0x50, b"".join(subs)), st.lists(leaf_items, max_size=8))
context_items = st.builds(
    _container,
    st.sampled_from([0x20, 0x21]),
    st.integers(0, 255),
    st.integers(0, 5),
    st.lists(st.one_of(leaf_items, st.builds(_item, st.sampled_from([0x30, 0x40]), short)), max_size=4),
)
item_trees = st.one_of(
    user_info_items,
    context_items,
    st.recursive(  # any nesting, including the wrong kind of item in the wrong parent
        leaf_items,
        lambda inner: st.builds(
            _container,
            st.sampled_from([0x20, 0x21, 0x50]),
            st.integers(0, 255),
            st.integers(0, 5),
            st.lists(inner, max_size=5),
        ),
        max_leaves=20,
    ),
)


def _tweak_length(item: bytes, delta: int) -> bytes:
    if len(item) < 4 or delta == 0:
        return item
    length = max(0, min(0xFFFF, int.from_bytes(item[2:4], "big") + delta))
    return item[:2] + length.to_bytes(2, "big") + item[4:]


@st.composite
def associate_pdus(draw: st.DrawFn) -> bytes:
    pdu_type = draw(st.sampled_from([0x01, 0x02]))
    fixed = draw(st.one_of(st.just(g.ASSOCIATE_FIXED), st.binary(min_size=68, max_size=68)))
    items = draw(st.lists(item_trees, max_size=6))
    tweak = draw(st.sampled_from([0, 0, 0, -1, 1, 3, -7]))
    body = fixed + b"".join(_tweak_length(i, tweak) for i in items)
    if draw(st.integers(0, 4)) == 0:
        body = body[: draw(st.integers(0, len(body)))]  # may cut into the fixed part
    return _header(pdu_type, body)


pdv_items = st.builds(
    lambda length_delta, ctx, mch, frag: (
        (max(0, 2 + len(frag) + length_delta)).to_bytes(4, "big") + bytes((ctx, mch)) + frag
    ),
    st.sampled_from([0, 0, 0, -1, -2, -3, 1, 100, 2**31]),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=40),
)
pdata_pdus = st.builds(
    lambda pdvs, tail: _header(0x04, b"".join(pdvs) + tail),
    st.lists(pdv_items, max_size=5),
    st.sampled_from([b"", b"", b"\x00", b"\x00\x00\x00"]),
)
fixed_pdus = st.builds(_header, st.sampled_from([0x03, 0x05, 0x06, 0x07]), st.binary(min_size=0, max_size=6))
framed_pdus = st.one_of(associate_pdus(), pdata_pdus, fixed_pdus)


@FUZZ
@given(raw=framed_pdus)
def test_framed_pdus_parse_or_fail_cleanly(raw: bytes) -> None:
    _parse_frame(memoryview(raw))


@FUZZ
@given(raw=framed_pdus)
def test_framer_and_parser_agree(raw: bytes) -> None:
    """With limits out of the way, the framer cuts exactly one frame from a well-framed PDU, and
    whatever the framer refuses from the header alone, parse_pdu refuses too."""
    try:
        frames = PDUFramer(sniff_foreign=False, max_pdata_length=BIG, max_associate_length=BIG).feed(raw)
    except RemotePDUError as exc:
        try:
            parse_pdu(raw)
        except RemotePDUError as parse_exc:
            assert (parse_exc.source, parse_exc.reason) == (exc.source, exc.reason)
        else:
            raise AssertionError(f"framer refused what parse_pdu accepts: {exc}") from None
        return
    assert [f.data.tobytes() for f in frames] == [raw]


@settings(FUZZ, max_examples=150)
@given(pdus=st.lists(framed_pdus, min_size=1, max_size=6), sizes=chunk_sizes)
def test_streams_of_framed_pdus(pdus: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(pdus)
    one_by_one = _run_stream(stream, [1] * len(stream), _unlimited())
    chunked = _run_stream(stream, sizes, _unlimited())
    whole = _run_stream(stream, [], _unlimited())
    # Every PDU before the first bad header comes out, however the stream is cut into reads.
    assert chunked == one_by_one
    assert whole == one_by_one


# ------------------------------------------------------------------------------- golden mutations

GOLDEN = [*g.GOLDEN_PDUS.values(), g.A_ASSOCIATE_RQ_UNKNOWN_ITEMS]
ITEM_LENGTH_OFFSETS = {
    g.A_ASSOCIATE_RQ: [off + 2 for off in g.RQ_OFFSETS],
    g.A_ASSOCIATE_AC: [off + 2 for off in g.AC_OFFSETS],
    g.P_DATA_TF: [6, 114],  # the two PDV u32 lengths (their low bytes are at +2, +3)
}


@st.composite
def mutated_golden(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(GOLDEN))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "length", "truncate"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
        else:
            offsets = ITEM_LENGTH_OFFSETS.get(base) or [2]
            at = draw(st.sampled_from(offsets))
            if at + 2 <= len(data):
                value = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0x7F, 0xFF, 0xFFFF]))
                data[at : at + 2] = value.to_bytes(2, "big")
    if draw(st.booleans()) and len(data) >= 6:  # keep the PDU header honest so the body is reached
        data[2:6] = (len(data) - 6).to_bytes(4, "big")
    return bytes(data)


@FUZZ
@given(raw=mutated_golden(), sizes=chunk_sizes)
def test_mutated_golden_pdus(raw: bytes, sizes: list[int]) -> None:
    _parse_frame(memoryview(raw))
    _run_stream(raw, sizes, _unlimited())
    _run_stream(g.A_ASSOCIATE_RQ + raw + g.A_RELEASE_RQ, sizes, PDUFramer())


# ------------------------------------------------------------------------------- round trip


@FUZZ
@given(raw=st.one_of(framed_pdus, mutated_golden()))
def test_whatever_parses_reencodes_to_the_same_value(raw: bytes) -> None:
    try:
        pdu = parse_pdu(raw)
    except RemotePDUError:
        return
    _roundtrip(pdu)
    # and re-encoding is a fixed point after one normalisation (reserved bytes set to zero)
    once = pdu.encode()
    assert parse_pdu(once).encode() == once
    assert len(once) == len(raw)


def test_some_fuzzed_inputs_do_parse() -> None:
    """Guard against a strategy that never reaches the parsers' success paths."""
    parsed = 0
    for raw in (g.rq_with(g.ITEM_APP_CONTEXT, g.ITEM_PC_RQ_1_WITH_35), *GOLDEN):
        parsed += _parse_frame(memoryview(raw)) is not None
    assert parsed == len(GOLDEN) + 1
