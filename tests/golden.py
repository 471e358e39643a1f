"""Golden DICOM Upper Layer bytes, written out by hand, one commented field at a time.

Layouts: PS3.8 9.3 and PS3.7 D.3.3 (summarised in /work/shared/spec/standards.md sections 1-2).
Everything is big-endian except the DIMSE command set inside the P-DATA-TF (Implicit VR LE).
Offsets are 0-based. Inside an item, "+n" is relative to the item's first byte. Each item also notes
its absolute offset in the PDU, which `RQ_OFFSETS`/`AC_OFFSETS` repeat so that a test can check them.

The A-ASSOCIATE-RQ and -AC are the bytes pynetdicom 3.0.4 produces for the same primitives
(tests/test_dul_pdus.py checks this), so they do not depend only on our reading of the standard.

`MALFORMED` and `MALFORMED_PDATA` are tables of broken input with the A-ABORT the proxy is expected
to send back; the end-to-end tests reuse them against the running proxy.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

# The byte literals below are laid out one field per line on purpose: keep the formatter off.
# fmt: off

# ---------------------------------------------------------------------------------------------
# UIDs and values used by the fixtures (lengths in brackets: they appear in the length fields)

APP_CONTEXT = "1.2.840.10008.3.1.1.1"  # [21] DICOM application context name
VERIFICATION = "1.2.840.10008.1.1"  # [17] Verification SOP class
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # [25] CT Image Storage
IMPLICIT_LE = "1.2.840.10008.1.2"  # [17] Implicit VR Little Endian
EXPLICIT_LE = "1.2.840.10008.1.2.1"  # [19] Explicit VR Little Endian
IMPL_CLASS_UID = "1.2.3.4"  # [7]
IMPL_VERSION = "PROXYTEST_1"  # [11]
BASIC_WORKLIST = "1.2.840.10008.5.1.4.1.2.1.1"  # [27] Patient Root Q/R FIND (used in 0x56)
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"  # [17] Storage Service Class
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"  # [29] Enhanced SR (a related general SOP class)
USERNAME = b"alice"  # [5]  user identity primary field (type 2)
PASSCODE = b"s3cret"  # [6]  user identity secondary field: a secret, never in a repr
SERVER_RESPONSE = b"token"  # [5]  0x59 server response
CALLED_AE = "ARCHIVE"
CALLING_AE = "MODALITY"

# ---------------------------------------------------------------------------------------------
# Items (PS3.8 9.3.2.x, 9.3.3.x) and user information sub-items (PS3.7 D.3.3)

ITEM_APP_CONTEXT = (  # 25 bytes; at 74 in both the RQ and the AC
    b"\x10"  # +0  item type 0x10 Application Context
    b"\x00"  # +1  reserved
    b"\x00\x15"  # +2  item length 21
    b"1.2.840.10008.3.1.1.1"  # +4  application context name (no NUL padding)
)

SUBITEM_ABSTRACT_VERIFICATION = (  # 21 bytes
    b"\x30"  # +0  item type 0x30 Abstract Syntax
    b"\x00"  # +1  reserved
    b"\x00\x11"  # +2  item length 17
    b"1.2.840.10008.1.1"  # +4  abstract syntax name
)

SUBITEM_TRANSFER_IMPLICIT = (  # 21 bytes
    b"\x40"  # +0  item type 0x40 Transfer Syntax
    b"\x00"  # +1  reserved
    b"\x00\x11"  # +2  item length 17
    b"1.2.840.10008.1.2"  # +4  transfer syntax name
)

SUBITEM_ABSTRACT_CT = (  # 29 bytes
    b"\x30"  # +0  item type 0x30
    b"\x00"  # +1  reserved
    b"\x00\x19"  # +2  item length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # +4  CT Image Storage
)

SUBITEM_TRANSFER_EXPLICIT = (  # 23 bytes
    b"\x40"  # +0  item type 0x40
    b"\x00"  # +1  reserved
    b"\x00\x13"  # +2  item length 19
    b"1.2.840.10008.1.2.1"  # +4  Explicit VR Little Endian
)

ITEM_PC_RQ_1 = (  # 50 bytes; at 99 in the RQ
    b"\x20"  # +0  item type 0x20 Presentation Context (RQ)
    b"\x00"  # +1  reserved
    b"\x00\x2e"  # +2  item length 46 = 4 + 21 + 21
    b"\x01"  # +4  presentation context ID 1
    b"\x00"  # +5  reserved
    b"\x00"  # +6  reserved
    b"\x00"  # +7  reserved
    + SUBITEM_ABSTRACT_VERIFICATION  # +8  (abs 107) 0x30 Verification
    + SUBITEM_TRANSFER_IMPLICIT  # +29 (abs 128) 0x40 Implicit VR LE
)

ITEM_PC_RQ_3 = (  # 81 bytes; at 149 in the RQ
    b"\x20"  # +0  item type 0x20
    b"\x00"  # +1  reserved
    b"\x00\x4d"  # +2  item length 77 = 4 + 29 + 23 + 21
    b"\x03"  # +4  presentation context ID 3
    b"\x00\x00\x00"  # +5  reserved x3
    + SUBITEM_ABSTRACT_CT  # +8  (abs 157) 0x30 CT Image Storage
    + SUBITEM_TRANSFER_EXPLICIT  # +37 (abs 186) 0x40 Explicit VR LE
    + SUBITEM_TRANSFER_IMPLICIT  # +60 (abs 209) 0x40 Implicit VR LE
)

SUBITEM_MAX_LENGTH_RQ = (  # 8 bytes; at 234 in the RQ
    b"\x51"  # +0  item type 0x51 Maximum Length
    b"\x00"  # +1  reserved
    b"\x00\x04"  # +2  item length, always 4
    b"\x00\x00\x40\x00"  # +4  u32 maximum length received 16384
)

SUBITEM_IMPL_CLASS_UID = (  # 11 bytes
    b"\x52"  # +0  item type 0x52 Implementation Class UID
    b"\x00"  # +1  reserved
    b"\x00\x07"  # +2  item length 7
    b"1.2.3.4"  # +4  implementation class UID
)

SUBITEM_ASYNC_WINDOW = (  # 8 bytes; at 253 in the RQ
    b"\x53"  # +0  item type 0x53 Asynchronous Operations Window
    b"\x00"  # +1  reserved
    b"\x00\x04"  # +2  item length, always 4
    b"\x00\x05"  # +4  u16 maximum number of operations invoked 5
    b"\x00\x03"  # +6  u16 maximum number of operations performed 3
)

SUBITEM_ROLE_SELECTION = (  # 33 bytes; at 261 in the RQ
    b"\x54"  # +0  item type 0x54 SCP/SCU Role Selection
    b"\x00"  # +1  reserved
    b"\x00\x1d"  # +2  item length 29 = 2 + 25 + 1 + 1
    b"\x00\x19"  # +4  u16 UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # +6  SOP class UID (CT Image Storage)
    b"\x01"  # +31 SCU role: supported (SCU byte comes first)
    b"\x00"  # +32 SCP role: not supported
)

SUBITEM_IMPL_VERSION = (  # 15 bytes; at 294 in the RQ
    b"\x55"  # +0  item type 0x55 Implementation Version Name
    b"\x00"  # +1  reserved
    b"\x00\x0b"  # +2  item length 11
    b"PROXYTEST_1"  # +4  1-16 characters
)

SUBITEM_EXT_NEGOTIATION = (  # 35 bytes; at 309 in the RQ
    b"\x56"  # +0  item type 0x56 SOP Class Extended Negotiation
    b"\x00"  # +1  reserved
    b"\x00\x1f"  # +2  item length 31 = 2 + 27 + 2
    b"\x00\x1b"  # +4  u16 SOP class UID length 27
    b"1.2.840.10008.5.1.4.1.2.1.1"  # +6  SOP class UID
    b"\x01\x00"  # +33 service-class application information (opaque, rest of the item)
)

SUBITEM_COMMON_EXT_NEGOTIATION = (  # 83 bytes; at 344 in the RQ
    b"\x57"  # +0  item type 0x57 SOP Class Common Extended Negotiation
    b"\x00"  # +1  sub-item version 0
    b"\x00\x4f"  # +2  item length 79 = 2+25 + 2+17 + 2 + (2+29)
    b"\x00\x19"  # +4  u16 SOP class UID length 25
    b"1.2.840.10008.5.1.4.1.1.2"  # +6  SOP class UID
    b"\x00\x11"  # +31 u16 service class UID length 17
    b"1.2.840.10008.4.2"  # +33 service class UID (Storage)
    b"\x00\x1f"  # +50 u16 related general SOP class identification block length 31
    b"\x00\x1d"  # +52   u16 related general SOP class UID length 29
    b"1.2.840.10008.5.1.4.1.1.88.22"  # +54   related general SOP class UID
)

SUBITEM_USER_IDENTITY_RQ = (  # 21 bytes; at 427 in the RQ
    b"\x58"  # +0  item type 0x58 User Identity (RQ)
    b"\x00"  # +1  reserved
    b"\x00\x11"  # +2  item length 17 = 1 + 1 + 2+5 + 2+6
    b"\x02"  # +4  user identity type 2: username and passcode
    b"\x01"  # +5  positive response requested
    b"\x00\x05"  # +6  u16 primary field length 5
    b"alice"  # +8  primary field (username)
    b"\x00\x06"  # +13 u16 secondary field length 6
    b"s3cret"  # +15 secondary field (passcode)
)

ITEM_USER_INFO_RQ = (  # 218 bytes; at 230 in the RQ
    b"\x50"  # +0  item type 0x50 User Information
    b"\x00"  # +1  reserved
    b"\x00\xd6"  # +2  item length 214 = 8+11+8+33+15+35+83+21
    + SUBITEM_MAX_LENGTH_RQ  # +4   (abs 234)
    + SUBITEM_IMPL_CLASS_UID  # +12  (abs 242)
    + SUBITEM_ASYNC_WINDOW  # +23  (abs 253)
    + SUBITEM_ROLE_SELECTION  # +31  (abs 261)
    + SUBITEM_IMPL_VERSION  # +64  (abs 294)
    + SUBITEM_EXT_NEGOTIATION  # +79  (abs 309)
    + SUBITEM_COMMON_EXT_NEGOTIATION  # +114 (abs 344)
    + SUBITEM_USER_IDENTITY_RQ  # +197 (abs 427)
)

ITEM_PC_AC_1_REJECTED = (  # 29 bytes; at 99 in the AC
    b"\x21"  # +0  item type 0x21 Presentation Context (AC)
    b"\x00"  # +1  reserved
    b"\x00\x19"  # +2  item length 25 = 4 + 21
    b"\x01"  # +4  presentation context ID 1
    b"\x00"  # +5  reserved
    b"\x03"  # +6  result 3: abstract-syntax-not-supported (provider rejection)
    b"\x00"  # +7  reserved
    + SUBITEM_TRANSFER_IMPLICIT  # +8  0x40, present but meaningless when rejected
)

ITEM_PC_AC_3_ACCEPTED = (  # 31 bytes; at 128 in the AC
    b"\x21"  # +0  item type 0x21
    b"\x00"  # +1  reserved
    b"\x00\x1b"  # +2  item length 27 = 4 + 23
    b"\x03"  # +4  presentation context ID 3
    b"\x00"  # +5  reserved
    b"\x00"  # +6  result 0: acceptance
    b"\x00"  # +7  reserved
    + SUBITEM_TRANSFER_EXPLICIT  # +8  the accepted transfer syntax
)

SUBITEM_MAX_LENGTH_AC = (  # 8 bytes; at 163 in the AC
    b"\x51"  # +0  item type 0x51
    b"\x00"  # +1  reserved
    b"\x00\x04"  # +2  item length 4
    b"\x00\x00\x80\x00"  # +4  u32 maximum length received 32768
)

SUBITEM_USER_IDENTITY_AC = (  # 11 bytes; at 182 in the AC
    b"\x59"  # +0  item type 0x59 User Identity (AC)
    b"\x00"  # +1  reserved
    b"\x00\x07"  # +2  item length 7 = 2 + 5
    b"\x00\x05"  # +4  u16 server response length 5
    b"token"  # +6  server response
)

ITEM_USER_INFO_AC = (  # 34 bytes; at 159 in the AC
    b"\x50"  # +0  item type 0x50
    b"\x00"  # +1  reserved
    b"\x00\x1e"  # +2  item length 30 = 8 + 11 + 11
    + SUBITEM_MAX_LENGTH_AC  # +4  (abs 163)
    + SUBITEM_IMPL_CLASS_UID  # +12 (abs 171)
    + SUBITEM_USER_IDENTITY_AC  # +23 (abs 182)
)

# ---------------------------------------------------------------------------------------------
# PDUs

ASSOCIATE_FIXED = (  # offsets 6..73 of the RQ and the AC (68 bytes)
    b"\x00\x01"  # 6   u16 protocol version: bit 0 = version 1
    b"\x00\x00"  # 8   reserved
    b"ARCHIVE         "  # 10  called AE title, 16 bytes, space padded (AC: echoed, reserved)
    b"MODALITY        "  # 26  calling AE title, 16 bytes (AC: echoed, reserved)
    + bytes(32)  # 42  reserved, 32 zero bytes
)

A_ASSOCIATE_RQ = (  # 448 bytes
    b"\x01"  # 0   PDU type 0x01 A-ASSOCIATE-RQ
    b"\x00"  # 1   reserved
    b"\x00\x00\x01\xba"  # 2   u32 PDU length 442 = 68 + 25 + 50 + 81 + 218
    + ASSOCIATE_FIXED  # 6
    + ITEM_APP_CONTEXT  # 74  0x10
    + ITEM_PC_RQ_1  # 99  0x20 context 1, Verification
    + ITEM_PC_RQ_3  # 149 0x20 context 3, CT Image Storage
    + ITEM_USER_INFO_RQ  # 230 0x50 with 0x51..0x58
)

A_ASSOCIATE_AC = (  # 193 bytes
    b"\x02"  # 0   PDU type 0x02 A-ASSOCIATE-AC
    b"\x00"  # 1   reserved
    b"\x00\x00\x00\xbb"  # 2   u32 PDU length 187 = 68 + 25 + 29 + 31 + 34
    + ASSOCIATE_FIXED  # 6   (AE fields echo the RQ)
    + ITEM_APP_CONTEXT  # 74  0x10
    + ITEM_PC_AC_1_REJECTED  # 99  0x21 context 1 rejected (3)
    + ITEM_PC_AC_3_ACCEPTED  # 128 0x21 context 3 accepted
    + ITEM_USER_INFO_AC  # 159 0x50 with 0x51, 0x52, 0x59
)

RQ_OFFSETS: dict[int, bytes] = {
    74: ITEM_APP_CONTEXT,
    99: ITEM_PC_RQ_1,
    107: SUBITEM_ABSTRACT_VERIFICATION,
    128: SUBITEM_TRANSFER_IMPLICIT,
    149: ITEM_PC_RQ_3,
    157: SUBITEM_ABSTRACT_CT,
    186: SUBITEM_TRANSFER_EXPLICIT,
    209: SUBITEM_TRANSFER_IMPLICIT,
    230: ITEM_USER_INFO_RQ,
    234: SUBITEM_MAX_LENGTH_RQ,
    242: SUBITEM_IMPL_CLASS_UID,
    253: SUBITEM_ASYNC_WINDOW,
    261: SUBITEM_ROLE_SELECTION,
    294: SUBITEM_IMPL_VERSION,
    309: SUBITEM_EXT_NEGOTIATION,
    344: SUBITEM_COMMON_EXT_NEGOTIATION,
    427: SUBITEM_USER_IDENTITY_RQ,
}
"""Absolute offset -> the item found there, as the comments above claim."""

AC_OFFSETS: dict[int, bytes] = {
    74: ITEM_APP_CONTEXT,
    99: ITEM_PC_AC_1_REJECTED,
    107: SUBITEM_TRANSFER_IMPLICIT,
    128: ITEM_PC_AC_3_ACCEPTED,
    136: SUBITEM_TRANSFER_EXPLICIT,
    159: ITEM_USER_INFO_AC,
    163: SUBITEM_MAX_LENGTH_AC,
    171: SUBITEM_IMPL_CLASS_UID,
    182: SUBITEM_USER_IDENTITY_AC,
}

A_ASSOCIATE_RJ = (  # 10 bytes
    b"\x03"  # 0   PDU type 0x03 A-ASSOCIATE-RJ
    b"\x00"  # 1   reserved
    b"\x00\x00\x00\x04"  # 2   u32 PDU length, always 4
    b"\x00"  # 6   reserved
    b"\x01"  # 7   result 1: rejected-permanent
    b"\x01"  # 8   source 1: service-user
    b"\x03"  # 9   reason 3: calling-AE-title-not-recognized
)

# A C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 6.3.1): tag group LE, element LE,
# u32 LE value length, value. 102 bytes.
COMMAND_C_STORE_RQ = (
    b"\x00\x00\x00\x00"  # +0   (0000,0000) CommandGroupLength
    b"\x04\x00\x00\x00"  # +4     length 4
    b"\x5a\x00\x00\x00"  # +8     UL 90: bytes after this element
    b"\x00\x00\x02\x00"  # +12  (0000,0002) AffectedSOPClassUID
    b"\x1a\x00\x00\x00"  # +16    length 26
    b"1.2.840.10008.5.1.4.1.1.2\x00"  # +20    UI, padded to even with one NUL
    b"\x00\x00\x00\x01"  # +46  (0000,0100) CommandField
    b"\x02\x00\x00\x00"  # +50    length 2
    b"\x01\x00"  # +54    US 0x0001 C-STORE-RQ
    b"\x00\x00\x10\x01"  # +56  (0000,0110) MessageID
    b"\x02\x00\x00\x00"  # +60    length 2
    b"\x07\x00"  # +64    US 7
    b"\x00\x00\x00\x07"  # +66  (0000,0700) Priority
    b"\x02\x00\x00\x00"  # +70    length 2
    b"\x00\x00"  # +74    US 0 MEDIUM
    b"\x00\x00\x00\x08"  # +76  (0000,0800) CommandDataSetType
    b"\x02\x00\x00\x00"  # +80    length 2
    b"\x01\x00"  # +84    US 0x0001: a data set follows (anything but 0x0101)
    b"\x00\x00\x00\x10"  # +86  (0000,1000) AffectedSOPInstanceUID
    b"\x08\x00\x00\x00"  # +90    length 8
    b"1.2.3.4\x00"  # +94    UI, NUL padded
)

# First fragment of the data set, Explicit VR Little Endian (the transfer syntax of context 3).
DATASET_FRAGMENT = (  # 16 bytes
    b"\x10\x00\x10\x00"  # +0  (0010,0010) PatientName
    b"PN"  # +4  VR
    b"\x08\x00"  # +6  u16 LE length 8
    b"Doe^John"  # +8  value
)

P_DATA_TF = (  # 136 bytes
    b"\x04"  # 0   PDU type 0x04 P-DATA-TF
    b"\x00"  # 1   reserved
    b"\x00\x00\x00\x82"  # 2   u32 PDU length 130 = (4 + 104) + (4 + 18)
    b"\x00\x00\x00\x68"  # 6   PDV 1: u32 item length 104 = 2 + 102
    b"\x03"  # 10    presentation context ID 3
    b"\x03"  # 11    message control header 0x03: command, last fragment
    + COMMAND_C_STORE_RQ  # 12    fragment (102 bytes)
    + b"\x00\x00\x00\x12"  # 114 PDV 2: u32 item length 18 = 2 + 16
    b"\x03"  # 118   presentation context ID 3
    b"\x00"  # 119   message control header 0x00: data set, more fragments follow
    + DATASET_FRAGMENT  # 120   fragment (16 bytes), ends at 136
)
PDV_FRAGMENT_OFFSETS = ((12, 114), (120, 136))
"""(start, end) of each PDV fragment inside P_DATA_TF."""

A_RELEASE_RQ = (
    b"\x05"  # 0   PDU type 0x05 A-RELEASE-RQ
    b"\x00"  # 1   reserved
    b"\x00\x00\x00\x04"  # 2   u32 PDU length, always 4
    b"\x00\x00\x00\x00"  # 6   reserved
)

A_RELEASE_RP = (
    b"\x06"  # 0   PDU type 0x06 A-RELEASE-RP
    b"\x00"  # 1   reserved
    b"\x00\x00\x00\x04"  # 2   u32 PDU length, always 4
    b"\x00\x00\x00\x00"  # 6   reserved
)

A_ABORT = (
    b"\x07"  # 0   PDU type 0x07 A-ABORT
    b"\x00"  # 1   reserved
    b"\x00\x00\x00\x04"  # 2   u32 PDU length, always 4
    b"\x00"  # 6   reserved
    b"\x00"  # 7   reserved
    b"\x02"  # 8   source 2: UL service-provider
    b"\x06"  # 9   reason 6: invalid-PDU-parameter-value
)

GOLDEN_PDUS: dict[str, bytes] = {
    "A-ASSOCIATE-RQ": A_ASSOCIATE_RQ,
    "A-ASSOCIATE-AC": A_ASSOCIATE_AC,
    "A-ASSOCIATE-RJ": A_ASSOCIATE_RJ,
    "P-DATA-TF": P_DATA_TF,
    "A-RELEASE-RQ": A_RELEASE_RQ,
    "A-RELEASE-RP": A_RELEASE_RP,
    "A-ABORT": A_ABORT,
}

GOLDEN_ITEMS: dict[str, bytes] = {
    "0x10 application context": ITEM_APP_CONTEXT,
    "0x20 presentation context 1": ITEM_PC_RQ_1,
    "0x20 presentation context 3": ITEM_PC_RQ_3,
    "0x21 presentation context rejected": ITEM_PC_AC_1_REJECTED,
    "0x21 presentation context accepted": ITEM_PC_AC_3_ACCEPTED,
    "0x30 abstract syntax verification": SUBITEM_ABSTRACT_VERIFICATION,
    "0x30 abstract syntax CT": SUBITEM_ABSTRACT_CT,
    "0x40 transfer syntax implicit": SUBITEM_TRANSFER_IMPLICIT,
    "0x40 transfer syntax explicit": SUBITEM_TRANSFER_EXPLICIT,
    "0x50 user information RQ": ITEM_USER_INFO_RQ,
    "0x50 user information AC": ITEM_USER_INFO_AC,
    "0x51 maximum length RQ": SUBITEM_MAX_LENGTH_RQ,
    "0x51 maximum length AC": SUBITEM_MAX_LENGTH_AC,
    "0x52 implementation class UID": SUBITEM_IMPL_CLASS_UID,
    "0x53 asynchronous operations window": SUBITEM_ASYNC_WINDOW,
    "0x54 role selection": SUBITEM_ROLE_SELECTION,
    "0x55 implementation version name": SUBITEM_IMPL_VERSION,
    "0x56 SOP class extended negotiation": SUBITEM_EXT_NEGOTIATION,
    "0x57 SOP class common extended negotiation": SUBITEM_COMMON_EXT_NEGOTIATION,
    "0x58 user identity RQ": SUBITEM_USER_IDENTITY_RQ,
    "0x59 user identity AC": SUBITEM_USER_IDENTITY_AC,
}

# ---------------------------------------------------------------------------------------------
# Unknown item types: kept and re-encoded byte for byte

SUBITEM_UNKNOWN_35 = (  # an unknown sub-item inside a presentation context
    b"\x35"  # +0  item type 0x35 (not defined)
    b"\x00"  # +1  reserved
    b"\x00\x03"  # +2  item length 3
    b"\x01\x02\x03"  # +4  opaque
)

SUBITEM_UNKNOWN_5F = (  # an unknown user information sub-item (PS3.8 D.2: ignore, do not reject)
    b"\x5f"  # +0  item type 0x5F (not defined)
    b"\x07"  # +1  reserved, deliberately non-zero: the raw bytes must survive
    b"\x00\x04"  # +2  item length 4
    b"xyz\x00"  # +4  opaque
)

ITEM_UNKNOWN_60 = (  # an unknown top-level item
    b"\x60"  # +0  item type 0x60 (not defined)
    b"\x00"  # +1  reserved
    b"\x00\x02"  # +2  item length 2
    b"\xff\xfe"  # +4  opaque
)

ITEM_PC_RQ_1_WITH_35 = (  # 57 bytes
    b"\x20"  # +0  item type 0x20
    b"\x00"  # +1  reserved
    b"\x00\x35"  # +2  item length 53 = 4 + 21 + 21 + 7
    b"\x01\x00\x00\x00"  # +4  context ID 1, 3 reserved
    + SUBITEM_ABSTRACT_VERIFICATION  # +8
    + SUBITEM_TRANSFER_IMPLICIT  # +29
    + SUBITEM_UNKNOWN_35  # +50 unknown sub-item after the transfer syntax
)

ITEM_USER_INFO_WITH_5F = (  # 31 bytes
    b"\x50"  # +0  item type 0x50
    b"\x00"  # +1  reserved
    b"\x00\x1b"  # +2  item length 27 = 8 + 8 + 11
    + SUBITEM_MAX_LENGTH_RQ  # +4
    + SUBITEM_UNKNOWN_5F  # +12 unknown sub-item between known ones
    + SUBITEM_IMPL_CLASS_UID  # +20
)

A_ASSOCIATE_RQ_UNKNOWN_ITEMS = (  # 193 bytes
    b"\x01"  # 0   PDU type 0x01
    b"\x00"  # 1   reserved
    b"\x00\x00\x00\xbb"  # 2   u32 PDU length 187 = 68 + 25 + 57 + 6 + 31
    + ASSOCIATE_FIXED  # 6
    + ITEM_APP_CONTEXT  # 74
    + ITEM_PC_RQ_1_WITH_35  # 99  0x20 holding an unknown 0x35
    + ITEM_UNKNOWN_60  # 156 unknown top-level item
    + ITEM_USER_INFO_WITH_5F  # 162 0x50 holding an unknown 0x5F
)

# ---------------------------------------------------------------------------------------------
# Other protocols that reach a DICOM port by mistake

TLS_CLIENT_HELLO = (  # a minimal, well-formed TLS 1.2/1.3 ClientHello record
    b"\x16"  # 0   record type 22: handshake
    b"\x03\x01"  # 1   record version TLS 1.0 (as ClientHellos send it)
    b"\x00\x2f"  # 3   record length 47
    b"\x01"  # 5   handshake type 1: ClientHello
    b"\x00\x00\x2b"  # 6   handshake length 43
    b"\x03\x03"  # 9   client version TLS 1.2
    + bytes(range(32))  # 11  random
    + b"\x00"  # 43  session ID length 0
    b"\x00\x02\x13\x01"  # 44  cipher suites: length 2, TLS_AES_128_GCM_SHA256
    b"\x01\x00"  # 48  compression methods: length 1, null
    b"\x00\x00"  # 50  extensions length 0
)

HTTP_GET = b"GET / HTTP/1.1\r\nHost: archive\r\n\r\n"
HTTP_POST = b"POST /dicom-web/studies HTTP/1.1\r\nHost: archive\r\nContent-Length: 0\r\n\r\n"

# ---------------------------------------------------------------------------------------------
# Malformed input


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU header with the true length of `body`, then `body` (the malformation is inside)."""
    return bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + body


