"""Rule model and the facts/decision values exchanged with the relay.

CONTRACT: the relay codes against AssociationFacts, CertFacts, IdentityFacts, DimseFacts, Decision,
DimseDecision and RuleSet.evaluate/evaluate_dimse. Extend, never rename.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class CertFacts:
    """A verified TLS client certificate (TLS listeners only)."""

    subject_cn: str | None
    sans: tuple[str, ...]  # DNS names, IP addresses, URIs, e-mail addresses as text
    issuer: str  # RFC 4514 string
    fingerprint_sha256: str  # lowercase hex, no colons


@dataclass(frozen=True)
class IdentityFacts:
    """A client-supplied User Identity (0x58); never carries the secret fields."""

    type: int  # 1..5
    username: str | None  # the primary field for types 1 and 2 (UTF-8), else None


@dataclass(frozen=True)
class AssociationFacts:
    source: IPAddress
    listener: str
    calling_ae: str  # stripped
    called_ae: str  # stripped
    abstract_syntaxes: tuple[str, ...] = ()  # every proposed abstract syntax UID
    transfer_syntaxes: tuple[str, ...] = ()  # every proposed transfer syntax UID
    client_cert: CertFacts | None = None
    user_identity: IdentityFacts | None = None
    now: datetime | None = None  # local time; None = do not match `time` conditions (explain may pass one)


@dataclass(frozen=True)
class DimseFacts:
    command: str  # "C-STORE", "C-FIND", "C-MOVE", "C-GET", "C-ECHO", "N-ACTION", ... (proxy.dul.dimse.command_name)
    affected_sop_class: str | None = None
    move_destination: str | None = None
    priority: int | None = None


AssociationAction = Literal["accept", "reject", "drop"]


@dataclass(frozen=True)
class Decision:
    rule: str  # the matching rule's name, or "default"
    action: AssociationAction
    reject: tuple[int, int, int] | None = None  # (result, source, reason) when action == "reject"
    upstreams: tuple[str, ...] = ()  # priority order; () = route by called AE / default_upstream
    identity: str | None = None  # identity profile name
    rewrite_called_ae: str | None = None
    rewrite_calling_ae: str | None = None
    context_rejection: int = 1  # AC result for filtered contexts: 1 user-rejection or 3 abstract-syntax-not-supported
    shadow_matches: tuple[tuple[str, str], ...] = ()  # (rule, action) of shadow-mode rules that matched first
    # abstract syntaxes this decision lets through; None = all (no presentation-context filtering)
    allowed_abstract_syntaxes: frozenset[str] | None = None
    location: str = ""  # "path:line" of the rule, for logs

    def context_allowed(self, abstract_syntax: str) -> bool:
        return self.allowed_abstract_syntaxes is None or abstract_syntax in self.allowed_abstract_syntaxes


@dataclass(frozen=True)
class DimseDecision:
    rule: str  # matching `on: dimse` rule name, or "default"
    action: Literal["forward", "refuse"]
    status: int = 0x0124  # Refused: Not authorized (0xA801 for a forbidden move destination)
    shadow_matches: tuple[tuple[str, str], ...] = field(default=())
