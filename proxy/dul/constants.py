"""Code tables of PS3.8 and PS3.7 as IntEnums, and every wire limit as a named constant."""

from __future__ import annotations

from enum import IntEnum


class PDUType(IntEnum):
    """PS3.8 9.3.1, Table 9-11."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class ItemType(IntEnum):
    """PS3.8 9.3.2-9.3.3 and PS3.7 D.3.3 (user information sub-items)."""

    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNCHRONOUS_OPERATIONS_WINDOW = 0x53
    SCP_SCU_ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED_NEGOTIATION = 0x56
    SOP_CLASS_COMMON_EXTENDED_NEGOTIATION = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


class UserIdentityType(IntEnum):
    """PS3.7 D.3.3.7.1."""

    USERNAME = 1
    USERNAME_PASSCODE = 2
    KERBEROS = 3
    SAML = 4
    JWT = 5


class PresentationContextResult(IntEnum):
    """PS3.8 9.3.3.2, byte 7 of the 0x21 item."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class RejectResult(IntEnum):
    """PS3.8 9.3.4."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    """PS3.8 9.3.4."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReasonUser(IntEnum):
    """PS3.8 9.3.4, reasons when the source is 1 (service user)."""

    NO_REASON = 1
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7


class RejectReasonACSE(IntEnum):
    """PS3.8 9.3.4, reasons when the source is 2 (service provider, ACSE)."""

    NO_REASON = 1
    PROTOCOL_VERSION_NOT_SUPPORTED = 2


class RejectReasonPresentation(IntEnum):
    """PS3.8 9.3.4, reasons when the source is 3 (service provider, presentation)."""

    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


class AbortSource(IntEnum):
    """PS3.8 9.3.8."""

    SERVICE_USER = 0
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """PS3.8 9.3.8; meaningful only when the source is the service provider."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


PDU_HEADER_LENGTH = 6
"""Type (1), reserved (1), length (4): PS3.8 9.3.1."""

FIXED_PDU_BODY_LENGTH = 4
"""A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT always declare 4 (PS3.8 9.3.4-9.3.8)."""

ASSOCIATE_FIXED_LENGTH = 68
"""Protocol version, reserved, called AE, calling AE, 32 reserved: PS3.8 9.3.2."""

PDV_HEADER_LENGTH = 6
"""PDV item length (4), presentation context ID (1), message control header (1): PS3.8 9.3.5.1."""

ITEM_HEADER_LENGTH = 4
"""Item type (1), reserved (1), item length (2): PS3.8 9.3.2.x."""

MAX_ITEM_LENGTH = 0xFFFF
"""Item lengths are 16-bit, so the whole User Information item fits in 65,535 bytes."""

AE_TITLE_LENGTH = 16
MAX_UID_LENGTH = 64
"""PS3.5 9.1."""

DEFAULT_MAX_ASSOCIATE_LENGTH = 256 * 1024
"""Sanity cap for an A-ASSOCIATE-RQ/AC; D4C caps every PDU at 16 MiB, a real RQ is a few KiB."""

DEFAULT_MAX_PDU_LENGTH = 256 * 1024
"""The proxy's own P-DATA cap (its P in standards.md section 4): what it advertises at most."""

MAX_DECLARED_PDU_LENGTH = 0xFFFFFFFF

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
"""PS3.7 A.2.1: the only DICOM application context."""

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
