"""Rule files -> RuleSet, strictly: every mistake is reported as `path:line:col: error: ...`.

Schema (version 1; rules/site.yaml is a commented example, rules/README.md the reference):

    version: 1                       # required in every file
    default: reject                  # accept | reject | drop, or {action: reject, reject: {result, source, reason}}
    sets:                            # named typed sets, referenced as "@name"
      NAME: {type: ae_title | cidr | uid | command, elements: [...]}
    rules:                           # first enforcing match wins, in file order
      - name: NAME                   # required, unique over all files; the label in logs and metrics
        description: free text
        on: association | dimse      # default association
        mode: enforce | shadow       # default enforce
        match: {KEY: VALUE, ...}     # keys ANDed; a VALUE is one item or a list of items (ORed)
        action: accept | reject | drop          (on: association)
                forward | refuse                (on: dimse)
        upstream: NAME | [NAME, ...]            accept: upstreams in priority order
        identity: NAME                          accept: identity profile
        rewrite: {called_ae: AE, calling_ae: AE}   accept
        contexts: {allow: [...], deny: [...]}   accept: presentation-context filter
        context_rejection: user-rejection | abstract-syntax-not-supported
        reject: {result: 1|2, source: 1|2|3, reason: N}   reject: explicit A-ASSOCIATE-RJ codes
        status: 0xA801                          refuse: the failure Status of the response

Several files (`rules: [rules/site.yaml, "rules/site.d/*.yaml"]` in proxy.yaml) form one rule set:
their rules are concatenated in file order, sets share one name space (any file may use a set
defined in any other), rule names are unique across all files, and `default` is required in the
first file and may be repeated in later ones only with the same value, so a drop-in file can
never silently change what happens to unmatched associations.

Values: an item prefixed with `!` is negated; `@name` is a set. A value list matches when the
fact is present, any positive item matches (or there is none), and no negated item matches.
AE titles are matched case-sensitively (PS3.5: AE is case-sensitive) as shell-style globs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Hashable, Sequence
from pathlib import Path
from typing import Literal

import yaml

from proxy import yamlsrc
from proxy.errors import ConfigError, ConfigErrors, Location
from proxy.policy.engine import MOVE_DESTINATION_REFUSE_STATUS, shadowed_rules
from proxy.policy.groups import COMMAND_GROUPS, COMMANDS, GROUPS
from proxy.policy.model import (
    IDENTITY_TYPES,
    PRIORITY_VALUES,
    WEEKDAYS,
    AssociationAction,
    Condition,
    ContextFilter,
    DefaultAction,
    Finite,
    Glob,
    GroupRef,
    Match,
    NamedSet,
    Network,
    Pattern,
    Ref,
    Rule,
    RuleKind,
    RuleMode,
    RuleSet,
    RuleWarning,
    SetRef,
    SetType,
    UidPrefix,
)
from proxy.yamlsrc import Collector, MapNode, Node, ScalarNode, SeqNode, describe

__all__ = [
    "RULES_VERSION",
    "check_references",
    "compile_glob",
    "expand_rule_path",
    "load_rules",
    "load_rules_text",
]

RULES_VERSION = 1

TOP_KEYS = ("version", "default", "sets", "rules")
SET_KEYS = ("type", "elements")
SET_TYPES: tuple[SetType, ...] = ("ae_title", "cidr", "uid", "command")
RULE_KEYS = (
    "name",
    "description",
    "on",
    "mode",
    "match",
    "action",
    "upstream",
    "identity",
    "rewrite",
    "contexts",
    "context_rejection",
    "reject",
    "status",
)
ASSOCIATION_KEYS = (
    "source",
    "listener",
    "calling_ae",
    "called_ae",
    "client_cert",
    "abstract_syntax",
    "transfer_syntax",
    "user_identity",
    "time",
)
DIMSE_KEYS = ("command", "affected_sop_class", "move_destination", "priority")
CLIENT_CERT_KEYS = ("cn", "san", "issuer", "fingerprint")
USER_IDENTITY_KEYS = ("type", "username")
TIME_KEYS = ("days", "hours")
REWRITE_KEYS = ("called_ae", "calling_ae")
CONTEXTS_KEYS = ("allow", "deny")
REJECT_KEYS = ("result", "source", "reason")
DEFAULT_KEYS = ("action", "reject")
ASSOCIATION_ACTIONS: tuple[AssociationAction, ...] = ("accept", "reject", "drop")
DIMSE_ACTIONS = ("forward", "refuse")
ACCEPT_OPTIONS = ("upstream", "identity", "rewrite", "contexts", "context_rejection")
CONTEXT_REJECTIONS = {"user-rejection": 1, "abstract-syntax-not-supported": 3}

REJECT_REASONS: dict[int, dict[int, str]] = {
    # PS3.8 9.3.4 (standards.md 3.1): the reasons each source may give
    1: {1: "no-reason-given", 2: "application-context-name-not-supported", 3: "calling-AE-title-not-recognized",
        7: "called-AE-title-not-recognized"},
    2: {1: "no-reason-given", 2: "protocol-version-not-supported"},
    3: {1: "temporary-congestion", 2: "local-limit-exceeded"},
}
REJECT_SOURCES = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}

AE_TITLE_LENGTH = 16  # PS3.5 Table 6.2-1, VR AE
UID_LENGTH = 64  # PS3.5 9.1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Rule, set and listener names end up in logs and metric labels."""
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_UID_CHARS = re.compile(r"[0-9.]+")
_HOURS = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_HEX = re.compile(r"[0-9a-f]{64}")
_GLOB_CHARS = frozenset("*?[")
_GLOB_RE = re.compile(r"[*?\[]")
_AE_LITERAL = re.compile(r"(?![!@])[\x20-\x29\x2b-\x3e\x40-\x5a\x5d-\x7e]{1,16}")
"""A plain AE title: printable ASCII, no backslash, no glob character, not read as `!` or `@`."""
_AE_SUSPECT = re.compile(r"[^\x20-\x5b\x5d-\x7e]")
"""Anything but printable ASCII without the backslash (PS3.5 VR AE)."""
CALLING_AE_TOKEN = "$calling_ae"
"""`move_destination: $calling_ae`: the C-MOVE destination is the requestor's own AE title."""