def rq_with(*items: bytes) -> bytes:
    """An A-ASSOCIATE-RQ with the golden fixed part and the given (possibly broken) items."""
    return pdu(0x01, ASSOCIATE_FIXED + b"".join(items))


def user_info(*subitems: bytes) -> bytes:
    """A well-formed 0x50 item around the given (possibly broken) sub-items."""
    body = b"".join(subitems)
    return b"\x50\x00" + len(body).to_bytes(2, "big") + body


Stage = Literal["framer", "parse", "machine", "foreign", "incomplete"]


class Malformed(NamedTuple):
    """One broken input, sent as a client's FIRST bytes on a fresh connection to the proxy.

    `source`/`reason`: the A-ABORT the proxy answers with; both None means the proxy closes the
    connection without sending any PDU.
    `stage`: which sans-I/O layer decides, in the relay's order:
      "foreign"    PDUFramer.feed raises ForeignProtocolError (TLS/HTTP): close, no PDU;
      "framer"     PDUFramer.feed raises RemotePDUError as soon as the 6-byte header is complete;
      "machine"    advance(Sta2, requestor, type) raises (2/2), or returns Action.CLOSE for A-ABORT;
      "parse"      parse_pdu of the (well-framed) A-ASSOCIATE-RQ raises RemotePDUError;
      "incomplete" the framer keeps waiting for more bytes: the proxy can only close without a PDU
                   (once the client half-closes, or when ARTIM expires).
    `match`: a regex the codec's error message must contain (codec-level tests only).
    """

    name: str
    raw: bytes
    source: int | None
    reason: int | None
    stage: Stage
    match: str = ""


