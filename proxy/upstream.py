"""Upstream health: C-ECHO probes over the upstream's own TLS, a rise/fall state machine, and
failover by priority order.

A probe is a real association, as a modality would make it, each step timed:

    connect    TCP connect to the upstream's address
    tls        TLS handshake with the upstream's context (profile, CA, client certificate, pins)
    associate  A-ASSOCIATE-RQ proposing Verification (Implicit VR LE) -> A-ASSOCIATE-AC
    echo       C-ECHO-RQ in a P-DATA-TF -> C-ECHO-RSP with status 0x0000
    release    A-RELEASE-RQ -> A-RELEASE-RP

The state machine is a value (`HealthState.advance`), the probing loop a thin asyncio shell around
it (`UpstreamHealth`), and what the outside world sees goes to an observer (metrics) and the log.
An upstream without `health:` is never probed and always counts as up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from proxy import tls
from proxy.config import HealthCheck, ProxyConfig, Upstream
from proxy.dul.constants import (
    APPLICATION_CONTEXT_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    VERIFICATION_SOP_CLASS,
    PDUType,
)
from proxy.dul.dimse import CommandField, MessageStream, c_echo_rq
from proxy.dul.framer import Frame, PDUFramer
from proxy.dul.items import (
    AbstractSyntaxSubItem,
    ApplicationContextItem,
    ImplementationClassUIDSubItem,
    ImplementationVersionNameSubItem,
    MaximumLengthSubItem,
    PresentationContextRQItem,
    TransferSyntaxSubItem,
    UserInformationItem,
)
from proxy.dul.pdus import AAssociateAC, AAssociateRJ, AAssociateRQ, AReleaseRQ, PDataTF, parse_pdu
from proxy.errors import ProxyError, RemotePDUError

log = logging.getLogger("proxy.upstream")

__all__ = [
    "DEFAULT_CALLED_AE",
    "PROBE_FAILURE_REASONS",
    "PROBE_STEPS",
    "HealthObserver",
    "HealthState",
    "ProbeResult",
    "UpstreamHealth",
    "format_probe_result",
    "probe_once",
    "run_echo",
]

PROBE_STEPS = ("connect", "tls", "associate", "echo", "release")
"""The timed steps of a probe, in order (`tls` only for TLS upstreams)."""

PROBE_FAILURE_REASONS = (
    "refused",  # nothing listens on the port
    "timeout",  # the probe's `timeout` ran out (in any step)
    "unreachable",  # no route to the host
    "dns",  # the host name does not resolve
    "reset",  # the connection was reset
    "tls",  # TLS handshake, certificate or pin failure
    "rejected",  # A-ASSOCIATE-RJ, or Verification not accepted
    "aborted",  # A-ABORT from the archive
    "echo_failed",  # C-ECHO-RSP with a status other than Success
    "protocol",  # an unexpected or malformed PDU or DIMSE message
    "closed",  # the archive closed the connection without a PDU
    "other",
)
"""Every `reason` a failed ProbeResult carries: the `reason` label of
dicomproxy_upstream_probe_failures_total."""

DEFAULT_CALLED_AE = "ANY-SCP"
"""Called AE title of `dicom-proxy echo` for an upstream without `health:` (pynetdicom's default)."""

IMPLEMENTATION_CLASS_UID = "2.25.206332421049167117524847551523184597359"
"""The proxy's own Implementation Class UID (PS3.7 D.3.3.2), for the associations it originates."""
IMPLEMENTATION_VERSION_NAME = "DICOMTLSPROXY"

PROBE_MAX_PDU = 16384
"""The Max Length our probes advertise: a C-ECHO-RSP is about a hundred bytes."""

_CONTEXT_ID = 1


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ProbeResult:
    """One probe. `detail` is for people (logs, `dicom-proxy echo`); never use it as a label."""

    upstream: str
    ok: bool
    reason: str | None  # None when ok, else one of PROBE_FAILURE_REASONS
    detail: str
    steps: tuple[tuple[str, float], ...]  # completed steps and their seconds, in order
    failed_step: str | None  # the step that failed (its time is in `duration`, not `steps`)
    duration: float  # seconds, the whole probe

    def step_seconds(self, step: str) -> float | None:
        for name, seconds in self.steps:
            if name == step:
                return seconds
        return None


def format_probe_result(result: ProbeResult) -> str:
    """What `dicom-proxy echo` prints: one line per step and a verdict."""
    lines = [f"{name:<10} {seconds * 1000:9.1f} ms  ok" for name, seconds in result.steps]
    if result.failed_step is not None:
        spent = result.duration - sum(s for _n, s in result.steps)
        lines.append(f"{result.failed_step:<10} {spent * 1000:9.1f} ms  FAILED ({result.reason}): {result.detail}")
    verdict = "ok" if result.ok else f"FAILED ({result.reason})"
    lines.append(f"{'total':<10} {result.duration * 1000:9.1f} ms  {verdict}: upstream {result.upstream}")
    return "\n".join(lines)


class _ProbeFailure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- one probe


def _associate_rq(calling_ae: str, called_ae: str) -> AAssociateRQ:
    context = PresentationContextRQItem(
        _CONTEXT_ID,
        (AbstractSyntaxSubItem(VERIFICATION_SOP_CLASS), TransferSyntaxSubItem(IMPLICIT_VR_LITTLE_ENDIAN)),
    )
    user = UserInformationItem(
        (
            MaximumLengthSubItem(PROBE_MAX_PDU),
            ImplementationClassUIDSubItem(IMPLEMENTATION_CLASS_UID),
            ImplementationVersionNameSubItem(IMPLEMENTATION_VERSION_NAME),
        )
    )
    return AAssociateRQ(1, called_ae, calling_ae, (ApplicationContextItem(APPLICATION_CONTEXT_NAME), context, user))


def _pdata(command: bytes) -> bytes:
    return PDataTF.from_pdvs([(_CONTEXT_ID, 0x03, command)]).encode()


class _Conversation:
    """Reads whole PDUs from the archive with our own framer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.framer = PDUFramer(max_pdata_length=PROBE_MAX_PDU, sniff_foreign=False)
        self.frames: list[Frame] = []

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next_pdu(self) -> Frame:
        while not self.frames:
            data = await self.reader.read(65536)
            if not data:
                raise _ProbeFailure("closed", "the archive closed the connection without a PDU")
            try:
                self.frames.extend(self.framer.feed(data))
            except RemotePDUError as exc:
                raise _ProbeFailure("protocol", f"the archive sent a malformed PDU: {exc}") from None
        return self.frames.pop(0)


def _unexpected(frame: Frame, waiting_for: str) -> _ProbeFailure:
    if frame.pdu_type == PDUType.A_ABORT:
        abort = frame.data
        return _ProbeFailure("aborted", f"the archive sent A-ABORT {abort[8]}/{abort[9]} instead of {waiting_for}")
    try:
        name = PDUType(frame.pdu_type).name.replace("_", "-")
    except ValueError:  # pragma: no cover - the framer rejects unknown types
        name = f"PDU type 0x{frame.pdu_type:02X}"
    return _ProbeFailure("protocol", f"the archive sent {name} instead of {waiting_for}")


async def _associate(talk: _Conversation, calling_ae: str, called_ae: str) -> None:
    await talk.send(_associate_rq(calling_ae, called_ae).encode())
    frame = await talk.next_pdu()
    try:
        pdu = parse_pdu(frame.data)
    except RemotePDUError as exc:
        raise _ProbeFailure("protocol", f"the archive's answer to the A-ASSOCIATE-RQ is malformed: {exc}") from None
    if isinstance(pdu, AAssociateRJ):
        raise _ProbeFailure(
            "rejected",
            f"the archive rejected the association (RJ {pdu.result}/{pdu.source}/{pdu.reason}); "
            f"is {called_ae!r} its AE title and does it accept calling AE {calling_ae!r}?",
        )
    if not isinstance(pdu, AAssociateAC):
        raise _unexpected(frame, "A-ASSOCIATE-AC")
    if not any(pc.context_id == _CONTEXT_ID and pc.result == 0 for pc in pdu.presentation_contexts):
        raise _ProbeFailure("rejected", "the archive accepted the association but not the Verification SOP class")


async def _echo(talk: _Conversation, message_id: int) -> None:
    await talk.send(_pdata(c_echo_rq(message_id)))
    stream = MessageStream()
    while True:
        frame = await talk.next_pdu()
        if frame.pdu_type != PDUType.P_DATA_TF:
            raise _unexpected(frame, "the C-ECHO-RSP")
        try:
            done = stream.observe(frame.data[6:])
        except RemotePDUError as exc:
            raise _ProbeFailure("protocol", f"the archive's C-ECHO-RSP is malformed: {exc}") from None
        for _context, command in done:
            if command.command_field != CommandField.C_ECHO_RSP:
                field_value = command.command_field or 0
                raise _ProbeFailure("protocol", f"expected a C-ECHO-RSP, got command 0x{field_value:04X}")
            if command.message_id_being_responded_to != message_id:
                raise _ProbeFailure("protocol", "the C-ECHO-RSP answers another message ID")
            if command.status != 0x0000:
                status = "none" if command.status is None else f"0x{command.status:04X}"
                raise _ProbeFailure("echo_failed", f"the C-ECHO-RSP has status {status}")
            return


async def _release(talk: _Conversation) -> None:
    await talk.send(AReleaseRQ().encode())
    while True:
        frame = await talk.next_pdu()
        if frame.pdu_type == PDUType.A_RELEASE_RP:
            return
        if frame.pdu_type != PDUType.P_DATA_TF:  # a late P-DATA may cross our RQ (PS3.8 7.2.2)
            raise _unexpected(frame, "A-RELEASE-RP")


async def probe_once(
    upstream: Upstream,
    *,
    ssl_context: ssl.SSLContext | None = None,
    called_ae: str | None = None,
    calling_ae: str | None = None,
    timeout: float | None = None,
    message_id: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> ProbeResult:
    """Associate with `upstream`, C-ECHO, release; time each step. Never raises for a failure of
    the archive or the network: the result says which step failed and why.

    AE titles and the timeout default to the upstream's `health:` (else DEFAULT_CALLED_AE,
    DICOMPROXY and 5 s). For a TLS upstream without `ssl_context` one is built from its config.
    """
    check = upstream.health or HealthCheck(called_ae=DEFAULT_CALLED_AE)
    called = called_ae or check.called_ae
    calling = calling_ae or check.calling_ae
    limit = timeout if timeout is not None else check.timeout
    steps: list[tuple[str, float]] = []
    start = clock()
    mark = start
    current = "connect"
    writer: asyncio.StreamWriter | None = None

    def done(name: str) -> None:
        nonlocal mark
        now = clock()
        steps.append((name, now - mark))
        mark = now

    def result(reason: str | None, detail: str, failed: str | None) -> ProbeResult:
        return ProbeResult(upstream.name, reason is None, reason, detail, tuple(steps), failed, clock() - start)

    clean = False
    try:
        async with asyncio.timeout(limit):
            try:
                reader, writer = await asyncio.open_connection(upstream.address.host, upstream.address.port)
            except OSError as exc:
                label, words = tls.describe_connect_error(exc, upstream.address)
                raise _ProbeFailure(label if label in PROBE_FAILURE_REASONS else "other", words) from None
            done("connect")
            if upstream.tls is not None:
                current = "tls"
                await _start_tls(upstream, writer, ssl_context)
                done("tls")
            talk = _Conversation(reader, writer)
            current = "associate"
            await _associate(talk, calling, called)
            done("associate")
            current = "echo"
            await _echo(talk, message_id)
            done("echo")
            current = "release"
            await _release(talk)
            done("release")
            clean = True
    except _ProbeFailure as exc:
        return result(exc.reason, exc.detail, current)
    except TimeoutError:
        return result("timeout", f"no answer within the probe timeout of {limit:g} s", current)
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return result("reset", "the archive reset the connection", current)
    except ssl.SSLError as exc:  # a TLS alert after the handshake, e.g. a rejected client certificate
        _label, words = tls.describe_tls_error(exc, server_name=upstream.server_hostname)
        return result("tls", words, current)
    except OSError as exc:
        return result("other", f"{type(exc).__name__}: {exc.strerror or exc}", current)
    finally:
        if writer is not None:
            await _close(writer, graceful=clean)
    return result(None, "C-ECHO succeeded", None)


async def _start_tls(upstream: Upstream, writer: asyncio.StreamWriter, ssl_context: ssl.SSLContext | None) -> None:
    assert upstream.tls is not None
    try:
        ctx = ssl_context or tls.upstream_context(upstream.tls)
    except (ProxyError, OSError, ssl.SSLError) as exc:
        raise _ProbeFailure("tls", f"cannot build the TLS context of upstream {upstream.name}: {exc}") from None
    try:
        await writer.start_tls(ctx, server_hostname=upstream.server_hostname)
    except (ssl.SSLError, ConnectionError, EOFError) as exc:
        _label, words = tls.describe_tls_error(exc, server_name=upstream.server_hostname, profile=upstream.tls.profile)
        raise _ProbeFailure("tls", words) from None
    if upstream.tls.pin_sha256:
        sslobj = writer.get_extra_info("ssl_object")
        if not tls.check_pin(sslobj, upstream.tls.pin_sha256):
            _label, words = tls.describe_pin_mismatch(sslobj)
            raise _ProbeFailure("tls", words)


async def _close(writer: asyncio.StreamWriter, *, graceful: bool) -> None:
    if not graceful:
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


# --------------------------------------------------------------------------- the state machine


@dataclass(frozen=True)
class HealthState:
    """Up/down of one probed upstream. Before the first probe it is `known=False` and counts as up;
    the first result decides at once (so a dead archive is skipped within one probe of a start),
    after that `fall` failures in a row take it down and `rise` successes bring it back."""

    up: bool = True
    known: bool = False
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    last_reason: str | None = None  # reason of the last failed probe

    def advance(self, ok: bool, *, rise: int, fall: int, reason: str | None = None) -> HealthState:
        if ok:
            successes, failures = self.successes + 1, 0
            up = True if not self.known else self.up or successes >= rise
            return HealthState(up, True, successes, failures, self.last_reason)
        successes, failures = 0, self.failures + 1
        up = False if not self.known else self.up and failures < fall
        return HealthState(up, True, successes, failures, reason)


class HealthObserver(Protocol):
    """What UpstreamHealth reports (proxy.metrics.ProxyMetrics implements it)."""

    def probe_finished(self, result: ProbeResult, up: bool) -> None: ...

    def upstream_state(self, name: str, up: bool) -> None: ...


@dataclass
class _Probed:
    upstream: Upstream
    check: HealthCheck
    ssl_context: ssl.SSLContext | None
    state: HealthState = field(default_factory=HealthState)
    task: asyncio.Task[None] | None = None


class UpstreamHealth:
    """Probe every upstream that has `health:`, keep its state, and pick upstreams for the relay.

    `pick(names)` is what the relay asks per association: the first of `names` (priority order)
    that is up; an upstream without `health:` (or unknown here) is always up. None when every
    one of them is down: the relay answers A-ASSOCIATE-RJ 2/3/1 at once.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        contexts: Mapping[str, ssl.SSLContext | None] | None = None,
        observer: HealthObserver | None = None,
        probe: Callable[..., Coroutine[object, object, ProbeResult]] = probe_once,
    ) -> None:
        self.observer = observer
        self._probe = probe
        self._probed: dict[str, _Probed] = {}
        self._running = False
        self._message_ids = 0
        self._apply(config, contexts)

    # ---- queries (the relay) ------------------------------------------------------------------
    def is_up(self, name: str) -> bool:
        probed = self._probed.get(name)
        return probed is None or probed.state.up

    def pick(self, names: Sequence[str]) -> str | None:
        for name in names:
            if self.is_up(name):
                return name
        return None

    def state(self, name: str) -> HealthState | None:
        probed = self._probed.get(name)
        return None if probed is None else probed.state

    @property
    def probed_names(self) -> tuple[str, ...]:
        return tuple(self._probed)

    # ---- results ------------------------------------------------------------------------------
    def record(self, result: ProbeResult) -> HealthState | None:
        """Feed one probe result to its upstream's state machine; logs and reports transitions."""
        probed = self._probed.get(result.upstream)
        if probed is None:
            return None
        before = probed.state
        after = before.advance(result.ok, rise=probed.check.rise, fall=probed.check.fall, reason=result.reason)
        probed.state = after
        if after.up != before.up or not before.known:
            if after.up:
                log.info("upstream %s is UP (C-ECHO in %.0f ms)", result.upstream, result.duration * 1000)
            else:
                log.warning("upstream %s is DOWN: %s failed (%s): %s", result.upstream, result.failed_step,
                            result.reason, result.detail)
        elif not result.ok:
            log.info("upstream %s: probe failed (%s, %d in a row, down after %d): %s", result.upstream,
                     result.reason, after.failures, probed.check.fall, result.detail)
        self._notify(result, after.up)
        return after

    def _notify(self, result: ProbeResult, up: bool) -> None:
        if self.observer is None:
            return
        try:
            self.observer.probe_finished(result, up)
        except Exception:  # an observer must never stop the probes (DESIGN habit 7)
            log.exception("health observer failed")

    # ---- lifecycle ----------------------------------------------------------------------------
    def _apply(self, config: ProxyConfig, contexts: Mapping[str, ssl.SSLContext | None] | None) -> None:
        old = self._probed
        self._probed = {}
        for name, upstream in config.upstreams.items():
            if upstream.health is None:
                continue
            ctx = contexts.get(name) if contexts is not None else None
            previous = old.get(name)
            probed = _Probed(upstream, upstream.health, ctx)
            if previous is not None and previous.upstream == upstream:
                probed.state = previous.state  # same upstream, same check: keep what we know
            self._probed[name] = probed
        for previous in old.values():
            if previous.task is not None:
                previous.task.cancel()
        if self.observer is not None:
            for name in config.upstreams:
                with contextlib.suppress(Exception):
                    self.observer.upstream_state(name, self.is_up(name))

    def start(self) -> None:
        """Start one probing task per probed upstream (call from the running event loop)."""
        self._running = True
        loop = asyncio.get_running_loop()
        for name, probed in self._probed.items():
            if probed.task is None or probed.task.done():
                probed.task = loop.create_task(self._loop(probed), name=f"health-{name}")

    def reconfigure(self, config: ProxyConfig, contexts: Mapping[str, ssl.SSLContext | None] | None = None) -> None:
        """After a reload: probes restart with the new settings; an unchanged upstream keeps its state."""
        self._apply(config, contexts)
        if self._running:
            self.start()

    async def stop(self) -> None:
        self._running = False
        tasks = [p.task for p in self._probed.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _loop(self, probed: _Probed) -> None:
        while True:
            self._message_ids = self._message_ids % 0xFFFF + 1
            try:
                result = await self._probe(probed.upstream, ssl_context=probed.ssl_context,
                                           message_id=self._message_ids)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the probe: count it as a failure, keep probing
                log.exception("upstream %s: the probe crashed", probed.upstream.name)
                result = ProbeResult(probed.upstream.name, False, "other", f"probe error: {type(exc).__name__}",
                                     (), "connect", 0.0)
            if self._probed.get(probed.upstream.name) is probed:
                self.record(result)
            await asyncio.sleep(probed.check.interval)


# --------------------------------------------------------------------------- dicom-proxy echo


def run_echo(
    config: ProxyConfig,
    name: str,
    *,
    called_ae: str | None = None,
    calling_ae: str | None = None,
    timeout: float | None = None,
    out: TextIO | None = None,
) -> int:
    """`dicom-proxy echo -c proxy.yaml UPSTREAM`: one probe, each step's time printed.
    Exit code 0 when the C-ECHO succeeded, 1 otherwise (an unknown upstream included)."""
    import sys

    stream = out or sys.stdout
    upstream = config.upstreams.get(name)
    if upstream is None:
        names = ", ".join(sorted(config.upstreams)) or "none"
        print(f"error: unknown upstream {name!r} (defined upstreams: {names})", file=stream)
        return 1
    result = asyncio.run(probe_once(upstream, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout))
    check = upstream.health
    called = called_ae or (check.called_ae if check else DEFAULT_CALLED_AE)
    calling = calling_ae or (check.calling_ae if check else "DICOMPROXY")
    print(f"C-ECHO {calling} -> {called} at {upstream.address} ({'TLS' if upstream.tls else 'plaintext'})",
          file=stream)
    print(format_probe_result(result), file=stream)
    return 0 if result.ok else 1

