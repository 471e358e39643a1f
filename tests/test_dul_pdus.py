"""PDUs from bytes: golden fixtures parsed field by field, re-encoded byte for byte, confirmed by
pynetdicom's encoder, rewritten (max length, user information), and every malformed one rejected
with the A-ABORT source/reason the proxy must answer."""

from __future__ import annotations

import re
from enum import IntEnum
from io import BytesIO

import pytest
from pydicom.filereader import read_dataset
from pynetdicom import pdu as pnd
from pynetdicom import pdu_items as pnd_items
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

from proxy.dul import constants
from proxy.dul.constants import PDUType
from proxy.dul.framer import PDUFramer
from proxy.dul.items import (
    AbstractSyntaxSubItem,
    ApplicationContextItem,
    AsynchronousOperationsWindowSubItem,
    ImplementationClassUIDSubItem,
    ImplementationVersionNameSubItem,
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
)
from proxy.dul.pdus import (
    PDU,
    PDU_CLASSES,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    check_pdvs,
    header,
    iter_pdvs,
    parse_pdu,
)
from proxy.errors import LocalPDUError, RemotePDUError
from tests import golden as g


def _rq() -> AAssociateRQ:
    pdu = parse_pdu(g.A_ASSOCIATE_RQ)
    assert isinstance(pdu, AAssociateRQ)
    return pdu


def _ac() -> AAssociateAC:
    pdu = parse_pdu(g.A_ASSOCIATE_AC)
    assert isinstance(pdu, AAssociateAC)
    return pdu


# ------------------------------------------------------------------------------- golden layout


@pytest.mark.parametrize("name", list(g.GOLDEN_PDUS))
def test_golden_header_length_matches_the_bytes(name: str) -> None:
    raw = g.GOLDEN_PDUS[name]
    assert int.from_bytes(raw[2:6], "big") == len(raw) - 6
    assert raw[1] == 0


@pytest.mark.parametrize(("pdu_bytes", "offsets"), [(g.A_ASSOCIATE_RQ, g.RQ_OFFSETS), (g.A_ASSOCIATE_AC, g.AC_OFFSETS)])
def test_golden_item_offsets_are_as_commented(pdu_bytes: bytes, offsets: dict[int, bytes]) -> None:
    for offset, item in offsets.items():
        assert pdu_bytes[offset : offset + len(item)] == item, offset


def test_golden_command_is_a_valid_c_store_rq() -> None:
    command = read_dataset(BytesIO(g.COMMAND_C_STORE_RQ), is_implicit_VR=True, is_little_endian=True)
    assert command.CommandGroupLength == len(g.COMMAND_C_STORE_RQ) - 12
    assert command.AffectedSOPClassUID == g.CT_STORAGE
    assert command.CommandField == 0x0001
    assert command.MessageID == 7
    assert command.CommandDataSetType != 0x0101
    assert command.AffectedSOPInstanceUID == "1.2.3.4"


# ------------------------------------------------------------------------------- parse: fields


def test_parse_associate_rq_fields() -> None:
    rq = _rq()
    assert rq.pdu_type is PDUType.A_ASSOCIATE_RQ
    assert rq.protocol_version == 1
    assert rq.called_ae == "ARCHIVE         "
    assert rq.calling_ae == "MODALITY        "
    assert (rq.called_ae_title, rq.calling_ae_title) == (g.CALLED_AE, g.CALLING_AE)
    assert rq.reserved == bytes(32)
    assert rq.application_context == g.APP_CONTEXT
    assert [type(i) for i in rq.items] == [
        ApplicationContextItem,
        PresentationContextRQItem,
        PresentationContextRQItem,
        UserInformationItem,
    ]
    pc1, pc3 = rq.presentation_contexts
    assert (pc1.context_id, pc1.abstract_syntax, pc1.transfer_syntaxes) == (1, g.VERIFICATION, (g.IMPLICIT_LE,))
    assert (pc3.context_id, pc3.abstract_syntax) == (3, g.CT_STORAGE)
    assert pc3.transfer_syntaxes == (g.EXPLICIT_LE, g.IMPLICIT_LE)
    assert rq.max_length == 16384
    info = rq.user_information
    assert info is not None
    assert info.items == (
        MaximumLengthSubItem(16384),
        ImplementationClassUIDSubItem(g.IMPL_CLASS_UID),
        AsynchronousOperationsWindowSubItem(5, 3),
        SCPSCURoleSelectionSubItem(g.CT_STORAGE, 1, 0),
        ImplementationVersionNameSubItem(g.IMPL_VERSION),
        SOPClassExtendedNegotiationSubItem(g.BASIC_WORKLIST, b"\x01\x00"),
        SOPClassCommonExtendedNegotiationSubItem(g.CT_STORAGE, g.STORAGE_SERVICE_CLASS, (g.ENHANCED_SR,), 0),
        UserIdentityRQSubItem(2, True, g.USERNAME, g.PASSCODE),
    )