_UNKNOWN_TYPE, _UNEXPECTED, _INVALID = 1, 2, 6
_M = Malformed

MALFORMED: list[Malformed] = [
    # --- rejected from the 6-byte header alone
    _M("unknown PDU type 0x08", pdu(0x08, bytes(4)), 2, _UNKNOWN_TYPE, "framer", "unrecognised PDU type 0x08"),
    _M("unknown PDU type 0x00", pdu(0x00, bytes(4)), 2, _UNKNOWN_TYPE, "framer", "unrecognised PDU type 0x00"),
    _M("unknown PDU type 0xFF", pdu(0xFF, bytes(4)), 2, _UNKNOWN_TYPE, "framer", "unrecognised PDU type 0xFF"),
    _M("0x16 without a TLS version", b"\x16\x00" + bytes(8), 2, _UNKNOWN_TYPE, "framer", "unrecognised PDU type 0x16"),
    _M("A-ABORT with length 5", pdu(0x07, bytes(5)), 2, _INVALID, "framer", "A_ABORT declares length 5"),
    _M("A-ASSOCIATE-RJ with length 3", pdu(0x03, b"\x00\x01\x01"), 2, _INVALID, "framer", "RJ declares length 3"),
    _M("A-RELEASE-RQ with length 0", pdu(0x05, b""), 2, _INVALID, "framer", "RELEASE_RQ declares length 0"),
    _M("A-RELEASE-RP with length 6", pdu(0x06, bytes(6)), 2, _INVALID, "framer", "RELEASE_RP declares length 6"),
    _M("A-ASSOCIATE-RQ body of 67 bytes", pdu(0x01, ASSOCIATE_FIXED[:67]), 2, _INVALID, "framer", "declares 67 bytes"),
    _M("A-ASSOCIATE-AC with length 0", pdu(0x02, b""), 2, _INVALID, "framer", "AC declares 0 bytes"),
    _M("P-DATA-TF declaring 0xFFFFFFFF", b"\x04\x00\xff\xff\xff\xff", 2, _INVALID, "framer", "4294967295"),
    _M("P-DATA-TF declaring 256 MiB", b"\x04\x00\x10\x00\x00\x00", 2, _INVALID, "framer", "268435456 bytes, over"),
    _M(
        "A-ASSOCIATE-RQ declaring 16 MiB",
        b"\x01\x00\x01\x00\x00\x00" + ASSOCIATE_FIXED,
        2,
        _INVALID,
        "framer",
        "declares 16777216 bytes",
    ),
    _M("A-ASSOCIATE-RQ declaring 0xFFFFFFFF", b"\x01\x00\xff\xff\xff\xff", 2, _INVALID, "framer", "4294967295"),
    # --- well framed, valid PDUs at the wrong time (before any A-ASSOCIATE-RQ)
    _M("P-DATA-TF before A-ASSOCIATE-RQ", P_DATA_TF, 2, _UNEXPECTED, "machine", "P_DATA_TF .* Sta2"),
    _M("A-RELEASE-RQ before A-ASSOCIATE-RQ", A_RELEASE_RQ, 2, _UNEXPECTED, "machine", "A_RELEASE_RQ .* Sta2"),
    _M("A-RELEASE-RP before A-ASSOCIATE-RQ", A_RELEASE_RP, 2, _UNEXPECTED, "machine", "A_RELEASE_RP .* Sta2"),
    _M("A-ASSOCIATE-AC before A-ASSOCIATE-RQ", A_ASSOCIATE_AC, 2, _UNEXPECTED, "machine", "A_ASSOCIATE_AC .* Sta2"),
    _M("A-ASSOCIATE-RJ before A-ASSOCIATE-RQ", A_ASSOCIATE_RJ, 2, _UNEXPECTED, "machine", "A_ASSOCIATE_RJ .* Sta2"),
    _M("A-ABORT before A-ASSOCIATE-RQ (AA-2: just close)", A_ABORT, None, None, "machine"),
    # --- well framed A-ASSOCIATE-RQ with a broken item
    _M(
        "item length overflows the PDU",
        rq_with(b"\x10\x00\x01\x00" + APP_CONTEXT.encode()),  # claims 256, 21 follow
        2,
        _INVALID,
        "parse",
        "item 0x10 declares 256 bytes, only 21 remain",
    ),
    _M(
        "item header truncated",
        rq_with(ITEM_APP_CONTEXT, b"\x20\x00\x00"),
        2,
        _INVALID,
        "parse",
        "item header truncated at offset 25",
    ),
    _M(
        "0x30 overflows its 0x20",
        rq_with(
            ITEM_APP_CONTEXT,
            b"\x20\x00\x00\x19"  # 0x20, length 25 = 4 + 21
            b"\x01\x00\x00\x00"  # context 1
            b"\x30\x00\x00\x26"  # 0x30 claims 38: 17 left in the 0x20, though 38 are left in the PDU
            + VERIFICATION.encode()
            + SUBITEM_TRANSFER_IMPLICIT,  # outside the 0x20: the 0x30 may not reach into it
        ),
        2,
        _INVALID,
        "parse",
        "item 0x30 declares 38 bytes, only 17 remain",
    ),
    _M(
        "0x20 shorter than 4 bytes",
        rq_with(b"\x20\x00\x00\x02\x01\x00"),
        2,
        _INVALID,
        "parse",
        "presentation context item shorter than 4",
    ),
    _M(
        "user information sub-item overflows the 0x50",
        rq_with(ITEM_APP_CONTEXT, ITEM_PC_RQ_1, user_info(SUBITEM_MAX_LENGTH_RQ, b"\x52\x00\x00\x40" + b"1.2.3.4")),
        2,
        _INVALID,
        "parse",
        "item 0x52 declares 64 bytes, only 7 remain",
    ),
    _M(
        "0x51 with length 3",
        rq_with(user_info(b"\x51\x00\x00\x03\x00\x40\x00")),
        2,
        _INVALID,
        "parse",
        "maximum length sub-item has length 3",
    ),
    _M(
        "0x53 with length 2",
        rq_with(user_info(b"\x53\x00\x00\x02\x00\x01")),
        2,
        _INVALID,
        "parse",
        "operations window sub-item has length 2",
    ),
    _M(
        "0x54 UID length overflows the sub-item",
        rq_with(user_info(b"\x54\x00\x00\x06" b"\x00\xff" b"1.2" b"\x01")),  # UID claims 255, 4 bytes left
        2,
        _INVALID,
        "parse",
        "role selection sub-item: declared length 255 exceeds",
    ),
    _M(
        "0x54 without its role bytes",
        rq_with(user_info(b"\x54\x00\x00\x05" b"\x00\x03" b"1.2")),  # UID fits, SCU/SCP bytes missing
        2,
        _INVALID,
        "parse",
        "role bytes missing",
    ),
    _M(
        "0x54 length field truncated",
        rq_with(user_info(b"\x54\x00\x00\x01\x00")),
        2,
        _INVALID,
        "parse",
        "role selection sub-item: length field truncated",
    ),
    _M(
        "0x56 UID length overflows the sub-item",
        rq_with(user_info(b"\x56\x00\x00\x04" b"\x00\x09" b"1.")),
        2,
        _INVALID,
        "parse",
        "SOP class extended negotiation sub-item: declared length 9",
    ),
    _M(
        "0x57 related block overflows the sub-item",
        rq_with(
            user_info(
                b"\x57\x00\x00\x0b"  # 0x57, length 11
                b"\x00\x03" b"1.2"  # SOP class UID
                b"\x00\x01" b"9"  # service class UID
                b"\x00\x20" b"\x00"  # block claims 32 bytes, 1 is left
            )
        ),
        2,
        _INVALID,
        "parse",
        "common extended negotiation sub-item: declared length 32",
    ),
    _M(
        "0x57 related UID overflows its block",
        rq_with(
            user_info(
                b"\x57\x00\x00\x0d"  # 0x57, length 13
                b"\x00\x03" b"1.2"  # SOP class UID
                b"\x00\x01" b"9"  # service class UID
                b"\x00\x03"  # block length 3
                b"\x00\x05" b"1"  # an entry claiming 5 bytes, 1 is left in the block
            )
        ),
        2,
        _INVALID,
        "parse",
        "common extended negotiation sub-item: declared length 5",
    ),
    _M(
        "0x57 trailing bytes after the block",
        rq_with(user_info(b"\x57\x00\x00\x09" b"\x00\x01" b"1" b"\x00\x01" b"9" b"\x00\x00" b"\xaa")),
        2,
        _INVALID,
        "parse",
        "common extended negotiation sub-item: trailing bytes",
    ),
    _M(
        "0x58 primary field length overflows the sub-item",
        rq_with(user_info(b"\x58\x00\x00\x08" b"\x02\x00" b"\x00\xff" b"al" b"\x00\x00")),
        2,
        _INVALID,
        "parse",
        "user identity sub-item: declared length 255",
    ),
    _M(
        "0x58 secondary field length overflows the sub-item",
        rq_with(user_info(b"\x58\x00\x00\x09" b"\x02\x00" b"\x00\x01" b"a" b"\x00\x09" b"pw")),
        2,
        _INVALID,
        "parse",
        "user identity sub-item: declared length 9",
    ),
    _M(
        "0x58 shorter than 6 bytes",
        rq_with(user_info(b"\x58\x00\x00\x04\x01\x00\x00\x00")),
        2,
        _INVALID,
        "parse",
        "user identity sub-item shorter than 6",
    ),
    _M(
        "0x58 trailing bytes",
        rq_with(user_info(b"\x58\x00\x00\x08" b"\x01\x00" b"\x00\x01" b"a" b"\x00\x00" b"\xaa")),
        2,
        _INVALID,
        "parse",
        "user identity sub-item: trailing bytes",
    ),
    _M(
        "0x59 server response overflows the sub-item",
        rq_with(user_info(b"\x59\x00\x00\x03\x00\x05t")),
        2,
        _INVALID,
        "parse",
        "user identity response sub-item: declared length 5",
    ),
    _M(
        "0x59 trailing bytes",
        rq_with(user_info(b"\x59\x00\x00\x03\x00\x00t")),
        2,
        _INVALID,
        "parse",
        "user identity response sub-item: trailing bytes",
    ),
    # --- not DICOM at all: the proxy closes without a PDU
    _M("TLS ClientHello", TLS_CLIENT_HELLO, None, None, "foreign", "tls"),
    _M("HTTP GET", HTTP_GET, None, None, "foreign", "http"),
    _M("HTTP POST", HTTP_POST, None, None, "foreign", "http"),
    # --- incomplete: nothing to answer until the client gives up (half-close) or ARTIM expires
    _M("truncated PDU header (3 bytes)", b"\x01\x00\x00", None, None, "incomplete"),
    _M("A-ASSOCIATE-RQ cut short", A_ASSOCIATE_RQ[:100], None, None, "incomplete"),
]


