"""proxy.yaml -> frozen dataclasses. Relative paths resolve against the config file's folder.

CONTRACT (relay, cli and tests code against these names): extend, never rename.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from proxy.dul.constants import AE_TITLE_LENGTH, DEFAULT_MAX_ASSOCIATE_LENGTH, DEFAULT_MAX_PDU_LENGTH
from proxy.errors import ConfigError, ConfigErrors, Location
from proxy.yamlsrc import Collector, MapNode, Node, ScalarNode, describe, parse, read_text


@dataclass(frozen=True)
class Address:
    host: str
    port: int  # 0 on a listener means "any free port" (tests); never 0 on an upstream

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamTLS:
    ca: Path | None = None  # trust anchors; None = the system store
    cert: Path | None = None  # optional client certificate ...
    key: Path | None = None  # ... and its key
    server_name: str | None = None  # SNI and hostname check; None = the host of the address


@dataclass(frozen=True)
class Upstream:
    name: str
    address: Address
    tls: UpstreamTLS | None  # None = plaintext upstream (warned about at start)

    @property
    def server_hostname(self) -> str | None:
        """What to pass as server_hostname when connecting (SNI and hostname check)."""
        if self.tls is None:
            return None
        return self.tls.server_name or self.address.host


@dataclass(frozen=True)
class Listener:
    name: str
    address: Address


@dataclass(frozen=True)
class Timeouts:
    artim: float = 30.0  # TCP accept -> A-ASSOCIATE-RQ, and after RJ/RP/ABORT until close
    connect: float = 10.0  # TCP connect + TLS handshake to the upstream
    acse: float = 20.0  # RQ forwarded -> AC/RJ from upstream; below the 30 s clients wait
    idle: float = 300.0  # no PDU in either direction -> A-ABORT both sides
    shutdown: float = 30.0  # SIGTERM: how long live associations may finish


@dataclass(frozen=True)
class ProxyConfig:
    path: Path
    listeners: tuple[Listener, ...]
    upstreams: Mapping[str, Upstream]
    routes: Mapping[str, str] = field(default_factory=dict)  # called AE title (stripped) -> upstream name
    default_upstream: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_pdu_length: int = DEFAULT_MAX_PDU_LENGTH  # P in standards.md section 4
    max_associate_length: int = DEFAULT_MAX_ASSOCIATE_LENGTH

    def upstream_for(self, called_ae: str) -> Upstream | None:
        """Route by called AE title (trailing/leading spaces are padding), else the default."""
        name = self.routes.get(called_ae.strip(" "), self.default_upstream)
        return None if name is None else self.upstreams.get(name)


# --------------------------------------------------------------------------- loading

MIN_PDU_LENGTH = 4096
"""Smallest cap we accept: below this even a modest A-ASSOCIATE-RQ or DIMSE command may not fit."""
MAX_CONFIGURED_PDU_LENGTH = 16 * 1024 * 1024
"""The proxy buffers whole PDUs, so its own cap must be finite; 16 MiB is dcm4che's ceiling."""
MAX_TIMEOUT = 7 * 24 * 3600.0
"""A week: longer is a typo, and asyncio timers far in the future gain nothing."""

TOP_KEYS = ("listeners", "upstreams", "routes", "default_upstream", "timeouts", "max_pdu_length",
            "max_associate_length")
