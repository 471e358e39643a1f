"""Variable items and sub-items of the A-ASSOCIATE PDUs (PS3.8 9.3.2-9.3.3, PS3.7 D.3.3).

One frozen class per item type. Every item starts with the same 4-byte header:

    off 0  u8   item type
    off 1  u8   reserved (0x57 uses it as the sub-item version)
    off 2  u16  item length (bytes after this field), big-endian

Text fields (AE titles, UIDs, names) are decoded as latin-1 so that any byte string round-trips
and no peer input can raise UnicodeDecodeError; comparisons strip the padding (see `clean_uid`).
Item types we do not know are kept as `UnknownItem` and re-encoded byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from proxy.dul.constants import ITEM_HEADER_LENGTH, MAX_ITEM_LENGTH, ItemType
from proxy.errors import LocalPDUError, RemotePDUError

_HEADER = struct.Struct(">BBH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U16U16 = struct.Struct(">HH")


def clean_uid(value: str) -> str:
    """A UID as compared: one trailing NUL (PS3.5 9.1 padding) and spaces removed."""
    return value.rstrip("\x00 ").strip()


def _bad(message: str) -> RemotePDUError:
    return RemotePDUError(message, source=2, reason=6)


def _text(view: memoryview) -> str:
    return bytes(view).decode("latin-1")


def _encode_text(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise LocalPDUError(f"text {value!r} cannot be encoded in an item") from exc


def _wrap(item_type: int, body: bytes, reserved: int = 0) -> bytes:
    if len(body) > MAX_ITEM_LENGTH:
        raise LocalPDUError(f"item 0x{item_type:02X} would be {len(body)} bytes, over the 65,535 limit")
    return _HEADER.pack(item_type, reserved, len(body)) + body


def _prefixed(value: bytes) -> bytes:
    """A u16 length-prefixed field, as the inner UIDs of 0x54/0x56/0x57 and the identity fields."""
    if len(value) > MAX_ITEM_LENGTH:
        raise LocalPDUError(f"field of {len(value)} bytes exceeds the 65,535 limit")
    return _U16.pack(len(value)) + value


def _read_prefixed(body: memoryview, offset: int, what: str) -> tuple[memoryview, int]:
    if offset + 2 > len(body):
        raise _bad(f"{what}: length field truncated")
    (length,) = _U16.unpack_from(body, offset)
    end = offset + 2 + length
    if end > len(body):
        raise _bad(f"{what}: declared length {length} exceeds the item")
    return body[offset + 2 : end], end


@dataclass(frozen=True)
class Item:
    """Base of every item: `encode()` gives the full item, header included."""

    item_type: ClassVar[int] = -1

    def encode(self) -> bytes:
        try:
            return self._encode()
        except (struct.error, ValueError, OverflowError) as exc:
            raise LocalPDUError(f"{type(self).__name__} holds a value out of range: {exc}") from exc

    def _encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        raise NotImplementedError


@dataclass(frozen=True)
class UnknownItem(Item):
    """An item or sub-item type this codec does not model; kept whole, header included."""

    type_code: int
    raw: bytes

    def _encode(self) -> bytes:
        return self.raw


@dataclass(frozen=True)
class _UIDItem(Item):
    uid: str

    def _encode(self) -> bytes:
        return _wrap(self.item_type, _encode_text(self.uid))

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        return cls(_text(body))

    @property
    def value(self) -> str:
        return clean_uid(self.uid)


@dataclass(frozen=True)
class ApplicationContextItem(_UIDItem):
    """0x10, PS3.8 9.3.2.1: off 4.. application context name (UID)."""

    item_type: ClassVar[int] = ItemType.APPLICATION_CONTEXT


@dataclass(frozen=True)
class AbstractSyntaxSubItem(_UIDItem):
    """0x30, PS3.8 9.3.2.2.1: off 4.. abstract syntax name (SOP class UID)."""

    item_type: ClassVar[int] = ItemType.ABSTRACT_SYNTAX


@dataclass(frozen=True)
class TransferSyntaxSubItem(_UIDItem):
    """0x40, PS3.8 9.3.2.2.2: off 4.. transfer syntax name (UID)."""

    item_type: ClassVar[int] = ItemType.TRANSFER_SYNTAX


@dataclass(frozen=True)
class ImplementationClassUIDSubItem(_UIDItem):
    """0x52, PS3.7 D.3.3.2: off 4.. implementation class UID."""

    item_type: ClassVar[int] = ItemType.IMPLEMENTATION_CLASS_UID


@dataclass(frozen=True)
class ImplementationVersionNameSubItem(Item):
    """0x55, PS3.7 D.3.3.2: off 4.. 1-16 characters."""

    item_type: ClassVar[int] = ItemType.IMPLEMENTATION_VERSION_NAME
    name: str

    def _encode(self) -> bytes:
        return _wrap(self.item_type, _encode_text(self.name))

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        return cls(_text(body))


@dataclass(frozen=True)
class PresentationContextRQItem(Item):
    """0x20, PS3.8 9.3.2.2.

    off 4 u8 presentation context ID (odd); off 5-7 reserved; off 8.. one 0x30, then 0x40 items.
    `items` keeps every sub-item in wire order, unknown ones included.
    """

    item_type: ClassVar[int] = ItemType.PRESENTATION_CONTEXT_RQ
    context_id: int
    items: tuple[Item, ...]

    @property
    def abstract_syntax(self) -> str | None:
        for item in self.items:
            if isinstance(item, AbstractSyntaxSubItem):
                return item.value
        return None

    @property
    def transfer_syntaxes(self) -> tuple[str, ...]:
        return tuple(i.value for i in self.items if isinstance(i, TransferSyntaxSubItem))

    def _encode(self) -> bytes:
        body = bytes((self.context_id, 0, 0, 0)) + b"".join(i.encode() for i in self.items)
        return _wrap(self.item_type, body)

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        if len(body) < 4:
            raise _bad("presentation context item shorter than 4 bytes")
        return cls(body[0], parse_items(body[4:], _CONTEXT_SUBITEMS))


@dataclass(frozen=True)
class PresentationContextACItem(Item):
    """0x21, PS3.8 9.3.3.2.

    off 4 u8 context ID; off 5 reserved; off 6 u8 result/reason; off 7 reserved; off 8.. one 0x40.
    """

    item_type: ClassVar[int] = ItemType.PRESENTATION_CONTEXT_AC
    context_id: int
    result: int
    items: tuple[Item, ...]

    @property
    def transfer_syntax(self) -> str | None:
        for item in self.items:
            if isinstance(item, TransferSyntaxSubItem):
                return item.value
        return None

    def _encode(self) -> bytes:
        body = bytes((self.context_id, 0, self.result, 0)) + b"".join(i.encode() for i in self.items)
        return _wrap(self.item_type, body)

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        if len(body) < 4:
            raise _bad("presentation context item shorter than 4 bytes")
        return cls(body[0], body[2], parse_items(body[4:], _CONTEXT_SUBITEMS))


@dataclass(frozen=True)
class MaximumLengthSubItem(Item):
    """0x51, PS3.8 D.1: off 4 u32 maximum P-DATA-TF PDU length the sender receives; 0 = unlimited."""

    item_type: ClassVar[int] = ItemType.MAXIMUM_LENGTH
    max_length: int

    def _encode(self) -> bytes:
        return _wrap(self.item_type, _U32.pack(self.max_length))

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        if len(body) != 4:
            raise _bad(f"maximum length sub-item has length {len(body)}, expected 4")
        return cls(_U32.unpack_from(body)[0])


@dataclass(frozen=True)
class AsynchronousOperationsWindowSubItem(Item):
    """0x53, PS3.7 D.3.3.3: off 4 u16 max operations invoked; off 6 u16 max operations performed."""

    item_type: ClassVar[int] = ItemType.ASYNCHRONOUS_OPERATIONS_WINDOW
    max_operations_invoked: int
    max_operations_performed: int

    def _encode(self) -> bytes:
        return _wrap(self.item_type, _U16U16.pack(self.max_operations_invoked, self.max_operations_performed))

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        if len(body) != 4:
            raise _bad(f"asynchronous operations window sub-item has length {len(body)}, expected 4")
        invoked, performed = _U16U16.unpack_from(body)
        return cls(invoked, performed)


@dataclass(frozen=True)
class SCPSCURoleSelectionSubItem(Item):
    """0x54, PS3.7 D.3.3.4: off 4 u16 UID length; SOP class UID; u8 SCU role; u8 SCP role."""

    item_type: ClassVar[int] = ItemType.SCP_SCU_ROLE_SELECTION
    sop_class_uid: str
    scu_role: int
    scp_role: int

    def _encode(self) -> bytes:
        body = _prefixed(_encode_text(self.sop_class_uid)) + bytes((self.scu_role, self.scp_role))
        return _wrap(self.item_type, body)

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        uid, end = _read_prefixed(body, 0, "role selection sub-item")
        if end + 2 != len(body):
            raise _bad("role selection sub-item: role bytes missing or trailing data")
        return cls(_text(uid), body[end], body[end + 1])


@dataclass(frozen=True)
class SOPClassExtendedNegotiationSubItem(Item):
    """0x56, PS3.7 D.3.3.5: off 4 u16 UID length; SOP class UID; service-class application info."""

    item_type: ClassVar[int] = ItemType.SOP_CLASS_EXTENDED_NEGOTIATION
    sop_class_uid: str
    application_info: bytes

    def _encode(self) -> bytes:
        return _wrap(self.item_type, _prefixed(_encode_text(self.sop_class_uid)) + self.application_info)

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        uid, end = _read_prefixed(body, 0, "SOP class extended negotiation sub-item")
        return cls(_text(uid), bytes(body[end:]))


@dataclass(frozen=True)
class SOPClassCommonExtendedNegotiationSubItem(Item):
    """0x57, PS3.7 D.3.3.6 (RQ only); byte 1 is the sub-item version.

    u16 + SOP class UID; u16 + service class UID; u16 block length, then (u16 + related UID)*.
    """

    item_type: ClassVar[int] = ItemType.SOP_CLASS_COMMON_EXTENDED_NEGOTIATION
    sop_class_uid: str
    service_class_uid: str
    related_general_sop_classes: tuple[str, ...] = ()
    version: int = 0

    def _encode(self) -> bytes:
        related = b"".join(_prefixed(_encode_text(uid)) for uid in self.related_general_sop_classes)
        body = (
            _prefixed(_encode_text(self.sop_class_uid))
            + _prefixed(_encode_text(self.service_class_uid))
            + _prefixed(related)
        )
        return _wrap(self.item_type, body, reserved=self.version)

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        what = "SOP class common extended negotiation sub-item"
        sop, off = _read_prefixed(body, 0, what)
        service, off = _read_prefixed(body, off, what)
        block, off = _read_prefixed(body, off, what)
        if off != len(body):
            raise _bad(f"{what}: trailing bytes")
        related: list[str] = []
        pos = 0
        while pos < len(block):
            uid, pos = _read_prefixed(block, pos, what)
            related.append(_text(uid))
        return cls(_text(sop), _text(service), tuple(related), reserved)


@dataclass(frozen=True)
class UserIdentityRQSubItem(Item):
    """0x58, PS3.7 D.3.3.7.1.

    off 4 u8 identity type; off 5 u8 positive response requested; u16 + primary field;
    u16 + secondary field (non-empty only for type 2). The fields are secrets: never in repr.
    """

    item_type: ClassVar[int] = ItemType.USER_IDENTITY_RQ
    identity_type: int
    positive_response_requested: bool
    primary: bytes = field(repr=False)
    secondary: bytes = field(default=b"", repr=False)

    def __repr__(self) -> str:
        return (
            f"UserIdentityRQSubItem(identity_type={self.identity_type}, "
            f"positive_response_requested={self.positive_response_requested}, "
            f"primary=<{len(self.primary)} bytes>, secondary=<{len(self.secondary)} bytes>)"
        )

    def _encode(self) -> bytes:
        body = (
            bytes((self.identity_type, int(self.positive_response_requested)))
            + _prefixed(self.primary)
            + _prefixed(self.secondary)
        )
        return _wrap(self.item_type, body)

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        what = "user identity sub-item"
        if len(body) < 6:
            raise _bad(f"{what} shorter than 6 bytes")
        primary, off = _read_prefixed(body, 2, what)
        secondary, off = _read_prefixed(body, off, what)
        if off != len(body):
            raise _bad(f"{what}: trailing bytes")
        return cls(body[0], bool(body[1]), bytes(primary), bytes(secondary))


@dataclass(frozen=True)
class UserIdentityACSubItem(Item):
    """0x59, PS3.7 D.3.3.7.2: off 4 u16 server response length; server response (may be empty)."""

    item_type: ClassVar[int] = ItemType.USER_IDENTITY_AC
    server_response: bytes = field(default=b"", repr=False)

    def __repr__(self) -> str:
        return f"UserIdentityACSubItem(server_response=<{len(self.server_response)} bytes>)"

    def _encode(self) -> bytes:
        return _wrap(self.item_type, _prefixed(self.server_response))

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        response, off = _read_prefixed(body, 0, "user identity response sub-item")
        if off != len(body):
            raise _bad("user identity response sub-item: trailing bytes")
        return cls(bytes(response))


@dataclass(frozen=True)
class UserInformationItem(Item):
    """0x50, PS3.8 9.3.2.3 / PS3.7 D.3.3: off 4.. sub-items 0x51-0x59 (and unknown ones), in order."""

    item_type: ClassVar[int] = ItemType.USER_INFORMATION
    items: tuple[Item, ...]

    @property
    def max_length(self) -> int | None:
        for item in self.items:
            if isinstance(item, MaximumLengthSubItem):
                return item.max_length
        return None

    def find(self, item_class: type[_I]) -> _I | None:
        for item in self.items:
            if isinstance(item, item_class):
                return item
        return None

    def replace(self, item_class: type[Item], new: Item | None) -> UserInformationItem:
        """A copy with every `item_class` sub-item replaced by `new` (at the first one's place)
        or, when there is none, `new` appended; `new=None` removes them."""
        out: list[Item] = []
        placed = False
        for item in self.items:
            if isinstance(item, item_class):
                if new is not None and not placed:
                    out.append(new)
                placed = True
            else:
                out.append(item)
        if new is not None and not placed:
            out.append(new)
        return UserInformationItem(tuple(out))

    def _encode(self) -> bytes:
        return _wrap(self.item_type, b"".join(i.encode() for i in self.items))

    @classmethod
    def parse_body(cls, body: memoryview, reserved: int) -> Item:
        items = parse_items(body, _USER_SUBITEMS)
        for kind in _SINGLE_USER_SUBITEMS:
            if sum(isinstance(i, kind) for i in items) > 1:
                raise _bad(f"user information holds more than one {kind.__name__}")
        return cls(items)


_I = TypeVar("_I", bound=Item)

ItemRegistry = dict[int, type[Item]]


def _registry(classes: Iterable[type[Item]]) -> ItemRegistry:
    return {cls.item_type: cls for cls in classes}


_CONTEXT_SUBITEMS = _registry([AbstractSyntaxSubItem, TransferSyntaxSubItem])
_USER_SUBITEMS = _registry(
    [
        MaximumLengthSubItem,
        ImplementationClassUIDSubItem,
        AsynchronousOperationsWindowSubItem,
        SCPSCURoleSelectionSubItem,
        ImplementationVersionNameSubItem,
        SOPClassExtendedNegotiationSubItem,
        SOPClassCommonExtendedNegotiationSubItem,
        UserIdentityRQSubItem,
        UserIdentityACSubItem,
    ]
)
_SINGLE_USER_SUBITEMS: tuple[type[Item], ...] = (
    MaximumLengthSubItem,
    ImplementationClassUIDSubItem,
    AsynchronousOperationsWindowSubItem,
    ImplementationVersionNameSubItem,
    UserIdentityRQSubItem,
    UserIdentityACSubItem,
)
RQ_ITEMS = _registry([ApplicationContextItem, PresentationContextRQItem, UserInformationItem])
AC_ITEMS = _registry([ApplicationContextItem, PresentationContextACItem, UserInformationItem])


def parse_items(view: memoryview, registry: ItemRegistry) -> tuple[Item, ...]:
    """Every item in `view`, which must hold whole items and nothing else."""
    items: list[Item] = []
    offset = 0
    total = len(view)
    while offset < total:
        if offset + ITEM_HEADER_LENGTH > total:
            raise _bad(f"item header truncated at offset {offset}")
        item_type, reserved, length = _HEADER.unpack_from(view, offset)
        end = offset + ITEM_HEADER_LENGTH + length
        if end > total:
            raise _bad(f"item 0x{item_type:02X} declares {length} bytes, only {total - offset - 4} remain")
        cls = registry.get(item_type)
        if cls is None:
            items.append(UnknownItem(item_type, bytes(view[offset:end])))
        else:
            items.append(cls.parse_body(view[offset + ITEM_HEADER_LENGTH : end], reserved))
        offset = end
    return tuple(items)


def first(items: Iterable[Item], item_class: type[_I]) -> _I | None:
    for item in items:
        if isinstance(item, item_class):
            return item
    return None


