"""Items and sub-items from bytes: every golden item parsed, re-encoded byte for byte, unknown types
kept raw, secrets kept out of reprs, lengths recomputed on rewrite, PS3.8 size limits enforced."""

from __future__ import annotations

import pytest

from proxy.dul.constants import MAX_ITEM_LENGTH, ItemType
from proxy.dul.items import (
    AC_ITEMS,
    RQ_ITEMS,
    AbstractSyntaxSubItem,
    ApplicationContextItem,
    AsynchronousOperationsWindowSubItem,
    ImplementationClassUIDSubItem,
    ImplementationVersionNameSubItem,
    Item,
    ItemRegistry,
    MaximumLengthSubItem,
    PresentationContextACItem,
    PresentationContextRQItem,
    SCPSCURoleSelectionSubItem,
    SOPClassCommonExtendedNegotiationSubItem,
    SOPClassExtendedNegotiationSubItem,
    TransferSyntaxSubItem,
    UnknownItem,
    UserIdentityACSubItem,
    UserIdentityRQSubItem,
    UserInformationItem,
    clean_uid,
    first,
    parse_items,
)
from proxy.dul.pdus import AAssociateAC, AAssociateRQ, parse_pdu
from proxy.errors import LocalPDUError, RemotePDUError
from tests import golden as g

ITEM_CLASSES: dict[int, type[Item]] = {
    cls.item_type: cls
    for cls in (
        ApplicationContextItem,
        PresentationContextRQItem,
        PresentationContextACItem,
        AbstractSyntaxSubItem,
        TransferSyntaxSubItem,
        UserInformationItem,
        MaximumLengthSubItem,
        ImplementationClassUIDSubItem,
        AsynchronousOperationsWindowSubItem,
        SCPSCURoleSelectionSubItem,
        ImplementationVersionNameSubItem,
        SOPClassExtendedNegotiationSubItem,
        SOPClassCommonExtendedNegotiationSubItem,
        UserIdentityRQSubItem,
        UserIdentityACSubItem,
    )
}


def _parse_one(raw: bytes, registry: ItemRegistry | None = None) -> Item:
    if registry is None:
        registry = {raw[0]: ITEM_CLASSES[raw[0]]}
    (item,) = parse_items(memoryview(raw), registry)
    return item


def test_one_class_per_item_type() -> None:
    assert sorted(ITEM_CLASSES) == sorted(ItemType)


def test_registries() -> None:
    assert sorted(RQ_ITEMS) == [0x10, 0x20, 0x50]
    assert sorted(AC_ITEMS) == [0x10, 0x21, 0x50]


# ------------------------------------------------------------------------------- golden items