def test_parse_associate_ac_fields() -> None:
    ac = _ac()
    assert ac.pdu_type is PDUType.A_ASSOCIATE_AC
    assert ac.protocol_version == 1
    assert (ac.called_ae_title, ac.calling_ae_title) == (g.CALLED_AE, g.CALLING_AE)
    assert ac.application_context == g.APP_CONTEXT
    rejected, accepted = ac.presentation_contexts
    assert (rejected.context_id, rejected.result, rejected.transfer_syntax) == (1, 3, g.IMPLICIT_LE)
    assert (accepted.context_id, accepted.result, accepted.transfer_syntax) == (3, 0, g.EXPLICIT_LE)
    assert ac.max_length == 32768
    info = ac.user_information
    assert info is not None
    assert info.items == (
        MaximumLengthSubItem(32768),
        ImplementationClassUIDSubItem(g.IMPL_CLASS_UID),
        UserIdentityACSubItem(g.SERVER_RESPONSE),
    )


def test_parse_fixed_size_pdus() -> None:
    assert parse_pdu(g.A_ASSOCIATE_RJ) == AAssociateRJ(result=1, source=1, reason=3)
    assert parse_pdu(g.A_RELEASE_RQ) == AReleaseRQ()
    assert parse_pdu(g.A_RELEASE_RP) == AReleaseRP()
    assert parse_pdu(g.A_ABORT) == AAbort(source=2, reason=6)
    assert AAbort() == AAbort(2, 0)


def test_parse_p_data_tf_pdvs() -> None:
    pdata = parse_pdu(g.P_DATA_TF)
    assert isinstance(pdata, PDataTF)
    assert pdata.data == g.P_DATA_TF[6:]
    command, dataset = pdata.pdvs()
    assert (command.context_id, command.control, command.is_command, command.is_last) == (3, 0x03, True, True)
    assert bytes(command.fragment) == g.COMMAND_C_STORE_RQ
    assert (dataset.context_id, dataset.control, dataset.is_command, dataset.is_last) == (3, 0x00, False, False)
    assert bytes(dataset.fragment) == g.DATASET_FRAGMENT


def test_pdu_classes_cover_every_type() -> None:
    assert sorted(PDU_CLASSES) == sorted(PDUType)
    for pdu_type, cls in PDU_CLASSES.items():
        assert cls.pdu_type == pdu_type


# ------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", [*g.GOLDEN_PDUS, "RQ with unknown items"])
def test_encode_parse_round_trip(name: str) -> None:
    raw = g.GOLDEN_PDUS.get(name, g.A_ASSOCIATE_RQ_UNKNOWN_ITEMS)
    pdu = parse_pdu(raw)
    assert pdu.encode() == raw
    assert parse_pdu(pdu.encode()) == pdu


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_accepts_any_buffer(kind: type) -> None:
    for raw in g.GOLDEN_PDUS.values():
        assert parse_pdu(kind(raw)).encode() == raw


