"""The seven PDUs of PS3.8 9.3 as frozen classes with `parse(view)` and `encode()`.

Every PDU starts with the common 6-byte header (PS3.8 9.3.1):

    off 0  u8   PDU type (0x01-0x07)
    off 1  u8   reserved
    off 2  u32  PDU length = bytes after this field, big-endian

`parse_pdu` takes one whole PDU (header included), as the framer delivers it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import ClassVar, NamedTuple, Self

from proxy.dul.constants import (
    AE_TITLE_LENGTH,
    ASSOCIATE_FIXED_LENGTH,
    FIXED_PDU_BODY_LENGTH,
    PDU_HEADER_LENGTH,
    PDV_HEADER_LENGTH,
    AbortReason,
    AbortSource,
    PDUType,
)
from proxy.dul.items import (
    AC_ITEMS,
    RQ_ITEMS,
    ApplicationContextItem,
    Item,
    MaximumLengthSubItem,
    PresentationContextACItem,
    PresentationContextRQItem,
    UserInformationItem,
    first,
    parse_items,
)
from proxy.errors import LocalPDUError, RemotePDUError

HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
_ASSOC_FIXED = struct.Struct(">HH16s16s32s")


def header(pdu_type: int, length: int) -> bytes:
    return HEADER.pack(pdu_type, 0, length)


def _ae(raw: bytes) -> str:
    return raw.decode("latin-1")


def _encode_ae(value: str) -> bytes:
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise LocalPDUError(f"AE title {value!r} is not latin-1") from exc
    if len(raw) > AE_TITLE_LENGTH:
        raise LocalPDUError(f"AE title {value!r} is longer than 16 bytes")
    return raw.ljust(AE_TITLE_LENGTH, b" ")


@dataclass(frozen=True)
class PDU:
    pdu_type: ClassVar[PDUType]

    def encode(self) -> bytes:
        try:
            return self._encode()
        except (struct.error, ValueError, OverflowError) as exc:
            raise LocalPDUError(f"{type(self).__name__} holds a value out of range: {exc}") from exc

    def _encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def parse_body(cls, body: memoryview) -> PDU:
        raise NotImplementedError


@dataclass(frozen=True)
class _AssociatePDU(PDU):
    """A-ASSOCIATE-RQ/AC fixed part (PS3.8 9.3.2 / 9.3.3):

        off 6  u16  protocol version (bit 0 = version 1)
        off 8  u16  reserved
        off 10 16s  called AE title (AC: reserved, echoes the RQ)
        off 26 16s  calling AE title (AC: reserved, echoes the RQ)
        off 42 32s  reserved
        off 74 ...  items
    """

    _registry: ClassVar[dict[int, type[Item]]]
    protocol_version: int
    called_ae: str  # raw 16 characters, padding included
    calling_ae: str
    items: tuple[Item, ...]
    reserved: bytes = field(default=bytes(32), repr=False)

    @property
    def called_ae_title(self) -> str:
        return self.called_ae.strip(" \x00")

    @property
    def calling_ae_title(self) -> str:
        return self.calling_ae.strip(" \x00")

    @property
    def application_context(self) -> str | None:
        item = first(self.items, ApplicationContextItem)
        return item.value if item else None

    @property
    def user_information(self) -> UserInformationItem | None:
        return first(self.items, UserInformationItem)

    @property
    def max_length(self) -> int | None:
        info = self.user_information
        return info.max_length if info else None

    def with_user_information(self, info: UserInformationItem) -> Self:
        """A copy whose User Information item is `info` (appended if there was none)."""
        items = list(self.items)
        for i, item in enumerate(items):
            if isinstance(item, UserInformationItem):
                items[i] = info
                break
        else:
            items.append(info)
        return replace(self, items=tuple(items))

    def with_max_length(self, max_length: int) -> Self:
        info = self.user_information or UserInformationItem(())
        return self.with_user_information(info.replace(MaximumLengthSubItem, MaximumLengthSubItem(max_length)))

    def _encode(self) -> bytes:
        fixed = _ASSOC_FIXED.pack(
            self.protocol_version, 0, _encode_ae(self.called_ae), _encode_ae(self.calling_ae), self.reserved
        )
        body = fixed + b"".join(item.encode() for item in self.items)
        return header(self.pdu_type, len(body)) + body

    @classmethod
    def parse_body(cls, body: memoryview) -> PDU:
        if len(body) < ASSOCIATE_FIXED_LENGTH:
            raise RemotePDUError(
                f"{cls.pdu_type.name} body is {len(body)} bytes, shorter than the 68-byte fixed part",
                source=2,
                reason=AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        version, _reserved, called, calling, reserved = _ASSOC_FIXED.unpack_from(body)
        items = parse_items(body[ASSOCIATE_FIXED_LENGTH:], cls._registry)
        for kind in (ApplicationContextItem, UserInformationItem):
            # Peers disagree on which duplicate wins; the proxy must not clamp or check the other one.
            if sum(isinstance(i, kind) for i in items) > 1:
                raise RemotePDUError(
                    f"{cls.pdu_type.name} has more than one {kind.__name__}", source=2, reason=6
                )
        return cls(version, _ae(called), _ae(calling), items, reserved)


@dataclass(frozen=True)
class AAssociateRQ(_AssociatePDU):
    """A-ASSOCIATE-RQ, PDU type 0x01: items 0x10, 0x20 (one or more), 0x50."""

    pdu_type: ClassVar[PDUType] = PDUType.A_ASSOCIATE_RQ
    _registry: ClassVar[dict[int, type[Item]]] = RQ_ITEMS

    @property
    def presentation_contexts(self) -> tuple[PresentationContextRQItem, ...]:
        return tuple(i for i in self.items if isinstance(i, PresentationContextRQItem))


@dataclass(frozen=True)
class AAssociateAC(_AssociatePDU):
    """A-ASSOCIATE-AC, PDU type 0x02: items 0x10, 0x21 (one per proposed context), 0x50."""

    pdu_type: ClassVar[PDUType] = PDUType.A_ASSOCIATE_AC
    _registry: ClassVar[dict[int, type[Item]]] = AC_ITEMS

    @property
    def presentation_contexts(self) -> tuple[PresentationContextACItem, ...]:
        return tuple(i for i in self.items if isinstance(i, PresentationContextACItem))


@dataclass(frozen=True)
class _FourBytePDU(PDU):
    """The 10-byte PDUs: header, then 4 bytes (PS3.8 9.3.4-9.3.8)."""

    def _body(self) -> bytes:
        return bytes(4)

    def _encode(self) -> bytes:
        return header(self.pdu_type, FIXED_PDU_BODY_LENGTH) + self._body()

    @classmethod
    def _check(cls, body: memoryview) -> None:
        if len(body) != FIXED_PDU_BODY_LENGTH:
            raise RemotePDUError(
                f"{cls.pdu_type.name} has length {len(body)}, expected 4",
                source=2,
                reason=AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )


@dataclass(frozen=True)
class AAssociateRJ(_FourBytePDU):
    """A-ASSOCIATE-RJ, 0x03: off 6 reserved; off 7 result; off 8 source; off 9 reason/diag."""

    pdu_type: ClassVar[PDUType] = PDUType.A_ASSOCIATE_RJ
    result: int
    source: int
    reason: int

    def _body(self) -> bytes:
        return bytes((0, self.result, self.source, self.reason))

    @classmethod
    def parse_body(cls, body: memoryview) -> PDU:
        cls._check(body)
        return cls(body[1], body[2], body[3])


@dataclass(frozen=True)
class AReleaseRQ(_FourBytePDU):
    """A-RELEASE-RQ, 0x05: 4 reserved bytes."""

    pdu_type: ClassVar[PDUType] = PDUType.A_RELEASE_RQ

    @classmethod
    def parse_body(cls, body: memoryview) -> PDU:
        cls._check(body)
        return cls()


@dataclass(frozen=True)
class AReleaseRP(_FourBytePDU):
    """A-RELEASE-RP, 0x06: 4 reserved bytes."""

    pdu_type: ClassVar[PDUType] = PDUType.A_RELEASE_RP

    @classmethod
    def parse_body(cls, body: memoryview) -> PDU:
        cls._check(body)
        return cls()


@dataclass(frozen=True)
class AAbort(_FourBytePDU):
    """A-ABORT, 0x07: off 6, 7 reserved; off 8 source; off 9 reason/diag (PS3.8 9.3.8)."""

    pdu_type: ClassVar[PDUType] = PDUType.A_ABORT
    source: int = AbortSource.SERVICE_PROVIDER
    reason: int = AbortReason.NOT_SPECIFIED

    def _body(self) -> bytes:
        return bytes((0, 0, self.source, self.reason))

    @classmethod
    def parse_body(cls, body: memoryview) -> PDU:
        cls._check(body)
        return cls(body[2], body[3])


class PDV(NamedTuple):
    """One presentation data value item (PS3.8 9.3.5.1): a view, never a copy.

    off 0 u32 item length (2 + fragment); off 4 u8 context ID; off 5 u8 message control header.
    """

    context_id: int
    control: int
    fragment: memoryview

    @property
    def is_command(self) -> bool:
        return bool(self.control & 0x01)

    @property
    def is_last(self) -> bool:
        return bool(self.control & 0x02)


def iter_pdvs(body: memoryview) -> Iterator[PDV]:
    """The PDVs of a P-DATA-TF body; RemotePDUError (2/6) when their lengths do not add up."""
    offset = 0
    total = len(body)
    if total == 0:
        raise RemotePDUError("P-DATA-TF without any PDV item", source=2, reason=6)
    while offset < total:
        if offset + PDV_HEADER_LENGTH > total:
            raise RemotePDUError(f"PDV header truncated at offset {offset}", source=2, reason=6)
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        if length < 2:
            raise RemotePDUError(f"PDV item length {length} is below 2", source=2, reason=6)
        end = offset + 4 + length
        if end > total:
            raise RemotePDUError(
                f"PDV item declares {length} bytes, only {total - offset - 4} remain in the PDU",
                source=2,
                reason=6,
            )
        yield PDV(context_id, control, body[offset + PDV_HEADER_LENGTH : end])
        offset = end


def is_single_data_fragment(pdu: bytes | bytearray | memoryview, offset: int, length: int) -> bool:
    """The P-DATA-TF PDU at `offset` (declared body `length`) is one PDV, a data-set fragment:
    nothing in it needs a look (cut-through, DIMSE metrics). Needs its first 12 bytes only."""
    pdv_length, _context, control = _PDV_HEADER.unpack_from(pdu, offset + PDU_HEADER_LENGTH)
    return pdv_length + 4 == length and pdv_length >= 2 and not control & 0x01


def check_pdvs(body: memoryview) -> None:
    """Walk the PDV headers only: the relay's per-PDU check on the hot path."""
    offset = 0
    total = len(body)
    if total == 0:
        raise RemotePDUError("P-DATA-TF without any PDV item", source=2, reason=6)
    unpack = _PDV_HEADER.unpack_from
    while offset < total:
        if offset + PDV_HEADER_LENGTH > total:
            raise RemotePDUError(f"PDV header truncated at offset {offset}", source=2, reason=6)
        length = unpack(body, offset)[0]
        if length < 2 or offset + 4 + length > total:
            raise RemotePDUError(f"PDV item length {length} does not fit the P-DATA-TF", source=2, reason=6)
        offset += 4 + length