EXPECTED: dict[str, Item] = {
    "0x10 application context": ApplicationContextItem(g.APP_CONTEXT),
    "0x20 presentation context 1": PresentationContextRQItem(
        1, (AbstractSyntaxSubItem(g.VERIFICATION), TransferSyntaxSubItem(g.IMPLICIT_LE))
    ),
    "0x20 presentation context 3": PresentationContextRQItem(
        3,
        (
            AbstractSyntaxSubItem(g.CT_STORAGE),
            TransferSyntaxSubItem(g.EXPLICIT_LE),
            TransferSyntaxSubItem(g.IMPLICIT_LE),
        ),
    ),
    "0x21 presentation context rejected": PresentationContextACItem(1, 3, (TransferSyntaxSubItem(g.IMPLICIT_LE),)),
    "0x21 presentation context accepted": PresentationContextACItem(3, 0, (TransferSyntaxSubItem(g.EXPLICIT_LE),)),
    "0x30 abstract syntax verification": AbstractSyntaxSubItem(g.VERIFICATION),
    "0x30 abstract syntax CT": AbstractSyntaxSubItem(g.CT_STORAGE),
    "0x40 transfer syntax implicit": TransferSyntaxSubItem(g.IMPLICIT_LE),
    "0x40 transfer syntax explicit": TransferSyntaxSubItem(g.EXPLICIT_LE),
    "0x50 user information RQ": UserInformationItem(
        (
            MaximumLengthSubItem(16384),
            ImplementationClassUIDSubItem(g.IMPL_CLASS_UID),
            AsynchronousOperationsWindowSubItem(5, 3),
            SCPSCURoleSelectionSubItem(g.CT_STORAGE, 1, 0),
            ImplementationVersionNameSubItem(g.IMPL_VERSION),
            SOPClassExtendedNegotiationSubItem(g.BASIC_WORKLIST, b"\x01\x00"),
            SOPClassCommonExtendedNegotiationSubItem(g.CT_STORAGE, g.STORAGE_SERVICE_CLASS, (g.ENHANCED_SR,)),
            UserIdentityRQSubItem(2, True, g.USERNAME, g.PASSCODE),
        )
    ),
    "0x50 user information AC": UserInformationItem(
        (
            MaximumLengthSubItem(32768),
            ImplementationClassUIDSubItem(g.IMPL_CLASS_UID),
            UserIdentityACSubItem(g.SERVER_RESPONSE),
        )
    ),
    "0x51 maximum length RQ": MaximumLengthSubItem(16384),
    "0x51 maximum length AC": MaximumLengthSubItem(32768),
    "0x52 implementation class UID": ImplementationClassUIDSubItem(g.IMPL_CLASS_UID),
    "0x53 asynchronous operations window": AsynchronousOperationsWindowSubItem(
        max_operations_invoked=5, max_operations_performed=3
    ),
    "0x54 role selection": SCPSCURoleSelectionSubItem(g.CT_STORAGE, scu_role=1, scp_role=0),
    "0x55 implementation version name": ImplementationVersionNameSubItem(g.IMPL_VERSION),
    "0x56 SOP class extended negotiation": SOPClassExtendedNegotiationSubItem(g.BASIC_WORKLIST, b"\x01\x00"),
    "0x57 SOP class common extended negotiation": SOPClassCommonExtendedNegotiationSubItem(
        g.CT_STORAGE, g.STORAGE_SERVICE_CLASS, (g.ENHANCED_SR,), version=0
    ),
    "0x58 user identity RQ": UserIdentityRQSubItem(
        identity_type=2, positive_response_requested=True, primary=g.USERNAME, secondary=g.PASSCODE
    ),
    "0x59 user identity AC": UserIdentityACSubItem(g.SERVER_RESPONSE),
}


def test_every_golden_item_has_an_expectation() -> None:
    assert set(EXPECTED) == set(g.GOLDEN_ITEMS)
    assert {raw[0] for raw in g.GOLDEN_ITEMS.values()} == set(ItemType)


@pytest.mark.parametrize("name", list(g.GOLDEN_ITEMS))
def test_parse_golden_item(name: str) -> None:
    raw = g.GOLDEN_ITEMS[name]
    assert int.from_bytes(raw[2:4], "big") == len(raw) - 4
    assert _parse_one(raw) == EXPECTED[name]


@pytest.mark.parametrize("name", list(g.GOLDEN_ITEMS))
def test_golden_item_round_trip(name: str) -> None:
    raw = g.GOLDEN_ITEMS[name]
    item = _parse_one(raw)
    assert item.encode() == raw
    assert EXPECTED[name].encode() == raw


@pytest.mark.parametrize("name", list(g.GOLDEN_ITEMS))
def test_golden_item_followed_by_trailing_bytes_is_rejected(name: str) -> None:
    """parse_items wants whole items: a stray byte after the last one is a truncated header."""
    raw = g.GOLDEN_ITEMS[name]
    with pytest.raises(RemotePDUError) as info:
        parse_items(memoryview(raw + b"\x00"), {raw[0]: ITEM_CLASSES[raw[0]]})
    assert (info.value.source, info.value.reason) == (2, 6)