# Which set type each key takes, and how its items are read.
_ITEM_KIND = {
    "calling_ae": "ae",
    "called_ae": "ae",
    "move_destination": "ae",
    "source": "cidr",
    "abstract_syntax": "abstract",
    "affected_sop_class": "abstract",
    "transfer_syntax": "transfer",
    "command": "command",
    "listener": "listener",
    "priority": "priority",
    "client_cert.cn": "text",
    "client_cert.san": "text",
    "client_cert.issuer": "text",
    "client_cert.fingerprint": "fingerprint",
    "user_identity.type": "identity-type",
    "user_identity.username": "text",
    "time.days": "days",
    "time.hours": "hours",
}
_SET_TYPE_OF_KIND: dict[str, SetType] = {
    "ae": "ae_title",
    "cidr": "cidr",
    "abstract": "uid",
    "transfer": "uid",
    "command": "command",
}
_KIND_OF_SET_TYPE = {"ae_title": "ae", "cidr": "cidr", "uid": "abstract", "command": "command"}


# --------------------------------------------------------------------------- values


def compile_glob(text: str) -> Finite | Glob:
    """A shell-style pattern, case-sensitive: `*`, `?`, `[abc]`, `[a-z]`, `[!0-9]` (or `[^0-9]`).
    Without wildcards it is a literal (Finite). ValueError for an unclosed `[` or a bad range."""
    if _GLOB_RE.search(text) is None:
        return Finite(text, frozenset({text}))
    parts: list[str] = []
    prefix: list[str] = []
    literal = True  # still in the literal prefix
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "*":
            parts.append(".*")
            literal = False
        elif ch == "?":
            parts.append(".")
            literal = False
        elif ch == "[":
            j = i + 1
            if j < n and text[j] in "!^":
                j += 1
            if j < n and text[j] == "]":
                j += 1
            while j < n and text[j] != "]":
                j += 1
            if j >= n:
                raise ValueError(f"unclosed '[' in pattern {text!r} (write '[[]' for a literal '[')")
            body = text[i + 1 : j]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            for k in range(1, len(body) - 1):
                if body[k] == "-" and body[k - 1] > body[k + 1]:
                    raise ValueError(f"bad range '{body[k - 1:k + 2]}' in pattern {text!r} (write it low to high)")
            chars = [
                "-" if ch2 == "-" and 0 < k < len(body) - 1 else re.escape(ch2) for k, ch2 in enumerate(body)
            ]
            parts.append("[" + ("^" if negate else "") + "".join(chars) + "]")
            literal = False
            i = j
        else:
            parts.append(re.escape(ch))
            if literal:
                prefix.append(ch)
        i += 1
    regex = "".join(parts)
    literal_prefix = "".join(prefix)
    prefix_only = text == literal_prefix + "*"
    return Glob(text, regex, literal_prefix, prefix_only)


def _glob_min_length(text: str) -> int:
    """How many characters a value matching the glob has at least."""
    count, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "[":
            j = i + 1
            if j < n and text[j] in "!^":
                j += 1
            if j < n and text[j] == "]":
                j += 1
            while j < n and text[j] != "]":
                j += 1
            i = j
            count += 1
        elif ch != "*":
            count += 1
        i += 1
    return count


def _ae_pattern(text: str) -> Pattern:
    body = text.strip(" ")
    if not body:
        raise ValueError("an AE title must not be empty or all spaces")
    if _AE_SUSPECT.search(body):
        if any(ord(ch) > 126 for ch in body):
            raise ValueError(f"AE title {body!r} must be ASCII")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in body):
            raise ValueError(f"AE title {body!r} must not contain control characters")
        raise ValueError(f"AE title {body!r} must not contain a backslash")
    pattern = compile_glob(body)
    if isinstance(pattern, Finite):
        if len(body) > AE_TITLE_LENGTH:
            raise ValueError(f"AE title {body!r} is longer than {AE_TITLE_LENGTH} characters")
    else:
        need = _glob_min_length(body)
        if need > AE_TITLE_LENGTH:
            raise ValueError(f"AE title pattern {body!r} can never match: it needs at least {need} characters "
                             f"and AE titles have at most {AE_TITLE_LENGTH}")
    return pattern


def _text_pattern(text: str) -> Pattern:
    if not text.strip():
        raise ValueError("the value must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError(f"{text!r} must not contain control characters")
    return compile_glob(text)


def _network(text: str) -> Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or CIDR network "
                             "(e.g. 10.20.0.0/16, 192.0.2.7, 2001:db8::/32)") from None
        raise ValueError(f"{text!r} has host bits set: did you mean {loose}?") from None
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")):
        raise ValueError(f"{text!r} is an IPv4-mapped IPv6 network: write it as IPv4 "
                         "(clients on dual-stack listeners are matched by their IPv4 address)")
    return Network(text, net)


def _uid(text: str) -> str:
    if not _UID_CHARS.fullmatch(text):
        raise ValueError(f"{text!r} is not a UID (digits and dots, e.g. 1.2.840.10008.1.1)")
    if len(text) > UID_LENGTH:
        raise ValueError(f"UID {text!r} is longer than {UID_LENGTH} characters")
    if not _UID.fullmatch(text):
        bad = next((c for c in text.split(".") if not c or (len(c) > 1 and c.startswith("0"))), "")
        if not bad:
            raise ValueError(f"UID {text!r} has an empty component")
        raise ValueError(f"UID {text!r} has a component with a leading zero ({bad!r})")
    return text


def _uid_pattern(text: str, *, groups: bool) -> Pattern:
    if text[:1].isdigit():
        if text.endswith(".*"):
            root = _uid(text[:-2])
            return UidPrefix(text, root + ".")
        if "*" in text or "?" in text:
            raise ValueError(f"{text!r}: only a whole-component prefix such as '1.2.826.0.1.3680043.*' may use '*'")
        uid = _uid(text)
        return Finite(uid, frozenset({uid}))
    if not groups:
        raise ValueError(f"{text!r} is not a transfer syntax UID (digits and dots, e.g. 1.2.840.10008.1.2.1)")
    group = GROUPS.get(text)
    if group is None:
        names = ", ".join(GROUPS)
        raise ValueError(f"unknown abstract syntax group {text!r} (groups: {names}; or write a UID)")
    return GroupRef(group)


