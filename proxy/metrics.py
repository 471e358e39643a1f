"""Every metric of the proxy, on an injected CollectorRegistry, and the /metrics exporter.

Observers, not participants (DESIGN.md habits 7 and 9): the relay and the server report what
happened; nothing here decides anything, and a failure here is logged, never raised into an
association. Label values come from enums and the config only, so the number of series is
bounded whatever the peers send: listeners, upstreams, rules, devices (an AE title no
`devices:` pattern matches is `other`), and the fixed tuples below. AE titles, addresses, user
names and secrets are never label values.

Cheap on the hot path: an association's bytes and PDUs are counted in plain ints of its
AssociationRecorder and flushed into Prometheus when it ends and before every scrape (the
exporter calls ProxyMetrics.flush()), never one Prometheus call per PDU.

Outcomes (`outcome` label) count every connection once, when it ends, plus the `accepted`
milestone when the A-ASSOCIATE-AC reaches the modality:

    accepted              milestone: the association was established (its end is counted too)
    released              ended by A-RELEASE
    aborted               ended by A-ABORT, a closed connection, the idle timeout or shutdown
    rejected_by_rule      a rule rejected or dropped it
    rejected_by_upstream  the archive sent A-ASSOCIATE-RJ
    upstream_unavailable  no upstream reachable: connect/TLS failure, ACSE timeout, all down
    rejected              the proxy rejected it (protocol version, application context, bind_ae,
                          no route)
    rejected_by_limit     a `limits:` cap or rate refused it (A-ASSOCIATE-RJ 2/3/2)
    protocol_error        a peer broke PS3.8 and the proxy aborted
    no_association        the connection ended before any A-ASSOCIATE-RQ (ARTIM, TLS or HTTP on
                          a DICOM port, a port check)

So `sum(rate(...{outcome!="accepted"}))` is the rate of connections ending, and
`accepted / (accepted + rejected* + upstream_unavailable)` the acceptance ratio.

Per device: `dicomproxy_device_associations_total{device,outcome}` and
`dicomproxy_device_bytes_total{device,direction}` (separate counters, so the contract label sets
of associations_total and bytes_total stay as they are and device x upstream x listener is never
multiplied out).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from proxy import __version__
from proxy import tls as tls_mod
from proxy.config import RESERVED_DEVICE, Address, MetricsConfig, ProxyConfig, read_passphrase
from proxy.dul.constants import PDUType, UserIdentityType
from proxy.dul.dimse import CommandFacts, CommandField, MessageStream, command_name, status_class
from proxy.dul.framer import ForeignProtocolError
from proxy.dul.machine import Side
from proxy.dul.pdus import is_single_data_fragment
from proxy.errors import ProxyError, RemotePDUError
from proxy.limits import LIMIT_REASONS

if TYPE_CHECKING:
    from proxy.dul.framer import Frame
    from proxy.policy.model import Decision, DimseDecision
    from proxy.upstream import ProbeResult

log = logging.getLogger("proxy.metrics")

__all__ = [
    "DIMSE_COMMANDS",
    "DIRECTIONS",
    "NULL_RECORDER",
    "OUTCOMES",
    "PDU_TYPES",
    "PROTOCOL_ERROR_REASONS",
    "SIDES",
    "STATUS_CLASSES",
    "AssociationRecorder",
    "DeviceMap",
    "DimseEvent",
    "DimseTracker",
    "MetricsExporter",
    "NullRecorder",
    "ProxyMetrics",
    "outcome_label",
]

# --------------------------------------------------------------------------- label values

OUTCOMES = (
    "accepted",
    "released",
    "aborted",
    "rejected_by_rule",
    "rejected_by_upstream",
    "upstream_unavailable",
    "rejected",
    "rejected_by_limit",
    "protocol_error",
    "no_association",
)
"""Every `outcome` label value (see the module docstring)."""

_TERMINAL = OUTCOMES[1:]

_RELAY_OUTCOMES: Mapping[str, str] = {
    "released": "released",
    "aborted": "aborted",
    "idle": "aborted",
    "internal_error": "aborted",
    "open": "aborted",
    "accepted": "aborted",
    "rejected_by_rule": "rejected_by_rule",
    "dropped_by_rule": "rejected_by_rule",
    "rejected_by_upstream": "rejected_by_upstream",
    "upstream_unavailable": "upstream_unavailable",
    "acse_timeout": "upstream_unavailable",
    "rejected": "rejected",
    "rejected_by_limit": "rejected_by_limit",
    "protocol_error": "protocol_error",
    "artim": "no_association",
    "closed_before_rq": "no_association",
}


def outcome_label(relay_outcome: str, *, requested: bool = True) -> str:
    """The bounded `outcome` label of Association.outcome at its end. `requested=False` (no
    A-ASSOCIATE-RQ ever arrived) is always `no_association`; an unknown string is `aborted`."""
    if not requested or relay_outcome.startswith("foreign_"):
        return "no_association"
    return _RELAY_OUTCOMES.get(relay_outcome, "aborted")


DIRECTIONS = ("to_upstream", "to_client")
"""`direction`: bytes/PDUs received from the modality (on their way to the archive), and back."""

SIDES = ("client", "upstream")
"""`side` of TLS and protocol errors: a modality on a listener, or an archive."""

PDU_TYPES: Mapping[int, str] = {
    PDUType.A_ASSOCIATE_RQ: "associate_rq",
    PDUType.A_ASSOCIATE_AC: "associate_ac",
    PDUType.A_ASSOCIATE_RJ: "associate_rj",
    PDUType.P_DATA_TF: "p_data_tf",
    PDUType.A_RELEASE_RQ: "release_rq",
    PDUType.A_RELEASE_RP: "release_rp",
    PDUType.A_ABORT: "abort",
}

DIMSE_COMMANDS = (*sorted({command_name(c) for c in CommandField}), "unknown")
STATUS_CLASSES = ("success", "warning", "failure", "cancel", "pending")

PROTOCOL_ERROR_REASONS = (
    "unrecognized_pdu",
    "unexpected_pdu",
    "unrecognized_pdu_parameter",
    "unexpected_pdu_parameter",
    "invalid_pdu_parameter_value",
    "not_specified",
    "foreign_tls",
    "foreign_http",
)
_ABORT_REASONS = {0: "not_specified", 1: "unrecognized_pdu", 2: "unexpected_pdu", 4: "unrecognized_pdu_parameter",
                  5: "unexpected_pdu_parameter", 6: "invalid_pdu_parameter_value"}

IDENTITY_TYPES: Mapping[int, str] = {t.value: t.name.lower() for t in UserIdentityType}
IDENTITY_RESULTS = ("injected", "skipped", "failed")
RULE_MODES = ("enforce", "shadow")
NO_UPSTREAM = "none"
"""`upstream` label of an association that never got one (rejected or dropped before routing)."""
OTHER = RESERVED_DEVICE  # "other": any device, upstream or rule name not in the config

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")

# --------------------------------------------------------------------------- buckets

SETUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DIMSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


# --------------------------------------------------------------------------- devices


class DeviceMap:
    """`devices:` as a classifier: calling AE title -> device name, or `other`. Patterns are the
    case-sensitive globs of proxy.policy (`CT*`, `MR0?`); the first device listed wins."""

    def __init__(self, devices: Mapping[str, Sequence[str]]) -> None:
        from proxy.policy.loader import compile_glob
        from proxy.policy.model import Glob

        self.names: tuple[str, ...] = (*devices, OTHER)
        self._exact: dict[str, str] = {}
        parts: list[str] = []
        self._groups: list[str] = []
        for name, patterns in devices.items():
            for text in patterns:
                pattern = compile_glob(text)
                if not isinstance(pattern, Glob):
                    self._exact.setdefault(text, name)
                else:
                    parts.append(f"(?P<g{len(self._groups)}>{pattern.regex})")
                    self._groups.append(name)
        self._regex = re.compile("|".join(parts)) if parts else None
        self._order = {name: i for i, name in enumerate(devices)}

    def classify(self, calling_ae: str) -> str:
        title = calling_ae.strip(" \x00")
        best = self._exact.get(title)
        if self._regex is not None:
            match = self._regex.fullmatch(title)
            if match is not None and match.lastgroup is not None:
                glob_device = self._groups[int(match.lastgroup[1:])]
                if best is None or self._order[glob_device] < self._order[best]:
                    best = glob_device
        return best or OTHER


# --------------------------------------------------------------------------- DIMSE


@dataclass(frozen=True, slots=True)
class DimseEvent:
    """One DIMSE observation: a request (`status_class` None) or a response; `duration` is set
    on the final response of a request this tracker saw (request -> final response)."""

    command: str  # one of DIMSE_COMMANDS
    status_class: str | None = None  # one of STATUS_CLASSES for a response
    duration: float | None = None


class DimseTracker:
    """Pairs requests with their responses in one association (pure: the clock is passed in).

    Requests travel both ways (C-GET sub-operations, N-EVENT-REPORT), so an outstanding request
    is keyed by (direction, MessageID), and a response arriving from the other direction is
    matched by MessageIDBeingRespondedTo. Pending responses (0xFF00/0xFF01) are counted but do
    not end a request. At most `max_outstanding` requests are remembered (the oldest is
    forgotten first), so a peer that never answers cannot grow it.
    """

    __slots__ = ("_max", "_pending")

    def __init__(self, max_outstanding: int = 1024) -> None:
        self._max = max_outstanding
        self._pending: dict[tuple[bool, int], tuple[str, float]] = {}

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def feed(self, from_requestor: bool, commands: Iterable[tuple[int, CommandFacts]], now: float) -> list[DimseEvent]:
        """Commands completed in one direction (MessageStream.observe's result) -> events."""
        events: list[DimseEvent] = []
        for _context_id, command in commands:
            field_value = command.command_field
            name = command_name(field_value) if field_value is not None else "unknown"
            if field_value is None or not field_value & 0x8000:
                events.append(DimseEvent(name))
                message_id = command.message_id
                if field_value is not None and field_value != CommandField.C_CANCEL_RQ and message_id is not None:
                    self._remember((from_requestor, message_id), name, now)
                continue
            status = command.status
            klass = status_class(status) if status is not None else "failure"
            duration = None
            answered = command.message_id_being_responded_to
            if klass != "pending" and answered is not None:
                started = self._pending.pop((not from_requestor, answered), None)
                if started is not None:
                    duration = max(0.0, now - started[1])
            events.append(DimseEvent(name, klass, duration))
        return events

    def _remember(self, key: tuple[bool, int], name: str, now: float) -> None:
        self._pending.pop(key, None)
        if len(self._pending) >= self._max:
            self._pending.pop(next(iter(self._pending)))
        self._pending[key] = (name, now)


# --------------------------------------------------------------------------- one association


_REQUESTOR = Side.REQUESTOR


class AssociationRecorder:
    """What one association reports; created by ProxyMetrics.association(listener), or
    NULL_RECORDER when metrics are off (same methods, all no-ops), so the relay needs no `if`.

    The relay calls, in this order (each at most once unless noted):

        received(side, nbytes, frames)   every read, after PDUFramer.feed (hot path: int adds only)
        requested(calling_ae)            the A-ASSOCIATE-RQ was parsed
        rule_decision(decision)          after RuleSet.evaluate / evaluate_dimse (any number)
        routed(upstream)                 an upstream was chosen
        upstream_connected(c, t)         TCP connect and TLS handshake seconds (t None = plaintext)
        tls_handshake_failure(label)     TLS to the upstream failed (describe_tls_error's label)
        accepted()                       the A-ASSOCIATE-AC went to the modality
        pdata(side, pdu)                 every forwarded P-DATA-TF, only when `dimse_enabled`
        protocol_error(side, exc)        the relay aborts for a RemotePDUError / ForeignProtocolError
        finished(outcome)                once, when the association is done (Association.outcome)

    DIMSE: pdata() reassembles command sets with its own MessageStream per direction and pairs
    requests with responses (DimseTracker). It only observes: a malformed command stream stops the
    tracking of that direction, and the relay's own checks decide about the association.
    """

    __slots__ = (
        "_closed",
        "_dimse_durations",
        "_dimse_requests",
        "_dimse_responses",
        "_metrics",
        "_pdus",
        "_requested_at",
        "_streams",
        "_tracker",
        "bytes_to_client",
        "bytes_to_upstream",
        "device",
        "dimse_counts",
        "listener",
        "requested_ae",
        "upstream",
    )

    def __init__(self, metrics: ProxyMetrics, listener: str, *, dimse: bool) -> None:
        self._metrics = metrics
        self.listener = listener
        self.upstream = NO_UPSTREAM
        self.device = OTHER
        self.requested_ae = False
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self._pdus = [0] * 16  # index: pdu_type (1..7) + 8 for the upstream's direction
        self._requested_at: float | None = None
        self._tracker = DimseTracker() if dimse else None
        self._streams: list[MessageStream | None] = [MessageStream(), MessageStream()] if dimse else [None, None]
        self._dimse_requests: dict[str, int] = {}
        self.dimse_counts: dict[str, int] = {}  # requests per command for this association (never flushed)
        self._dimse_responses: dict[tuple[str, str], int] = {}
        self._dimse_durations: list[tuple[str, float]] = []
        self._closed = False

    @property
    def dimse_enabled(self) -> bool:
        """True when the relay should pass every forwarded P-DATA-TF to pdata()."""
        return self._tracker is not None

    # ---- hot path ------------------------------------------------------------------------------
    def received(self, side: Side, nbytes: int, frames: Sequence[Frame]) -> None:
        if side is _REQUESTOR:
            self.bytes_to_upstream += nbytes
            offset = 0
        else:
            self.bytes_to_client += nbytes
            offset = 8
        pdus = self._pdus
        for pdu_type, _data in frames:
            pdus[(pdu_type & 7) + offset] += 1  # cut-through: a P_DATA_HEAD counts as P-DATA, a P_DATA_REST not

    # ---- milestones ----------------------------------------------------------------------------
    def requested(self, calling_ae: str) -> None:
        self.requested_ae = True
        self._requested_at = self._metrics.clock()
        self.device = self._metrics.devices.classify(calling_ae)

    def routed(self, upstream: str | None) -> None:
        self.upstream = self._metrics.upstream_label(upstream)

    def upstream_connected(self, connect_seconds: float, tls_seconds: float | None = None) -> None:
        self._metrics.safe(self._metrics.observe_connect, self.upstream, connect_seconds, tls_seconds)

    def accepted(self) -> None:
        started = self._requested_at
        setup = None if started is None else self._metrics.clock() - started
        self._metrics.safe(self._metrics.observe_accepted, self, setup)

    def pdata(self, side: Side, pdu: memoryview) -> None:
        """One whole P-DATA-TF PDU (header included) on its way through, for DIMSE metrics."""
        index = 0 if side is _REQUESTOR else 1
        stream = self._streams[index]
        if stream is None:
            return
        if len(pdu) >= 12 and is_single_data_fragment(pdu, 0, len(pdu) - 6):
            self.data_fragment(side, pdu)  # a single data-set fragment (the bulk of a C-STORE)
            return
        try:
            completed = stream.observe(pdu[6:])
        except RemotePDUError:
            self._streams[index] = None  # not ours to judge: stop looking at this direction
            return
        if completed:
            self.commands(side, completed)

    def data_fragment(self, side: Side, head: memoryview) -> None:
        """A P-DATA-TF PDU that is one data-set fragment; `head` holds at least its first 12 bytes
        (cut-through passes it on before the rest arrives): nothing to reassemble."""
        stream = self._streams[0 if side is _REQUESTOR else 1]
        if stream is not None and head[11] & 0x02:  # the data set's last fragment
            stream.in_data_set = False

    def commands(self, side: Side, completed: Sequence[tuple[int, CommandFacts]]) -> None:
        """Command sets completed in one direction (if the relay reassembles them itself)."""
        tracker = self._tracker
        if tracker is None or not completed:
            return
        for event in tracker.feed(side is _REQUESTOR, completed, self._metrics.clock()):
            if event.status_class is None:
                self._dimse_requests[event.command] = self._dimse_requests.get(event.command, 0) + 1
                self.dimse_counts[event.command] = self.dimse_counts.get(event.command, 0) + 1
            else:
                key = (event.command, event.status_class)
                self._dimse_responses[key] = self._dimse_responses.get(key, 0) + 1
                if event.duration is not None:
                    self._dimse_durations.append((event.command, event.duration))
        if len(self._dimse_durations) >= 4096:
            self._metrics.safe(self.flush)

    def rule_decision(self, decision: Decision | DimseDecision) -> None:
        self._metrics.rule_decision(decision)

    def tls_handshake_failure(self, reason: str) -> None:
        """TLS to this association's upstream failed; `reason` from proxy.tls.describe_tls_error."""
        self._metrics.tls_handshake_failure("upstream", reason)

    def protocol_error(self, side: Side, exc: RemotePDUError) -> None:
        self._metrics.protocol_error(side, exc)

    def identity_injection(self, profile: str, identity_type: int, result: str) -> None:
        self._metrics.identity_injection(profile, identity_type, result)

    def finished(self, relay_outcome: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._metrics.safe(self._metrics.observe_finished, self, relay_outcome)

    # ---- into Prometheus -----------------------------------------------------------------------
    def flush(self) -> None:
        """Move the local counts into the Prometheus metrics (event loop thread only)."""
        m = self._metrics
        upstream = self.upstream
        if self.bytes_to_upstream or self.bytes_to_client:
            for direction, count in (("to_upstream", self.bytes_to_upstream), ("to_client", self.bytes_to_client)):
                if count:
                    m.bytes.labels(self.listener, upstream, direction).inc(count)
                    m.device_bytes.labels(self.device, direction).inc(count)
            self.bytes_to_upstream = self.bytes_to_client = 0
        pdus = self._pdus
        for index, count in enumerate(pdus):
            if count:
                name = PDU_TYPES.get(index & 7)
                if name is not None:
                    m.pdus.labels(name, DIRECTIONS[index >> 3]).inc(count)
                pdus[index] = 0
        if self._dimse_requests:
            for command, count in self._dimse_requests.items():
                m.dimse_requests.labels(upstream, command).inc(count)
            self._dimse_requests.clear()
        if self._dimse_responses:
            for (command, klass), count in self._dimse_responses.items():
                m.dimse_responses.labels(upstream, command, klass).inc(count)
            self._dimse_responses.clear()
        if self._dimse_durations:
            for command, seconds in self._dimse_durations:
                m.dimse_duration.labels(upstream, command).observe(seconds)
            self._dimse_durations.clear()


class NullRecorder(AssociationRecorder):
    """The recorder of every association when metrics are off: accepts every call, keeps nothing."""

    __slots__ = ()

    def __init__(self) -> None:  # no ProxyMetrics behind it
        self.listener = ""
        self.upstream = NO_UPSTREAM
        self.device = OTHER
        self.requested_ae = False
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self._tracker = None
        self._streams = [None, None]
        self.dimse_counts = {}  # shared by every association without metrics: never written to

    def received(self, side: Side, nbytes: int, frames: Sequence[Frame]) -> None:
        pass

    def requested(self, calling_ae: str) -> None:
        pass

    def routed(self, upstream: str | None) -> None:
        pass

    def upstream_connected(self, connect_seconds: float, tls_seconds: float | None = None) -> None:
        pass

    def accepted(self) -> None:
        pass

    def pdata(self, side: Side, pdu: memoryview) -> None:
        pass

    def data_fragment(self, side: Side, head: memoryview) -> None:
        pass

    def commands(self, side: Side, completed: Sequence[tuple[int, CommandFacts]]) -> None:
        pass

    def rule_decision(self, decision: Decision | DimseDecision) -> None:
        pass

    def tls_handshake_failure(self, reason: str) -> None:
        pass

    def protocol_error(self, side: Side, exc: RemotePDUError) -> None:
        pass

    def identity_injection(self, profile: str, identity_type: int, result: str) -> None:
        pass

    def finished(self, relay_outcome: str) -> None:
        pass

    def flush(self) -> None:
        pass


NULL_RECORDER = NullRecorder()
"""Share it: it holds no state."""


# --------------------------------------------------------------------------- the registry


class ProxyMetrics:
    """All metrics of one proxy process, on `registry` (inject a fresh CollectorRegistry; the
    global one is never touched). Also the HealthObserver of proxy.upstream.UpstreamHealth."""

    def __init__(
        self,
        registry: CollectorRegistry,
        config: ProxyConfig,
        *,
        dimse: bool = True,
        version: str = __version__,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.wall_clock = wall_clock
        self.dimse = dimse
        self._live: set[AssociationRecorder] = set()
        r = registry
        self.build_info = Gauge("dicomproxy_build_info", "Always 1; the version of the running proxy.",
                                ["version"], registry=r)
        self.build_info.labels(version).set(1)
        self.associations_active = Gauge("dicomproxy_associations_active",
                                         "Connections being handled now (association or not yet).",
                                         ["listener"], registry=r)
        self.associations = Counter("dicomproxy_associations",
                                    "Connections by final outcome, plus the 'accepted' milestone.",
                                    ["listener", "upstream", "outcome"], registry=r)
        self.device_associations = Counter("dicomproxy_device_associations",
                                           "Associations per device (devices: in proxy.yaml) and outcome.",
                                           ["device", "outcome"], registry=r)
        self.setup = Histogram("dicomproxy_association_setup_seconds",
                               "A-ASSOCIATE-RQ received to A-ASSOCIATE-AC sent to the modality.",
                               ["upstream"], buckets=SETUP_BUCKETS, registry=r)
        self.connect = Histogram("dicomproxy_upstream_connect_seconds", "TCP connect to an upstream.",
                                 ["upstream"], buckets=CONNECT_BUCKETS, registry=r)
        self.tls_handshake = Histogram("dicomproxy_upstream_tls_handshake_seconds",
                                       "TLS handshake with an upstream.", ["upstream"],
                                       buckets=CONNECT_BUCKETS, registry=r)
        self.bytes = Counter("dicomproxy_bytes", "DICOM bytes relayed (after TLS), by direction.",
                             ["listener", "upstream", "direction"], registry=r)
        self.device_bytes = Counter("dicomproxy_device_bytes", "DICOM bytes relayed per device and direction.",
                                    ["device", "direction"], registry=r)
        self.pdus = Counter("dicomproxy_pdus", "PDUs received, by type and direction.", ["type", "direction"],
                            registry=r)
        self.dimse_requests = Counter("dicomproxy_dimse_requests", "DIMSE requests relayed.",
                                      ["upstream", "command"], registry=r)
        self.dimse_responses = Counter("dicomproxy_dimse_responses", "DIMSE responses relayed, by status class.",
                                       ["upstream", "command", "status_class"], registry=r)
        self.dimse_duration = Histogram("dicomproxy_dimse_duration_seconds",
                                        "DIMSE request to its final (non-pending) response.",
                                        ["upstream", "command"], buckets=DIMSE_BUCKETS, registry=r)
        self.rule_matches = Counter("dicomproxy_rule_matches", "Rule decisions (rule name or 'default').",
                                    ["rule", "action", "mode"], registry=r)
        self.identity_injections = Counter("dicomproxy_identity_injections", "User Identity injections.",
                                           ["profile", "type", "result"], registry=r)
        self.upstream_up = Gauge("dicomproxy_upstream_up",
                                 "1 if the upstream counts as up (always 1 without health checks).",
                                 ["upstream"], registry=r)
        self.probe_duration = Gauge("dicomproxy_upstream_probe_duration_seconds",
                                    "Duration of the last health probe.", ["upstream"], registry=r)
        self.probe_step = Gauge("dicomproxy_upstream_probe_step_seconds",
                                "Duration of each step of the last successful probe.", ["upstream", "step"],
                                registry=r)
        self.probes = Counter("dicomproxy_upstream_probes", "Health probes run.", ["upstream"], registry=r)
        self.probe_failures = Counter("dicomproxy_upstream_probe_failures", "Failed health probes, by reason.",
                                      ["upstream", "reason"], registry=r)
        self.tls_failures = Counter("dicomproxy_tls_handshake_failures", "TLS handshake failures.",
                                    ["side", "reason"], registry=r)
        self.protocol_errors = Counter("dicomproxy_protocol_errors", "PS3.8 violations the proxy aborted.",
                                       ["side", "reason"], registry=r)
        self.limit_rejections = Counter("dicomproxy_limit_rejections",
                                        "Associations refused with RJ 2/3/2 because a limit bit.",
                                        ["listener", "reason"], registry=r)
        self.cert_expiry = Gauge("dicomproxy_tls_certificate_expiry_timestamp_seconds",
                                 "notAfter (Unix time) of each configured certificate file (earliest in it).",
                                 ["role", "name"], registry=r)
        self.reload_ok = Gauge("dicomproxy_config_last_reload_successful",
                               "1 if the last configuration load succeeded.", registry=r)
        self.reload_time = Gauge("dicomproxy_config_last_reload_success_timestamp_seconds",
                                 "When the configuration was last loaded successfully (Unix time).", registry=r)
        self.metric_errors = Counter("dicomproxy_metrics_errors", "Internal errors of the metrics observer.",
                                     registry=r)
        self.config = config
        self.devices = DeviceMap(config.devices)
        self._upstreams: frozenset[str] = frozenset()
        self._rules: frozenset[str] = frozenset()
        self._initialise(config)
        self.reload_ok.set(1)
        self.reload_time.set(self.wall_clock())

    # ---- configuration -------------------------------------------------------------------------
    def _initialise(self, config: ProxyConfig) -> None:
        """Create every known label combination at 0, so dashboards and alerts see series from the
        first scrape (a counter that appears at 1 has no rate)."""
        self.config = config
        self.devices = DeviceMap(config.devices)
        upstreams = list(config.upstreams)
        self._upstreams = frozenset(upstreams)
        rules = config.rules
        self._rules = frozenset({"default", *(rule.name for rule in rules.rules)} if rules else {"default"})
        for listener in config.listeners:
            self.associations_active.labels(listener.name)
            for upstream in (*upstreams, NO_UPSTREAM):
                for outcome in OUTCOMES:
                    self.associations.labels(listener.name, upstream, outcome)
                for direction in DIRECTIONS:
                    self.bytes.labels(listener.name, upstream, direction)
        for device in self.devices.names:
            for outcome in OUTCOMES[:-1]:
                self.device_associations.labels(device, outcome)
            for direction in DIRECTIONS:
                self.device_bytes.labels(device, direction)
        for name in PDU_TYPES.values():
            for direction in DIRECTIONS:
                self.pdus.labels(name, direction)
        for upstream in upstreams:
            self.setup.labels(upstream)
            self.connect.labels(upstream)
            if config.upstreams[upstream].tls is not None:
                self.tls_handshake.labels(upstream)
            for command in DIMSE_COMMANDS:
                self.dimse_requests.labels(upstream, command)
                for klass in STATUS_CLASSES:
                    self.dimse_responses.labels(upstream, command, klass)
        from proxy.upstream import PROBE_FAILURE_REASONS

        present = set(self._label_values(self.upstream_up, 0))
        for name in present - self._upstreams:
            self.upstream_up.remove(name)
        for upstream, spec in config.upstreams.items():
            if spec.health is None or upstream not in present:
                # no probes: always up; probed: up until its first probe says otherwise (proxy.upstream)
                self.upstream_up.labels(upstream).set(1)
            if spec.health is not None:
                self.probes.labels(upstream)
                for reason in PROBE_FAILURE_REASONS:
                    self.probe_failures.labels(upstream, reason)
        if rules is not None:
            for rule in rules.rules:
                self.rule_matches.labels(rule.name, rule.action, rule.mode)
            self.rule_matches.labels("default", rules.default.action, "enforce")
        for listener in config.listeners:
            for reason in LIMIT_REASONS:
                self.limit_rejections.labels(listener.name, reason)
        for side in SIDES:
            for reason in tls_mod.TLS_ERROR_LABELS:
                self.tls_failures.labels(side, reason)
            for reason in PROTOCOL_ERROR_REASONS:
                self.protocol_errors.labels(side, reason)
        self._certificates(config)

    @staticmethod
    def _label_values(metric: Gauge, index: int) -> list[str]:
        values: list[str] = []
        for family in metric.collect():
            for sample in family.samples:
                values.append(list(sample.labels.values())[index])
        return values

    def _certificates(self, config: ProxyConfig) -> None:
        self.cert_expiry.clear()
        found = [(c.role, c.name, c.path) for c in tls_mod.configured_certificates(config)]
        if config.metrics is not None and config.metrics.tls is not None:
            found.append(("metrics", "exporter", config.metrics.tls.cert))
        for role, name, path in found:
            try:
                expiry = tls_mod.certificate_expiry(path)
            except (OSError, ValueError) as exc:
                log.warning("cannot read the %s certificate of %s for its expiry: %s", role, name, exc)
                continue
            self.cert_expiry.labels(role, name).set(expiry.timestamp())

    def reloaded(self, config: ProxyConfig) -> None:
        """A reload succeeded: new label values, certificate expiry, and the reload gauges."""
        self.safe(self._initialise, config)
        self.reload_ok.set(1)
        self.reload_time.set(self.wall_clock())

    def reload_failed(self) -> None:
        self.reload_ok.set(0)

    def refresh_certificates(self) -> None:
        """Re-read the certificate files (e.g. daily, or after a renewal without a reload)."""
        self.safe(self._certificates, self.config)

    # ---- label helpers -------------------------------------------------------------------------
    def upstream_label(self, name: str | None) -> str:
        if not name:
            return NO_UPSTREAM
        return name if name in self._upstreams else OTHER

    # ---- associations --------------------------------------------------------------------------
    def association(self, listener: str) -> AssociationRecorder:
        """A recorder for a new connection on `listener` (counts it as active until finished())."""
        recorder = AssociationRecorder(self, listener, dimse=self.dimse)
        self._live.add(recorder)
        self.associations_active.labels(listener).inc()
        return recorder

    def observe_connect(self, upstream: str, connect_seconds: float, tls_seconds: float | None) -> None:
        self.connect.labels(upstream).observe(connect_seconds)
        if tls_seconds is not None:
            self.tls_handshake.labels(upstream).observe(tls_seconds)

    def observe_accepted(self, recorder: AssociationRecorder, setup_seconds: float | None) -> None:
        self.associations.labels(recorder.listener, recorder.upstream, "accepted").inc()
        self.device_associations.labels(recorder.device, "accepted").inc()
        if setup_seconds is not None:
            self.setup.labels(recorder.upstream).observe(setup_seconds)

    def observe_finished(self, recorder: AssociationRecorder, relay_outcome: str) -> None:
        self._live.discard(recorder)
        self.associations_active.labels(recorder.listener).dec()
        recorder.flush()
        outcome = outcome_label(relay_outcome, requested=recorder.requested_ae)
        self.associations.labels(recorder.listener, recorder.upstream, outcome).inc()
        if recorder.requested_ae:
            self.device_associations.labels(recorder.device, outcome).inc()

    def flush(self) -> None:
        """Fold every live association's local counts into the metrics. The exporter calls it
        before each scrape; call it from the event loop thread only."""
        for recorder in list(self._live):
            self.safe(recorder.flush)

    @property
    def live(self) -> int:
        return len(self._live)

    # ---- decisions and errors ------------------------------------------------------------------
    def rule_decision(self, decision: Decision | DimseDecision) -> None:
        """An association or DIMSE rule decision: the deciding rule (mode enforce) and every
        shadow-mode rule that matched before it."""
        self.safe(self._rule_decision, decision)

    def _rule_decision(self, decision: Decision | DimseDecision) -> None:
        self.rule_matches.labels(self._rule_label(decision.rule), decision.action, "enforce").inc()
        for rule, action in decision.shadow_matches:
            self.rule_matches.labels(self._rule_label(rule), action, "shadow").inc()

    def _rule_label(self, rule: str) -> str:
        return rule if rule in self._rules else OTHER

    def identity_injection(self, profile: str, identity_type: int, result: str) -> None:
        """User Identity injection by `profile` (a name from proxy.yaml): result injected,
        skipped or failed. Never pass the user name or token."""
        label = profile if _SAFE_NAME.fullmatch(profile) else OTHER
        kind = IDENTITY_TYPES.get(identity_type, OTHER)
        self.safe(self.identity_injections.labels(label, kind, result if result in IDENTITY_RESULTS else OTHER).inc)

    def tls_handshake_failure(self, side: str, reason: str) -> None:
        """`side` client (a modality failed a listener's handshake) or upstream; `reason` a label
        from proxy.tls.describe_*_error (TLS_ERROR_LABELS)."""
        side_label = side if side in SIDES else OTHER
        reason_label = reason if reason in tls_mod.TLS_ERROR_LABELS else OTHER
        self.safe(self.tls_failures.labels(side_label, reason_label).inc)

    def limit_rejection(self, listener: str, reason: str) -> None:
        """A limit of proxy.limits refused an association (`reason` one of LIMIT_REASONS)."""
        reason_label = reason if reason in LIMIT_REASONS else OTHER
        self.safe(self.limit_rejections.labels(listener, reason_label).inc)

    def protocol_error(self, side: Side | str, exc: RemotePDUError) -> None:
        """A peer broke PS3.8 (the relay's _protocol_error, or a foreign protocol on a port)."""
        if isinstance(side, Side):
            side_label = "client" if side is Side.REQUESTOR else "upstream"
        else:
            side_label = side if side in SIDES else OTHER
        if isinstance(exc, ForeignProtocolError):
            reason = f"foreign_{exc.protocol}"
            reason = reason if reason in PROTOCOL_ERROR_REASONS else "not_specified"
        else:
            reason = _ABORT_REASONS.get(exc.reason, "not_specified")
        self.safe(self.protocol_errors.labels(side_label, reason).inc)

    # ---- HealthObserver ------------------------------------------------------------------------
    def probe_finished(self, result: ProbeResult, up: bool) -> None:
        name = self.upstream_label(result.upstream)
        self.probes.labels(name).inc()
        self.probe_duration.labels(name).set(result.duration)
        if result.ok:
            for step, seconds in result.steps:
                self.probe_step.labels(name, step).set(seconds)
        else:
            from proxy.upstream import PROBE_FAILURE_REASONS

            reason = result.reason if result.reason in PROBE_FAILURE_REASONS else "other"
            self.probe_failures.labels(name, reason).inc()
        self.upstream_up.labels(name).set(1 if up else 0)

    def upstream_state(self, name: str, up: bool) -> None:
        if name in self._upstreams:
            self.upstream_up.labels(name).set(1 if up else 0)

    # ---- safety --------------------------------------------------------------------------------
    def safe(self, func: Callable[..., object], *args: object) -> None:
        """Run an observation; a failure is logged and counted, never raised (DESIGN habit 7)."""
        try:
            func(*args)
        except Exception:
            self.metric_errors.inc()
            log.exception("metrics observer failed in %s", getattr(func, "__name__", func))


# --------------------------------------------------------------------------- the exporter

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
REALM = "dicom-tls-proxy metrics"


class MetricsExporter:
    """GET /metrics over HTTP or HTTPS, optionally with Basic authentication, in the proxy's own
    event loop. Counts are folded in (`before_scrape`, usually ProxyMetrics.flush) on the loop,
    then the text is rendered in a worker thread, so a scrape never stalls the relay.
    One request per connection (`Connection: close`); /metrics and /-/healthy only."""

    def __init__(
        self,
        config: MetricsConfig,
        registry: CollectorRegistry,
        *,
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.before_scrape = before_scrape
        self._server: asyncio.Server | None = None
        self._ssl: ssl.SSLContext | None = None
        self._credentials: tuple[bytes, bytes] | None = None  # sha256 of "user", sha256 of "password"
        self._connections = 0
        self.bound: tuple[str, int] | None = None

    def _load(self, config: MetricsConfig) -> tuple[ssl.SSLContext | None, tuple[bytes, bytes] | None]:
        """TLS context and credentials for `config`; ProxyError when a file cannot be used."""
        context = None
        if config.tls is not None:
            try:
                context = tls_mod.server_context(config.tls.cert, config.tls.key)
            except (OSError, ssl.SSLError) as exc:
                raise ProxyError(f"metrics: cannot use {config.tls.cert} / {config.tls.key}: {exc}") from None
        credentials = None
        if config.basic_auth is not None:
            try:
                password = read_passphrase(config.basic_auth.password_file)
            except (OSError, ValueError) as exc:
                raise ProxyError(f"metrics: cannot read the password file {config.basic_auth.password_file}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
            credentials = (hashlib.sha256(config.basic_auth.username.encode()).digest(),
                           hashlib.sha256(password).digest())
        return context, credentials

    async def start(self) -> None:
        """Bind and serve; OSError if the address is taken, ProxyError for unusable files."""
        self._ssl, self._credentials = self._load(self.config)
        address = self.config.address
        self._server = await asyncio.start_server(
            self._handle, address.host, address.port, ssl=self._ssl, limit=MAX_REQUEST_HEAD,
            ssl_handshake_timeout=REQUEST_TIMEOUT if self._ssl else None, reuse_address=True,
        )
        sock = self._server.sockets[0].getsockname()
        self.bound = (str(sock[0]), int(sock[1]))
        scheme = "https" if self._ssl else "http"
        auth = ", basic auth" if self._credentials else ""
        log.info("metrics on %s://%s/metrics%s", scheme, Address(*self.bound), auth)

    def reload(self, config: MetricsConfig) -> bool:
        """Pick up a renewed certificate or a changed password (a new address needs a restart).
        False (and the old settings kept) when the new files cannot be used."""
        try:
            context, credentials = self._load(config)
        except ProxyError as exc:
            log.error("%s; keeping the running metrics settings", exc)
            return False
        if config.address != self.config.address:
            log.warning("metrics: a new address takes effect only after a restart")
        if (context is None) != (self._ssl is None):
            log.warning("metrics: switching TLS on or off takes effect only after a restart")
        elif context is not None and self._server is not None:
            # asyncio keeps the context it started with; swap certificates in place
            assert config.tls is not None and self._ssl is not None
            with contextlib.suppress(ssl.SSLError, OSError):
                self._ssl.load_cert_chain(str(config.tls.cert), str(config.tls.key))
        self._credentials = credentials
        self.config = config
        return True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # ---- HTTP ----------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._connections += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await self._serve(reader, writer)
        except (TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, ConnectionError,
                ssl.SSLError, ValueError):
            pass
        except Exception:
            log.exception("metrics: error while answering a scrape")
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _respond(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            await _respond(writer, 405, b"only GET and HEAD\n", extra={"Allow": "GET, HEAD"})
            return
        if not self._authorised(headers.get("authorization")):
            await _respond(writer, 401, b"unauthorised\n",
                           extra={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
            return
        path = target.split("?", 1)[0]
        if path == "/-/healthy":
            await _respond(writer, 200, b"OK\n", head_only=method == "HEAD")
            return
        if path != "/metrics":
            await _respond(writer, 404, b"not found: try /metrics\n")
            return
        if self.before_scrape is not None:
            try:
                self.before_scrape()
            except Exception:
                log.exception("metrics: flushing before the scrape failed")
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = await asyncio.to_thread(encoder, self.registry)
        extra = {}
        if "gzip" in headers.get("accept-encoding", ""):
            body = await asyncio.to_thread(gzip.compress, body, 1)
            extra["Content-Encoding"] = "gzip"
        await _respond(writer, 200, body, content_type=content_type, extra=extra, head_only=method == "HEAD")

    def _authorised(self, header: str | None) -> bool:
        expected = self._credentials
        if expected is None:
            return True
        if header is None:
            return False
        scheme, _sep, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except ValueError:
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        user_ok = hmac.compare_digest(hashlib.sha256(user).digest(), expected[0])
        password_ok = hmac.compare_digest(hashlib.sha256(password).digest(), expected[1])
        return user_ok and password_ok


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: Mapping[str, str] | None = None,
    head_only: bool = False,
) -> None:
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close",
               **(extra or {})}
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()