def test_parse_items_keeps_wire_order_and_handles_empty() -> None:
    raw = g.ITEM_PC_RQ_1[8:]  # the 0x30 and the 0x40
    registry: ItemRegistry = {0x30: AbstractSyntaxSubItem, 0x40: TransferSyntaxSubItem}
    context = EXPECTED["0x20 presentation context 1"]
    assert isinstance(context, PresentationContextRQItem)
    assert parse_items(memoryview(raw), registry) == context.items
    assert parse_items(memoryview(b""), registry) == ()


def test_items_parse_from_a_view_of_a_bytearray() -> None:
    source = bytearray(g.ITEM_USER_INFO_RQ)
    item = _parse_one(bytes(source))
    assert _parse_one(source) == item  # type: ignore[arg-type]
    source[-1] = ord("X")  # parsed values own their bytes: a later change of the buffer does not leak in
    assert isinstance(item, UserInformationItem)
    assert item.find(UserIdentityRQSubItem) == UserIdentityRQSubItem(2, True, g.USERNAME, g.PASSCODE)


# ------------------------------------------------------------------------------- properties


def test_uid_values_are_cleaned() -> None:
    item = _parse_one(b"\x40\x00\x00\x12" + g.IMPLICIT_LE.encode() + b"\x00")  # one NUL pad
    assert isinstance(item, TransferSyntaxSubItem)
    assert item.uid == g.IMPLICIT_LE + "\x00"  # kept as received, for re-encoding
    assert item.value == g.IMPLICIT_LE
    assert item.encode() == b"\x40\x00\x00\x12" + g.IMPLICIT_LE.encode() + b"\x00"
    assert clean_uid(" 1.2.3 \x00") == "1.2.3"
    assert clean_uid("1.2\x00 ") == "1.2"


def test_presentation_context_properties() -> None:
    rq_context = EXPECTED["0x20 presentation context 3"]
    assert isinstance(rq_context, PresentationContextRQItem)
    assert rq_context.abstract_syntax == g.CT_STORAGE
    assert rq_context.transfer_syntaxes == (g.EXPLICIT_LE, g.IMPLICIT_LE)
    empty_rq = PresentationContextRQItem(5, ())
    assert (empty_rq.abstract_syntax, empty_rq.transfer_syntaxes) == (None, ())
    assert empty_rq.encode() == b"\x20\x00\x00\x04\x05\x00\x00\x00"
    empty_ac = PresentationContextACItem(5, 2, ())
    assert empty_ac.transfer_syntax is None
    assert empty_ac.encode() == b"\x21\x00\x00\x04\x05\x00\x02\x00"
    assert _parse_one(empty_ac.encode()) == empty_ac


def test_context_properties_look_past_other_subitems() -> None:
    """The first 0x30/0x40 counts wherever it is: order inside a context is not validated here."""
    rq_context = PresentationContextRQItem(
        7, (UnknownItem(0x35, g.SUBITEM_UNKNOWN_35), TransferSyntaxSubItem("1.2"), AbstractSyntaxSubItem("3.4"))
    )
    assert (rq_context.abstract_syntax, rq_context.transfer_syntaxes) == ("3.4", ("1.2",))
    ac_context = PresentationContextACItem(
        7, 0, (UnknownItem(0x35, g.SUBITEM_UNKNOWN_35), TransferSyntaxSubItem("1.2"))
    )
    assert ac_context.transfer_syntax == "1.2"
    assert _parse_one(rq_context.encode()) == rq_context
    assert _parse_one(ac_context.encode()) == ac_context


def test_user_information_find_and_max_length() -> None:
    info = EXPECTED["0x50 user information RQ"]
    assert isinstance(info, UserInformationItem)
    assert info.max_length == 16384
    assert info.find(AsynchronousOperationsWindowSubItem) == AsynchronousOperationsWindowSubItem(5, 3)
    assert info.find(UserIdentityACSubItem) is None
    assert UserInformationItem(()).max_length is None
    assert first(info.items, ImplementationVersionNameSubItem) == ImplementationVersionNameSubItem(g.IMPL_VERSION)
    assert first((), MaximumLengthSubItem) is None