LISTENER_KEYS = ("name", "address")
UPSTREAM_KEYS = ("address", "tls")
TLS_KEYS = ("ca", "cert", "key", "server_name")
TIMEOUT_KEYS = ("artim", "connect", "acse", "idle", "shutdown")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Listener and upstream names end up in logs and metric labels: keep them tame."""
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")
_PORT = re.compile(r"[0-9]{1,5}")


def load(path: str | Path) -> ProxyConfig:
    """Read proxy.yaml strictly; raise ConfigErrors listing every problem found in one pass."""
    file = Path(path)
    return load_text(read_text(file, str(path)), str(path), base_dir=file.resolve().parent)


def load_text(text: str, path: str = "proxy.yaml", *, base_dir: Path | None = None) -> ProxyConfig:
    """Like load() for text already in memory; relative file paths resolve against base_dir."""
    check = Collector()
    root = parse(text, path, check.errors)
    if root is None:
        if not check.errors:
            check.errors.append(ConfigError("the file is empty", Location(path, 1, 1)))
        check.raise_if_any()
    assert root is not None  # raise_if_any raised otherwise
    base = base_dir if base_dir is not None else Path(path).resolve().parent
    config = _Reader(check, Path(path), base).top(root)
    check.raise_if_any()
    assert config is not None  # _Reader returns None only after recording an error
    return config


def parse_address(text: str, *, allow_any_port: bool = False) -> Address:
    """`host:port` or `[v6]:port` -> Address; ValueError says what is wrong, in admin words."""
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected host:port, e.g. 127.0.0.1:11112")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:2762")
        if not host:
            raise ValueError(f"{text!r}: missing host (use 0.0.0.0 or [::] for every interface)")
        if not _HOST.fullmatch(host):
            raise ValueError(f"{text!r}: {host!r} is not a valid host name or IPv4 address")
    if not _PORT.fullmatch(port_text):
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    port = int(port_text)
    low = 0 if allow_any_port else 1
    if not low <= port <= 65535:
        hint = "" if allow_any_port else " (port 0 is only allowed on a listener)"
        raise ValueError(f"{text!r}: the port must be a number from {low} to 65535{hint}")
    return Address(host, port)


def check_ae_title(text: str) -> str:
    """Validate an AE title (PS3.5 VR AE) and return it without its space padding."""
    if any(ord(ch) > 126 for ch in text):
        raise ValueError(f"AE title {text!r} must be ASCII")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError(f"AE title {text!r} must not contain control characters")
    if "\\" in text:
        raise ValueError(f"AE title {text!r} must not contain a backslash")
    stripped = text.strip(" ")
    if not stripped:
        raise ValueError("an AE title must not be empty or all spaces")
    if len(stripped) > AE_TITLE_LENGTH:
        raise ValueError(f"AE title {stripped!r} is longer than {AE_TITLE_LENGTH} characters")
    return stripped


class _Reader:
    """One pass over the tree; every method records its errors and returns None on failure."""

    def __init__(self, check: Collector, path: Path, base: Path) -> None:
        self.check = check
        self.path = path
        self.base = base

    def top(self, root: Node) -> ProxyConfig | None:
        c = self.check
        top = c.mapping(root, "the top level")
        if top is None:
            return None
        c.keys(top, "the top level", required=("listeners", "upstreams"), optional=TOP_KEYS[2:])
        if "routes" not in top and "default_upstream" not in top:
            c.add(top, "the top level needs 'routes' or 'default_upstream' (or both), "
                       "so that every association has an upstream")

        node = top.get("listeners")
        listeners = self.listeners(node) if node is not None else None
        node = top.get("upstreams")
        upstreams = self.upstreams(node) if node is not None else None
        # Names declared, even by an upstream that is itself broken, so routes are still checked.
        known = {k.value for k, _ in node if isinstance(k.value, str)} if isinstance(node, MapNode) else None

        routes: dict[str, str] = {}
        node = top.get("routes")
        if node is not None:
            routes = self.routes(node, known) or {}
        default: str | None = None
        node = top.get("default_upstream")
        if node is not None:
            default = self.upstream_ref(node, known, "'default_upstream'")

        timeouts = Timeouts()
        node = top.get("timeouts")
        if node is not None:
            timeouts = self.timeouts(node) or timeouts

        max_pdu = DEFAULT_MAX_PDU_LENGTH
        node = top.get("max_pdu_length")
        if node is not None:
            max_pdu = self.length(node, "'max_pdu_length'") or max_pdu
        max_assoc = DEFAULT_MAX_ASSOCIATE_LENGTH
        node = top.get("max_associate_length")
        if node is not None:
            max_assoc = self.length(node, "'max_associate_length'") or max_assoc

        if listeners is None or upstreams is None:
            return None
        return ProxyConfig(
            path=self.path,
            listeners=listeners,
            upstreams=MappingProxyType(upstreams),
            routes=MappingProxyType(routes),
            default_upstream=default,
            timeouts=timeouts,
            max_pdu_length=max_pdu,
            max_associate_length=max_assoc,
        )

    # Listeners --------------------------------------------------------------------------

    def listeners(self, node: Node) -> tuple[Listener, ...] | None:
        seq = self.check.sequence(node, "'listeners'")
        if seq is None:
            return None
        out: list[Listener] = []
        names: dict[str, ScalarNode] = {}
        addresses: dict[Address, str] = {}
        ok = True
        for item in seq:
            listener = self.listener(item)
            ok = ok and listener is not None
            # Duplicates are checked on the raw name, so a broken listener still claims its name.
            name_node = item.get("name") if isinstance(item, MapNode) else None
            if isinstance(name_node, ScalarNode) and isinstance(name_node.value, str):
                first = names.get(name_node.value)
                if first is not None:
                    self.check.add(name_node, f"duplicate listener name {name_node.value!r} "
                                              f"(first used at line {first.loc.line})")
                    ok = False
                    continue
                names[name_node.value] = name_node
            if listener is None:
                continue
            if listener.address.port != 0 and listener.address in addresses:
                address_node = item.get("address") if isinstance(item, MapNode) else None
                self.check.add(address_node or item, f"address {listener.address} is already used by "
                                                     f"listener {addresses[listener.address]!r}")
                ok = False
                continue
            addresses[listener.address] = listener.name
            out.append(listener)
        return tuple(out) if ok else None

    def listener(self, node: Node) -> Listener | None:
        c = self.check
        m = c.mapping(node, "a listener")
        if m is None:
            return None
        c.keys(m, "a listener", required=LISTENER_KEYS)
        name_node, address_node = m.get("name"), m.get("address")
        name = self.name(name_node, "listener") if name_node is not None else None
        what = f"the address of listener {name!r}" if name else "the listener address"
        address = self.address(address_node, what, listener=True) if address_node is not None else None
        if name is None or address is None:
            return None
        return Listener(name, address)

    # Upstreams --------------------------------------------------------------------------

    def upstreams(self, node: Node) -> dict[str, Upstream] | None:
        c = self.check
        m = c.mapping(node, "'upstreams'")
        if m is None:
            return None
        if not m.entries:
            c.add(m, "'upstreams' must not be empty")
            return None
        out: dict[str, Upstream] = {}
        ok = True
        for key, value in m:
            name = self.name(key, "upstream")
            upstream = self.upstream(name, value) if name is not None else None
            if name is None or upstream is None:
                ok = False
                continue
            out[name] = upstream
        return out if ok else None

    def upstream(self, name: str, node: Node) -> Upstream | None:
        c = self.check
        what = f"upstream {name!r}"
        m = c.mapping(node, what)
        if m is None:
            return None
        c.keys(m, what, required=UPSTREAM_KEYS[:1], optional=UPSTREAM_KEYS[1:])
        address_node = m.get("address")
        address = self.address(address_node, f"the address of {what}") if address_node is not None else None
        tls: UpstreamTLS | None = None
        tls_ok = True
        tls_node = m.get("tls")
        if tls_node is not None:
            tls = self.tls(tls_node, what)
            tls_ok = tls is not None
        if address is None or not tls_ok:
            return None
        return Upstream(name, address, tls)

    def tls(self, node: Node, owner: str) -> UpstreamTLS | None:
        c = self.check
        what = f"'tls' of {owner}"
        if isinstance(node, ScalarNode) and node.value is None:
            c.add(node, f"{what} is empty: use 'tls: {{}}' for TLS with the system trust store, "
                        "or remove the key for a plaintext upstream")
            return None
        m = c.mapping(node, what)
        if m is None:
            return None
        ok = c.keys(m, what, optional=TLS_KEYS)
        paths: dict[str, Path | None] = {}
        for field_name in ("ca", "cert", "key"):
            value = m.get(field_name)
            paths[field_name] = self.file(value, f"'{field_name}' in {what}") if value is not None else None
            if value is not None and paths[field_name] is None:
                ok = False
        server_name: str | None = None
        sn = m.get("server_name")
        if sn is not None:
            server_name = c.string(sn, f"'server_name' in {what}")
            if server_name is not None and (any(ch.isspace() for ch in server_name) or "/" in server_name):
                c.add(sn, f"'server_name' in {what} must be a host name or IP address")
                server_name = None
            ok = ok and server_name is not None
        for have, need in (("cert", "key"), ("key", "cert")):
            present = m.key_node(have)
            if present is not None and need not in m:
                c.add(present, f"{what} has '{have}' but no '{need}': a client certificate needs both")
                ok = False
        ca, cert, key = paths["ca"], paths["cert"], paths["key"]
        if ca is not None:
            ok = self.check_ca(m, ca) and ok
        if cert is not None and key is not None:
            ok = self.check_pair(m, cert, key) and ok
        if not ok:
            return None
        return UpstreamTLS(ca=ca, cert=cert, key=key, server_name=server_name)

    def check_ca(self, m: MapNode, ca: Path) -> bool:
        node = m.get("ca")
        assert node is not None
        try:
            x509.load_pem_x509_certificates(ca.read_bytes())
        except (ValueError, OSError):
            self.check.add(node, f"{ca} does not contain a PEM certificate")
            return False
        return True

    def check_pair(self, m: MapNode, cert_path: Path, key_path: Path) -> bool:
        """Catch a wrong, encrypted or mismatched key now rather than at the first association."""
        cert_node, key_node = m.get("cert"), m.get("key")
        assert cert_node is not None and key_node is not None
        try:
            cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        except (ValueError, OSError):
            self.check.add(cert_node, f"{cert_path} does not contain a PEM certificate")
            return False
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except TypeError:  # cryptography's way to say "this key needs a password"
            self.check.add(key_node, f"{key_path} is encrypted; the proxy needs an unencrypted key "
                                     "(protect it with file permissions)")
            return False
        except (ValueError, OSError, UnsupportedAlgorithm):
            self.check.add(key_node, f"{key_path} does not contain a PEM private key")
            return False
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            self.check.add(key_node, f"{key_path} is not the private key of {cert_path}")
            return False
        return True

    def file(self, node: Node, what: str) -> Path | None:
        text = self.check.string(node, what)
        if text is None:
            return None
        path = Path(text)
        if not path.is_absolute():
            path = self.base / path
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except IsADirectoryError:
            self.check.add(node, f"{what}: {path} is a folder, expected a file")
            return None
        except OSError as exc:
            self.check.add(node, f"{what}: cannot read {path}: {exc.strerror or exc}")
            return None
        return path

    # Routes -----------------------------------------------------------------------------

    def routes(self, node: Node, known: set[str] | None) -> dict[str, str] | None:
        c = self.check
        m = c.mapping(node, "'routes'")
        if m is None:
            return None
        if not m.entries:
            c.add(m, "'routes' must not be empty (remove the key to route everything to default_upstream)")
            return None
        out: dict[str, str] = {}
        where: dict[str, ScalarNode] = {}
        ok = True
        for key, value in m:
            ae = self.ae_title(key)
            target = self.upstream_ref(value, known, f"the route for {key.text!r}")
            if ae is None or target is None:
                ok = False
                continue
            if ae in where:
                c.add(key, f"AE title {ae!r} is already routed at line {where[ae].loc.line} "
                           "(padding spaces do not count)")
                ok = False
                continue
            where[ae] = key
            out[ae] = target
        return out if ok else None

    def ae_title(self, node: ScalarNode) -> str | None:
        if not isinstance(node.value, str):
            self.check.add(node, f"AE title {node.text!r} must be a string; quote it: \"{node.text}\"")
            return None
        try:
            return check_ae_title(node.value)
        except ValueError as exc:
            self.check.add(node, str(exc))
            return None

    def upstream_ref(self, node: Node, known: set[str] | None, what: str) -> str | None:
        name = self.check.string(node, what)
        if name is None:
            return None
        if known is not None and name not in known:
            names = ", ".join(repr(n) for n in sorted(known)) or "none"
            self.check.add(node, f"unknown upstream {name!r} in {what} (defined upstreams: {names})")
            return None
        return name

    # Scalars ----------------------------------------------------------------------------

    def name(self, node: Node, kind: str) -> str | None:
        name = self.check.string(node, f"the {kind} name")
        if name is None:
            return None
        if not _NAME.fullmatch(name):
            self.check.add(node, f"{kind} name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                                 "starting with a letter or digit")
            return None
        return name

    def address(self, node: Node, what: str, *, listener: bool = False) -> Address | None:
        if not isinstance(node, ScalarNode):
            # `address: [::1]:2762` unquoted is a YAML list: say how to write it.
            self.check.add(node, f"{what} must be a string 'host:port', got {describe(node)} "
                                 "(quote IPv6 addresses: \"[::1]:2762\")")
            return None
        if not isinstance(node.value, str):
            self.check.add(node, f"{what} must be a string 'host:port'; quote it: \"{node.text}\"")
            return None
        try:
            return parse_address(node.value, allow_any_port=listener)
        except ValueError as exc:
            self.check.add(node, f"{what}: {exc}")
            return None

    def timeouts(self, node: Node) -> Timeouts | None:
        c = self.check
        m = c.mapping(node, "'timeouts'")
        if m is None:
            return None
        ok = c.keys(m, "'timeouts'", optional=TIMEOUT_KEYS)
        values: dict[str, float] = {}
        for key in TIMEOUT_KEYS:
            value_node = m.get(key)
            if value_node is None:
                continue
            value = c.number(value_node, f"timeout {key!r} (seconds)", positive=True, high=MAX_TIMEOUT)
            if value is None:
                ok = False
            else:
                values[key] = value
        return Timeouts(**values) if ok else None

    def length(self, node: Node, what: str) -> int | None:
        return self.check.integer(node, what, low=MIN_PDU_LENGTH, high=MAX_CONFIGURED_PDU_LENGTH)


__all__ = [
    "Address",
    "ConfigErrors",
    "Listener",
    "ProxyConfig",
    "Timeouts",
    "Upstream",
    "UpstreamTLS",
    "check_ae_title",
    "load",
    "load_text",
    "parse_address",
]
