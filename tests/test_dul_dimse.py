"""DIMSE command sets: parsing, builders, status classes and the request gate used by DIMSE rules."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dul.dimse import (
    CommandField,
    CommandSet,
    MessageStream,
    RequestGate,
    Tag,
    c_echo_rq,
    command_name,
    encode_command_set,
    parse_command_set,
    response_for,
    status_class,
    summarize_command_set,
    uid_value,
    us_value,
)
from proxy.dul.pdus import iter_pdvs
from proxy.errors import RemotePDUError

CT = "1.2.840.10008.5.1.4.1.1.2"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


def store_rq(message_id: int) -> bytes:
    return encode_command_set(
        [
            (Tag.AFFECTED_SOP_CLASS_UID, uid_value(CT)),
            (Tag.COMMAND_FIELD, us_value(CommandField.C_STORE_RQ)),
            (Tag.MESSAGE_ID, us_value(message_id)),
            (Tag.PRIORITY, us_value(0)),
            (Tag.COMMAND_DATA_SET_TYPE, us_value(0x0000)),
            (Tag.AFFECTED_SOP_INSTANCE_UID, uid_value("1.2.3.4.5")),
        ]
    )


def move_rq(message_id: int, destination: str) -> bytes:
    return encode_command_set(
        [
            (Tag.AFFECTED_SOP_CLASS_UID, uid_value(MOVE)),
            (Tag.COMMAND_FIELD, us_value(CommandField.C_MOVE_RQ)),
            (Tag.MESSAGE_ID, us_value(message_id)),
            (Tag.MOVE_DESTINATION, destination.ljust(16).encode()),
            (Tag.PRIORITY, us_value(0)),
            (Tag.COMMAND_DATA_SET_TYPE, us_value(0x0000)),
        ]
    )


def pdata(*pdvs: tuple[int, int, bytes]) -> memoryview:
    body = b"".join(struct.pack(">IBB", len(f) + 2, ctx, mch) + f for ctx, mch, f in pdvs)
    return memoryview(struct.pack(">BBI", 4, 0, len(body)) + body)


def test_c_echo_rq_matches_pynetdicom_byte_for_byte() -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO

    primitive = C_ECHO()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, message.command_set)
    assert c_echo_rq(7) == fp.getvalue()


def test_parse_reads_the_fields_rules_use() -> None:
    command = parse_command_set(move_rq(9, "WS9"))
    assert command.command_field == CommandField.C_MOVE_RQ
    assert command_name(CommandField.C_MOVE_RQ) == "C-MOVE"
    assert command.message_id == 9
    assert command.move_destination == "WS9"
    assert command.affected_sop_class_uid == MOVE
    assert command.priority == 0
    assert command.has_data_set
    assert not command.is_response


def test_response_for_a_refused_move() -> None:
    response = parse_command_set(response_for(parse_command_set(move_rq(9, "WS9")), 0xA801))
    assert response.command_field == CommandField.C_MOVE_RSP
    assert response.message_id_being_responded_to == 9
    assert response.status == 0xA801
    assert response.affected_sop_class_uid == MOVE
    assert not response.has_data_set
    # CommandGroupLength covers exactly the rest
    raw = response_for(parse_command_set(move_rq(9, "WS9")), 0xA801)
    assert struct.unpack_from("<I", raw, 8)[0] == len(raw) - 12


def test_response_for_refuses_to_answer_a_response() -> None:
    rsp = CommandSet({Tag.COMMAND_FIELD: us_value(CommandField.C_STORE_RSP)})
    with pytest.raises(ValueError):
        response_for(rsp, 0x0124)


@pytest.mark.parametrize(
    ("status", "klass"),
    [(0, "success"), (0xFF00, "pending"), (0xFF01, "pending"), (0xFE00, "cancel"), (0xB000, "warning"),
     (0x0107, "warning"), (0x0001, "warning"), (0xA700, "failure"), (0x0124, "failure"), (0xC000, "failure")],
)
def test_status_classes(status: int, klass: str) -> None:
    assert status_class(status) == klass


@pytest.mark.parametrize(
    "raw",
    [b"\x00\x00\x00\x00\x04", b"\x08\x00\x00\x00\x02\x00\x00\x00\x00\x00", b"\x00\x00\x00\x01\xff\x00\x00\x00"],
)
def test_malformed_command_sets_are_remote_errors(raw: bytes) -> None:
    with pytest.raises(RemotePDUError):
        parse_command_set(raw)


def test_message_stream_reassembles_a_command_cut_in_fragments() -> None:
    command = store_rq(3)
    stream = MessageStream()
    assert stream.observe(pdata((1, 0x01, command[:10]))[6:]) == []
    done = stream.observe(pdata((1, 0x03, command[10:]))[6:])
    assert [(ctx, c.message_id) for ctx, c in done] == [(1, 3)]
    assert stream.in_data_set
    stream.observe(pdata((1, 0x00, b"\x00" * 100))[6:])
    stream.observe(pdata((1, 0x02, b"\x00" * 50))[6:])
    assert not stream.in_data_set
    assert stream.data_bytes == 150


def test_gate_forwards_allowed_requests_unchanged() -> None:
    gate = RequestGate(lambda ctx, cmd: None)
    first = pdata((1, 0x01, store_rq(1)[:20]))
    second = pdata((1, 0x03, store_rq(1)[20:]))
    data = pdata((1, 0x02, b"\x01\x02"))
    assert gate.feed(first) == ([], [])  # held until the command is complete
    forward, answers = gate.feed(second)
    assert [bytes(v) for v in forward] == [bytes(first), bytes(second)]
    assert answers == []
    forward, answers = gate.feed(data)
    assert [bytes(v) for v in forward] == [bytes(data)]


def test_gate_refuses_discards_the_data_set_and_answers_after_it() -> None:
    decided: list[tuple[int, str | None]] = []

    def decide(ctx: int, cmd: CommandSet) -> int | None:
        decided.append((ctx, cmd.move_destination))
        return 0xA801 if cmd.move_destination == "EVIL" else None

    gate = RequestGate(decide)
    forward, answers = gate.feed(pdata((3, 0x03, move_rq(5, "EVIL"))))
    assert forward == [] and answers == []  # the identifier is still to come
    forward, answers = gate.feed(pdata((3, 0x02, b"\x08\x00\x52\x00")))
    assert forward == []
    assert len(answers) == 1
    pdvs = list(iter_pdvs(memoryview(answers[0])[6:]))
    assert [(p.context_id, p.control) for p in pdvs] == [(3, 0x03)]
    response = parse_command_set(pdvs[0].fragment)
    assert response.status == 0xA801
    assert response.message_id_being_responded_to == 5
    # the association goes on: the next request is forwarded
    allowed = pdata((3, 0x03, move_rq(6, "WS1")))
    forward, answers = gate.feed(allowed)
    assert [bytes(v) for v in forward] == [bytes(allowed)]
    assert decided == [(3, "EVIL"), (3, "WS1")]


def test_gate_answers_at_once_when_no_data_set_follows() -> None:
    echo = parse_command_set(c_echo_rq(11))
    assert not echo.has_data_set
    gate = RequestGate(lambda ctx, cmd: 0x0124)
    forward, answers = gate.feed(pdata((1, 0x03, c_echo_rq(11))))
    assert forward == []
    assert parse_command_set(next(iter(iter_pdvs(memoryview(answers[0])[6:]))).fragment).status == 0x0124


def test_gate_passes_responses_without_asking() -> None:
    asked: list[int] = []
    gate = RequestGate(lambda ctx, cmd: asked.append(1) or 0x0124)
    rsp = response_for(parse_command_set(store_rq(1)), 0)
    forward, answers = gate.feed(pdata((1, 0x03, rsp)))
    assert len(forward) == 1 and answers == [] and asked == []


def test_gate_rejects_interleaved_messages() -> None:
    gate = RequestGate(lambda ctx, cmd: None)
    gate.feed(pdata((1, 0x03, store_rq(1))))
    with pytest.raises(RemotePDUError) as err:
        gate.feed(pdata((1, 0x03, store_rq(2))))
    assert (err.value.source, err.value.reason) == (2, 5)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x0000, 0x0002, 0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1000]),
                          st.binary(max_size=6)), max_size=10),
       st.binary(max_size=12))
def test_the_summary_reads_what_the_full_parse_reads(elements: list[tuple[int, bytes]], junk: bytes) -> None:
    """summarize_command_set (metrics, probes) and parse_command_set (rules) agree on every value
    they share, and refuse the same broken sets."""
    raw = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    for data in (raw, raw + junk):
        try:
            full = parse_command_set(data)
        except RemotePDUError as exc:
            with pytest.raises(RemotePDUError) as caught:
                summarize_command_set(data)
            assert str(caught.value) == str(exc)
            continue
        summary = summarize_command_set(data)
        assert summary == (full.command_field, full.message_id, full.message_id_being_responded_to, full.status,
                           full.has_data_set)