def test_57_version_byte_and_empty_related_block() -> None:
    raw = b"\x57\x03\x00\x08\x00\x011\x00\x012\x00\x00"
    item = _parse_one(raw)
    assert item == SOPClassCommonExtendedNegotiationSubItem("1", "2", (), version=3)
    assert item.encode() == raw


def test_57_several_related_classes() -> None:
    item = SOPClassCommonExtendedNegotiationSubItem("1.2", "3", ("4.5", "6", ""))
    raw = item.encode()
    assert raw == (
        b"\x57\x00\x00\x14"  # length 20
        b"\x00\x031.2"
        b"\x00\x013"
        b"\x00\x0a"  # block: (2+3) + (2+1) + (2+0)
        b"\x00\x034.5"
        b"\x00\x016"
        b"\x00\x00"
    )
    assert _parse_one(raw) == item


def test_58_single_field_identity_and_flag_values() -> None:
    jwt = b"eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl"
    item = UserIdentityRQSubItem(5, False, jwt)
    raw = item.encode()
    length = (2 + 2 + len(jwt) + 2).to_bytes(2, "big")
    assert raw == b"\x58\x00" + length + b"\x05\x00" + b"\x00\x22" + jwt + b"\x00\x00"
    assert _parse_one(raw) == item
    # any non-zero "positive response requested" byte means yes
    flagged = _parse_one(raw[:5] + b"\x07" + raw[6:])
    assert isinstance(flagged, UserIdentityRQSubItem)
    assert flagged.positive_response_requested is True


def test_59_empty_server_response() -> None:
    raw = b"\x59\x00\x00\x02\x00\x00"
    assert _parse_one(raw) == UserIdentityACSubItem()
    assert UserIdentityACSubItem().encode() == raw


def test_56_without_application_info() -> None:
    raw = b"\x56\x00\x00\x05\x00\x031.2"
    assert _parse_one(raw) == SOPClassExtendedNegotiationSubItem("1.2", b"")


def test_text_fields_accept_any_byte() -> None:
    """latin-1 decoding: no peer byte can raise UnicodeDecodeError, and every byte round-trips."""
    raw = b"\x55\x00\x00\x04\xff\x80\x00\xe9"
    item = _parse_one(raw)
    assert isinstance(item, ImplementationVersionNameSubItem)
    assert item.encode() == raw


def test_base_item_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        Item().encode()
    with pytest.raises(NotImplementedError):
        Item.parse_body(memoryview(b""), 0)


# ------------------------------------------------------------------------------- unknown items


@pytest.mark.parametrize(
    ("raw", "registry"),
    [
        (g.ITEM_UNKNOWN_60, RQ_ITEMS),
        (g.ITEM_UNKNOWN_60, AC_ITEMS),
        (g.SUBITEM_UNKNOWN_5F, {}),
        (g.SUBITEM_UNKNOWN_35, {0x30: AbstractSyntaxSubItem, 0x40: TransferSyntaxSubItem}),
        (b"\xff\xff\x00\x00", RQ_ITEMS),  # empty body, non-zero reserved byte
    ],
)
def test_unknown_item_is_kept_whole(raw: bytes, registry: ItemRegistry) -> None:
    item = _parse_one(raw, registry)
    assert item == UnknownItem(raw[0], raw)
    assert item.encode() == raw


def test_unknown_subitems_inside_known_items() -> None:
    pc = _parse_one(g.ITEM_PC_RQ_1_WITH_35)
    assert isinstance(pc, PresentationContextRQItem)
    assert pc.items == (
        AbstractSyntaxSubItem(g.VERIFICATION),
        TransferSyntaxSubItem(g.IMPLICIT_LE),
        UnknownItem(0x35, g.SUBITEM_UNKNOWN_35),
    )
    assert pc.encode() == g.ITEM_PC_RQ_1_WITH_35
    info = _parse_one(g.ITEM_USER_INFO_WITH_5F)
    assert isinstance(info, UserInformationItem)
    assert info.items == (
        MaximumLengthSubItem(16384),
        UnknownItem(0x5F, g.SUBITEM_UNKNOWN_5F),
        ImplementationClassUIDSubItem(g.IMPL_CLASS_UID),
    )
    assert info.encode() == g.ITEM_USER_INFO_WITH_5F