def test_unknown_items_kept_at_every_level() -> None:
    pdu = parse_pdu(g.A_ASSOCIATE_RQ_UNKNOWN_ITEMS)
    assert isinstance(pdu, AAssociateRQ)
    app, pc, unknown60, info = pdu.items
    assert isinstance(app, ApplicationContextItem)
    assert unknown60 == UnknownItem(0x60, g.ITEM_UNKNOWN_60)
    assert isinstance(pc, PresentationContextRQItem)
    assert pc.items[-1] == UnknownItem(0x35, g.SUBITEM_UNKNOWN_35)
    assert (pc.abstract_syntax, pc.transfer_syntaxes) == (g.VERIFICATION, (g.IMPLICIT_LE,))
    assert isinstance(info, UserInformationItem)
    assert info.items[1] == UnknownItem(0x5F, g.SUBITEM_UNKNOWN_5F)
    assert info.items[1].encode()[1] == 0x07  # the non-zero reserved byte survives
    assert pdu.encode() == g.A_ASSOCIATE_RQ_UNKNOWN_ITEMS
    # rewriting the max length keeps every unknown item in place
    again = parse_pdu(pdu.with_max_length(1000).encode())
    assert isinstance(again, AAssociateRQ)
    assert again.items[2] == unknown60
    assert again.max_length == 1000
    assert again.user_information is not None
    assert again.user_information.items[1] == UnknownItem(0x5F, g.SUBITEM_UNKNOWN_5F)


def test_items_of_the_other_associate_pdu_are_unknown() -> None:
    """A 0x21 in an RQ, or a 0x20 in an AC, is not modelled there: kept raw, not misparsed."""
    rq_bytes = g.rq_with(g.ITEM_APP_CONTEXT, g.ITEM_PC_AC_3_ACCEPTED)
    rq = parse_pdu(rq_bytes)
    assert isinstance(rq, AAssociateRQ)
    assert rq.items[1] == UnknownItem(0x21, g.ITEM_PC_AC_3_ACCEPTED)
    assert rq.presentation_contexts == ()
    ac_bytes = g.pdu(0x02, g.ASSOCIATE_FIXED + g.ITEM_PC_RQ_1)
    ac = parse_pdu(ac_bytes)
    assert isinstance(ac, AAssociateAC)
    assert ac.items == (UnknownItem(0x20, g.ITEM_PC_RQ_1),)
    assert (rq.encode(), ac.encode()) == (rq_bytes, ac_bytes)


def test_associate_without_items_or_user_information() -> None:
    raw = g.pdu(0x01, g.ASSOCIATE_FIXED)
    rq = parse_pdu(raw)
    assert isinstance(rq, AAssociateRQ)
    assert rq.items == ()
    assert rq.application_context is None
    assert rq.user_information is None
    assert rq.max_length is None
    assert rq.presentation_contexts == ()
    assert rq.encode() == raw


def test_user_information_without_max_length() -> None:
    rq = parse_pdu(g.rq_with(g.user_info(g.SUBITEM_IMPL_CLASS_UID)))
    assert isinstance(rq, AAssociateRQ)
    assert rq.user_information is not None
    assert rq.max_length is None


def test_ae_titles_strip_spaces_and_nuls() -> None:
    fixed = b"\x00\x01\x00\x00" + b"  AE\x00\x00" + bytes(10) + b"CALLING  \x00" + b" " * 6 + bytes(32)
    rq = parse_pdu(g.pdu(0x01, fixed))
    assert isinstance(rq, AAssociateRQ)
    assert (rq.called_ae_title, rq.calling_ae_title) == ("AE", "CALLING")
    assert len(rq.called_ae) == 16


def test_reserved_bytes_of_the_fixed_part_are_kept() -> None:
    """PS3.8 says "do not test"; the AC's reserved AE fields and the 32 reserved bytes travel as received."""
    fixed = b"\x00\x01\x00\x00" + b"\xe9" * 16 + b"\xff" * 16 + bytes(range(32))
    raw = g.pdu(0x02, fixed)
    ac = parse_pdu(raw)
    assert isinstance(ac, AAssociateAC)
    assert ac.reserved == bytes(range(32))
    assert ac.called_ae == "\xe9" * 16  # latin-1: any byte decodes, none raises
    assert ac.encode() == raw


def test_protocol_version_is_kept_as_received() -> None:
    raw = g.A_ASSOCIATE_RQ[:6] + b"\x00\x02" + g.A_ASSOCIATE_RQ[8:]
    rq = parse_pdu(raw)
    assert isinstance(rq, AAssociateRQ)
    assert rq.protocol_version == 2  # bit 0 clear: the relay rejects it (RJ 1/2/2), the codec only reports
    assert rq.encode() == raw


# ------------------------------------------------------------------------------- pynetdicom