def _command(text: str) -> Finite:
    if text in COMMANDS:
        return Finite(text, frozenset({text}))
    if text in COMMAND_GROUPS:
        return Finite(text, frozenset(COMMAND_GROUPS[text]))
    if text.upper() == "C-CANCEL":
        raise ValueError("C-CANCEL cannot be matched: it is always forwarded (it has no response to refuse it with)")
    if text.upper() in COMMANDS:
        raise ValueError(f"unknown command {text!r}: command names are upper case, e.g. {text.upper()!r}")
    expected = ", ".join([*COMMANDS, *COMMAND_GROUPS])
    raise ValueError(f"unknown command {text!r} (expected one of: {expected})")


def _days(text: str) -> Finite:
    start, sep, end = text.partition("-")
    for day in (start, end) if sep else (start,):
        if day not in WEEKDAYS:
            raise ValueError(f"unknown weekday {day!r} in {text!r} (expected {', '.join(WEEKDAYS)}, "
                             "or a range such as mon-fri)")
    first = WEEKDAYS.index(start)
    last = WEEKDAYS.index(end) if sep else first
    days = {(first + k) % 7 for k in range((last - first) % 7 + 1)}
    return Finite(text, frozenset(days))


def _hours(text: str) -> Finite:
    m = _HOURS.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not an hour range: write HH:MM-HH:MM, e.g. 07:00-19:00 "
                         "(a range may cross midnight: 22:00-06:00)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise ValueError(f"{text!r}: times run from 00:00 to 23:59 (24:00 is allowed as the end)")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % 1440:
        raise ValueError(f"{text!r} is empty or ambiguous: write 00:00-24:00 for the whole day")
    minutes = range(start, end) if start < end else [*range(start, 1440), *range(0, end)]
    return Finite(text, frozenset(minutes))


def _fingerprint(text: str) -> Finite:
    digits = text.replace(":", "").strip().lower()
    if not _HEX.fullmatch(digits):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hexadecimal digits, colons allowed)")
    return Finite(text, frozenset({digits}))