def test_known_item_inside_the_wrong_parent_is_unknown() -> None:
    """A 0x51 inside a presentation context, or a 0x30 inside user information, is not interpreted."""
    pc_raw = b"\x20\x00\x00\x0c\x01\x00\x00\x00" + g.SUBITEM_MAX_LENGTH_RQ
    pc = _parse_one(pc_raw)
    assert isinstance(pc, PresentationContextRQItem)
    assert pc.items == (UnknownItem(0x51, g.SUBITEM_MAX_LENGTH_RQ),)
    info_raw = g.user_info(g.SUBITEM_ABSTRACT_CT)
    info = _parse_one(info_raw)
    assert isinstance(info, UserInformationItem)
    assert info.items == (UnknownItem(0x30, g.SUBITEM_ABSTRACT_CT),)
    assert (pc.encode(), info.encode()) == (pc_raw, info_raw)


# ------------------------------------------------------------------------------- secrets


def test_user_identity_repr_hides_the_secrets() -> None:
    item = _parse_one(g.SUBITEM_USER_IDENTITY_RQ)
    text = repr(item) + str(item)
    assert "alice" not in text and "s3cret" not in text
    assert "<5 bytes>" in text and "<6 bytes>" in text
    assert "identity_type=2" in text
    ac_item = _parse_one(g.SUBITEM_USER_IDENTITY_AC)
    ac_text = repr(ac_item) + str(ac_item)
    assert "token" not in ac_text and "<5 bytes>" in ac_text


def test_secrets_stay_hidden_in_containers() -> None:
    rq = parse_pdu(g.A_ASSOCIATE_RQ)
    ac = parse_pdu(g.A_ASSOCIATE_AC)
    assert isinstance(rq, AAssociateRQ) and isinstance(ac, AAssociateAC)
    for text in (repr(rq), str(rq), repr(rq.user_information), repr(ac), f"{rq}", repr([rq.items])):
        for secret in ("alice", "s3cret", "token", "YWxpY2U", "733363726574"):  # also no base64 or hex forms
            assert secret not in text


# ------------------------------------------------------------------------------- replace()


def _info() -> UserInformationItem:
    info = EXPECTED["0x50 user information RQ"]
    assert isinstance(info, UserInformationItem)
    return info


def test_replace_keeps_the_position_of_the_first() -> None:
    info = _info()
    out = info.replace(AsynchronousOperationsWindowSubItem, AsynchronousOperationsWindowSubItem(1, 1))
    assert out.items[2] == AsynchronousOperationsWindowSubItem(1, 1)
    assert out.items[:2] == info.items[:2] and out.items[3:] == info.items[3:]
    raw = out.encode()
    assert len(raw) == len(g.ITEM_USER_INFO_RQ)
    assert _parse_one(raw) == out


def test_replace_appends_when_absent_and_removes_with_none() -> None:
    info = UserInformationItem((MaximumLengthSubItem(1), ImplementationClassUIDSubItem("1.2")))
    added = info.replace(UserIdentityACSubItem, UserIdentityACSubItem(b"ok"))
    assert added.items[-1] == UserIdentityACSubItem(b"ok")
    assert _parse_one(added.encode()) == added
    assert int.from_bytes(added.encode()[2:4], "big") == 8 + 7 + 8
    removed = added.replace(UserIdentityACSubItem, None)
    assert removed == info
    assert info.replace(UserIdentityRQSubItem, None) == info


def test_replace_collapses_duplicates() -> None:
    dup = UserInformationItem(
        (
            UserIdentityRQSubItem(1, False, b"a"),
            MaximumLengthSubItem(1),
            UserIdentityRQSubItem(1, False, b"b"),
        )
    )
    new = UserIdentityRQSubItem(2, True, b"c", b"d")
    assert dup.replace(UserIdentityRQSubItem, new).items == (new, MaximumLengthSubItem(1))
    assert dup.replace(UserIdentityRQSubItem, None).items == (MaximumLengthSubItem(1),)