def _pnd_rq_primitive() -> A_ASSOCIATE:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = g.APP_CONTEXT
    primitive.calling_ae_title = g.CALLING_AE
    primitive.called_ae_title = g.CALLED_AE
    contexts = []
    for context_id, abstract, transfers in (
        (1, g.VERIFICATION, [g.IMPLICIT_LE]),
        (3, g.CT_STORAGE, [g.EXPLICIT_LE, g.IMPLICIT_LE]),
    ):
        context = PresentationContext()
        context.context_id = context_id
        context.abstract_syntax = abstract
        for transfer in transfers:
            context.add_transfer_syntax(transfer)
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts

    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = g.IMPL_CLASS_UID
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 3
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = g.CT_STORAGE
    role.scu_role = True
    role.scp_role = False
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = g.IMPL_VERSION
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = g.BASIC_WORKLIST
    extended.service_class_application_information = b"\x01\x00"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = g.CT_STORAGE
    common.service_class_uid = g.STORAGE_SERVICE_CLASS
    common.related_general_sop_class_identification = [g.ENHANCED_SR]
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.positive_response_requested = True
    identity.primary_field = g.USERNAME
    identity.secondary_field = g.PASSCODE
    primitive.user_information = [max_length, class_uid, window, role, version, extended, common, identity]
    return primitive


def _pnd_ac_primitive() -> A_ASSOCIATE:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = g.APP_CONTEXT
    primitive.calling_ae_title = g.CALLING_AE
    primitive.called_ae_title = g.CALLED_AE
    results = []
    for context_id, abstract, transfer, result in (
        (1, g.VERIFICATION, g.IMPLICIT_LE, 3),
        (3, g.CT_STORAGE, g.EXPLICIT_LE, 0),
    ):
        context = PresentationContext()
        context.context_id = context_id
        context.abstract_syntax = abstract
        context.add_transfer_syntax(transfer)
        context.result = result
        results.append(context)
    primitive.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 32768
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = g.IMPL_CLASS_UID
    identity = UserIdentityNegotiation()
    identity.server_response = g.SERVER_RESPONSE
    primitive.user_information = [max_length, class_uid, identity]
    return primitive


def test_golden_rq_equals_pynetdicom_encoding() -> None:
    encoded = pnd.A_ASSOCIATE_RQ()
    encoded.from_primitive(_pnd_rq_primitive())
    assert encoded.encode() == g.A_ASSOCIATE_RQ


def test_golden_ac_equals_pynetdicom_encoding() -> None:
    encoded = pnd.A_ASSOCIATE_AC()
    encoded.from_primitive(_pnd_ac_primitive())
    assert encoded.encode() == g.A_ASSOCIATE_AC


_PND_CLASSES: dict[str, type] = {
    "A-ASSOCIATE-RQ": pnd.A_ASSOCIATE_RQ,
    "A-ASSOCIATE-AC": pnd.A_ASSOCIATE_AC,
    "A-ASSOCIATE-RJ": pnd.A_ASSOCIATE_RJ,
    "P-DATA-TF": pnd.P_DATA_TF,
    "A-RELEASE-RQ": pnd.A_RELEASE_RQ,
    "A-RELEASE-RP": pnd.A_RELEASE_RP,
    "A-ABORT": pnd.A_ABORT_RQ,
}


@pytest.mark.parametrize("name", list(g.GOLDEN_PDUS))
def test_pynetdicom_decodes_and_reencodes_every_golden_pdu(name: str) -> None:
    theirs = _PND_CLASSES[name]()
    theirs.decode(g.GOLDEN_PDUS[name])
    assert theirs.encode() == g.GOLDEN_PDUS[name]


def test_pynetdicom_reads_the_same_values() -> None:
    rq = pnd.A_ASSOCIATE_RQ()
    rq.decode(g.A_ASSOCIATE_RQ)
    assert rq.called_ae_title == g.CALLED_AE
    assert rq.user_information is not None
    identity = rq.user_information.user_identity
    assert isinstance(identity, pnd_items.UserIdentitySubItemRQ)
    assert (identity.primary, identity.secondary) == (g.USERNAME, g.PASSCODE)
    pdata = pnd.P_DATA_TF()
    pdata.decode(g.P_DATA_TF)
    ours = list(iter_pdvs(memoryview(g.P_DATA_TF)[6:]))
    theirs = pdata.presentation_data_value_items
    assert [(p.presentation_context_id, p.presentation_data_value) for p in theirs] == [
        (p.context_id, bytes((p.control,)) + bytes(p.fragment)) for p in ours
    ]
    abort = pnd.A_ABORT_RQ()
    abort.decode(g.A_ABORT)
    assert (abort.source, abort.reason_diagnostic) == (2, 6)
    rj = pnd.A_ASSOCIATE_RJ()
    rj.decode(g.A_ASSOCIATE_RJ)
    assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, 3)


