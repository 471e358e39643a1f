"""DIMSE command sets (PS3.7 6.3, 9.3, 10.3): reassembly from PDVs, reading, and the few messages
the proxy must originate itself (C-ECHO-RQ for health probes, refusal responses for rules).

Command sets are always Implicit VR Little Endian, group 0000 only, ascending tags:

    u16 group | u16 element | u32 value length | value (even length), all little-endian

Only command fragments are ever buffered; data-set fragments are counted, never kept.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple, Protocol

from proxy.dul.pdus import iter_pdvs
from proxy.errors import RemotePDUError

_ELEMENT = struct.Struct("<HHI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

MAX_COMMAND_SET_LENGTH = 64 * 1024
"""A command set is a few hundred bytes; a bigger one is hostile (the proxy buffers it)."""

NO_DATA_SET = 0x0101
"""CommandDataSetType value meaning that no data set follows (PS3.7 E.1-1)."""


class CommandField(IntEnum):
    """PS3.7 Annex E; bit 15 marks a response."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    C_CANCEL_RQ = 0x0FFF
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150


_COMMAND_NAMES = {int(f): f.name.rsplit("_", 1)[0].replace("_", "-") for f in CommandField}


def command_name(value: int) -> str:
    """'C-STORE' for C-STORE-RQ and -RSP; a bounded label, safe for metrics."""
    return _COMMAND_NAMES.get(value, "unknown")


class Tag(IntEnum):
    """Group 0000 elements the proxy reads or writes (PS3.7 E.1-1)."""

    COMMAND_GROUP_LENGTH = 0x0000
    AFFECTED_SOP_CLASS_UID = 0x0002
    REQUESTED_SOP_CLASS_UID = 0x0003
    COMMAND_FIELD = 0x0100
    MESSAGE_ID = 0x0110
    MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
    MOVE_DESTINATION = 0x0600
    PRIORITY = 0x0700
    COMMAND_DATA_SET_TYPE = 0x0800
    STATUS = 0x0900
    ERROR_COMMENT = 0x0902
    AFFECTED_SOP_INSTANCE_UID = 0x1000
    REQUESTED_SOP_INSTANCE_UID = 0x1001


def status_class(status: int) -> str:
    """PS3.7 Annex C: success, warning, failure, cancel or pending."""
    if status == 0x0000:
        return "success"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if status == 0x0001 or status in (0x0107, 0x0116) or (status & 0xF000) == 0xB000:
        return "warning"
    return "failure"


# plain ints: looking an IntEnum member up costs more than the dict access it keys
_AFFECTED_SOP_CLASS_UID = int(Tag.AFFECTED_SOP_CLASS_UID)
_AFFECTED_SOP_INSTANCE_UID = int(Tag.AFFECTED_SOP_INSTANCE_UID)
_COMMAND_DATA_SET_TYPE = int(Tag.COMMAND_DATA_SET_TYPE)
_COMMAND_FIELD = int(Tag.COMMAND_FIELD)
_MESSAGE_ID = int(Tag.MESSAGE_ID)
_MESSAGE_ID_BEING_RESPONDED_TO = int(Tag.MESSAGE_ID_BEING_RESPONDED_TO)
_MOVE_DESTINATION = int(Tag.MOVE_DESTINATION)
_PRIORITY = int(Tag.PRIORITY)
_REQUESTED_SOP_CLASS_UID = int(Tag.REQUESTED_SOP_CLASS_UID)
_STATUS = int(Tag.STATUS)
_SUMMARY_TAGS = frozenset(
    (_COMMAND_FIELD, _MESSAGE_ID, _MESSAGE_ID_BEING_RESPONDED_TO, _STATUS, _COMMAND_DATA_SET_TYPE)
)


@dataclass(frozen=True)
class CommandSet:
    """A parsed command set: element number (group 0000) -> raw value bytes."""

    elements: Mapping[int, bytes]

    def _us(self, tag: int) -> int | None:
        raw = self.elements.get(tag)
        if raw is None or len(raw) != 2:
            return None
        return int(_U16.unpack(raw)[0])

    def _text(self, tag: int) -> str | None:
        raw = self.elements.get(tag)
        return None if raw is None else raw.decode("latin-1").rstrip("\x00 ").strip()

    @property
    def command_field(self) -> int | None:
        return self._us(_COMMAND_FIELD)

    @property
    def is_response(self) -> bool:
        value = self.command_field
        return value is not None and bool(value & 0x8000)

    @property
    def message_id(self) -> int | None:
        return self._us(_MESSAGE_ID)

    @property
    def message_id_being_responded_to(self) -> int | None:
        return self._us(_MESSAGE_ID_BEING_RESPONDED_TO)

    @property
    def affected_sop_class_uid(self) -> str | None:
        return self._text(_AFFECTED_SOP_CLASS_UID)

    @property
    def requested_sop_class_uid(self) -> str | None:
        return self._text(_REQUESTED_SOP_CLASS_UID)

    @property
    def sop_class_uid(self) -> str | None:
        return self.affected_sop_class_uid or self.requested_sop_class_uid

    @property
    def affected_sop_instance_uid(self) -> str | None:
        return self._text(_AFFECTED_SOP_INSTANCE_UID)

    @property
    def move_destination(self) -> str | None:
        return self._text(_MOVE_DESTINATION)

    @property
    def priority(self) -> int | None:
        return self._us(_PRIORITY)

    @property
    def status(self) -> int | None:
        return self._us(_STATUS)

    @property
    def has_data_set(self) -> bool:
        value = self._us(_COMMAND_DATA_SET_TYPE)
        return value is not None and value != NO_DATA_SET