@dataclass(frozen=True)
class PDataTF(PDU):
    """P-DATA-TF, 0x04: off 6.. one or more PDV items, kept as raw bytes."""

    pdu_type: ClassVar[PDUType] = PDUType.P_DATA_TF
    data: bytes

    def pdvs(self) -> Iterator[PDV]:
        return iter_pdvs(memoryview(self.data))

    @classmethod
    def from_pdvs(cls, pdvs: list[tuple[int, int, bytes]]) -> PDataTF:
        parts = [_PDV_HEADER.pack(2 + len(frag), ctx, ctrl) + frag for ctx, ctrl, frag in pdvs]
        return cls(b"".join(parts))

    def _encode(self) -> bytes:
        return header(self.pdu_type, len(self.data)) + self.data

    @classmethod
    def parse_body(cls, body: memoryview) -> PDU:
        check_pdvs(body)
        return cls(bytes(body))


PDU_CLASSES: dict[int, type[PDU]] = {
    cls.pdu_type: cls for cls in (AAssociateRQ, AAssociateAC, AAssociateRJ, PDataTF, AReleaseRQ, AReleaseRP, AAbort)
}


def parse_pdu(data: bytes | memoryview) -> PDU:
    """One whole PDU, header included. RemotePDUError for anything that is not exactly one PDU."""
    view = memoryview(data)
    if len(view) < PDU_HEADER_LENGTH:
        raise RemotePDUError(f"PDU of {len(view)} bytes is shorter than its 6-byte header", source=2, reason=6)
    pdu_type, _reserved, length = HEADER.unpack_from(view)
    cls = PDU_CLASSES.get(pdu_type)
    if cls is None:
        raise RemotePDUError(f"unrecognised PDU type 0x{pdu_type:02X}", source=2, reason=1)
    if length != len(view) - PDU_HEADER_LENGTH:
        raise RemotePDUError(
            f"{cls.pdu_type.name} declares {length} bytes but {len(view) - PDU_HEADER_LENGTH} follow",
            source=2,
            reason=6,
        )
    return cls.parse_body(view[PDU_HEADER_LENGTH:])