def test_our_rewritten_rq_is_read_by_pynetdicom() -> None:
    rewritten = _rq().with_max_length(4096).encode()
    theirs = pnd.A_ASSOCIATE_RQ()
    theirs.decode(rewritten)
    assert theirs.user_information is not None
    assert theirs.user_information.maximum_length == 4096
    assert theirs.encode() == rewritten


# ------------------------------------------------------------------------------- rewriting


def test_with_max_length_replaces_the_51_in_place() -> None:
    rq = _rq()
    out = rq.with_max_length(0x12345678)
    raw = out.encode()
    assert len(raw) == len(g.A_ASSOCIATE_RQ)  # same size: only the u32 value changed
    assert raw == g.A_ASSOCIATE_RQ[:238] + b"\x12\x34\x56\x78" + g.A_ASSOCIATE_RQ[242:]
    again = parse_pdu(raw)
    assert isinstance(again, AAssociateRQ)
    assert again.max_length == 0x12345678
    assert again.user_information is not None and rq.user_information is not None
    assert again.user_information.items[1:] == rq.user_information.items[1:]
    assert rq.max_length == 16384  # frozen: the original is untouched


def test_with_max_length_adds_a_51_and_recomputes_lengths() -> None:
    raw = g.rq_with(g.ITEM_APP_CONTEXT, g.ITEM_PC_RQ_1, g.user_info(g.SUBITEM_IMPL_CLASS_UID))
    rq = parse_pdu(raw)
    assert isinstance(rq, AAssociateRQ)
    out = rq.with_max_length(16382).encode()
    assert len(out) == len(raw) + 8
    assert int.from_bytes(out[2:6], "big") == len(out) - 6
    again = parse_pdu(out)
    assert isinstance(again, AAssociateRQ)
    assert again.max_length == 16382
    info = again.user_information
    assert info is not None
    assert info.items == (ImplementationClassUIDSubItem(g.IMPL_CLASS_UID), MaximumLengthSubItem(16382))
    # the 0x50 length field grew by the 8 bytes of the new sub-item
    assert out[-8 - 11 - 2 : -8 - 11] == (11 + 8).to_bytes(2, "big")


def test_with_max_length_adds_user_information_when_missing() -> None:
    raw = g.rq_with(g.ITEM_APP_CONTEXT, g.ITEM_PC_RQ_1)
    rq = parse_pdu(raw)
    assert isinstance(rq, AAssociateRQ)
    out = rq.with_max_length(0).encode()
    assert out == g.pdu(0x01, raw[6:] + b"\x50\x00\x00\x08" + b"\x51\x00\x00\x04\x00\x00\x00\x00")
    again = parse_pdu(out)
    assert isinstance(again, AAssociateRQ)
    assert again.max_length == 0


def test_with_max_length_on_the_ac() -> None:
    ac = _ac().with_max_length(16384)
    raw = ac.encode()
    assert raw == g.A_ASSOCIATE_AC[:167] + b"\x00\x00\x40\x00" + g.A_ASSOCIATE_AC[171:]
    assert parse_pdu(raw) == ac


def test_with_user_information_replaces_identity_and_recomputes_lengths() -> None:
    rq = _rq()
    info = rq.user_information
    assert info is not None
    token = b"x" * 300
    new_info = info.replace(UserIdentityRQSubItem, UserIdentityRQSubItem(5, False, token))
    raw = rq.with_user_information(new_info).encode()
    growth = (2 + 300 + 2) - (2 + 5 + 2 + 6)
    assert len(raw) == len(g.A_ASSOCIATE_RQ) + growth
    assert int.from_bytes(raw[2:6], "big") == len(raw) - 6
    assert int.from_bytes(raw[232:234], "big") == 214 + growth  # the 0x50 length field
    again = parse_pdu(raw)
    assert isinstance(again, AAssociateRQ)
    assert again.user_information is not None
    identity = again.user_information.find(UserIdentityRQSubItem)
    assert identity == UserIdentityRQSubItem(5, False, token, b"")
    assert again.user_information.items[:-1] == info.items[:-1]


