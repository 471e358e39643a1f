"""Named groups that rule files may use instead of long UID lists.

Abstract-syntax groups (`abstract_syntax:`, `affected_sop_class:`, `contexts:` and `uid` sets) name
the SOP classes of one DICOM service. Command groups (`command:` and `command` sets) name DIMSE
operations.

Storage is *not* "everything under 1.2.840.10008.5.1.4.1.1.": a few query, retrieve and management
classes sit under that prefix (Inventory FIND/MOVE/GET, Repository Query, Protocol Approval
FIND/MOVE/GET, Inventory Creation; standards.md 2.4), and some storage classes live elsewhere
(Hanging Protocol, Color Palette, Implant Templates, RT delivery instructions). The lists were
checked against pynetdicom's `sop_class.py` and pydicom's UID dictionary (a test re-checks them
when pynetdicom is installed). New storage classes that DICOM adds under the prefix are storage
automatically; new classes elsewhere need a line here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "COMMANDS",
    "COMMAND_GROUPS",
    "GROUPS",
    "STORAGE_PREFIX",
    "UidGroup",
    "group_covers",
]

STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."
"""Where most Storage SOP classes live (PS3.4 Annex B; PS3.6 Table A-1)."""

NOT_STORAGE_UNDER_PREFIX = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.200.4",  # Protocol Approval Information Model FIND
        "1.2.840.10008.5.1.4.1.1.200.5",  # Protocol Approval Information Model MOVE
        "1.2.840.10008.5.1.4.1.1.200.6",  # Protocol Approval Information Model GET
        "1.2.840.10008.5.1.4.1.1.201.1.1",  # Storage Management SOP Instance (a well-known instance)
        "1.2.840.10008.5.1.4.1.1.201.2",  # Inventory FIND
        "1.2.840.10008.5.1.4.1.1.201.3",  # Inventory MOVE
        "1.2.840.10008.5.1.4.1.1.201.4",  # Inventory GET
        "1.2.840.10008.5.1.4.1.1.201.5",  # Inventory Creation (N-ACTION / N-EVENT-REPORT)
        "1.2.840.10008.5.1.4.1.1.201.6",  # Repository Query (C-FIND)
    }
)

STORAGE_OUTSIDE_PREFIX = frozenset(
    {
        "1.2.840.10008.5.1.4.34.7",  # RT Beams Delivery Instruction Storage
        "1.2.840.10008.5.1.4.34.10",  # RT Brachy Application Setup Delivery Instruction Storage
        "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage
        "1.2.840.10008.5.1.4.39.1",  # Color Palette Storage
        "1.2.840.10008.5.1.4.43.1",  # Generic Implant Template Storage
        "1.2.840.10008.5.1.4.44.1",  # Implant Assembly Template Storage
        "1.2.840.10008.5.1.4.45.1",  # Implant Template Group Storage
    }
)

_QR_FIND = frozenset(
    {
        "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root Q/R FIND
        "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root Q/R FIND
        "1.2.840.10008.5.1.4.1.2.3.1",  # Patient/Study Only Q/R FIND (retired)
        "1.2.840.10008.5.1.4.1.1.201.2",  # Inventory FIND (under the storage prefix)
        "1.2.840.10008.5.1.4.1.1.201.6",  # Repository Query (under the storage prefix)
    }
)
_QR_MOVE = frozenset(
    {
        "1.2.840.10008.5.1.4.1.2.1.2",  # Patient Root Q/R MOVE
        "1.2.840.10008.5.1.4.1.2.2.2",  # Study Root Q/R MOVE
        "1.2.840.10008.5.1.4.1.2.3.2",  # Patient/Study Only Q/R MOVE (retired)
        "1.2.840.10008.5.1.4.1.2.4.2",  # Composite Instance Root Retrieve MOVE
        "1.2.840.10008.5.1.4.1.1.201.3",  # Inventory MOVE
    }
)
_QR_GET = frozenset(
    {
        "1.2.840.10008.5.1.4.1.2.1.3",  # Patient Root Q/R GET
        "1.2.840.10008.5.1.4.1.2.2.3",  # Study Root Q/R GET
        "1.2.840.10008.5.1.4.1.2.3.3",  # Patient/Study Only Q/R GET (retired)
        "1.2.840.10008.5.1.4.1.2.4.3",  # Composite Instance Root Retrieve GET
        "1.2.840.10008.5.1.4.1.2.5.3",  # Composite Instance Retrieve Without Bulk Data GET
        "1.2.840.10008.5.1.4.1.1.201.4",  # Inventory GET
    }
)


@dataclass(frozen=True)
class UidGroup:
    """A named set of SOP class UIDs: `uids`, plus every UID under `prefix` except `excluded`."""

    name: str
    description: str
    uids: frozenset[str]
    prefix: str | None = None
    excluded: frozenset[str] = frozenset()

    def matches(self, uid: object) -> bool:
        if not isinstance(uid, str):
            return False
        if uid in self.uids:
            return True
        return self.prefix is not None and uid.startswith(self.prefix) and uid not in self.excluded


_GROUP_LIST = (
    UidGroup("verification", "Verification (C-ECHO)", frozenset({"1.2.840.10008.1.1"})),
    UidGroup(
        "storage",
        "every Storage SOP class (C-STORE), not the Q/R classes under the storage prefix",
        STORAGE_OUTSIDE_PREFIX,
        STORAGE_PREFIX,
        NOT_STORAGE_UNDER_PREFIX,
    ),
    UidGroup("query-retrieve", "Query/Retrieve FIND, MOVE and GET models", _QR_FIND | _QR_MOVE | _QR_GET),
    UidGroup("query-retrieve-find", "Query/Retrieve FIND models (C-FIND)", _QR_FIND),
    UidGroup("query-retrieve-move", "Query/Retrieve MOVE models (C-MOVE)", _QR_MOVE),
    UidGroup("query-retrieve-get", "Query/Retrieve GET models (C-GET)", _QR_GET),
    UidGroup("worklist", "Modality Worklist (C-FIND)", frozenset({"1.2.840.10008.5.1.4.31"})),
    UidGroup(
        "storage-commitment",
        "Storage Commitment Push Model (and the retired Pull Model)",
        frozenset({"1.2.840.10008.1.20.1", "1.2.840.10008.1.20.2"}),
    ),
    UidGroup(
        "mpps",
        "Modality Performed Procedure Step (and its retired Retrieve and Notification classes)",
        frozenset({"1.2.840.10008.3.1.2.3.3", "1.2.840.10008.3.1.2.3.4", "1.2.840.10008.3.1.2.3.5"}),
    ),
    UidGroup(
        "ups",
        "Unified Procedure Step Push, Watch, Pull, Event and Query",
        frozenset(f"1.2.840.10008.5.1.4.34.6.{n}" for n in range(1, 6)),
    ),
    UidGroup(
        "instance-availability",
        "Instance Availability Notification",
        frozenset({"1.2.840.10008.5.1.4.33"}),
    ),
)

GROUPS: dict[str, UidGroup] = {g.name: g for g in _GROUP_LIST}
"""Abstract-syntax groups by name, in documentation order."""

_SUBGROUPS: dict[str, frozenset[str]] = {
    "query-retrieve": frozenset({"query-retrieve-find", "query-retrieve-move", "query-retrieve-get"}),
}


def group_covers(outer: str, inner: str) -> bool:
    """True when every UID of group `inner` is in group `outer` (for shadowed-rule warnings)."""
    return outer == inner or inner in _SUBGROUPS.get(outer, frozenset())


COMMANDS = (
    "C-STORE",
    "C-FIND",
    "C-GET",
    "C-MOVE",
    "C-ECHO",
    "N-EVENT-REPORT",
    "N-GET",
    "N-SET",
    "N-ACTION",
    "N-CREATE",
    "N-DELETE",
)
"""DIMSE request names a rule may test; the spelling of proxy.dul.dimse.command_name.
C-CANCEL is left out on purpose: it has no response to refuse it with, and it only stops an
operation that was already let through, so evaluate_dimse always forwards it."""

COMMAND_GROUPS: dict[str, frozenset[str]] = {
    "query-retrieve": frozenset({"C-FIND", "C-MOVE", "C-GET"}),
    "retrieve": frozenset({"C-MOVE", "C-GET"}),
    "composite": frozenset(c for c in COMMANDS if c.startswith("C-")),
    "normalized": frozenset(c for c in COMMANDS if c.startswith("N-")),
}
"""Command groups by name, usable wherever a command name is."""