def _walk_elements(raw: bytes) -> Iterator[tuple[int, int, int]]:
    """(element number, value start, value end) of each group 0000 element, in order; RemotePDUError
    (2/6) for a command set whose elements do not add up."""
    n = len(raw)
    unpack = _ELEMENT.unpack_from
    offset = 0
    while offset < n:
        if offset + 8 > n:
            raise RemotePDUError("command set element header truncated", source=2, reason=6)
        group, element, length = unpack(raw, offset)
        start = offset + 8
        offset = start + length
        if group != 0x0000:
            raise RemotePDUError(f"command set holds element ({group:04X},{element:04X})", source=2, reason=6)
        if offset > n:
            raise RemotePDUError(f"command element (0000,{element:04X}) overflows the set", source=2, reason=6)
        yield element, start, offset


def parse_command_set(data: bytes | bytearray | memoryview) -> CommandSet:
    """RemotePDUError (2/6) for a command set whose elements do not add up."""
    raw = bytes(data)  # one copy; slices of bytes are cheaper than bytes(memoryview slices)
    return CommandSet({element: raw[start:end] for element, start, end in _walk_elements(raw)})


class CommandFacts(Protocol):
    """What DIMSE metrics and health probes read of a command: a CommandSet or a CommandSummary."""

    @property
    def command_field(self) -> int | None: ...

    @property
    def message_id(self) -> int | None: ...

    @property
    def message_id_being_responded_to(self) -> int | None: ...

    @property
    def status(self) -> int | None: ...

    @property
    def has_data_set(self) -> bool: ...


class CommandSummary(NamedTuple):
    """The fields MessageStream's readers need, decoded in one pass: no dict, no copies of UIDs
    (metrics look at every command of every association)."""

    command_field: int | None
    message_id: int | None
    message_id_being_responded_to: int | None
    status: int | None
    has_data_set: bool


def summarize_command_set(data: bytes | bytearray | memoryview) -> CommandSummary:
    """Like parse_command_set (the same RemotePDUError checks), keeping five US values only."""
    raw = bytes(data)
    u16 = _U16.unpack_from
    values: dict[int, int | None] = {}
    for element, start, end in _walk_elements(raw):
        if element in _SUMMARY_TAGS:  # the last one wins, and only a 2-byte value counts, as in CommandSet
            values[element] = u16(raw, start)[0] if end - start == 2 else None
    data_set_type = values.get(_COMMAND_DATA_SET_TYPE)
    return CommandSummary(values.get(_COMMAND_FIELD), values.get(_MESSAGE_ID),
                          values.get(_MESSAGE_ID_BEING_RESPONDED_TO), values.get(_STATUS),
                          data_set_type is not None and data_set_type != NO_DATA_SET)


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def encode_command_set(values: Iterable[tuple[int, bytes]]) -> bytes:
    """Elements in ascending order with a fresh CommandGroupLength (values already padded)."""
    body = b"".join(
        _ELEMENT.pack(0x0000, tag, len(value)) + value
        for tag, value in sorted(values)
        if tag != Tag.COMMAND_GROUP_LENGTH
    )
    return _ELEMENT.pack(0x0000, Tag.COMMAND_GROUP_LENGTH, 4) + _U32.pack(len(body)) + body


def uid_value(uid: str) -> bytes:
    return _pad(uid.encode("ascii"), b"\x00")


def us_value(value: int) -> bytes:
    return _U16.pack(value)


def c_echo_rq(message_id: int) -> bytes:
    return encode_command_set(
        [
            (Tag.AFFECTED_SOP_CLASS_UID, uid_value("1.2.840.10008.1.1")),
            (Tag.COMMAND_FIELD, us_value(CommandField.C_ECHO_RQ)),
            (Tag.MESSAGE_ID, us_value(message_id)),
            (Tag.COMMAND_DATA_SET_TYPE, us_value(NO_DATA_SET)),
        ]
    )