def test_with_user_information_removing_the_identity() -> None:
    rq = _rq()
    assert rq.user_information is not None
    stripped = rq.with_user_information(rq.user_information.replace(UserIdentityRQSubItem, None))
    raw = stripped.encode()
    assert raw[6:] == g.A_ASSOCIATE_RQ[6:232] + (214 - 21).to_bytes(2, "big") + g.A_ASSOCIATE_RQ[234:427]
    assert int.from_bytes(raw[2:6], "big") == len(raw) - 6
    assert parse_pdu(raw) == stripped


def test_with_user_information_appends_when_missing() -> None:
    raw = g.rq_with(g.ITEM_APP_CONTEXT)
    rq = parse_pdu(raw)
    assert isinstance(rq, AAssociateRQ)
    info = UserInformationItem((MaximumLengthSubItem(1),))
    out = rq.with_user_information(info)
    assert out.items == (ApplicationContextItem(g.APP_CONTEXT), info)
    assert parse_pdu(out.encode()) == out


def test_building_an_rq_from_values() -> None:
    rq = AAssociateRQ(
        protocol_version=1,
        called_ae=g.CALLED_AE,  # padded on encode
        calling_ae=g.CALLING_AE,
        items=(
            ApplicationContextItem(g.APP_CONTEXT),
            PresentationContextRQItem(
                1,
                (AbstractSyntaxSubItem(g.VERIFICATION), TransferSyntaxSubItem(g.IMPLICIT_LE)),
            ),
        ),
    )
    assert rq.encode() == g.rq_with(g.ITEM_APP_CONTEXT, g.ITEM_PC_RQ_1)


def test_building_an_ac_with_contexts() -> None:
    ac = AAssociateAC(
        1,
        "ARCHIVE         ",
        "MODALITY        ",
        (
            ApplicationContextItem(g.APP_CONTEXT),
            PresentationContextACItem(1, 3, (TransferSyntaxSubItem(g.IMPLICIT_LE),)),
            PresentationContextACItem(3, 0, (TransferSyntaxSubItem(g.EXPLICIT_LE),)),
            UserInformationItem(
                (
                    MaximumLengthSubItem(32768),
                    ImplementationClassUIDSubItem(g.IMPL_CLASS_UID),
                    UserIdentityACSubItem(g.SERVER_RESPONSE),
                )
            ),
        ),
    )
    assert ac.encode() == g.A_ASSOCIATE_AC


@pytest.mark.parametrize(
    ("pdu", "raw"),
    [
        (AAssociateRJ(1, 1, 3), g.A_ASSOCIATE_RJ),
        (AReleaseRQ(), g.A_RELEASE_RQ),
        (AReleaseRP(), g.A_RELEASE_RP),
        (AAbort(2, 6), g.A_ABORT),
    ],
)
def test_building_fixed_size_pdus(pdu: PDU, raw: bytes) -> None:
    assert pdu.encode() == raw


def test_header_helper() -> None:
    assert header(PDUType.A_ABORT, 4) == b"\x07\x00\x00\x00\x00\x04"


@pytest.mark.parametrize("ae", ["A" * 17, "MODALITÄ€"])
def test_ae_title_that_cannot_fit_is_a_local_error(ae: str) -> None:
    rq = AAssociateRQ(1, ae, "CALLING", ())
    with pytest.raises(LocalPDUError):
        rq.encode()


def test_encode_is_abstract_on_the_base_class() -> None:
    with pytest.raises(NotImplementedError):
        PDU().encode()
    with pytest.raises(NotImplementedError):
        PDU.parse_body(memoryview(b""))


# ------------------------------------------------------------------------------- P-DATA-TF / PDVs


def test_iter_pdvs_yields_views_into_the_caller_buffer() -> None:
    source = bytearray(g.P_DATA_TF)
    body = memoryview(source)[6:]
    pdvs = list(iter_pdvs(body))
    for pdv, (start, end) in zip(pdvs, g.PDV_FRAGMENT_OFFSETS, strict=True):
        assert isinstance(pdv.fragment, memoryview)
        assert pdv.fragment.obj is source  # a slice of the caller's buffer, not a copy
        assert bytes(pdv.fragment) == g.P_DATA_TF[start:end]
    source[12] = 0xAB  # first fragment byte
    source[135] = 0xCD  # last fragment byte
    assert pdvs[0].fragment[0] == 0xAB
    assert pdvs[1].fragment[-1] == 0xCD


