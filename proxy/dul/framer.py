"""Incremental PDU framing: bytes in, whole PDUs (as views) out.

The declared length is checked the moment the 6-byte header is complete, so a peer that
announces 4 GiB is answered before a single body byte is buffered. Complete PDUs inside one
read are returned as views of that read (no copy); only a PDU cut by a read boundary is copied.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from proxy.dul.constants import (
    ASSOCIATE_FIXED_LENGTH,
    DEFAULT_MAX_ASSOCIATE_LENGTH,
    DEFAULT_MAX_PDU_LENGTH,
    FIXED_PDU_BODY_LENGTH,
    PDU_HEADER_LENGTH,
    AbortReason,
    PDUType,
)
from proxy.dul.pdus import is_single_data_fragment
from proxy.errors import RemotePDUError

_HEADER = struct.Struct(">BBI")
_FIXED_TYPES = frozenset(
    (PDUType.A_ASSOCIATE_RJ, PDUType.A_RELEASE_RQ, PDUType.A_RELEASE_RP, PDUType.A_ABORT)
)
_ASSOCIATE_TYPES = frozenset((PDUType.A_ASSOCIATE_RQ, PDUType.A_ASSOCIATE_AC))
_HTTP_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"OPTI", b"DELE", b"PATC", b"CONN")


class ForeignProtocolError(RemotePDUError):
    """The stream is not DICOM at all (a TLS ClientHello, an HTTP request): close, send no PDU."""

    def __init__(self, message: str, protocol: str) -> None:
        super().__init__(message, source=2, reason=AbortReason.UNRECOGNIZED_PDU)
        self.protocol = protocol


class Frame(NamedTuple):
    pdu_type: int  # a PDU type, or P_DATA_HEAD / P_DATA_REST (cut-through)
    data: memoryview  # the whole PDU, header included (or the part that arrived, for cut-through)


P_DATA_HEAD = 0x80 | PDUType.P_DATA_TF
"""Cut-through: the start of a P-DATA-TF PDU (header and first PDV header included, already
checked); the rest follows as P_DATA_REST frames. `& 7` gives the PDU type back."""
P_DATA_REST = 0
"""Cut-through: more bytes of the P-DATA-TF PDU begun by the last P_DATA_HEAD, in order."""
_CUT_MIN = PDU_HEADER_LENGTH + 6  # PDU header + PDV length, context ID and control header


class PDUFramer:
    """Cuts one direction of a DUL byte stream into PDUs.

    `max_pdata_length` is the Max Length we advertised to this peer (standards.md section 4);
    the relay lowers it once the association is negotiated. 0 is not accepted: the proxy's
    own cap always applies.
    """

    __slots__ = (
        "_buf", "_need", "_started", "_through", "cut_through", "error", "max_associate_length", "max_pdata_length"
    )

    def __init__(
        self,
        *,
        max_pdata_length: int = DEFAULT_MAX_PDU_LENGTH,
        max_associate_length: int = DEFAULT_MAX_ASSOCIATE_LENGTH,
        sniff_foreign: bool = True,
    ) -> None:
        self.max_pdata_length = max_pdata_length
        self.max_associate_length = max_associate_length
        self._buf = bytearray()
        self._need = 0  # total size of the PDU being completed in _buf, 0 while its header is incomplete
        self._started = not sniff_foreign
        self._through = 0  # bytes of a cut-through P-DATA-TF PDU still to come
        self.cut_through = False
        """When True, a P-DATA-TF PDU cut by a read whose body is one data-set PDV (the bulk of any
        C-STORE: nothing inside needs a look) is passed on as it arrives (P_DATA_HEAD, then
        P_DATA_REST frames) instead of being gathered first. The relay turns it on once an
        association is established and it has no reason to look inside P-DATA."""
        self.error: RemotePDUError | None = None
        """Set when a read held whole PDUs before a bad header: the caller handles those PDUs
        first (an A-ABORT among them must be relayed as sent), then this error."""

    @property
    def mid_pdu(self) -> bool:
        """A cut-through PDU has been begun and not finished: the far side is inside a PDU, so no
        other PDU may be written to it (an A-ABORT would be read as P-DATA bytes)."""
        return self._through > 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete PDU."""
        return len(self._buf)

    def _check(self, pdu_type: int, length: int) -> None:
        if pdu_type == PDUType.P_DATA_TF:
            if length > self.max_pdata_length:
                raise RemotePDUError(
                    f"P-DATA-TF declares {length} bytes, over the maximum length of "
                    f"{self.max_pdata_length} negotiated for this peer",
                    source=2,
                    reason=AbortReason.INVALID_PDU_PARAMETER_VALUE,
                )
        elif pdu_type in _FIXED_TYPES:
            if length != FIXED_PDU_BODY_LENGTH:
                raise RemotePDUError(
                    f"{PDUType(pdu_type).name} declares length {length}, expected 4",
                    source=2,
                    reason=AbortReason.INVALID_PDU_PARAMETER_VALUE,
                )
        elif pdu_type in _ASSOCIATE_TYPES:
            if length < ASSOCIATE_FIXED_LENGTH or length > self.max_associate_length:
                raise RemotePDUError(
                    f"{PDUType(pdu_type).name} declares {length} bytes, outside "
                    f"{ASSOCIATE_FIXED_LENGTH}..{self.max_associate_length}",
                    source=2,
                    reason=AbortReason.INVALID_PDU_PARAMETER_VALUE,
                )
        else:
            raise RemotePDUError(
                f"unrecognised PDU type 0x{pdu_type:02X}", source=2, reason=AbortReason.UNRECOGNIZED_PDU
            )

    def _sniff(self, head: bytes) -> bool:
        """True once enough bytes are seen to tell DICOM from TLS or HTTP at the stream start."""
        if head[0] == 0x16:
            if len(head) < 2:
                return False
            if head[1] == 0x03:
                raise ForeignProtocolError(
                    "a TLS ClientHello arrived on a plaintext DICOM listener (the client speaks DICOM-TLS)",
                    "tls",
                )
        elif head[:1].isalpha():
            if len(head) < 4:
                return False
            if head[:4] in _HTTP_METHODS:
                raise ForeignProtocolError("an HTTP request arrived on a DICOM listener", "http")
        self._started = True
        return True

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Whole PDUs completed by `data`. Raises RemotePDUError when the stream is broken and no
        PDU came before the fault in this read; otherwise returns them and sets `error`."""
        if self.error is not None:
            raise self.error
        frames: list[Frame] = []
        try:
            self._feed(data, frames)
        except RemotePDUError as exc:
            if not frames:
                raise
            self.error = exc
        return frames

    def _feed(self, data: bytes | bytearray | memoryview, frames: list[Frame]) -> None:
        view = memoryview(data)
        n = len(view)
        off = 0
        if self._through:
            take = min(self._through, n)
            frames.append(Frame(P_DATA_REST, view[:take]))
            self._through -= take
            off = take
            if self._through:
                return
        buf = self._buf
        if buf or not self._started:
            if not self._started:
                probe = bytes(buf) + bytes(view[:4])
                if probe and not self._sniff(probe):
                    buf += view
                    return
            # complete a PDU cut by the previous read
            if self._need == 0:
                take = min(PDU_HEADER_LENGTH - len(buf), n - off)
                buf += view[off : off + take]
                off += take
                if len(buf) < PDU_HEADER_LENGTH:
                    return
                pdu_type, _r, length = _HEADER.unpack_from(buf)
                self._check(pdu_type, length)
                self._need = PDU_HEADER_LENGTH + length
            if self._need:
                take = min(self._need - len(buf), n - off)
                if (self.cut_through and buf[0] == PDUType.P_DATA_TF and len(buf) < _CUT_MIN <= len(buf) + take
                        and self._need - len(buf) > take):
                    # the read completes the PDV header but not the PDU: pass on what we have
                    head = _CUT_MIN - len(buf)
                    buf += view[off : off + head]
                    if is_single_data_fragment(buf, 0, self._need - PDU_HEADER_LENGTH):
                        off += head
                        rest = n - off
                        frames.append(Frame(P_DATA_HEAD, memoryview(buf)))
                        if rest:
                            frames.append(Frame(P_DATA_REST, view[off:]))
                        self._through = self._need - _CUT_MIN - rest
                        self._buf = bytearray()
                        self._need = 0
                        return
                    del buf[-head:]
                buf += view[off : off + take]
                off += take
                if len(buf) < self._need:
                    return
                frames.append(Frame(buf[0], memoryview(buf)))
                self._buf = bytearray()
                self._need = 0
        unpack = _HEADER.unpack_from
        check = self._check
        while n - off >= PDU_HEADER_LENGTH:
            pdu_type, _r, length = unpack(view, off)
            check(pdu_type, length)
            end = off + PDU_HEADER_LENGTH + length
            if end > n:
                if (self.cut_through and pdu_type == PDUType.P_DATA_TF and n - off >= _CUT_MIN
                        and is_single_data_fragment(view, off, length)):
                    frames.append(Frame(P_DATA_HEAD, view[off:]))
                    self._through = end - n
                    return
                self._need = end - off
                break
            frames.append(Frame(pdu_type, view[off:end]))
            off = end
        if off < n:
            self._buf = bytearray(view[off:])
        return