class MalformedPData(NamedTuple):
    """A P-DATA-TF whose PDV items are broken: A-ABORT 2/6 once the association is established (Sta6).

    As a connection's first bytes the same PDU is answered 2/2 (unexpected P-DATA-TF, the relay
    consults the state table before it walks the PDVs), which is why these are not in MALFORMED.
    """

    name: str
    raw: bytes
    source: int
    reason: int


MALFORMED_PDATA: list[MalformedPData] = [
    MalformedPData("P-DATA-TF without any PDV", pdu(0x04, b""), 2, _INVALID),
    MalformedPData("PDV item length 0", pdu(0x04, b"\x00\x00\x00\x00\x03\x03"), 2, _INVALID),
    MalformedPData("PDV item length 1", pdu(0x04, b"\x00\x00\x00\x01\x03\x03"), 2, _INVALID),
    MalformedPData("PDV length overflows the PDU", pdu(0x04, b"\x00\x00\x01\x00\x03\x03" + bytes(8)), 2, _INVALID),
    MalformedPData("PDV header truncated", pdu(0x04, b"\x00\x00\x00"), 2, _INVALID),
    MalformedPData(
        "second PDV header truncated", pdu(0x04, b"\x00\x00\x00\x04\x03\x03\x00\x00" + b"\x00\x00"), 2, _INVALID
    ),
    MalformedPData(
        "second PDV overflows the PDU",
        pdu(0x04, b"\x00\x00\x00\x04\x03\x03\x00\x00" + b"\x00\x00\x00\x08\x03\x02\x00\x00"),
        2,
        _INVALID,
    ),
]
# fmt: on