def test_iter_pdvs_over_bytes_points_at_the_same_object() -> None:
    raw = bytes(g.P_DATA_TF)
    pdvs = list(iter_pdvs(memoryview(raw)[6:]))
    assert all(p.fragment.obj is raw for p in pdvs)


def test_pdv_with_an_empty_fragment_is_allowed() -> None:
    body = b"\x00\x00\x00\x02\x01\x03"
    (pdv,) = iter_pdvs(memoryview(body))
    assert (pdv.context_id, pdv.control, bytes(pdv.fragment)) == (1, 3, b"")
    check_pdvs(memoryview(body))


def test_from_pdvs_builds_the_golden_p_data() -> None:
    built = PDataTF.from_pdvs([(3, 0x03, g.COMMAND_C_STORE_RQ), (3, 0x00, g.DATASET_FRAGMENT)])
    assert built.encode() == g.P_DATA_TF
    assert PDataTF.from_pdvs([]).data == b""


def test_check_pdvs_accepts_the_golden_body() -> None:
    check_pdvs(memoryview(g.P_DATA_TF)[6:])


@pytest.mark.parametrize("case", g.MALFORMED_PDATA, ids=lambda c: c.name)
def test_malformed_p_data(case: g.MalformedPData) -> None:
    body = memoryview(case.raw)[6:]
    for check in (lambda: parse_pdu(case.raw), lambda: list(iter_pdvs(body)), lambda: check_pdvs(body)):
        with pytest.raises(RemotePDUError) as info:
            check()
        assert (info.value.source, info.value.reason) == (case.source, case.reason)


def test_malformed_p_data_passes_the_framer() -> None:
    """The PDV walk is the parser's job: the framer only checks the PDU header."""
    for case in g.MALFORMED_PDATA:
        frames = PDUFramer(sniff_foreign=False).feed(case.raw)
        assert [bytes(f.data) for f in frames] == [case.raw]


# ------------------------------------------------------------------------------- parse_pdu errors


def _error(raw: bytes) -> RemotePDUError:
    with pytest.raises(RemotePDUError) as info:
        parse_pdu(raw)
    return info.value


@pytest.mark.parametrize("size", range(6))
def test_truncated_header(size: int) -> None:
    error = _error(g.A_ASSOCIATE_RQ[:size])
    assert (error.source, error.reason) == (2, 6)
    assert "6-byte header" in str(error)


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x16, 0x47, 0xFF])
def test_unknown_pdu_type(pdu_type: int) -> None:
    error = _error(g.pdu(pdu_type, bytes(4)))
    assert (error.source, error.reason) == (2, 1)
    assert f"0x{pdu_type:02X}" in str(error)


@pytest.mark.parametrize("name", list(g.GOLDEN_PDUS))
def test_declared_length_must_match_the_bytes(name: str) -> None:
    raw = g.GOLDEN_PDUS[name]
    for bad in (raw[:-1], raw + b"\x00", raw + raw):
        error = _error(bad)
        assert (error.source, error.reason) == (2, 6)
        assert "declares" in str(error)


@pytest.mark.parametrize("pdu_type", [0x03, 0x05, 0x06, 0x07])
@pytest.mark.parametrize("length", [0, 3, 5, 68])
def test_fixed_size_pdus_need_length_4(pdu_type: int, length: int) -> None:
    error = _error(g.pdu(pdu_type, bytes(length)))
    assert (error.source, error.reason) == (2, 6)
    assert "expected 4" in str(error)


@pytest.mark.parametrize("pdu_type", [0x01, 0x02])
@pytest.mark.parametrize("length", [0, 4, 67])
def test_associate_body_shorter_than_68(pdu_type: int, length: int) -> None:
    error = _error(g.pdu(pdu_type, g.ASSOCIATE_FIXED[:length]))
    assert (error.source, error.reason) == (2, 6)
    assert "68-byte fixed part" in str(error)


