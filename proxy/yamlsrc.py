"""YAML with a location on every node, for files an admin must be able to fix from one error report.

PyYAML's constructors forget where a value came from and keep the last of duplicate keys. We
use only its composer (syntax, anchors, tag resolution) and build our own nodes, so that every
mapping, list and scalar can say `path:line:col` and a duplicate key is an error, not a silent
overwrite. Anchors and aliases work; merge keys (`<<`) and custom tags are refused because
they hide where a value really came from.

Typical use (config.py, the future rule loader)::

    errors = Collector()
    root = parse(text, "proxy.yaml", errors)
    top = errors.mapping(root, "the top level")
    if top is not None:
        errors.keys(top, "the top level", required=("listeners",), optional=("routes",))
        ...
    errors.raise_if_any()
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from proxy.errors import ConfigError, ConfigErrors, Location

__all__ = [
    "Collector",
    "MapNode",
    "Node",
    "ScalarNode",
    "SeqNode",
    "Source",
    "describe",
    "load_file",
    "parse",
    "read_text",
]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_LIST_LOOKALIKE = re.compile(r":\s+\[[^\]]*\][^\s,\]}]")
"""`address: [::1]:2762` unquoted: the most likely syntax error in a proxy config."""

ScalarValue = str | int | float | bool | None | bytes | datetime.date | datetime.datetime


@dataclass(frozen=True)
class Source:
    """The text of one file, kept so that every error can quote its line."""

    path: str
    lines: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str, path: str) -> Source:
        return cls(path, tuple(line.rstrip("\r") for line in text.split("\n")))

    def line(self, number: int) -> str | None:
        """Source line `number` (1-based), or None past the end (errors at end of file)."""
        if 1 <= number <= len(self.lines):
            return self.lines[number - 1]
        return None

    def error(self, message: str, line: int, col: int) -> ConfigError:
        return ConfigError(message, Location(self.path, line, col), self.line(line))


@dataclass(frozen=True, eq=False)
class Node:
    """Base of the three node kinds; `loc` is where the node starts in the file."""

    loc: Location
    src: Source = field(repr=False)

    kind: ClassVar[str] = "value"

    def error(self, message: str) -> ConfigError:
        """A ConfigError pointing at this node, with its source line for the caret."""
        return ConfigError(message, self.loc, self.src.line(self.loc.line))


@dataclass(frozen=True, eq=False)
class ScalarNode(Node):
    value: ScalarValue
    tag: str  # the resolved YAML tag, e.g. tag:yaml.org,2002:int
    text: str  # the scalar exactly as written (without quotes), for messages
    quoted: bool  # written in quotes or as a block scalar, so never re-typed by YAML

    kind: ClassVar[str] = "scalar"


@dataclass(frozen=True, eq=False)
class SeqNode(Node):
    items: tuple[Node, ...]

    kind: ClassVar[str] = "list"

    def __iter__(self) -> Iterator[Node]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, eq=False)
class MapNode(Node):
    """A mapping in file order. Keys are scalars and unique (duplicates were reported at parse)."""

    entries: tuple[tuple[ScalarNode, Node], ...]

    kind: ClassVar[str] = "mapping"

    def __iter__(self) -> Iterator[tuple[ScalarNode, Node]]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return self.key_node(key) is not None

    def get(self, key: object) -> Node | None:
        for k, v in self.entries:
            if _same_key(k.value, key):
                return v
        return None

    def key_node(self, key: object) -> ScalarNode | None:
        """The key itself, so an error about the key (not its value) points at the key."""
        for k, _ in self.entries:
            if _same_key(k.value, key):
                return k
        return None


def _same_key(a: object, b: object) -> bool:
    # bool is an int in Python; YAML keeps `true` and `1` apart, so do we.
    return type(a) is type(b) and a == b


def describe(node: Node) -> str:
    """A short English name of what the admin wrote, for `expected X, got Y` messages."""
    if isinstance(node, MapNode):
        return "a mapping"
    if isinstance(node, SeqNode):
        return "a list"
    if isinstance(node, ScalarNode):
        v = node.value
        if v is None:
            return "nothing (null)"
        if isinstance(v, bool):
            return f"a boolean ({node.text})"
        if isinstance(v, int):
            return f"an integer ({node.text})"
        if isinstance(v, float):
            return f"a number ({node.text})"
        if isinstance(v, str):
            return "a string"
        return f"a {type(v).__name__} ({node.text})"
    return "a value"


# --------------------------------------------------------------------------- parsing


class _Builder:
    """Turns composed PyYAML nodes into ours, reporting duplicates and unsupported features."""

    def __init__(self, src: Source, errors: list[ConfigError]) -> None:
        self.src = src
        self.errors = errors
        self.constructor = yaml.constructor.SafeConstructor()
        # Aliases compose to the very same PyYAML node: build it once (a "billion laughs"
        # document then stays linear) and detect an alias that contains itself.
        self.done: dict[int, Node] = {}
        self.busy: set[int] = set()

    def loc(self, node: yaml.Node) -> Location:
        mark = node.start_mark
        return Location(self.src.path, mark.line + 1, mark.column + 1)

    def err(self, node: yaml.Node, message: str) -> None:
        loc = self.loc(node)
        self.errors.append(self.src.error(message, loc.line, loc.col))

    def build(self, node: yaml.Node) -> Node:
        key = id(node)
        if key in self.done:
            return self.done[key]
        if key in self.busy:
            self.err(node, "an alias refers to the node that contains it (recursive structure)")
            return ScalarNode(self.loc(node), self.src, None, "tag:yaml.org,2002:null", "", False)
        self.busy.add(key)
        try:
            built = self._build(node)
        finally:
            self.busy.discard(key)
        self.done[key] = built
        return built

    def _build(self, node: yaml.Node) -> Node:
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                self.err(node, f"unsupported tag {node.tag!r} on a list")
            return SeqNode(self.loc(node), self.src, tuple(self.build(n) for n in node.value))
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node)
        raise TypeError(f"unexpected YAML node {type(node).__name__}")  # PyYAML has only these three

    def scalar(self, node: yaml.ScalarNode) -> ScalarNode:
        text = str(node.value)
        quoted = node.style is not None  # '"', "'", '|' or '>'; plain scalars have style None
        if node.tag == _MERGE_TAG:
            self.err(node, "merge keys ('<<') are not supported; write the keys out")
            return ScalarNode(self.loc(node), self.src, text, node.tag, text, quoted)
        try:
            value = self.constructor.construct_object(node)
        except yaml.MarkedYAMLError as exc:
            self.err(node, _yaml_problem(exc) or f"cannot read this value ({node.tag})")
            value = text
        return ScalarNode(self.loc(node), self.src, _as_scalar(value, text), node.tag, text, quoted)

    def mapping(self, node: yaml.MappingNode) -> MapNode:
        if node.tag != _MAP_TAG:
            self.err(node, f"unsupported tag {node.tag!r} on a mapping")
        entries: list[tuple[ScalarNode, Node]] = []
        for key_node, value_node in node.value:
            key = self.build(key_node)
            if not isinstance(key, ScalarNode):
                self.err(key_node, f"a mapping key must be a plain value, not {describe(key)}")
                continue
            if key.tag == _MERGE_TAG:
                continue  # reported by scalar()
            first = next((k for k, _ in entries if _same_key(k.value, key.value)), None)
            if first is not None:
                self.err(
                    key_node,
                    f"duplicate key {key.text!r} (first defined at line {first.loc.line}, "
                    f"column {first.loc.col})",
                )
                continue  # keep the first, so later checks still see a sensible tree
            entries.append((key, self.build(value_node)))
        return MapNode(self.loc(node), self.src, tuple(entries))


def _as_scalar(value: object, text: str) -> ScalarValue:
    if value is None or isinstance(value, str | int | float | bool | bytes | datetime.date):
        return value
    return text  # SafeConstructor yields only the types above for scalars; never guess


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    parts = [p for p in (exc.context, exc.problem) if p]
    return "; ".join(parts)


def parse(text: str, path: str, errors: list[ConfigError]) -> Node | None:
    """Parse one YAML document. Syntax errors stop here; other problems go to `errors`.

    Returns None for an empty document or a syntax error (then `errors` says why). Duplicate
    keys, merge keys and unknown tags are appended to `errors` and the tree is still returned
    (first duplicate wins), so a caller can report schema errors from the same pass.
    """
    src = Source.from_text(text, path)
    loader = yaml.SafeLoader(text)
    try:
        composed = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = _yaml_problem(exc) or "invalid YAML"
        if mark is not None and _LIST_LOOKALIKE.search(src.line(mark.line + 1) or ""):
            message += "; a value that starts with '[' is read as a YAML list: quote it, e.g. \"[::1]:2762\""
        if mark is None:
            errors.append(ConfigError(f"invalid YAML: {message}", Location(path, 1, 1), src.line(1)))
        else:
            errors.append(src.error(f"invalid YAML: {message}", mark.line + 1, mark.column + 1))
        return None
    except yaml.YAMLError as exc:  # ReaderError: a control character or bad encoding
        errors.append(ConfigError(f"invalid YAML: {exc}", Location(path, 1, 1), src.line(1)))
        return None
    except RecursionError:
        errors.append(ConfigError("the document is nested too deeply", Location(path, 1, 1), src.line(1)))
        return None
    finally:
        loader.dispose()
    if composed is None:
        return None
    try:
        return _Builder(src, errors).build(composed)
    except RecursionError:
        errors.append(ConfigError("the document is nested too deeply", Location(path, 1, 1), src.line(1)))
        return None


def read_text(path: Path, display: str) -> str:
    """Read a UTF-8 file or raise ConfigErrors that say why, located where possible."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigErrors([ConfigError(f"cannot read {display}: {exc.strerror or exc}")]) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        col = len(before) - (before.rfind(b"\n") + 1) + 1
        raise ConfigErrors(
            [ConfigError("the file is not valid UTF-8 (byte position counted)", Location(display, line, col))]
        ) from None