def _listener(text: str) -> Finite:
    if not _NAME.fullmatch(text):
        raise ValueError(f"listener name {text!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return Finite(text, frozenset({text}))


def _priority(text: str) -> Finite:
    if text not in PRIORITY_VALUES:
        raise ValueError(f"unknown priority {text!r} (expected low, medium or high)")
    return Finite(text, frozenset({PRIORITY_VALUES[text]}))


def _identity_type(text: str) -> Finite:
    if text in IDENTITY_TYPES:
        return Finite(text, frozenset({IDENTITY_TYPES[text]}))
    if text.isdigit() and 1 <= int(text) <= 5:
        return Finite(text, frozenset({int(text)}))
    raise ValueError(f"unknown user identity type {text!r} (expected {', '.join(IDENTITY_TYPES)} or 1-5)")


def _parse_value(kind: str, text: str) -> Pattern:
    """One item, without `!` or `@`, of a value of the given kind; ValueError in admin words."""
    if kind == "ae":
        return _ae_pattern(text)
    if kind == "cidr":
        return _network(text)
    if kind == "abstract":
        return _uid_pattern(text, groups=True)
    if kind == "transfer":
        return _uid_pattern(text, groups=False)
    if kind == "command":
        return _command(text)
    if kind == "listener":
        return _listener(text)
    if kind == "priority":
        return _priority(text)
    if kind == "text":
        return _text_pattern(text)
    if kind == "fingerprint":
        return _fingerprint(text)
    if kind == "identity-type":
        return _identity_type(text)
    if kind == "days":
        return _days(text)
    if kind == "hours":
        return _hours(text)
    raise AssertionError(kind)  # pragma: no cover - the tables above name every kind


# --------------------------------------------------------------------------- files


def expand_rule_path(pattern: str, *, base_dir: Path) -> list[Path]:
    """One `rules:` entry of proxy.yaml -> files. A glob (`*`, `?`, `[`) may match nothing and
    its matches come sorted; a plain path must exist. Relative to base_dir. ValueError if not."""
    path = Path(pattern).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if any(ch in pattern for ch in _GLOB_CHARS):
        anchor = Path(path.anchor)
        relative = str(path.relative_to(anchor))
        return sorted((p for p in anchor.glob(relative) if p.is_file()), key=str)
    if path.is_dir():
        raise ValueError(f"rule file {pattern!r} is a folder (to load the files in it, write '{pattern}/*.yaml')")
    if not path.is_file():
        raise ValueError(f"rule file {pattern!r} not found ({path})")
    return [path]


def _display(path: Path, base_dir: Path, display_dir: Path | None) -> str:
    try:
        relative = path.relative_to(base_dir)
    except ValueError:
        return str(path)
    return str(relative if display_dir is None else display_dir / relative)


def load_rules(
    paths: Sequence[Path], *, base_dir: Path, display_dir: Path | None = None
) -> tuple[RuleSet, list[RuleWarning]]:
    """Read rule files (in this order) into one RuleSet, plus the warnings found.

    Messages name a file under base_dir (the folder of proxy.yaml) by its path relative to
    base_dir, prefixed with display_dir when given (proxy.config passes the folder of proxy.yaml
    as the admin named it, so that `-c /etc/dicom-proxy/proxy.yaml` reports
    /etc/dicom-proxy/rules/site.yaml:9:15). Errors are raised together as ConfigErrors. A file
    listed twice is read once, at its first place.
    """
    sources: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        display = _display(path, base_dir, display_dir)
        sources.append((display, yamlsrc.read_text(path, display)))
    return load_rules_text(sources)


def load_rules_text(sources: Sequence[tuple[str, str]]) -> tuple[RuleSet, list[RuleWarning]]:
    """Like load_rules() for (display path, text) pairs already in memory."""
    if not sources:
        raise ConfigErrors([ConfigError("no rule files to load")])
    return _Loader().run(sources)


def _parse(text: str, path: str, errors: list[ConfigError]) -> Node | None:
    """yamlsrc.parse, with libyaml composing the document when it is available.

    The pure-Python composer needs about 1 s for 30,000 set elements; libyaml ten times less.
    The located nodes are then built by the same yamlsrc builder (duplicate keys, merge keys and
    tags are checked the same way). On any syntax problem the pure parser runs instead, so the
    message is the one yamlsrc gives everywhere else.
    """
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is None:
        return yamlsrc.parse(text, path, errors)
    loader = fast(text)
    try:
        composed = loader.get_single_node()
    except (yaml.YAMLError, RecursionError):
        return yamlsrc.parse(text, path, errors)
    finally:
        loader.dispose()
    if composed is None:
        return None
    try:
        return _FastBuilder(yamlsrc.Source.from_text(text, path), errors).build(composed)
    except RecursionError:
        return yamlsrc.parse(text, path, errors)


_STR_TAG = "tag:yaml.org,2002:str"


class _FastBuilder(yamlsrc._Builder):
    """yamlsrc's builder for a libyaml-composed tree. libyaml marks plain scalars with style ''
    where PyYAML uses None (yamlsrc reads None as "not quoted"). String scalars, most of a large
    set, take a shortcut: their value is their text, as SafeConstructor would return it."""

    def build(self, node: yaml.Node) -> Node:
        # A string scalar contains nothing, so it needs none of the alias bookkeeping either.
        if node.tag == _STR_TAG and isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        return super().build(node)

    def scalar(self, node: yaml.ScalarNode) -> ScalarNode:
        if node.style == "":
            node.style = None
        if node.tag == _STR_TAG:
            mark = node.start_mark
            loc = Location(self.src.path, mark.line + 1, mark.column + 1)
            return ScalarNode(loc, self.src, node.value, node.tag, node.value, node.style is not None)
        return super().scalar(node)


# --------------------------------------------------------------------------- the loader


class _Loader:
    def __init__(self) -> None:
        self.c = Collector()
        self.sets: dict[str, NamedSet] = {}
        self.set_keys: dict[str, ScalarNode] = {}
        self.used_sets: set[str] = set()
        self.rules: list[Rule] = []
        self.rule_names: dict[str, Location] = {}
        self.refs: list[Ref] = []
        self.default: DefaultAction | None = None
        self.default_node: Node | None = None
        self.current_rule = ""  # for located references found while reading a rule

    # Files ------------------------------------------------------------------------------

    def run(self, sources: Sequence[tuple[str, str]]) -> tuple[RuleSet, list[RuleWarning]]:
        c = self.c
        tops: list[MapNode] = []
        for index, (display, text) in enumerate(sources):
            root = _parse(text, display, c.errors)
            if root is None:
                if not any(e.location is not None and e.location.path == display for e in c.errors):
                    c.errors.append(ConfigError("the rule file is empty", Location(display, 1, 1)))
                continue
            top = c.mapping(root, "a rule file")
            if top is None:
                continue
            c.keys(top, "a rule file", required=("version",), optional=TOP_KEYS[1:])
            version = top.get("version")
            if version is not None:
                number = c.integer(version, "'version'")
                if number is not None and number != RULES_VERSION:
                    c.add(version, f"unsupported rule file version {number} (this proxy reads version {RULES_VERSION})")
            self.file_default(top, first=index == 0)
            tops.append(top)
        for top in tops:
            node = top.get("sets")
            if node is not None:
                self.named_sets(node)
        for top in tops:
            node = top.get("rules")
            if node is not None:
                self.rule_list(node)
        c.raise_if_any()
        assert self.default is not None  # the first file has one, or an error was raised
        ruleset = RuleSet(
            rules=tuple(self.rules),
            default=self.default,
            sets=dict(self.sets),
            files=tuple(display for display, _ in sources),
            refs=tuple(self.refs),
        )
        return ruleset, self.warnings(ruleset)

    def file_default(self, top: MapNode, *, first: bool) -> None:
        node = top.get("default")
        if node is None:
            if first:
                self.c.add(top, "missing required key 'default' in the first rule file "
                                "(what happens when no rule matches: accept, reject or drop)")
            return
        parsed = self.default_action(node)
        if parsed is None:
            return
        if first:
            self.default = parsed
            self.default_node = node
        elif self.default is not None and (parsed.action, parsed.reject) != (self.default.action, self.default.reject):
            first_loc = self.default.location
            self.c.add(node, f"'default' differs from the one in {first_loc.path} at line {first_loc.line}: "
                             "only the first rule file sets the default (remove this one or make it the same)")

    def default_action(self, node: Node) -> DefaultAction | None:
        c = self.c
        if isinstance(node, MapNode):
            c.keys(node, "'default'", required=("action",), optional=("reject",))
            action_node, reject_node = node.get("action"), node.get("reject")
            action = self.choice(action_node, "the default action", ASSOCIATION_ACTIONS) if action_node else None
            if action is None:
                return None
            codes: tuple[int, int, int] | None = (1, 1, 1) if action == "reject" else None
            if reject_node is not None:
                if action != "reject":
                    key = node.key_node("reject")
                    c.add(key or reject_node, "'reject' codes only apply when the default action is 'reject'")
                    return None
                codes = self.reject_codes(reject_node)
                if codes is None:
                    return None
            return DefaultAction(_association_action(action), codes, node.loc)
        action = self.choice(node, "'default'", ASSOCIATION_ACTIONS)
        if action is None:
            return None
        return DefaultAction(_association_action(action), (1, 1, 1) if action == "reject" else None, node.loc)

    # Sets -------------------------------------------------------------------------------

    def named_sets(self, node: Node) -> None:
        c = self.c
        m = c.mapping(node, "'sets'")
        if m is None:
            return
        if not m.entries:
            c.add(m, "'sets' must not be empty (remove the key)")
            return
        for key, value in m:
            name = self.name(key, "set")
            if name is None:
                continue
            if name in self.set_keys:
                first = self.set_keys[name].loc
                c.add(key, f"set {name!r} is already defined in {first.path} at line {first.line}")
                continue
            self.set_keys[name] = key
            named = self.named_set(name, key, value)
            if named is not None:
                self.sets[name] = named

    def named_set(self, name: str, key: ScalarNode, node: Node) -> NamedSet | None:
        c = self.c
        what = f"set {name!r}"
        m = c.mapping(node, what)
        if m is None:
            return None
        c.keys(m, what, required=SET_KEYS)
        type_node, elements_node = m.get("type"), m.get("elements")
        set_type = self.choice(type_node, f"the type of {what}", SET_TYPES) if type_node is not None else None
        if set_type is None or elements_node is None:
            return None
        seq = c.sequence(elements_node, f"the elements of {what}")
        if seq is None:
            return None
        kind = _KIND_OF_SET_TYPE[set_type]
        members: list[Pattern] = []
        literals: set[Hashable] = set()
        ok = True
        for item in seq:
            if kind == "ae" and isinstance(item, ScalarNode) and type(item.value) is str:
                plain = item.value.strip(" ")
                if _AE_LITERAL.fullmatch(plain):  # the common case of a large set, without the detours
                    literals.add(plain)
                    continue
            text = self.item_text(item, f"an element of {what}")
            if text is None:
                ok = False
                continue
            if text.startswith("!"):
                c.add(item, f"'!' is not allowed inside a set; negate the reference instead: '!@{name}'")
                ok = False
                continue
            if text.startswith("@"):
                c.add(item, "a set cannot contain another set; list the elements")
                ok = False
                continue
            try:
                pattern = _parse_value(kind, text)
            except ValueError as exc:
                c.add(item, str(exc))
                ok = False
                continue
            if isinstance(pattern, Finite):
                literals |= pattern.values
            else:
                members.append(pattern)
        if not ok:
            return None
        if literals:  # one member for every literal value: the same set, indexed and compared faster
            members.insert(0, Finite(f"{len(literals)} value(s) of @{name}", frozenset(literals)))
        set_type_literal: SetType = set_type  # type: ignore[assignment]  # one of SET_TYPES, checked above
        return NamedSet(name, set_type_literal, tuple(members), key.loc, key.src.line(key.loc.line))

    # Rules ------------------------------------------------------------------------------

    def rule_list(self, node: Node) -> None:
        seq = self.c.sequence(node, "'rules'")
        if seq is None:
            return
        for item in seq:
            rule = self.rule(item)
            if rule is not None:
                self.rules.append(rule)

    def rule(self, node: Node) -> Rule | None:
        c = self.c
        m = c.mapping(node, "a rule")
        if m is None:
            return None
        m = _on_as_string(m)
        c.keys(m, "a rule", required=("name", "action"), optional=[k for k in RULE_KEYS if k not in ("name", "action")])
        ok = True
        name_node = m.get("name")
        name = self.name(name_node, "rule") if name_node is not None else None
        if name is not None:
            if name == "default":
                c.add(name_node or m, "the rule name 'default' is reserved for the default decision")
                name = None
            elif name in self.rule_names:
                first = self.rule_names[name]
                c.add(name_node or m, f"duplicate rule name {name!r} (first used in {first.path} at line {first.line})")
                name = None
            else:
                self.rule_names[name] = m.loc
        ok = name is not None
        what = f"rule {name!r}" if name else "this rule"
        self.current_rule = name or ""

        kind: RuleKind = "association"
        on_node = m.get("on")
        if on_node is not None:
            on = self.choice(on_node, f"'on' of {what}", ("association", "dimse"))
            if on is None:
                return None  # without knowing the kind, the rest would only produce noise
            kind = "dimse" if on == "dimse" else "association"
        mode: RuleMode = "enforce"
        mode_node = m.get("mode")
        if mode_node is not None:
            mode_text = self.choice(mode_node, f"'mode' of {what}", ("enforce", "shadow"))
            ok = ok and mode_text is not None
            mode = "shadow" if mode_text == "shadow" else "enforce"
        description = ""
        desc_node = m.get("description")
        if desc_node is not None:
            description = c.string(desc_node, f"'description' of {what}", nonempty=False) or ""

        action = self.action(m.get("action"), kind, what)
        ok = ok and action is not None

        match = Match()
        match_node = m.get("match")
        if match_node is not None:
            parsed = self.match(match_node, kind, what)
            ok = ok and parsed is not None
            match = parsed or match

        # Options of one action: refuse them elsewhere, with a message that says where they belong.
        for option in (*ACCEPT_OPTIONS, "reject", "status"):
            key = m.key_node(option)
            if key is None:
                continue
            needs = "accept" if option in ACCEPT_OPTIONS else ("reject" if option == "reject" else "refuse")
            if option in ACCEPT_OPTIONS and kind == "dimse":
                c.add(key, f"'{option}' only applies to association rules (this rule has 'on: dimse')")
                ok = False
            elif option == "reject" and kind == "dimse":
                c.add(key, "'reject' only applies to association rules; a DIMSE rule refuses with 'status'")
                ok = False
            elif option == "status" and kind == "association":
                c.add(key, "'status' only applies to DIMSE rules ('on: dimse', action 'refuse')")
                ok = False
            elif action is not None and action != needs:
                c.add(key, f"'{option}' only applies to action '{needs}', not {action!r}")
                ok = False

        upstreams: tuple[str, ...] = ()
        if (node2 := m.get("upstream")) is not None and name:
            upstreams = self.upstreams(node2, name) or ()
        identity = None
        if (node2 := m.get("identity")) is not None and name:
            identity = self.ref_name(node2, "identity", name, f"'identity' of {what}")
            ok = ok and identity is not None
        rewrite: dict[str, str] = {}
        if (node2 := m.get("rewrite")) is not None:
            parsed_rewrite = self.rewrite(node2, what)
            ok = ok and parsed_rewrite is not None
            rewrite = parsed_rewrite or {}
        contexts = None
        if (node2 := m.get("contexts")) is not None:
            contexts = self.contexts(node2, what)
            ok = ok and contexts is not None
        context_rejection = 1
        if (node2 := m.get("context_rejection")) is not None:
            text = self.choice(node2, f"'context_rejection' of {what}", tuple(CONTEXT_REJECTIONS))
            ok = ok and text is not None
            if text is not None:
                context_rejection = CONTEXT_REJECTIONS[text]
            if "contexts" not in m:
                key = m.key_node("context_rejection")
                c.add(key or node2, "'context_rejection' has no effect without 'contexts'")
                ok = False

        reject_codes: tuple[int, int, int] | None = None
        if action == "reject":
            if (node2 := m.get("reject")) is not None:
                reject_codes = self.reject_codes(node2)
                ok = ok and reject_codes is not None
            elif match.uses("calling_ae"):
                reject_codes = (1, 1, 3)  # calling-AE-title-not-recognized
            elif match.uses("called_ae"):
                reject_codes = (1, 1, 7)  # called-AE-title-not-recognized
            else:
                reject_codes = (1, 1, 1)  # no-reason-given (source address, time, ...)
        status = MOVE_DESTINATION_REFUSE_STATUS if match.uses("move_destination") else 0x0124
        if (node2 := m.get("status")) is not None:
            parsed_status = self.status(node2, what)
            ok = ok and parsed_status is not None
            status = parsed_status or status

        if not ok or name is None or action is None:
            return None
        return Rule(
            name=name,
            kind=kind,
            mode=mode,
            action=action,
            match=match,
            location=m.loc,
            source_line=m.src.line(m.loc.line),
            description=description,
            upstreams=upstreams,
            identity=identity,
            rewrite_called_ae=rewrite.get("called_ae"),
            rewrite_calling_ae=rewrite.get("calling_ae"),
            contexts=contexts,
            context_rejection=context_rejection,
            reject=reject_codes,
            status=status,
        )

    def action(self, node: Node | None, kind: RuleKind, what: str) -> str | None:
        if node is None:
            return None  # reported as a missing key
        text = self.c.string(node, f"the action of {what}")
        if text is None:
            return None
        own: Sequence[str] = ASSOCIATION_ACTIONS if kind == "association" else DIMSE_ACTIONS
        other: Sequence[str] = DIMSE_ACTIONS if kind == "association" else ASSOCIATION_ACTIONS
        if text in own:
            return text
        if text in other:
            if kind == "association":
                self.c.add(node, f"action {text!r} is for DIMSE rules: add 'on: dimse' to {what}")
            else:
                self.c.add(node, f"action {text!r} is for association rules; a DIMSE rule can only "
                                 "'forward' or 'refuse'")
            return None
        expected = ", ".join(repr(a) for a in own)
        self.c.add(node, f"unknown action {text!r} in {what} (expected one of: {expected})")
        return None

    def upstreams(self, node: Node, rule: str) -> tuple[str, ...] | None:
        items = self.value_items(node, f"'upstream' of rule {rule!r}")
        if items is None:
            return None
        names: list[str] = []
        for item, text in items:
            if text in names:
                self.c.add(item, f"upstream {text!r} is listed twice")
                return None
            name = self.ref_name(item, "upstream", rule, f"'upstream' of rule {rule!r}")
            if name is None:
                return None
            names.append(name)
        return tuple(names)

    def ref_name(self, node: Node, kind: Literal["upstream", "identity"], rule: str, what: str) -> str | None:
        name = self.c.string(node, what)
        if name is None:
            return None
        if not _NAME.fullmatch(name):
            self.c.add(node, f"{kind} name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
            return None
        self.refs.append(Ref(kind, name, rule, node.loc, node.src.line(node.loc.line)))
        return name

    def rewrite(self, node: Node, what: str) -> dict[str, str] | None:
        c = self.c
        m = c.mapping(node, f"'rewrite' of {what}")
        if m is None:
            return None
        c.keys(m, f"'rewrite' of {what}", optional=REWRITE_KEYS)
        if not m.entries:
            c.add(m, f"'rewrite' of {what} must not be empty")
            return None
        out: dict[str, str] = {}
        ok = True
        for key, value in m:
            if key.value not in REWRITE_KEYS:
                ok = False
                continue
            text = self.item_text(value, f"the {key.value} rewrite")
            if text is None:
                ok = False
                continue
            try:
                pattern = _ae_pattern(text)
            except ValueError as exc:
                c.add(value, str(exc))
                ok = False
                continue
            if not isinstance(pattern, Finite):
                c.add(value, f"a rewrite needs a plain AE title, not the pattern {text!r}")
                ok = False
                continue
            out[str(key.value)] = text.strip(" ")
        return out if ok else None

    def contexts(self, node: Node, what: str) -> ContextFilter | None:
        c = self.c
        m = c.mapping(node, f"'contexts' of {what}")
        if m is None:
            return None
        c.keys(m, f"'contexts' of {what}", optional=CONTEXTS_KEYS)
        if not m.entries:
            c.add(m, f"'contexts' of {what} needs 'allow' or 'deny'")
            return None
        lists: dict[str, tuple[Pattern, ...]] = {"allow": (), "deny": ()}
        ok = True
        for key, value in m:
            if key.value not in CONTEXTS_KEYS:
                ok = False
                continue
            items = self.value_items(value, f"'contexts: {key.value}' of {what}")
            if items is None:
                ok = False
                continue
            patterns: list[Pattern] = []
            for item, text in items:
                if text.startswith("!"):
                    c.add(item, "'!' is not allowed in 'contexts': list what to refuse under 'deny'")
                    ok = False
                    continue
                pattern = self.pattern(item, text, "abstract", "contexts")
                if pattern is None:
                    ok = False
                else:
                    patterns.append(pattern)
            lists[str(key.value)] = tuple(patterns)
        if not ok:
            return None
        return ContextFilter(lists["allow"], lists["deny"])

    def reject_codes(self, node: Node) -> tuple[int, int, int] | None:
        c = self.c
        m = c.mapping(node, "'reject'")
        if m is None:
            return None
        if not c.keys(m, "'reject'", required=REJECT_KEYS):
            return None
        result_node, source_node, reason_node = (m.get(k) for k in REJECT_KEYS)
        assert result_node is not None and source_node is not None and reason_node is not None
        result = c.integer(result_node, "the reject result", low=1, high=2)
        source = c.integer(source_node, "the reject source", low=1, high=3)
        reason = c.integer(reason_node, "the reject reason", low=0, high=255)
        if result is None or source is None or reason is None:
            return None
        allowed = REJECT_REASONS[source]
        if reason not in allowed:
            listed = ", ".join(f"{k} {v}" for k, v in allowed.items())
            c.add(reason_node, f"reject reason {reason} is not defined for source {source} "
                               f"({REJECT_SOURCES[source]}): expected {listed}")
            return None
        return (result, source, reason)

    def status(self, node: Node, what: str) -> int | None:
        c = self.c
        value: int | None = None
        if isinstance(node, ScalarNode) and type(node.value) is int:
            value = node.value
        elif isinstance(node, ScalarNode) and isinstance(node.value, str):
            try:
                value = int(node.value, 16) if node.value.lower().startswith("0x") else None
            except ValueError:
                value = None
        if value is None:
            c.add(node, f"the status of {what} must be a number such as 0x0124, got {describe(node)}")
            return None
        if not 0 <= value <= 0xFFFF:
            c.add(node, f"status {value:#x} is out of range (0x0000-0xFFFF)")
            return None
        if not _is_failure_status(value):
            c.add(node, f"status 0x{value:04X} is not a failure status: refuse with 0x0124 (not authorized), "
                        "0xA801 (move destination unknown), 0x0122 (SOP class not supported), or another "
                        "0xAxxx, 0xCxxx, 0x01xx or 0x02xx failure (PS3.7 Annex C)")
            return None
        return value

    # Match ------------------------------------------------------------------------------

    def match(self, node: Node, kind: RuleKind, what: str) -> Match | None:
        c = self.c
        m = c.mapping(node, f"'match' of {what}")
        if m is None:
            return None
        if not m.entries:
            c.add(m, "'match' must not be empty (omit it to match everything)")
            return None
        allowed = ASSOCIATION_KEYS if kind == "association" else ASSOCIATION_KEYS + DIMSE_KEYS
        conditions: list[Condition] = []
        ok = True
        for key, value in m:
            k = key.value
            if not isinstance(k, str) or k not in allowed:
                if k in DIMSE_KEYS:
                    c.add(key, f"'{k}' is a DIMSE key: add 'on: dimse' to {what} to test requests")
                else:
                    expected = ", ".join(repr(a) for a in allowed)
                    c.add(key, f"unknown key {key.text!r} in match (expected one of: {expected})")
                ok = False
                continue
            if k in ("client_cert", "user_identity", "time"):
                sub = self.sub_conditions(k, value)
                if sub is None:
                    ok = False
                else:
                    conditions.extend(sub)
                continue
            condition = self.condition(k, value)
            if condition is None:
                ok = False
            else:
                conditions.append(condition)
        return Match(tuple(conditions)) if ok else None

    def sub_conditions(self, key: str, node: Node) -> list[Condition] | None:
        c = self.c
        subkeys = {"client_cert": CLIENT_CERT_KEYS, "user_identity": USER_IDENTITY_KEYS, "time": TIME_KEYS}[key]
        if key != "time" and isinstance(node, ScalarNode):
            if node.value in ("present", "absent"):
                pattern = Finite(str(node.value), frozenset({node.value == "present"}))
                return [Condition(key, (pattern,), (), node.loc)]
            keys = ", ".join(repr(k) for k in subkeys)
            c.add(node, f"'{key}' must be 'present', 'absent' or a mapping with {keys}")
            return None
        m = c.mapping(node, f"'{key}'")
        if m is None:
            return None
        if not m.entries:
            c.add(m, f"'{key}' must not be empty")
            return None
        ok = c.keys(m, f"'{key}'", optional=subkeys)
        out: list[Condition] = []
        for sub, value in m:
            if sub.value not in subkeys:
                continue
            condition = self.condition(f"{key}.{sub.value}", value)
            if condition is None:
                ok = False
            else:
                out.append(condition)
        return out if ok else None

    def condition(self, field: str, node: Node) -> Condition | None:
        items = self.value_items(node, f"'{field}'", allow_int=field == "user_identity.type")
        if items is None:
            return None
        if field == "move_destination" and any(text.lstrip("!") == CALLING_AE_TOKEN for _, text in items):
            return self.move_to_caller(node, items)
        kind = _ITEM_KIND[field]
        positives: list[Pattern] = []
        negatives: list[Pattern] = []
        ok = True
        for item, text in items:
            negated = text.startswith("!")
            body = text[1:] if negated else text
            if not body:
                self.c.add(item, "'!' must be followed by a value")
                ok = False
                continue
            pattern = self.pattern(item, body, kind, field)
            if pattern is None:
                ok = False
                continue
            (negatives if negated else positives).append(pattern)
            if field == "listener" and isinstance(pattern, Finite):
                self.refs.append(
                    Ref("listener", pattern.written, self.current_rule, item.loc, item.src.line(item.loc.line))
                )
        if not ok:
            return None
        return Condition(field, tuple(positives), tuple(negatives), node.loc)

    def move_to_caller(self, node: Node, items: list[tuple[Node, str]]) -> Condition | None:
        """`move_destination: $calling_ae` (or `!$calling_ae`): the destination is (not) the
        requestor's own AE title. It compares two facts, so it stands alone in its value."""
        if len(items) > 1:
            self.c.add(node, f"'{CALLING_AE_TOKEN}' must be the only value of 'move_destination' "
                             "(write a second rule for other destinations)")
            return None
        item, text = items[0]
        pattern = Finite(CALLING_AE_TOKEN, frozenset({True}))
        negated = text.startswith("!")
        return Condition("move_destination.calling_ae", () if negated else (pattern,), (pattern,) if negated else (),
                         item.loc)

    def pattern(self, item: Node, body: str, kind: str, field: str) -> Pattern | None:
        """One item without its `!`: a set reference or a value of `kind`."""
        c = self.c
        if body.startswith("@"):
            wanted = _SET_TYPE_OF_KIND.get(kind)
            if wanted is None:
                c.add(item, f"'{field}' takes values, not sets")
                return None
            name = body[1:]
            named = self.sets.get(name)
            if named is None:
                if name in self.set_keys:
                    return None  # the set exists but is broken: its own error says why
                defined = ", ".join(f"@{n}" for n in self.set_keys) or "none"
                c.add(item, f"undefined set {body!r} (defined sets: {defined})")
                return None
            self.used_sets.add(name)
            if named.type != wanted:
                c.add(item, f"set {body} has type {named.type}, but '{field}' needs a set of type {wanted}")
                return None
            if kind == "transfer" and any(isinstance(p, GroupRef) for p in named.members):
                c.add(item, f"set {body} contains abstract syntax groups, which '{field}' cannot use")
                return None
            return SetRef(named)
        try:
            return _parse_value(kind, body)
        except ValueError as exc:
            c.add(item, str(exc))
            return None

    # Small pieces -----------------------------------------------------------------------

    def value_items(self, node: Node, what: str, *, allow_int: bool = False) -> list[tuple[Node, str]] | None:
        """A value: one item or a non-empty list of items, each a string."""
        c = self.c
        nodes: tuple[Node, ...]
        if isinstance(node, SeqNode):
            if not node.items:
                c.add(node, f"{what} must not be an empty list (an empty list would match nothing)")
                return None
            nodes = node.items
        elif isinstance(node, MapNode):
            c.add(node, f"{what} must be a value or a list of values, got a mapping")
            return None
        else:
            nodes = (node,)
        out: list[tuple[Node, str]] = []
        ok = True
        for item in nodes:
            if allow_int and isinstance(item, ScalarNode) and type(item.value) is int:
                out.append((item, str(item.value)))
                continue
            text = self.item_text(item, what)
            if text is None:
                ok = False
            else:
                out.append((item, text))
        return out if ok else None

    def item_text(self, node: Node, what: str) -> str | None:
        if isinstance(node, ScalarNode) and node.value is not None and not isinstance(node.value, str):
            if isinstance(node.value, bool):
                self.c.add(node, f"{what}: {node.text!r} is read as a boolean; quote it: \"{node.text}\"")
            else:
                self.c.add(node, f"{what}: {node.text!r} must be a string; quote it: \"{node.text}\"")
            return None
        return self.c.string(node, what)

    def choice(self, node: Node | None, what: str, options: Sequence[str]) -> str | None:
        if node is None:
            return None
        text = self.c.string(node, what)
        if text is None:
            return None
        if text not in options:
            expected = ", ".join(repr(o) for o in options)
            self.c.add(node, f"{what} must be one of {expected}, got {text!r}")
            return None
        return text

    def name(self, node: Node, kind: str) -> str | None:
        name = self.c.string(node, f"the {kind} name")
        if name is None:
            return None
        if not _NAME.fullmatch(name):
            self.c.add(node, f"{kind} name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit")
            return None
        return name

    # Warnings ---------------------------------------------------------------------------

    def warnings(self, ruleset: RuleSet) -> list[RuleWarning]:
        out: list[RuleWarning] = []
        for name, named in self.sets.items():
            if name not in self.used_sets:
                out.append(RuleWarning(f"set {name!r} is not used by any rule", named.location, named.source_line))
        for rule, by in shadowed_rules(ruleset):
            where = f"line {by.location.line}"
            if by.location.path != rule.location.path:
                where = f"{by.location.path} at {where}"
            subject = "requests" if rule.kind == "dimse" else "associations"
            if rule.shadow:
                message = (f"shadow rule {rule.name!r} is never evaluated: rule {by.name!r} ({where}) "
                           f"decides every one of the {subject} it matches")
            else:
                message = (f"rule {rule.name!r} can never match: rule {by.name!r} ({where}) already decides "
                           f"every one of the {subject} it matches")
            out.append(RuleWarning(message, rule.location, rule.source_line))
        return sorted(out, key=lambda w: (w.location.path, w.location.line, w.location.col))


def _on_as_string(m: MapNode) -> MapNode:
    """YAML 1.1 reads a plain `on:` key as the boolean true; in a rule it is the key 'on'."""
    if not any(key.value is True and key.text.lower() == "on" for key, _ in m):
        return m
    entries = tuple(
        (ScalarNode(key.loc, key.src, "on", "tag:yaml.org,2002:str", key.text, False), value)
        if key.value is True and key.text.lower() == "on"
        else (key, value)
        for key, value in m
    )
    return MapNode(m.loc, m.src, entries)


def _association_action(text: str) -> AssociationAction:
    if text == "accept":
        return "accept"
    if text == "drop":
        return "drop"
    return "reject"


def _is_failure_status(status: int) -> bool:
    """PS3.7 Annex C (standards.md 2.6): 0xAxxx, 0xCxxx, 0x01xx except 0x0107/0x0116, 0x02xx."""
    if status >> 12 in (0xA, 0xC):
        return True
    if status >> 8 == 0x01:
        return status not in (0x0107, 0x0116)
    return status >> 8 == 0x02


# --------------------------------------------------------------------------- proxy.yaml cross-check


def check_references(
    ruleset: RuleSet,
    *,
    upstreams: Collection[str] | None,
    listeners: Collection[str] | None = None,
    identities: Collection[str] = (),
) -> list[ConfigError]:
    """Errors for rule `upstream:`/`identity:` names and `listener` values that proxy.yaml does
    not define, located in the rule files. None for `upstreams` or `listeners` skips that check
    (proxy.yaml's own section is broken and already reported)."""
    errors: list[ConfigError] = []
    for ref in ruleset.refs:
        if ref.kind == "upstream":
            known: Collection[str] | None = upstreams
            what = "upstream"
        elif ref.kind == "identity":
            known, what = identities, "identity profile"
        else:
            known, what = listeners, "listener"
        if known is None or ref.name in known:
            continue
        names = ", ".join(repr(n) for n in sorted(known)) or "none"
        where = f" in rule {ref.rule!r}" if ref.rule else ""
        plural = "identity profiles" if ref.kind == "identity" else f"{what}s"
        errors.append(ConfigError(f"unknown {what} {ref.name!r}{where} (defined {plural} in proxy.yaml: {names})",
                                  ref.location, ref.source_line))
    return errors