@pytest.mark.parametrize("case", [c for c in g.MALFORMED if c.stage == "parse"], ids=lambda c: c.name)
def test_malformed_rq_items(case: g.Malformed) -> None:
    error = _error(case.raw)
    assert (error.source, error.reason) == (case.source, case.reason)
    assert re.search(case.match, str(error)), str(error)


_AC_APPLICABLE = [c for c in g.MALFORMED if c.stage == "parse" and "0x20" not in c.name and "0x30" not in c.name]


@pytest.mark.parametrize("case", _AC_APPLICABLE, ids=lambda c: c.name)
def test_malformed_items_rejected_in_an_ac_too(case: g.Malformed) -> None:
    """The same damage inside an A-ASSOCIATE-AC (0x20 is not an AC item: those cases do not apply)."""
    error = _error(b"\x02" + case.raw[1:])
    assert (error.source, error.reason) == (case.source, case.reason)
    assert re.search(case.match, str(error)), str(error)


def test_type_is_checked_before_length() -> None:
    """Type first, then length, then body: an unknown type with a bad body is still 2/1."""
    error = _error(b"\x09\x00\x00\x00\x00\x01\x00")
    assert error.reason == 1


# ------------------------------------------------------------------------------- duplicate items


def test_a_second_user_information_item_cannot_smuggle_values_past_a_rewrite() -> None:
    smuggled = g.user_info(
        b"\x51\x00\x00\x04\x7f\xff\xff\xff",  # max length 2 GiB
        b"\x58\x00\x00\x0a\x01\x00\x00\x04evil\x00\x00",  # an identity nobody checked
    )
    raw = g.rq_with(g.ITEM_APP_CONTEXT, g.ITEM_PC_RQ_1, g.user_info(g.SUBITEM_MAX_LENGTH_RQ), smuggled)
    try:
        rq = parse_pdu(raw)
    except RemotePDUError as exc:  # one acceptable fix: PS3.8 9.3.2 allows exactly one 0x50
        assert (exc.source, exc.reason) == (2, 6)
        return
    assert isinstance(rq, AAssociateRQ) and rq.user_information is not None
    clamped = rq.with_max_length(1000)
    info = clamped.user_information
    assert info is not None
    rewritten = clamped.with_user_information(info.replace(UserIdentityRQSubItem, None))
    again = parse_pdu(rewritten.encode())
    assert isinstance(again, AAssociateRQ)
    infos = [i for i in again.items if isinstance(i, UserInformationItem)]
    assert all(info.max_length == 1000 for info in infos), "an unclamped 0x51 is forwarded"
    assert all(info.find(UserIdentityRQSubItem) is None for info in infos), "a 0x58 is forwarded"


def test_two_user_identities_in_one_user_information_are_rejected() -> None:
    first = b"\x58\x00\x00\x0b\x01\x00\x00\x05alice\x00\x00"
    second = b"\x58\x00\x00\x0b\x01\x00\x00\x05admin\x00\x00"
    raw = g.rq_with(g.ITEM_APP_CONTEXT, g.ITEM_PC_RQ_1, g.user_info(g.SUBITEM_MAX_LENGTH_RQ, first, second))
    try:
        parse_pdu(raw)
    except RemotePDUError as exc:
        assert (exc.source, exc.reason) == (2, 6)
        return
    raise AssertionError("an RQ with two user identities parsed: the proxy and the archive may read different ones")


@pytest.mark.parametrize("name", list(g.GOLDEN_PDUS))
def test_parsed_values_own_their_bytes(name: str) -> None:
    """A parsed PDU keeps no view of the read buffer, which the caller reuses after the next read."""
    source = bytearray(g.GOLDEN_PDUS[name])
    pdu = parse_pdu(memoryview(source))
    source[6:] = bytes(len(source) - 6)
    assert pdu.encode() == g.GOLDEN_PDUS[name]


# ------------------------------------------------------------------------------- code tables


def test_code_tables_have_no_aliases() -> None:
    """An alias's .name is its twin's: RejectReason.ACSE_PROTOCOL_VERSION_NOT_SUPPORTED.name would read
    'USER_APPLICATION_CONTEXT_NOT_SUPPORTED' in a log line, an audit record or a metric label."""
    for table in vars(constants).values():
        if isinstance(table, type) and issubclass(table, IntEnum):
            aliases = sorted(set(table.__members__) - {member.name for member in table})
            assert aliases == [], f"{table.__name__}: {aliases} are aliases of other members"