def load_file(path: str | Path) -> Node:
    """Read and parse a file; raise ConfigErrors for any problem, including an empty file."""
    display = str(path)
    errors: list[ConfigError] = []
    root = parse(read_text(Path(path), display), display, errors)
    if root is None and not errors:
        errors.append(ConfigError("the file is empty", Location(display, 1, 1)))
    if errors:
        raise ConfigErrors(errors)
    assert root is not None  # errors is empty only when parse returned a node
    return root


# --------------------------------------------------------------------------- checking


@dataclass
class Collector:
    """Collects every error of one pass; typed accessors return None (and record why) on misfit.

    `what` arguments name the thing for the admin, e.g. "upstream 'pacs'" or "'timeouts'".
    """

    errors: list[ConfigError] = field(default_factory=list)

    def add(self, node: Node, message: str) -> None:
        self.errors.append(node.error(message))

    def raise_if_any(self) -> None:
        if self.errors:
            ordered = sorted(self.errors, key=_error_order)
            raise ConfigErrors(ordered)

    # Shapes ------------------------------------------------------------------------------

    def mapping(self, node: Node, what: str) -> MapNode | None:
        if isinstance(node, MapNode):
            return node
        self.add(node, f"{what} must be a mapping, got {describe(node)}")
        return None

    def sequence(self, node: Node, what: str, *, nonempty: bool = True) -> SeqNode | None:
        if not isinstance(node, SeqNode):
            self.add(node, f"{what} must be a list, got {describe(node)}")
            return None
        if nonempty and not node.items:
            self.add(node, f"{what} must not be an empty list")
            return None
        return node

    def keys(
        self,
        node: MapNode,
        what: str,
        *,
        required: Iterable[str] = (),
        optional: Iterable[str] = (),
    ) -> bool:
        """Check key names; unknown keys name the expected ones. True when all is well."""
        required = tuple(required)
        allowed = (*required, *optional)
        ok = True
        for key, _ in node:
            if not isinstance(key.value, str) or key.value not in allowed:
                expected = ", ".join(repr(a) for a in allowed)
                self.add(key, f"unknown key {key.text!r} in {what} (expected one of: {expected})")
                ok = False
        for name in required:
            if name not in node:
                self.add(node, f"missing required key {name!r} in {what}")
                ok = False
        return ok

    # Scalars -----------------------------------------------------------------------------

    def string(self, node: Node, what: str, *, nonempty: bool = True) -> str | None:
        if not isinstance(node, ScalarNode) or not isinstance(node.value, str):
            self.add(node, f"{what} must be a string, got {describe(node)}")
            return None
        if nonempty and not node.value.strip():
            self.add(node, f"{what} must not be empty")
            return None
        return node.value

    def integer(self, node: Node, what: str, *, low: int | None = None, high: int | None = None) -> int | None:
        if not isinstance(node, ScalarNode) or type(node.value) is not int:
            self.add(node, f"{what} must be an integer, got {describe(node)}")
            return None
        value = node.value
        if (low is not None and value < low) or (high is not None and value > high):
            self.add(node, f"{what} must be {_range_words(low, high)}, got {value}")
            return None
        return value

    def number(self, node: Node, what: str, *, positive: bool = False, high: float | None = None) -> float | None:
        if not isinstance(node, ScalarNode) or type(node.value) not in (int, float):
            self.add(node, f"{what} must be a number, got {describe(node)}")
            return None
        assert isinstance(node.value, int | float)
        value = float(node.value)
        if not math.isfinite(value):
            self.add(node, f"{what} must be a finite number, got {node.text}")
            return None
        if positive and value <= 0:
            self.add(node, f"{what} must be greater than 0, got {node.text}")
            return None
        if high is not None and value > high:
            self.add(node, f"{what} must be at most {high:g}, got {node.text}")
            return None
        return value


def _error_order(error: ConfigError) -> tuple[str, int, int]:
    loc = error.location
    return ("", 0, 0) if loc is None else (loc.path, loc.line, loc.col)


def _range_words(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    if low is not None:
        return f"at least {low}"
    return f"at most {high}"
