"""Rule model and the facts/decision values exchanged with the relay.

CONTRACT: the relay codes against AssociationFacts, CertFacts, IdentityFacts, DimseFacts, Decision,
DimseDecision and RuleSet.evaluate/evaluate_dimse. Extend, never rename.

Layers, from the bottom up:

* facts and decisions: plain values the relay builds and reads;
* patterns: one compiled value of a condition (`CT*`, `10.0.0.0/8`, `storage`, `@ward`);
* MatchTable: many patterns indexed together, so that a value is tested against thousands of AE
  titles, globs or networks with a few dictionary look-ups instead of a loop;
* NamedSet, Condition, Match, Rule, RuleSet: what a rule file becomes (see proxy.policy.loader).

The evaluation itself lives in proxy.policy.engine; RuleSet.evaluate and evaluate_dimse delegate
to it. Everything here is immutable once built.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from proxy.errors import Location
from proxy.policy.groups import UidGroup

if TYPE_CHECKING:
    from proxy.policy.engine import CompiledRules

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    username: str | None  # the user name (types 1 and 2) or the verified subject (client_identity verify), else None


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
    # local time of the request for `time` conditions of DIMSE rules; None = the association's `now`
    now: datetime | None = None


AssociationAction = Literal["accept", "reject", "drop"]
DimseAction = Literal["forward", "refuse"]
RuleKind = Literal["association", "dimse"]
RuleMode = Literal["enforce", "shadow"]
SetType = Literal["ae_title", "cidr", "uid", "command"]


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
    location: str = ""  # "path:line" of the rule, for logs; "" for the default


# --------------------------------------------------------------------------- patterns


class Pattern:
    """One value of a condition, without its `!`: tests a single fact value.

    `text` is what the admin wrote, for explanations. `key` identifies the predicate, so that the
    engine indexes a pattern used by many rules once.
    """

    __slots__ = ()

    @property
    def text(self) -> str:
        raise NotImplementedError

    @property
    def key(self) -> Hashable:
        raise NotImplementedError

    def matches(self, value: object) -> bool:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Finite(Pattern):
    """A pattern that stands for a known, finite set of values: an AE title, a listener name,
    a command or command group, a weekday range, an hour range (as minutes of the day)..."""

    written: str
    values: frozenset[Hashable]

    @property
    def text(self) -> str:
        return self.written

    @property
    def key(self) -> Hashable:
        return ("finite", self.values)

    def matches(self, value: object) -> bool:
        return isinstance(value, Hashable) and value in self.values


@dataclass(frozen=True, slots=True)
class Glob(Pattern):
    """A case-sensitive shell-style pattern: `*` any run, `?` one character, `[A-C]`, `[!0-9]`."""

    written: str
    regex: str  # the equivalent regular expression, anchored at both ends by the caller
    prefix: str  # the literal characters before the first wildcard
    prefix_only: bool  # the pattern is `prefix*`: matching it needs no regular expression

    @property
    def text(self) -> str:
        return self.written

    @property
    def key(self) -> Hashable:
        return ("glob", self.written)

    def matches(self, value: object) -> bool:
        # Compiled on first use: the fast path uses MatchTable's combined expressions instead, and
        # compiling 10,000 globs one by one at load time would cost a second.
        return isinstance(value, str) and _glob_regex(self.regex).fullmatch(value) is not None

    @property
    def matches_everything(self) -> bool:
        return self.prefix_only and not self.prefix


@dataclass(frozen=True, slots=True)
class UidPrefix(Pattern):
    """`1.2.826.0.1.3680043.*`: every UID under a root (the prefix keeps its final dot)."""

    written: str
    prefix: str

    @property
    def text(self) -> str:
        return self.written

    @property
    def key(self) -> Hashable:
        return ("uid-prefix", self.prefix)

    def matches(self, value: object) -> bool:
        return isinstance(value, str) and value.startswith(self.prefix)


@dataclass(frozen=True, slots=True)
class GroupRef(Pattern):
    """A named abstract-syntax group (proxy.policy.groups)."""

    group: UidGroup

    @property
    def text(self) -> str:
        return self.group.name

    @property
    def key(self) -> Hashable:
        return ("group", self.group.name)

    def matches(self, value: object) -> bool:
        return self.group.matches(value)


@dataclass(frozen=True, slots=True)
class Network(Pattern):
    """An IPv4 or IPv6 network; a plain address is a /32 or /128."""

    written: str
    network: IPNetwork

    @property
    def text(self) -> str:
        return self.written

    @property
    def key(self) -> Hashable:
        return ("net", self.network)

    def matches(self, value: object) -> bool:
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return value.version == self.network.version and value in self.network
        return False


@dataclass(frozen=True, slots=True, eq=False)
class SetRef(Pattern):
    """`@name`: any member of a named set."""

    set: NamedSet

    @property
    def text(self) -> str:
        return f"@{self.set.name}"

    @property
    def key(self) -> Hashable:
        return ("set", self.set.name)

    def matches(self, value: object) -> bool:
        return self.set.matches(value)


@functools.lru_cache(maxsize=4096)
def _glob_regex(regex: str) -> re.Pattern[str]:
    return re.compile(regex, re.DOTALL)


def _alternation(parts: Iterable[str]) -> re.Pattern[str]:
    """One expression matching a whole value against any of the glob expressions `parts`."""
    return re.compile("(?:" + "|".join(sorted(set(parts))) + r")\Z", re.DOTALL)


# --------------------------------------------------------------------------- the index


_GLOB_BUCKET = 3
"""Globs that are not `prefix*` are grouped by up to this many leading literal characters, so a
value is tried only against the globs that can match its first characters."""


class MatchTable:
    """Many patterns, each with a bit mask, indexed for `hits(value)`: the OR of the masks of the
    patterns that match `value`.

    Literal values go to a dict, `prefix*` globs and UID prefixes to a dict walked once per
    distinct prefix length, other globs to one combined regular expression per (leading
    characters, mask), networks to one dict per prefix length, groups to a short list of
    predicates. A set reference adds the set's members; adding the same pattern again merges
    the masks. Call freeze() once after the last add().
    """

    __slots__ = (
        "_glob_lengths",
        "_globs",
        "_nets",
        "_prefix_lengths",
        "_residual",
        "all",
        "exact",
        "glob_parts",
        "nets",
        "prefix",
        "residual",
    )

    def __init__(self) -> None:
        self.exact: dict[Hashable, int] = {}
        self.prefix: dict[str, int] = {}
        # bucket -> mask -> regex sources
        self.glob_parts: dict[str, dict[int, list[str]]] = {}
        self.nets: dict[tuple[int, int], dict[int, int]] = {}  # (version, host bits) -> network >> host bits
        self.residual: dict[Hashable, tuple[Callable[[object], bool], int]] = {}
        self.all = 0
        self._prefix_lengths: tuple[int, ...] = ()
        self._glob_lengths: tuple[int, ...] = ()
        # bucket -> (one expression for the whole bucket or None, then one per mask)
        self._globs: dict[str, tuple[re.Pattern[str] | None, tuple[tuple[re.Pattern[str], int], ...]]] = {}
        self._nets: tuple[tuple[int, int, dict[int, int]], ...] = ()
        self._residual: tuple[tuple[Callable[[object], bool], int], ...] = ()

    def add(self, pattern: Pattern, bits: int) -> None:
        self.all |= bits
        if isinstance(pattern, Finite):
            exact = self.exact
            for value in pattern.values:
                exact[value] = exact.get(value, 0) | bits
        elif isinstance(pattern, Glob):
            if pattern.prefix_only:
                self.prefix[pattern.prefix] = self.prefix.get(pattern.prefix, 0) | bits
            else:
                bucket = pattern.prefix[:_GLOB_BUCKET]
                self.glob_parts.setdefault(bucket, {}).setdefault(bits, []).append(pattern.regex)
        elif isinstance(pattern, UidPrefix):
            self.prefix[pattern.prefix] = self.prefix.get(pattern.prefix, 0) | bits
        elif isinstance(pattern, Network):
            net = pattern.network
            host_bits = net.max_prefixlen - net.prefixlen
            table = self.nets.setdefault((net.version, host_bits), {})
            key = int(net.network_address) >> host_bits
            table[key] = table.get(key, 0) | bits
        elif isinstance(pattern, GroupRef):
            old = self.residual.get(pattern.key)
            self.residual[pattern.key] = (pattern.group.matches, bits | (old[1] if old else 0))
        elif isinstance(pattern, SetRef):
            self.merge(pattern.set._table, bits)
        else:  # pragma: no cover - every Pattern subclass is handled above
            raise TypeError(f"cannot index {type(pattern).__name__}")

    def merge(self, other: MatchTable, bits: int) -> None:
        """Add every pattern of `other` (a set's table) with `bits`: a bulk add() of its members."""
        self.all |= bits
        exact = self.exact
        for value in other.exact:
            exact[value] = exact.get(value, 0) | bits
        prefix = self.prefix
        for text in other.prefix:
            prefix[text] = prefix.get(text, 0) | bits
        for bucket, by_bits in other.glob_parts.items():
            mine = self.glob_parts.setdefault(bucket, {}).setdefault(bits, [])
            for parts in by_bits.values():
                mine.extend(parts)
        for shape, table in other.nets.items():
            own = self.nets.setdefault(shape, {})
            for number in table:
                own[number] = own.get(number, 0) | bits
        for key, (predicate, _) in other.residual.items():
            old = self.residual.get(key)
            self.residual[key] = (predicate, bits | (old[1] if old else 0))

    def freeze(self) -> MatchTable:
        self._prefix_lengths = tuple(sorted({len(p) for p in self.prefix}))
        self._glob_lengths = tuple(sorted({len(b) for b in self.glob_parts}))
        self._globs = {}
        for bucket, by_bits in self.glob_parts.items():
            entries = tuple((_alternation(parts), bits) for bits, parts in by_bits.items())
            # With several masks in a bucket, one expression for all of them first: most values
            # match none, and then a single C-level scan replaces one call per mask.
            screen = _alternation([p for parts in by_bits.values() for p in parts]) if len(entries) > 1 else None
            self._globs[bucket] = (screen, entries)
        self._nets = tuple((version, host_bits, table) for (version, host_bits), table in sorted(self.nets.items()))
        self._residual = tuple(self.residual.values())
        return self

    def hits(self, value: object) -> int:
        """OR of the masks of every pattern that matches `value` (call freeze() first)."""
        found = self.exact.get(value, 0) if isinstance(value, Hashable) else 0
        if isinstance(value, str):
            if self._prefix_lengths:
                prefix = self.prefix
                size = len(value)
                for n in self._prefix_lengths:
                    if n > size:
                        break
                    found |= prefix.get(value[:n], 0)
            if self._glob_lengths:
                size = len(value)
                for n in self._glob_lengths:
                    if n > size:
                        break
                    bucket = self._globs.get(value[:n])
                    if bucket is None:
                        continue
                    screen, entries = bucket
                    if screen is not None and screen.match(value) is None:
                        continue
                    for regex, bits in entries:
                        if bits & ~found and regex.match(value) is not None:
                            found |= bits
        elif self._nets and isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            number, version = int(value), value.version
            for net_version, host_bits, table in self._nets:
                if net_version == version:
                    found |= table.get(number >> host_bits, 0)
        for predicate, bits in self._residual:
            if bits & ~found and predicate(value):
                found |= bits
        return found


# --------------------------------------------------------------------------- sets, conditions, rules


@dataclass(frozen=True, eq=False)
class NamedSet:
    """`sets: {name: {type: ..., elements: [...]}}`: referenced as `@name` by conditions of its type."""

    name: str
    type: SetType
    members: tuple[Pattern, ...]
    location: Location
    source_line: str | None = field(default=None, repr=False)
    _table: MatchTable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = MatchTable()
        for member in self.members:
            table.add(member, 1)
        object.__setattr__(self, "_table", table.freeze())

    def matches(self, value: object) -> bool:
        return self._table.hits(value) != 0

    def __len__(self) -> int:
        """How many values the set lists (literal members hold several)."""
        return sum(len(m.values) if isinstance(m, Finite) else 1 for m in self.members)

    @property
    def literal_values(self) -> frozenset[Hashable]:
        """The values of the set's literal members (for the shadowed-rule analysis)."""
        return frozenset(self._table.exact)


@dataclass(frozen=True)
class FieldSpec:
    """One thing a condition can test, and how to read it from the facts.

    `extract` returns None when the association or request does not have the value (no client
    certificate, no move destination, no clock...): a condition on it then never matches, not
    even one written only with `!` items.
    """

    name: str  # as in messages: calling_ae, client_cert.cn, time.hours...
    scope: RuleKind  # "association": association facts; "dimse": request facts
    multi: bool  # the fact is a list (proposed syntaxes, SANs): a value matches if any element does
    extract: Callable[[AssociationFacts, DimseFacts | None], object]
    absent: str  # why the value can be missing, for explanations
    show: Callable[[object], str]
    label: str = ""  # the key as written, when it differs from `name`

    @property
    def key(self) -> str:
        return self.label or self.name


def _quote(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _ipv4_if_mapped(address: IPAddress) -> IPAddress:
    """Dual-stack listeners see IPv4 clients as ::ffff:a.b.c.d; rules are written in IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _now(a: AssociationFacts, d: DimseFacts | None) -> datetime | None:
    if d is not None and d.now is not None:
        return d.now
    return a.now


def _minutes(a: AssociationFacts, d: DimseFacts | None) -> int | None:
    now = _now(a, d)
    return None if now is None else now.hour * 60 + now.minute


def _weekday(a: AssociationFacts, d: DimseFacts | None) -> int | None:
    now = _now(a, d)
    return None if now is None else now.weekday()


def _cert_attr(name: str) -> Callable[[AssociationFacts, DimseFacts | None], object]:
    def extract(a: AssociationFacts, _d: DimseFacts | None) -> object:
        return None if a.client_cert is None else getattr(a.client_cert, name)

    return extract


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PRIORITY_VALUES = {"medium": 0, "high": 1, "low": 2}  # PS3.7 C.4.1.1.3 (0000H, 0001H, 0002H)
IDENTITY_TYPES = {"username": 1, "username_passcode": 2, "kerberos": 3, "saml": 4, "jwt": 5}


def _show_weekday(value: object) -> str:
    return WEEKDAYS[value] if isinstance(value, int) and 0 <= value < 7 else str(value)


def _show_minutes(value: object) -> str:
    return f"{value // 60:02d}:{value % 60:02d}" if isinstance(value, int) else str(value)


def _show_priority(value: object) -> str:
    names = {v: k for k, v in PRIORITY_VALUES.items()}
    return names.get(value, str(value)) if isinstance(value, int) else str(value)


def _show_identity_type(value: object) -> str:
    names = {v: k for k, v in IDENTITY_TYPES.items()}
    return f"{value} ({names[value]})" if isinstance(value, int) and value in names else str(value)


def _move_to_caller(a: AssociationFacts, d: DimseFacts | None) -> object:
    """`move_destination: $calling_ae`: is the C-MOVE destination the requestor's own AE title?"""
    if d is None or d.move_destination is None:
        return None
    return d.move_destination.strip(" ") == a.calling_ae


def _show_move_to_caller(value: object) -> str:
    return "(the calling AE title)" if value else "(not the calling AE title)"


def _show_presence(value: object) -> str:
    return "present" if value else "absent"


def _fields() -> dict[str, FieldSpec]:
    specs = [
        FieldSpec("source", "association", False, lambda a, _d: _ipv4_if_mapped(a.source), "", str),
        FieldSpec("listener", "association", False, lambda a, _d: a.listener, "", _quote),
        FieldSpec("calling_ae", "association", False, lambda a, _d: a.calling_ae, "", _quote),
        FieldSpec("called_ae", "association", False, lambda a, _d: a.called_ae, "", _quote),
        FieldSpec("abstract_syntax", "association", True, lambda a, _d: a.abstract_syntaxes, "", str),
        FieldSpec("transfer_syntax", "association", True, lambda a, _d: a.transfer_syntaxes, "", str),
        FieldSpec("client_cert", "association", False, lambda a, _d: a.client_cert is not None, "", _show_presence),
        FieldSpec("client_cert.cn", "association", False, _cert_attr("subject_cn"),
                  "no verified client certificate, or one without a CN", _quote),
        FieldSpec("client_cert.san", "association", True, _cert_attr("sans"),
                  "no verified client certificate", _quote),
        FieldSpec("client_cert.issuer", "association", False, _cert_attr("issuer"),
                  "no verified client certificate", _quote),
        FieldSpec("client_cert.fingerprint", "association", False, _cert_attr("fingerprint_sha256"),
                  "no verified client certificate", str),
        FieldSpec("user_identity", "association", False, lambda a, _d: a.user_identity is not None, "",
                  _show_presence),
        FieldSpec("user_identity.type", "association", False,
                  lambda a, _d: None if a.user_identity is None else a.user_identity.type,
                  "the association carries no user identity", _show_identity_type),
        FieldSpec("user_identity.username", "association", False,
                  lambda a, _d: None if a.user_identity is None else a.user_identity.username,
                  "no user identity with a user name (types 1 and 2, or a verified subject)", _quote),
        FieldSpec("time.days", "association", False, _weekday, "no clock was given", _show_weekday),
        FieldSpec("time.hours", "association", False, _minutes, "no clock was given", _show_minutes),
        FieldSpec("command", "dimse", False, lambda _a, d: None if d is None else d.command, "", _quote),
        FieldSpec("affected_sop_class", "dimse", False, lambda _a, d: None if d is None else d.affected_sop_class,
                  "the request names no SOP class", str),
        FieldSpec("move_destination", "dimse", False, lambda _a, d: None if d is None else d.move_destination,
                  "the request has no move destination (only C-MOVE has one)", _quote),
        FieldSpec("move_destination.calling_ae", "dimse", False, _move_to_caller,
                  "the request has no move destination (only C-MOVE has one)", _show_move_to_caller,
                  label="move_destination"),
        FieldSpec("priority", "dimse", False, lambda _a, d: None if d is None else d.priority,
                  "the request has no priority", _show_priority),
    ]
    return {spec.name: spec for spec in specs}


FIELDS: Mapping[str, FieldSpec] = MappingProxyType(_fields())
"""Every testable field, in the order the engine evaluates them (cheap and selective first)."""


@dataclass(frozen=True, eq=False)
class Condition:
    """One field of a match: matches if the value is present, some positive pattern matches (or
    there are none), and no negated pattern matches. For list facts (proposed syntaxes, SANs) "a
    pattern matches" means "matches at least one element"."""

    field: str  # a FIELDS key
    positives: tuple[Pattern, ...]
    negatives: tuple[Pattern, ...]
    location: Location

    @property
    def spec(self) -> FieldSpec:
        return FIELDS[self.field]

    @property
    def text(self) -> str:
        items = [p.text for p in self.positives] + [f"!{p.text}" for p in self.negatives]
        return items[0] if len(items) == 1 else "[" + ", ".join(items) + "]"

    def test(self, value: object) -> bool:
        if value is None:
            return False
        values: Iterable[object] = value if self.spec.multi and isinstance(value, tuple) else (value,)
        values = tuple(values)
        if self.positives and not any(p.matches(v) for v in values for p in self.positives):
            return False
        return not any(n.matches(v) for v in values for n in self.negatives)


@dataclass(frozen=True, eq=False)
class Match:
    """The `match:` of a rule: every condition must hold (an empty match matches everything)."""

    conditions: tuple[Condition, ...] = ()
    fields: frozenset[str] = field(init=False)  # the fields the conditions test

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", frozenset(c.field for c in self.conditions))

    def get(self, name: str) -> Condition | None:
        return next((c for c in self.conditions if c.field == name), None)

    def uses(self, key: str) -> bool:
        """True if the match tests `key` or one of its sub-fields (client_cert -> client_cert.cn)."""
        return any(c.field == key or c.field.startswith(key + ".") for c in self.conditions)


@dataclass(frozen=True, eq=False)
class ContextFilter:
    """`contexts: {allow: [...], deny: [...]}` of an accept rule: which proposed abstract syntaxes
    the client may use. Allowed = matches some `allow` pattern (or there is no `allow`) and no
    `deny` pattern."""

    allow: tuple[Pattern, ...]
    deny: tuple[Pattern, ...]
    _allow: MatchTable | None = field(init=False, repr=False)
    _deny: MatchTable | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name, patterns in (("_allow", self.allow), ("_deny", self.deny)):
            table: MatchTable | None = None
            if patterns:
                table = MatchTable()
                for pattern in patterns:
                    table.add(pattern, 1)
                table.freeze()
            object.__setattr__(self, name, table)

    def allows(self, abstract_syntax: str) -> bool:
        if self._allow is not None and not self._allow.hits(abstract_syntax):
            return False
        return self._deny is None or not self._deny.hits(abstract_syntax)

    def allowed(self, proposed: Iterable[str]) -> frozenset[str]:
        return frozenset(uid for uid in proposed if self.allows(uid))

    @property
    def text(self) -> str:
        parts = []
        if self.allow:
            parts.append("allow " + ", ".join(p.text for p in self.allow))
        if self.deny:
            parts.append("deny " + ", ".join(p.text for p in self.deny))
        return "; ".join(parts)


@dataclass(frozen=True, eq=False)
class Rule:
    """One entry of `rules:`. `action` is accept/reject/drop for association rules and
    forward/refuse for DIMSE rules; the other fields apply to the action that names them."""

    name: str
    kind: RuleKind
    mode: RuleMode
    action: str
    match: Match
    location: Location  # where the rule's mapping starts
    source_line: str | None = field(default=None, repr=False)
    description: str = ""
    upstreams: tuple[str, ...] = ()
    identity: str | None = None
    rewrite_called_ae: str | None = None
    rewrite_calling_ae: str | None = None
    contexts: ContextFilter | None = None
    context_rejection: int = 1
    reject: tuple[int, int, int] | None = None  # always set for action reject (defaults filled in)
    status: int = 0x0124  # for action refuse

    @property
    def where(self) -> str:
        """`path:line`, for logs and decisions."""
        return f"{self.location.path}:{self.location.line}"

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"


@dataclass(frozen=True)
class DefaultAction:
    """`default:` of the rule files: what happens to an association no enforcing rule matched."""

    action: AssociationAction
    reject: tuple[int, int, int] | None  # set when action == "reject"
    location: Location


@dataclass(frozen=True)
class Ref:
    """A name a rule uses that only proxy.yaml can resolve (an upstream, identity profile or
    listener), kept with its place for check_references()."""

    kind: Literal["upstream", "identity", "listener"]
    name: str
    rule: str
    location: Location
    source_line: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RuleWarning:
    """A problem that does not stop the rules from loading; str() is `path:line:col: warning: ...`."""

    message: str
    location: Location
    source_line: str | None = field(default=None, repr=False, compare=False)

    def render(self, with_caret: bool = False) -> str:
        head = f"{self.location}: warning: {self.message}"
        if with_caret and self.source_line is not None:
            caret = " " * (self.location.col - 1) + "^"
            return f"{head}\n    {self.source_line}\n    {caret}"
        return head

    def __str__(self) -> str:
        return self.render()


@dataclass(frozen=True, eq=False)
class RuleSet:
    """Every rule of every rule file, in order, with the default; immutable, so a reload swaps it
    in one assignment. Build it with proxy.policy.loader.load_rules()."""

    rules: tuple[Rule, ...]
    default: DefaultAction
    sets: Mapping[str, NamedSet] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[str, ...] = ()
    refs: tuple[Ref, ...] = ()
    _compiled: CompiledRules = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from proxy.policy.engine import CompiledRules  # engine imports this module

        object.__setattr__(self, "_compiled", CompiledRules(self))

    def evaluate(self, facts: AssociationFacts) -> Decision:
        """The association decision: the first enforcing association rule that matches, else the
        default. Shadow-mode rules that matched before it are listed in `shadow_matches`."""
        return self._compiled.evaluate(facts)

    def evaluate_dimse(self, assoc: AssociationFacts, dimse: DimseFacts) -> DimseDecision:
        """The decision for one DIMSE request: the first enforcing `on: dimse` rule that matches,
        else forward. C-CANCEL is always forwarded (there is nothing to answer it with)."""
        return self._compiled.evaluate_dimse(assoc, dimse)

    @property
    def association_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.kind == "association")

    @property
    def dimse_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.kind == "dimse")

    @property
    def has_dimse_rules(self) -> bool:
        """False: the relay can skip reassembling DIMSE commands for rules."""
        return any(r.kind == "dimse" for r in self.rules)

    @property
    def rule_names(self) -> tuple[str, ...]:
        """Every value Decision.rule / DimseDecision.rule can take: the rule names in file order,
        then "default". For initialising metric label values."""
        return (*(r.name for r in self.rules), "default")

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)