def response_for(request: CommandSet, status: int, *, error_comment: str | None = None) -> bytes:
    """The *-RSP that answers `request` with `status` and no data set (a refusal made by the proxy)."""
    command = request.command_field
    if command is None or command & 0x8000 or command == CommandField.C_CANCEL_RQ:
        raise ValueError("only a request can be answered")
    values: list[tuple[int, bytes]] = [
        (Tag.COMMAND_FIELD, us_value(command | 0x8000)),
        (Tag.MESSAGE_ID_BEING_RESPONDED_TO, us_value(request.message_id or 0)),
        (Tag.COMMAND_DATA_SET_TYPE, us_value(NO_DATA_SET)),
        (Tag.STATUS, us_value(status)),
    ]
    sop_class = request.sop_class_uid
    if sop_class:
        values.append((Tag.AFFECTED_SOP_CLASS_UID, uid_value(sop_class)))
    instance = request.affected_sop_instance_uid or request._text(Tag.REQUESTED_SOP_INSTANCE_UID)
    if instance:
        values.append((Tag.AFFECTED_SOP_INSTANCE_UID, uid_value(instance)))
    if error_comment:
        values.append((Tag.ERROR_COMMENT, _pad(error_comment[:64].encode("latin-1", "replace"), b" ")))
    return encode_command_set(values)


@dataclass
class MessageStream:
    """One direction of P-DATA: reassembles each command set from its PDVs (PS3.8 Annex E).

    `observe(body)` takes a P-DATA-TF body, validates the PDVs and returns the commands completed
    in it, each with its presentation context ID. Data-set fragments are only counted.
    """

    _command: bytearray = field(default_factory=bytearray)
    _context_id: int | None = None
    in_data_set: bool = False
    data_bytes: int = 0

    def observe(self, body: memoryview) -> list[tuple[int, CommandSummary]]:
        done: list[tuple[int, CommandSummary]] = []
        for pdv in iter_pdvs(body):
            if pdv.control & 0x01:
                if self.in_data_set:
                    raise RemotePDUError("command fragment inside an unfinished data set", source=2, reason=5)
                if self._context_id is not None and pdv.context_id != self._context_id:
                    raise RemotePDUError("command fragments on different presentation contexts", source=2, reason=5)
                self._context_id = pdv.context_id
                if len(self._command) + len(pdv.fragment) > MAX_COMMAND_SET_LENGTH:
                    raise RemotePDUError("command set larger than 64 KiB", source=2, reason=6)
                self._command += pdv.fragment
                if pdv.control & 0x02:
                    command = summarize_command_set(self._command)
                    done.append((pdv.context_id, command))
                    self._command = bytearray()
                    self._context_id = None
                    self.in_data_set = command.has_data_set
            else:
                if self._command:
                    raise RemotePDUError("data fragment inside an unfinished command", source=2, reason=5)
                self.data_bytes += len(pdv.fragment)
                if pdv.control & 0x02:
                    self.in_data_set = False
        return done


class RequestGate:
    """Requestor -> acceptor P-DATA when DIMSE rules apply: the PDUs carrying a request's command
    are held until the command is complete, then released or refused as a whole.

    `decide(context_id, command)` returns None to forward the request, or the failure Status of
    the response the proxy sends instead. A refused request's data set is discarded as it
    arrives (never buffered), and the response goes out once its last fragment has passed, as a
    real SCP would answer. Per PS3.8 E.1 the PDVs of one P-DATA-TF belong to one message, so a
    PDU's fate is decided as a whole.
    """

    def __init__(self, decide: Callable[[int, CommandSet], int | None]) -> None:
        self._decide = decide
        self._held: list[memoryview] = []
        self._command = bytearray()
        self._discarding = False
        self._pending: bytes | None = None  # the refusal response, sent after the discarded data set
        self._in_data_set = False

    def feed(self, pdu: memoryview) -> tuple[list[memoryview], list[bytes]]:
        """One whole P-DATA-TF PDU in; (PDUs to forward upstream, PDUs to answer the requestor with)."""
        forward: list[memoryview] = []
        answer: list[bytes] = []
        held = False
        for pdv in iter_pdvs(pdu[6:]):
            if pdv.control & 0x01:
                if self._in_data_set:
                    raise RemotePDUError("command fragment inside an unfinished data set", source=2, reason=5)
                if len(self._command) + len(pdv.fragment) > MAX_COMMAND_SET_LENGTH:
                    raise RemotePDUError("command set larger than 64 KiB", source=2, reason=6)
                self._command += pdv.fragment
                if not held:
                    self._held.append(pdu)
                    held = True
                if pdv.control & 0x02:
                    command = parse_command_set(self._command)
                    self._command = bytearray()
                    status = None if command.is_response else self._decide(pdv.context_id, command)
                    self._in_data_set = command.has_data_set
                    if status is None:
                        forward.extend(self._held)
                        self._discarding = False
                    else:
                        self._discarding = True
                        response = response_for(command, status)
                        self._pending = _pdata(pdv.context_id, response)
                    self._held = []
                    if not self._in_data_set:
                        self._flush_pending(answer)
            else:
                if self._command:
                    raise RemotePDUError("data fragment inside an unfinished command", source=2, reason=5)
                if not held and not self._discarding:
                    forward.append(pdu)
                    held = True
                if pdv.control & 0x02:
                    self._in_data_set = False
                    self._flush_pending(answer)
        return forward, answer

    def _flush_pending(self, answer: list[bytes]) -> None:
        if self._pending is not None:
            answer.append(self._pending)
            self._pending = None
        self._discarding = False


def _pdata(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF with the whole command in one last-fragment PDV (MCH 0x03)."""
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv
