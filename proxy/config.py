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
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from proxy.dul.constants import AE_TITLE_LENGTH, DEFAULT_MAX_ASSOCIATE_LENGTH, DEFAULT_MAX_PDU_LENGTH
from proxy.errors import ConfigError, ConfigErrors, Location
from proxy.identity import ClientIdentityPolicy, IdentityProfile
from proxy.identity_config import identity_names, read_client_identity, read_identities
from proxy.limits import DEFAULT_MAX_TRACKED_SOURCES, Limits
from proxy.policy.loader import check_references, expand_rule_path, load_rules
from proxy.policy.model import RuleSet
from proxy.yamlsrc import Collector, MapNode, Node, ScalarNode, describe, parse, read_text


@dataclass(frozen=True)
class Address:
    host: str
    port: int  # 0 on a listener means "any free port" (tests); never 0 on an upstream

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


TLSProfileName = Literal["bcp195-nd", "bcp195", "bcp195-ex", "tls13-only"]
TLS_PROFILE_NAMES: tuple[TLSProfileName, ...] = ("bcp195-nd", "bcp195", "bcp195-ex", "tls13-only")
"""PS3.15 Annex B profiles; proxy.tls.PROFILES holds what each one allows (versions, suites)."""
DEFAULT_TLS_PROFILE: TLSProfileName = "bcp195-nd"

PinKind = Literal["cert", "spki"]


@dataclass(frozen=True)
class CertPin:
    """A pinned SHA-256 of the peer's leaf certificate (`cert`, DER) or of its public key (`spki`,
    the DER SubjectPublicKeyInfo). An spki pin survives a renewal that keeps the key pair."""

    kind: PinKind
    sha256: str  # 64 lowercase hex digits

    def __str__(self) -> str:
        return f"{self.kind}:{self.sha256}"


@dataclass(frozen=True)
class UpstreamTLS:
    ca: Path | None = None  # trust anchors; None = the system store
    cert: Path | None = None  # optional client certificate ...
    key: Path | None = None  # ... and its key
    server_name: str | None = None  # SNI and hostname check; None = the host of the address
    profile: TLSProfileName = DEFAULT_TLS_PROFILE
    pin_sha256: tuple[CertPin, ...] = ()  # any one must match the archive's leaf (checked by the relay)
    insecure_skip_verify: bool = False  # no chain or host name check; the loader warns about it
    passphrase_file: Path | None = None  # passphrase of an encrypted `key`; read when the context is built


@dataclass(frozen=True)
class HealthCheck:
    """`health:` of an upstream: a C-ECHO association every `interval` seconds (proxy.upstream).
    The upstream goes down after `fall` failed probes in a row and up again after `rise` good ones."""

    called_ae: str  # the archive's AE title (stripped)
    calling_ae: str = "DICOMPROXY"
    interval: float = 10.0  # seconds from the end of one probe to the start of the next
    timeout: float = 5.0  # the whole probe: connect, TLS, associate, echo, release
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True)
class Upstream:
    name: str
    address: Address
    tls: UpstreamTLS | None  # None = plaintext upstream (warned about at start)
    health: HealthCheck | None = None  # None = no probes: the upstream always counts as up

    @property
    def server_hostname(self) -> str | None:
        """What to pass as server_hostname when connecting (SNI and hostname check)."""
        if self.tls is None:
            return None
        return self.tls.server_name or self.address.host


def _no_bindings() -> Mapping[str, frozenset[str]]:
    return MappingProxyType({})


@dataclass(frozen=True)
class ListenerTLS:
    """TLS on a listener: the proxy is the TLS server, modalities are the clients."""

    cert: Path
    key: Path
    client_ca: Path | None = None  # trust anchors for client certificates; None = none are asked for
    require_client_cert: bool = False  # the loader defaults it to True when client_ca is given
    profile: TLSProfileName = DEFAULT_TLS_PROFILE
    # certificate name (CN or any SAN, as cert_name_key() normalises it) -> AE titles it may call as
    bind_ae: Mapping[str, frozenset[str]] = field(default_factory=_no_bindings)
    passphrase_file: Path | None = None  # passphrase of an encrypted `key`


TrustedNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Listener:
    name: str
    address: Address
    tls: ListenerTLS | None = None  # None = plaintext listener
    # PROXY protocol v1/v2 (proxy.proxyproto) before the first DICOM (or TLS) byte, as HAProxy's
    # send-proxy-v2 writes it; only from these networks (required, non-empty, when True)
    proxy_protocol: bool = False
    trusted_proxies: tuple[TrustedNetwork, ...] = ()
    # `client_identity:` what happens to the User Identity (0x58) a modality sends (proxy.identity.screen)
    client_identity: ClientIdentityPolicy = field(default_factory=ClientIdentityPolicy)


@dataclass(frozen=True)
class Timeouts:
    artim: float = 30.0  # TCP accept -> A-ASSOCIATE-RQ, and after RJ/RP/ABORT until close
    connect: float = 10.0  # TCP connect + TLS handshake to the upstream
    acse: float = 20.0  # RQ forwarded -> AC/RJ from upstream; below the 30 s clients wait
    idle: float = 300.0  # no PDU in either direction -> A-ABORT both sides
    shutdown: float = 30.0  # SIGTERM: how long live associations may finish


@dataclass(frozen=True)
class MetricsTLS:
    cert: Path
    key: Path


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password_file: Path  # the password, read when the exporter starts; never logged


@dataclass(frozen=True)
class MetricsConfig:
    """`metrics:`: the Prometheus exporter (proxy.metrics). Absent = no metrics at all."""

    address: Address  # port 0 = any free port (tests)
    tls: MetricsTLS | None = None
    basic_auth: BasicAuth | None = None


def _no_devices() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


def _no_identities() -> Mapping[str, IdentityProfile]:
    return MappingProxyType({})


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
    # `path:line:col: warning: ...` lines the loader found (e.g. insecure_skip_verify): log them at every start
    warnings: tuple[str, ...] = ()
    # `rules:` (proxy.policy): None = no rule files, every association is accepted and routed as before
    rules: RuleSet | None = None
    # `metrics:`: None = no exporter and no metrics kept
    metrics: MetricsConfig | None = None
    # `devices:` device name -> calling AE title patterns (globs), in file order: the `device` metric label
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=_no_devices)
    # every route with its upstreams in priority order (failover); `routes` keeps the first of each
    route_upstreams: Mapping[str, tuple[str, ...]] = field(default_factory=_no_devices)
    # `default_upstream` as a priority list; `default_upstream` is its first name
    default_upstreams: tuple[str, ...] = ()
    # `limits:` (proxy.limits): concurrency caps and per-source connection rate; all off by default
    limits: Limits = field(default_factory=Limits)
    # `log_format` (text or json lines) and `log_level`; the command line flags win when given
    log_format: str = "text"
    log_level: str = "info"
    # `identities:` profile name -> what a rule's `identity: NAME` injects upstream (proxy.identity.build)
    identities: Mapping[str, IdentityProfile] = field(default_factory=_no_identities)

    def upstream_names_for(self, called_ae: str) -> tuple[str, ...]:
        """The upstreams for a called AE title in priority order (its route, else the default);
        the caller picks the first healthy one (proxy.upstream.UpstreamHealth.pick)."""
        return self.route_upstreams.get(called_ae.strip(" "), self.default_upstreams)

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
            "max_associate_length", "rules", "metrics", "devices", "limits", "log_format", "log_level",
            "identities")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
LISTENER_KEYS = ("name", "address", "tls", "proxy_protocol", "trusted_proxies", "client_identity")
LIMIT_KEYS = ("max_associations", "per_listener", "per_source", "per_calling_ae", "rate", "burst",
              "max_associate_rq_size", "ipv6_prefix", "max_tracked_sources")
MAX_LIMIT_COUNT = 1_000_000
"""Upper bound for association counts, burst and rate: beyond it a limit is a typo, not a limit."""
UPSTREAM_KEYS = ("address", "tls", "health")
HEALTH_KEYS = ("called_ae", "calling_ae", "interval", "timeout", "rise", "fall")
METRICS_KEYS = ("address", "tls", "basic_auth")
METRICS_TLS_KEYS = ("cert", "key")
BASIC_AUTH_KEYS = ("username", "password_file")
RESERVED_DEVICE = "other"
"""The `device` label of every calling AE title no `devices:` pattern matches."""
TLS_KEYS = ("ca", "cert", "key", "server_name", "profile", "pin_sha256", "insecure_skip_verify", "passphrase_file")
LISTENER_TLS_KEYS = ("cert", "key", "client_ca", "require_client_cert", "profile", "bind_ae", "passphrase_file")
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


_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_pin(text: str) -> CertPin:
    """`cert:<hex>` or `spki:<hex>`: 64 hex digits of a SHA-256, in any case, colons allowed
    (as `openssl x509 -noout -fingerprint -sha256` prints them). ValueError in admin words."""
    kind, sep, digest = text.strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in ("cert", "spki"):
        raise ValueError(f"{text!r}: write 'cert:<sha256 hex>' (the certificate) or 'spki:<sha256 hex>' "
                         "(its public key)")
    digits = digest.replace(":", "").strip().lower()
    if not _HEX_SHA256.fullmatch(digits):
        raise ValueError(f"{text!r}: expected 64 hexadecimal digits (a SHA-256) after '{kind}:', "
                         f"got {len(digits)} characters")
    pin_kind: PinKind = "cert" if kind == "cert" else "spki"
    return CertPin(pin_kind, digits)


def cert_name_key(name: str) -> str:
    """How bind_ae keys and certificate names are compared: IP addresses in canonical form
    (10.0.0.7, 2001:db8::1), everything else without regard to case."""
    text = name.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text.casefold()


def read_passphrase(path: Path) -> bytes:
    """The passphrase in `path`: its bytes without one trailing newline. Never log the result.

    Raises OSError when unreadable and ValueError when empty.
    """
    data = path.read_bytes()
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ValueError(f"{path} is empty")
    return data


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
        self.tls_warnings: list[str] = []  # `path:line:col: warning: ...`, for ProxyConfig.warnings
        self.identity_names: set[str] = set()  # profile names under `identities:` (set by top())

    def warn(self, node: Node, message: str) -> None:
        self.tls_warnings.append(f"{node.loc}: warning: {message}")

    def top(self, root: Node) -> ProxyConfig | None:
        c = self.check
        top = c.mapping(root, "the top level")
        if top is None:
            return None
        c.keys(top, "the top level", required=("listeners", "upstreams"), optional=TOP_KEYS[2:])
        if "routes" not in top and "default_upstream" not in top:
            c.add(top, "the top level needs 'routes' or 'default_upstream' (or both), "
                       "so that every association has an upstream")

        # Profile names first: listeners (client_identity: replace) and rules refer to them.
        identities_node = top.get("identities")
        self.identity_names = identity_names(identities_node)
        identities: dict[str, IdentityProfile] = {}
        if identities_node is not None:
            identities = read_identities(self, identities_node) or {}

        node = top.get("listeners")
        listeners = self.listeners(node) if node is not None else None
        node = top.get("upstreams")
        upstreams = self.upstreams(node) if node is not None else None
        # Names declared, even by an upstream that is itself broken, so routes are still checked.
        known = {k.value for k, _ in node if isinstance(k.value, str)} if isinstance(node, MapNode) else None

        route_upstreams: dict[str, tuple[str, ...]] = {}
        node = top.get("routes")
        if node is not None:
            route_upstreams = self.routes(node, known) or {}
        routes = {ae: names[0] for ae, names in route_upstreams.items()}
        defaults: tuple[str, ...] = ()
        node = top.get("default_upstream")
        if node is not None:
            defaults = self.upstream_refs(node, known, "'default_upstream'") or ()
        default = defaults[0] if defaults else None

        metrics: MetricsConfig | None = None
        node = top.get("metrics")
        if node is not None:
            metrics = self.metrics(node)
        devices: dict[str, tuple[str, ...]] = {}
        node = top.get("devices")
        if node is not None:
            devices = self.devices(node) or {}

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

        log_format = self.choice(top.get("log_format"), "'log_format'", LOG_FORMATS, "text")
        log_level = self.choice(top.get("log_level"), "'log_level'", LOG_LEVELS, "info")

        limits = Limits()
        node = top.get("limits")
        if node is not None:
            limits = self.limits(node, max_assoc) or limits

        rules: RuleSet | None = None
        rule_warnings: tuple[str, ...] = ()
        node = top.get("rules")
        if node is not None:
            names = {listener.name for listener in listeners} if listeners is not None else None
            rules, rule_warnings = self.rules(node, known if upstreams is not None else None, names)

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
            warnings=tuple(self.tls_warnings) + rule_warnings,
            rules=rules,
            metrics=metrics,
            devices=MappingProxyType(devices),
            route_upstreams=MappingProxyType(route_upstreams),
            default_upstreams=defaults,
            limits=limits,
            log_format=log_format,
            log_level=log_level,
            identities=MappingProxyType(identities),
        )

    def choice(self, node: Node | None, what: str, allowed: tuple[str, ...], default: str) -> str:
        if node is None:
            return default
        value = self.check.string(node, what)
        if value is None:
            return default
        if value not in allowed:
            self.check.add(node, f"{what} must be one of {', '.join(allowed)}, got {value!r}")
            return default
        return value

    # Rules ------------------------------------------------------------------------------

    def rules(
        self, node: Node, upstreams: set[str] | None, listeners: set[str] | None
    ) -> tuple[RuleSet | None, tuple[str, ...]]:
        """`rules:` -> one RuleSet from the listed files, in order (a glob's matches sorted; a glob
        may match nothing, a plain path must exist), with `upstream:` names and `listener` values
        checked against this file. Returns the rule set and its warning lines."""
        c = self.check
        items: tuple[Node, ...]
        if isinstance(node, ScalarNode):
            items = (node,)
        else:
            seq = c.sequence(node, "'rules'")
            if seq is None:
                return None, ()
            items = seq.items
        paths: list[Path] = []
        ok = True
        for item in items:
            text = c.string(item, "a rule file path")
            if text is None:
                ok = False
                continue
            try:
                paths.extend(expand_rule_path(text, base_dir=self.base))
            except ValueError as exc:
                c.add(item, str(exc))
                ok = False
        if not ok:
            return None, ()
        if not paths:
            c.add(node, "'rules' names no rule file (every pattern matched nothing); the first file must "
                        "exist and set 'default'")
            return None, ()
        try:
            ruleset, warnings = load_rules(paths, base_dir=self.base, display_dir=self.path.parent)
        except ConfigErrors as exc:
            c.errors.extend(exc.errors)
            return None, ()
        errors = check_references(ruleset, upstreams=upstreams, listeners=listeners,
                                  identities=self.identity_names)
        if errors:
            c.errors.extend(errors)
            return None, ()
        return ruleset, tuple(str(w) for w in warnings)

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
        c.keys(m, "a listener", required=LISTENER_KEYS[:2], optional=LISTENER_KEYS[2:])
        name_node, address_node = m.get("name"), m.get("address")
        name = self.name(name_node, "listener") if name_node is not None else None
        what = f"the address of listener {name!r}" if name else "the listener address"
        address = self.address(address_node, what, listener=True) if address_node is not None else None
        tls: ListenerTLS | None = None
        tls_node = m.get("tls")
        if tls_node is not None:
            tls = self.listener_tls(tls_node, f"listener {name!r}" if name else "the listener")
        owner = f"listener {name!r}" if name else "the listener"
        proxied = self.proxy_protocol(m, owner)
        client_identity: ClientIdentityPolicy | None = ClientIdentityPolicy()
        client_identity_node = m.get("client_identity")
        if client_identity_node is not None:
            client_identity = read_client_identity(self, client_identity_node, owner, self.identity_names)
        if (name is None or address is None or (tls_node is not None and tls is None) or proxied is None
                or client_identity is None):
            return None
        return Listener(name, address, tls, proxy_protocol=proxied[0], trusted_proxies=proxied[1],
                        client_identity=client_identity)

    def proxy_protocol(self, m: MapNode, owner: str) -> tuple[bool, tuple[TrustedNetwork, ...]] | None:
        """`proxy_protocol` and `trusted_proxies` of a listener: (False, ()) when absent."""
        c = self.check
        enabled: bool | None = False
        flag_node = m.get("proxy_protocol")
        if flag_node is not None:
            enabled = self.boolean(flag_node, f"'proxy_protocol' in {owner}")
        networks: tuple[TrustedNetwork, ...] | None = ()
        trusted_node = m.get("trusted_proxies")
        if trusted_node is not None:
            networks = self.networks(trusted_node, f"'trusted_proxies' in {owner}")
        if enabled is None or networks is None:
            return None
        trusted_key = m.key_node("trusted_proxies")
        if enabled and trusted_node is None:
            c.add(m.key_node("proxy_protocol") or m,
                  f"{owner} has 'proxy_protocol: true' but no 'trusted_proxies': list the addresses of the "
                  "load balancers (e.g. [10.0.5.10, 10.0.5.11]); a header from anyone else is refused")
            return None
        if not enabled and trusted_key is not None:
            c.add(trusted_key, f"'trusted_proxies' in {owner} has no effect without 'proxy_protocol: true'")
            return None
        for network in networks:
            if network.prefixlen == 0 and trusted_node is not None:
                self.warn(trusted_node, f"{owner} trusts PROXY headers from every address ({network}): any "
                                        "client can claim any source address and slip past source rules "
                                        "and limits")
        return bool(enabled), networks

    def networks(self, node: Node, what: str) -> tuple[TrustedNetwork, ...] | None:
        """One address or CIDR network, or a non-empty list of them."""
        if isinstance(node, ScalarNode):
            items: tuple[Node, ...] = (node,)
        else:
            seq = self.check.sequence(node, what)
            if seq is None:
                return None
            items = seq.items
        out: list[TrustedNetwork] = []
        ok = True
        for item in items:
            text = self.check.string(item, f"an entry of {what}")
            if text is None:
                ok = False
                continue
            try:
                network = ipaddress.ip_network(text.strip(), strict=True)
            except ValueError as exc:
                hint = ""
                if "host bits set" in str(exc):
                    loose = ipaddress.ip_network(text.strip(), strict=False)
                    host = text.strip().split("/", 1)[0]
                    hint = f": write {loose} for the network, or {host} for the one host"
                self.check.add(item, f"{what}: {text!r} is not an IP address or CIDR network{hint}")
                ok = False
                continue
            if network not in out:
                out.append(network)
        return tuple(out) if ok else None

    # Limits -----------------------------------------------------------------------------

    def limits(self, node: Node, max_associate_length: int) -> Limits | None:
        c = self.check
        what = "'limits'"
        m = c.mapping(node, what)
        if m is None:
            return None
        ok = c.keys(m, what, optional=LIMIT_KEYS)
        counts: dict[str, int] = {}
        for key in ("max_associations", "per_listener", "per_source", "per_calling_ae", "burst"):
            value_node = m.get(key)
            if value_node is None:
                continue
            count = c.integer(value_node, f"'{key}' in {what}", low=1, high=MAX_LIMIT_COUNT)
            if count is None:
                ok = False
            else:
                counts[key] = count
        rate: float | None = None
        rate_node = m.get("rate")
        if rate_node is not None:
            rate = c.number(rate_node, f"'rate' in {what} (connections per second from one source)",
                            positive=True, high=float(MAX_LIMIT_COUNT))
            ok = ok and rate is not None
        burst_key = m.key_node("burst")
        if burst_key is not None and rate_node is None:
            c.add(burst_key, f"'burst' in {what} needs 'rate' (the bucket refills at 'rate' per second)")
            ok = False
        rq_size: int | None = None
        rq_node = m.get("max_associate_rq_size")
        if rq_node is not None:
            rq_size = self.length(rq_node, f"'max_associate_rq_size' in {what}")
            ok = ok and rq_size is not None
            if rq_size is not None and rq_size > max_associate_length:
                self.warn(rq_node, f"'max_associate_rq_size' ({rq_size}) is above 'max_associate_length' "
                                   f"({max_associate_length}), which caps the A-ASSOCIATE-RQ first")
        prefix = 64
        prefix_node = m.get("ipv6_prefix")
        if prefix_node is not None:
            value = c.integer(prefix_node, f"'ipv6_prefix' in {what}", low=32, high=128)
            ok = ok and value is not None
            prefix = value if value is not None else prefix
        tracked = DEFAULT_MAX_TRACKED_SOURCES
        tracked_node = m.get("max_tracked_sources")
        if tracked_node is not None:
            value = c.integer(tracked_node, f"'max_tracked_sources' in {what}", low=100, high=10_000_000)
            ok = ok and value is not None
            tracked = value if value is not None else tracked
        if not ok:
            return None
        total = counts.get("max_associations")
        if total is not None:
            for key in ("per_listener", "per_source", "per_calling_ae"):
                if counts.get(key, 0) > total:
                    self.warn(m.get(key) or m, f"'{key}' ({counts[key]}) is above 'max_associations' ({total}) "
                                               "and can never be reached")
        return Limits(
            max_associations=total,
            per_listener=counts.get("per_listener"),
            per_source=counts.get("per_source"),
            per_calling_ae=counts.get("per_calling_ae"),
            rate=rate,
            burst=counts.get("burst"),
            max_associate_rq_size=rq_size,
            ipv6_prefix=prefix,
            max_tracked_sources=tracked,
        )

    def listener_tls(self, node: Node, owner: str) -> ListenerTLS | None:
        c = self.check
        what = f"'tls' of {owner}"
        if isinstance(node, ScalarNode) and node.value is None:
            c.add(node, f"{what} is empty: a TLS listener needs at least 'cert' and 'key' "
                        "(remove the key for a plaintext listener)")
            return None
        m = c.mapping(node, what)
        if m is None:
            return None
        ok = c.keys(m, what, required=LISTENER_TLS_KEYS[:2], optional=LISTENER_TLS_KEYS[2:])
        paths = self.tls_files(m, what, ("cert", "key", "client_ca", "passphrase_file"))
        ok = ok and paths is not None
        paths = paths or {}
        profile = self.profile(m, what)
        ok = ok and profile is not None
        require: bool | None = "client_ca" in m
        require_node = m.get("require_client_cert")
        if require_node is not None:
            require = self.boolean(require_node, f"'require_client_cert' in {what}")
            if require and "client_ca" not in m:
                c.add(require_node, f"'require_client_cert' in {what} needs 'client_ca' to verify the client "
                                    "certificates")
                ok = False
        ok = ok and require is not None
        bind_ae: dict[str, frozenset[str]] = {}
        bind_node = m.get("bind_ae")
        if bind_node is not None:
            bound = self.bind_ae(bind_node, what)
            ok = ok and bound is not None
            bind_ae = bound or {}
            key_node = m.key_node("bind_ae")
            if "client_ca" not in m and key_node is not None:
                c.add(key_node, f"'bind_ae' in {what} needs 'client_ca': only verified client certificates "
                                "can be bound to AE titles")
                ok = False
        cert, key, ca, passphrase = paths.get("cert"), paths.get("key"), paths.get("client_ca"), \
            paths.get("passphrase_file")
        if ca is not None:
            ok = self.check_ca(m, ca, "client_ca") and ok
        if cert is not None and key is not None:
            ok = self.check_pair(m, cert, key, passphrase) and ok
        if not ok or cert is None or key is None or profile is None or require is None:
            return None
        return ListenerTLS(
            cert=cert,
            key=key,
            client_ca=ca,
            require_client_cert=require,
            profile=profile,
            bind_ae=MappingProxyType(bind_ae),
            passphrase_file=passphrase,
        )

    def tls_files(self, m: MapNode, what: str, names: tuple[str, ...]) -> dict[str, Path] | None:
        """The file keys present in `m`, resolved and readable; None (errors recorded) otherwise."""
        out: dict[str, Path] = {}
        ok = True
        for field_name in names:
            value = m.get(field_name)
            if value is None:
                continue
            path = self.file(value, f"'{field_name}' in {what}")
            if path is None:
                ok = False
            else:
                out[field_name] = path
        return out if ok else None

    def profile(self, m: MapNode, what: str) -> TLSProfileName | None:
        node = m.get("profile")
        if node is None:
            return DEFAULT_TLS_PROFILE
        text = self.check.string(node, f"'profile' in {what}")
        if text is None:
            return None
        for name in TLS_PROFILE_NAMES:
            if text == name:
                return name
        names = ", ".join(repr(n) for n in TLS_PROFILE_NAMES)
        self.check.add(node, f"unknown TLS profile {text!r} in {what} (expected one of: {names})")
        return None

    def boolean(self, node: Node, what: str) -> bool | None:
        """Only `true` or `false` as written: YAML 1.1's yes/no/on/off are too easy to misread."""
        if isinstance(node, ScalarNode) and isinstance(node.value, bool) and node.text in ("true", "false"):
            return node.value
        self.check.add(node, f"{what} must be true or false, got {describe(node)}")
        return None

    def bind_ae(self, node: Node, what: str) -> dict[str, frozenset[str]] | None:
        c = self.check
        where = f"'bind_ae' in {what}"
        m = c.mapping(node, where)
        if m is None:
            return None
        if not m.entries:
            c.add(m, f"{where} must not be empty (remove it to let every trusted certificate use any AE title)")
            return None
        out: dict[str, frozenset[str]] = {}
        seen: dict[str, ScalarNode] = {}
        ok = True
        for key, value in m:
            if not isinstance(key.value, str) or not key.value.strip():
                c.add(key, f"a certificate name in {where} must be a non-empty string (a CN or SAN); "
                           f"quote it: \"{key.text}\"")
                ok = False
                continue
            name = cert_name_key(key.value)
            titles = self.ae_titles(value, f"the AE titles of {key.value!r} in {where}")
            if titles is None:
                ok = False
                continue
            if name in seen:
                c.add(key, f"certificate name {key.value!r} is already bound at line {seen[name].loc.line} "
                           "(names are compared without regard to case)")
                ok = False
                continue
            seen[name] = key
            out[name] = titles
        return out if ok else None

    def ae_titles(self, node: Node, what: str) -> frozenset[str] | None:
        """One AE title or a non-empty list of them."""
        if isinstance(node, ScalarNode):
            items: tuple[Node, ...] = (node,)
        else:
            seq = self.check.sequence(node, what)
            if seq is None:
                return None
            items = seq.items
        titles: set[str] = set()
        ok = True
        for item in items:
            if not isinstance(item, ScalarNode):
                self.check.add(item, f"{what}: an AE title must be a string, got {describe(item)}")
                ok = False
                continue
            title = self.ae_title(item)
            if title is None:
                ok = False
            else:
                titles.add(title)
        return frozenset(titles) if ok else None

    def pins(self, node: Node, what: str) -> tuple[CertPin, ...] | None:
        """One pin or a non-empty list of them (two during a certificate rotation)."""
        where = f"'pin_sha256' in {what}"
        if isinstance(node, ScalarNode):
            items: tuple[Node, ...] = (node,)
        else:
            seq = self.check.sequence(node, where)
            if seq is None:
                return None
            items = seq.items
        pins: list[CertPin] = []
        ok = True
        for item in items:
            text = self.check.string(item, where)
            if text is None:
                ok = False
                continue
            try:
                pin = parse_pin(text)
            except ValueError as exc:
                self.check.add(item, f"{where}: {exc}")
                ok = False
                continue
            if pin not in pins:
                pins.append(pin)
        return tuple(pins) if ok else None

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
        health: HealthCheck | None = None
        health_node = m.get("health")
        if health_node is not None:
            health = self.health(health_node, what)
            tls_ok = tls_ok and health is not None
        if address is None or not tls_ok:
            return None
        return Upstream(name, address, tls, health)

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
        for field_name in ("ca", "cert", "key", "passphrase_file"):
            value = m.get(field_name)
            paths[field_name] = self.file(value, f"'{field_name}' in {what}") if value is not None else None
            if value is not None and paths[field_name] is None:
                ok = False
        profile = self.profile(m, what)
        ok = ok and profile is not None
        pins: tuple[CertPin, ...] | None = ()
        pin_node = m.get("pin_sha256")
        if pin_node is not None:
            pins = self.pins(pin_node, what)
            ok = ok and pins is not None
        insecure: bool | None = False
        insecure_node = m.get("insecure_skip_verify")
        if insecure_node is not None:
            insecure = self.boolean(insecure_node, f"'insecure_skip_verify' in {what}")
            ok = ok and insecure is not None
        if insecure:
            assert insecure_node is not None
            checked = ("only the pinned 'pin_sha256' is checked" if pins
                       else "anyone on the network path can impersonate it")
            self.warn(insecure_node, f"{owner}: insecure_skip_verify is on: its certificate chain and host name "
                                     f"are NOT verified; {checked}")
        passphrase_key = m.key_node("passphrase_file")
        if passphrase_key is not None and "key" not in m:
            c.add(passphrase_key, f"{what} has 'passphrase_file' but no 'key' to decrypt")
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
        ca, cert, key, passphrase = paths["ca"], paths["cert"], paths["key"], paths["passphrase_file"]
        if ca is not None:
            ok = self.check_ca(m, ca) and ok
        if cert is not None and key is not None:
            ok = self.check_pair(m, cert, key, passphrase) and ok
        if not ok or profile is None or pins is None or insecure is None:
            return None
        return UpstreamTLS(
            ca=ca,
            cert=cert,
            key=key,
            server_name=server_name,
            profile=profile,
            pin_sha256=pins,
            insecure_skip_verify=insecure,
            passphrase_file=passphrase,
        )

    def check_ca(self, m: MapNode, ca: Path, key_name: str = "ca") -> bool:
        node = m.get(key_name)
        assert node is not None
        try:
            x509.load_pem_x509_certificates(ca.read_bytes())
        except (ValueError, OSError):
            self.check.add(node, f"{ca} does not contain a PEM certificate")
            return False
        return True

    def check_pair(self, m: MapNode, cert_path: Path, key_path: Path, passphrase_file: Path | None = None) -> bool:
        """Catch a wrong, encrypted or mismatched key now rather than at the first association."""
        cert_node, key_node = m.get("cert"), m.get("key")
        assert cert_node is not None and key_node is not None
        try:
            cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        except (ValueError, OSError):
            self.check.add(cert_node, f"{cert_path} does not contain a PEM certificate")
            return False
        password: bytes | None = None
        if passphrase_file is not None:
            passphrase_node = m.get("passphrase_file")
            assert passphrase_node is not None
            try:
                password = read_passphrase(passphrase_file)
            except (OSError, ValueError) as exc:
                words = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self.check.add(passphrase_node, f"cannot use the passphrase file {passphrase_file}: {words}")
                return False
            if passphrase_file.stat().st_mode & 0o077:
                self.warn(passphrase_node, f"{passphrase_file} is readable by other users; chmod 600 it")
        try:
            key_bytes = key_path.read_bytes()
        except OSError as exc:
            self.check.add(key_node, f"cannot read {key_path}: {exc.strerror or exc}")
            return False
        try:
            key = serialization.load_pem_private_key(key_bytes, password=password)
        except TypeError:  # cryptography's way to say "needs a password" or "is not encrypted"
            if password is None:
                self.check.add(key_node, f"{key_path} is encrypted; set 'passphrase_file' to a file holding its "
                                         "passphrase, or use an unencrypted key (protect it with file permissions)")
            else:
                self.check.add(key_node, f"{key_path} is not encrypted; remove 'passphrase_file'")
            return False
        except (ValueError, UnsupportedAlgorithm):
            if password is not None and b"ENCRYPTED" in key_bytes:
                self.check.add(key_node, f"cannot decrypt {key_path} with the passphrase in {passphrase_file} "
                                         "(wrong passphrase?)")
            else:
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

    def routes(self, node: Node, known: set[str] | None) -> dict[str, tuple[str, ...]] | None:
        c = self.check
        m = c.mapping(node, "'routes'")
        if m is None:
            return None
        if not m.entries:
            c.add(m, "'routes' must not be empty (remove the key to route everything to default_upstream)")
            return None
        out: dict[str, tuple[str, ...]] = {}
        where: dict[str, ScalarNode] = {}
        ok = True
        for key, value in m:
            ae = self.ae_title(key)
            target = self.upstream_refs(value, known, f"the route for {key.text!r}")
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

    def upstream_refs(self, node: Node, known: set[str] | None, what: str) -> tuple[str, ...] | None:
        """One upstream name, or a non-empty list of them in priority order (failover)."""
        if isinstance(node, ScalarNode):
            name = self.upstream_ref(node, known, what)
            return None if name is None else (name,)
        seq = self.check.sequence(node, what)
        if seq is None:
            return None
        names: list[str] = []
        ok = True
        for item in seq:
            name = self.upstream_ref(item, known, what)
            if name is None:
                ok = False
            elif name in names:
                self.check.add(item, f"upstream {name!r} is listed twice in {what}")
                ok = False
            else:
                names.append(name)
        return tuple(names) if ok else None

    # Health checks, metrics, devices ----------------------------------------------------

    def health(self, node: Node, owner: str) -> HealthCheck | None:
        c = self.check
        what = f"'health' of {owner}"
        m = c.mapping(node, what)
        if m is None:
            return None
        ok = c.keys(m, what, required=HEALTH_KEYS[:1], optional=HEALTH_KEYS[1:])
        values: dict[str, str | float | int] = {}
        for key in ("called_ae", "calling_ae"):
            value_node = m.get(key)
            if value_node is None:
                continue
            title = self.ae_title(value_node) if isinstance(value_node, ScalarNode) else None
            if not isinstance(value_node, ScalarNode):
                c.add(value_node, f"'{key}' in {what} must be an AE title, got {describe(value_node)}")
            if title is None:
                ok = False
            else:
                values[key] = title
        for key in ("interval", "timeout"):
            value_node = m.get(key)
            if value_node is None:
                continue
            number = c.number(value_node, f"'{key}' in {what} (seconds)", positive=True, high=MAX_TIMEOUT)
            if number is None:
                ok = False
            else:
                values[key] = number
        for key in ("rise", "fall"):
            value_node = m.get(key)
            if value_node is None:
                continue
            count = c.integer(value_node, f"'{key}' in {what}", low=1, high=100)
            if count is None:
                ok = False
            else:
                values[key] = count
        if not ok or "called_ae" not in values:
            return None
        return HealthCheck(**values)  # type: ignore[arg-type]

    def metrics(self, node: Node) -> MetricsConfig | None:
        c = self.check
        m = c.mapping(node, "'metrics'")
        if m is None:
            return None
        ok = c.keys(m, "'metrics'", required=METRICS_KEYS[:1], optional=METRICS_KEYS[1:])
        address_node = m.get("address")
        address = None
        if address_node is not None:
            address = self.address(address_node, "the address of 'metrics'", listener=True)
        tls: MetricsTLS | None = None
        tls_node = m.get("tls")
        if tls_node is not None:
            tls_map = c.mapping(tls_node, "'tls' of 'metrics'")
            tls_ok = tls_map is not None and c.keys(tls_map, "'tls' of 'metrics'", required=METRICS_TLS_KEYS)
            files = self.tls_files(tls_map, "'tls' of 'metrics'", METRICS_TLS_KEYS) if tls_map is not None else None
            cert, key = (files or {}).get("cert"), (files or {}).get("key")
            if tls_ok and tls_map is not None and cert is not None and key is not None:
                tls_ok = self.check_pair(tls_map, cert, key)
            if tls_ok and cert is not None and key is not None:
                tls = MetricsTLS(cert, key)
            else:
                ok = False
        auth: BasicAuth | None = None
        auth_node = m.get("basic_auth")
        if auth_node is not None:
            auth = self.basic_auth(auth_node)
            ok = ok and auth is not None
        if auth is not None and tls is None:
            key_node = m.key_node("basic_auth") or m
            self.warn(key_node, "'metrics' has 'basic_auth' but no 'tls': the password crosses the network "
                                "in clear text")
        if not ok or address is None:
            return None
        return MetricsConfig(address, tls, auth)

    def basic_auth(self, node: Node) -> BasicAuth | None:
        c = self.check
        what = "'basic_auth' of 'metrics'"
        m = c.mapping(node, what)
        if m is None:
            return None
        ok = c.keys(m, what, required=BASIC_AUTH_KEYS)
        username: str | None = None
        user_node = m.get("username")
        if user_node is not None:
            username = c.string(user_node, f"'username' in {what}")
            if username is not None and (":" in username or not username.isprintable()):
                c.add(user_node, f"'username' in {what} must be printable and must not contain ':'")
                username = None
        password: Path | None = None
        password_node = m.get("password_file")
        if password_node is not None:
            password = self.file(password_node, f"'password_file' in {what}")
            if password is not None:
                try:
                    read_passphrase(password)
                except (OSError, ValueError) as exc:
                    words = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    c.add(password_node, f"cannot use the password file {password}: {words}")
                    password = None
            if password is not None and password.stat().st_mode & 0o077:
                self.warn(password_node, f"{password} is readable by other users; chmod 600 it")
        if not ok or username is None or password is None:
            return None
        return BasicAuth(username, password)

    def devices(self, node: Node) -> dict[str, tuple[str, ...]] | None:
        """`devices: {name: pattern | [patterns]}`: calling AE title globs per device name."""
        from proxy.policy.loader import compile_glob

        c = self.check
        m = c.mapping(node, "'devices'")
        if m is None:
            return None
        if not m.entries:
            c.add(m, "'devices' must not be empty (remove the key: every device is then 'other')")
            return None
        out: dict[str, tuple[str, ...]] = {}
        claimed: dict[str, str] = {}
        ok = True
        for key, value in m:
            name = self.name(key, "device")
            if name is not None and name == RESERVED_DEVICE:
                c.add(key, f"device name {RESERVED_DEVICE!r} is reserved for AE titles no device matches")
                name = None
            what = f"the AE title patterns of device {key.text!r}"
            items: tuple[Node, ...]
            if isinstance(value, ScalarNode):
                items = (value,)
            else:
                seq = c.sequence(value, what)
                items = seq.items if seq is not None else ()
                ok = ok and seq is not None
            patterns: list[str] = []
            for item in items:
                text = self.ae_title(item) if isinstance(item, ScalarNode) else None
                if not isinstance(item, ScalarNode):
                    c.add(item, f"{what}: a pattern must be a string, got {describe(item)}")
                if text is None:
                    ok = False
                    continue
                try:
                    compile_glob(text)
                except ValueError as exc:
                    c.add(item, f"{what}: {exc}")
                    ok = False
                    continue
                if text in claimed:
                    c.add(item, f"pattern {text!r} is already used by device {claimed[text]!r}")
                    ok = False
                    continue
                claimed[text] = key.text
                patterns.append(text)
            if name is None:
                ok = False
            elif patterns:
                out[name] = tuple(patterns)
        return out if ok else None

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
    "DEFAULT_TLS_PROFILE",
    "TLS_PROFILE_NAMES",
    "Address",
    "BasicAuth",
    "CertPin",
    "ConfigErrors",
    "HealthCheck",
    "Limits",
    "Listener",
    "ListenerTLS",
    "MetricsConfig",
    "MetricsTLS",
    "ProxyConfig",
    "TLSProfileName",
    "Timeouts",
    "Upstream",
    "UpstreamTLS",
    "cert_name_key",
    "check_ae_title",
    "load",
    "load_text",
    "parse_address",
    "parse_pin",
    "read_passphrase",
]