def test_replace_shrinks_lengths() -> None:
    info = _info()
    out = info.replace(SOPClassCommonExtendedNegotiationSubItem, None)
    raw = out.encode()
    assert len(raw) == len(g.ITEM_USER_INFO_RQ) - len(g.SUBITEM_COMMON_EXT_NEGOTIATION)
    assert int.from_bytes(raw[2:4], "big") == len(raw) - 4
    assert _parse_one(raw) == out


# ------------------------------------------------------------------------------- size limits


def test_item_of_exactly_65535_bytes_is_fine() -> None:
    item = SOPClassExtendedNegotiationSubItem("1", b"\x00" * (MAX_ITEM_LENGTH - 3))
    raw = item.encode()
    assert raw[2:4] == b"\xff\xff"
    assert _parse_one(raw) == item


@pytest.mark.parametrize(
    "item",
    [
        SOPClassExtendedNegotiationSubItem("1", b"\x00" * (MAX_ITEM_LENGTH - 2)),  # body 65,536
        ImplementationClassUIDSubItem("1" * 65536),
        UserIdentityRQSubItem(5, False, b"j" * 65535),  # the field fits its u16, the item does not
        UserIdentityRQSubItem(5, False, b"j" * 65536),  # the field itself does not fit
        UserIdentityACSubItem(b"r" * 65534),
        SCPSCURoleSelectionSubItem("1" * 65534, 1, 1),
        SOPClassCommonExtendedNegotiationSubItem("1", "2", ("3" * 40000, "4" * 40000)),
        UserInformationItem(tuple(ImplementationVersionNameSubItem("x" * 16) for _ in range(3277))),
        PresentationContextRQItem(1, tuple(TransferSyntaxSubItem("1" * 64) for _ in range(1000))),
    ],
    ids=lambda item: type(item).__name__,
)
def test_item_over_65535_bytes_is_a_local_error(item: Item) -> None:
    with pytest.raises(LocalPDUError, match="65,535"):
        item.encode()


def test_rq_whose_user_information_grows_past_the_limit() -> None:
    rq = parse_pdu(g.A_ASSOCIATE_RQ)
    assert isinstance(rq, AAssociateRQ) and rq.user_information is not None
    big = rq.user_information.replace(UserIdentityRQSubItem, UserIdentityRQSubItem(5, False, b"t" * 65500))
    with pytest.raises(LocalPDUError):
        rq.with_user_information(big).encode()


@pytest.mark.parametrize(
    "item",
    [
        ApplicationContextItem("1.2.€"),
        ImplementationVersionNameSubItem("NAME\u2603"),
        SCPSCURoleSelectionSubItem("1.\u0100", 1, 0),
        SOPClassCommonExtendedNegotiationSubItem("1", "2", ("\u4e00",)),
    ],
    ids=lambda item: type(item).__name__,
)
def test_text_that_latin1_cannot_hold_is_a_local_error(item: Item) -> None:
    with pytest.raises(LocalPDUError):
        item.encode()


@pytest.mark.parametrize(
    "item",
    [
        MaximumLengthSubItem(2**32),
        MaximumLengthSubItem(-1),
        AsynchronousOperationsWindowSubItem(65536, 1),
        SCPSCURoleSelectionSubItem("1.2", 2**8, 0),
        PresentationContextRQItem(256, ()),
        PresentationContextACItem(1, 256, ()),
        UserIdentityRQSubItem(256, False, b"x"),
    ],
    ids=lambda item: type(item).__name__,
)
def test_out_of_range_integer_is_a_local_error(item: Item) -> None:
    try:
        item.encode()
    except LocalPDUError:
        return
    except Exception as exc:  # the bug: another exception type escapes
        raise AssertionError(f"{type(exc).__name__} instead of LocalPDUError") from exc
    raise AssertionError("encoded an out-of-range value silently")
