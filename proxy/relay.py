"""One relayed association: read the A-ASSOCIATE-RQ, open the upstream, relay, close both sides.

Each association owns two asyncio Protocols ("legs"), one per TCP/TLS connection. Bytes from a
leg go through that side's PDUFramer; whole P-DATA-TF PDUs are forwarded as views of the read
(checked PDV by PDV, never decoded or copied), so the hot path is a header walk and a write.
Max Length is clamped in both directions (standards.md section 4), so no PDU is ever re-cut.
Backpressure is write-then-drain at the transport level: when one leg's write buffer passes its
high-water mark, the other leg stops reading until it drains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from proxy import identity, tls, tlssocket
from proxy.config import Listener, ProxyConfig, Upstream
from proxy.dul.constants import (
    APPLICATION_CONTEXT_NAME,
    AbortReason,
    AbortSource,
    PDUType,
    RejectReasonACSE,
    RejectReasonPresentation,
    RejectReasonUser,
    RejectResult,
    RejectSource,
)
from proxy.dul.dimse import CommandSet, RequestGate, command_name
from proxy.dul.framer import P_DATA_HEAD, P_DATA_REST, ForeignProtocolError, Frame, PDUFramer
from proxy.dul.items import PresentationContextACItem, UserIdentityRQSubItem
from proxy.dul.machine import Action, Side, State, advance
from proxy.dul.pdus import AAbort, AAssociateAC, AAssociateRJ, AAssociateRQ, check_pdvs, iter_pdvs, parse_pdu
from proxy.errors import RemotePDUError
from proxy.limits import LimitReason, LimitTracker
from proxy.metrics import NULL_RECORDER, AssociationRecorder
from proxy.policy.model import AssociationFacts, CertFacts, Decision, DimseFacts

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.upstream import UpstreamHealth

log = logging.getLogger("proxy.relay")
_T = TypeVar("_T")

WRITE_HIGH_WATER = 1024 * 1024
"""A leg's write buffer above this pauses reading on the other leg (a few max-size PDUs)."""

QUICKACK_BELOW = 64 * 1024
"""TCP_QUICKACK after reads smaller than this. A stall needs a small segment waiting for our ACK,
which arrives as a small read; during bulk transfer reads are large, the kernel ACKs every second
segment anyway, and the extra syscall per read would cost about a tenth of the relay's CPU."""

CLOSE_GRACE = 2.0
"""Sta13: after our last PDU, how long we keep draining the peer before closing (D4C uses 1 s)."""

P_DATA = PDUType.P_DATA_TF
_ids = itertools.count(1)


def _clamp(peer_value: int | None, cap: int) -> int:
    """min(peer, cap) with 0/absent meaning unlimited (PS3.8 D.1)."""
    if not peer_value:
        return cap
    return min(peer_value, cap)


def _set_tcp_options(transport: asyncio.BaseTransport) -> socket.socket | None:
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    return None


@dataclass(frozen=True)
class UpstreamRoute:
    """What the relay needs of an upstream: where, and the TLS context built once at start."""

    upstream: Upstream
    ssl_context: ssl.SSLContext | None

    @property
    def server_hostname(self) -> str | None:
        if self.upstream.tls is None:
            return None
        return self.upstream.tls.server_name or self.upstream.address.host


class Leg(asyncio.Protocol):
    """One side's transport; every event goes to the Association."""

    def __init__(self, assoc: Association, side: Side) -> None:
        self.assoc = assoc
        self.side = side
        self.transport: asyncio.Transport | None = None
        self.quickack_sock: socket.socket | None = None
        self.closed = False
        self.draining = False  # Sta13: read and discard until the peer closes
        self.admit_by_peername = False  # plaintext listener via create_server: rate check at connect

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = _set_tcp_options(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.side is Side.REQUESTOR:
            if self.admit_by_peername and self.assoc.limits is not None:
                peer = transport.get_extra_info("peername")
                if isinstance(peer, tuple):
                    self.assoc.limited = self.assoc.limits.admit(peer[0])
            if self.assoc.quickack and transport.get_extra_info("sslcontext") is None:
                self.quickack_sock = sock
            self.assoc.client_connected(self)

    def data_received(self, data: bytes) -> None:
        if self.quickack_sock is not None and len(data) < QUICKACK_BELOW:
            # Legacy devices leave Nagle on; an immediate ACK spares them the 40 ms delayed-ACK stall.
            self.quickack_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if not self.draining:
            self.assoc.data_received(self.side, data)

    def eof_received(self) -> bool | None:
        self.assoc.peer_closed(self.side, None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.assoc.peer_closed(self.side, exc)
        self.assoc.leg_lost(self)

    def pause_writing(self) -> None:
        self.assoc.pause_reading(_other(self.side))

    def resume_writing(self) -> None:
        self.assoc.resume_reading(_other(self.side))

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def writelines(self, chunks: list[memoryview]) -> None:
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.writelines(chunks)

    def finish(self, grace: float) -> None:
        """Close after the pending writes: half-close and drain when we can (so our last PDU is
        read rather than lost to a reset), a plain close otherwise."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        self.draining = True
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the peer reset the connection right after our last PDU
                transport.close()
                return
            transport.resume_reading()
            asyncio.get_running_loop().call_later(grace, transport.close)
        else:
            transport.close()

    def abort_now(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


async def _connect_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """TCP connect alone (so the TLS handshake can be timed apart); every address in turn."""
    infos: list[tuple[Any, Any, int, str, tuple[Any, ...]]]
    try:  # an address literal needs no resolver (getaddrinfo runs in a worker thread)
        literal = ipaddress.ip_address(host)
        if "%" in host:  # a scoped IPv6 address: let the resolver turn the zone into an index
            raise ValueError(host)
    except ValueError:
        infos = list(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
    else:
        if literal.version == 6:
            infos = [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]
        else:
            infos = [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    error: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error or OSError(f"cannot resolve {host}")


def _other(side: Side) -> Side:
    return Side.ACCEPTOR if side is Side.REQUESTOR else Side.REQUESTOR


class Association:
    """State of one relayed association. Created by the server when a client connects."""

    def __init__(
        self,
        *,
        config: ProxyConfig,
        listener: Listener,
        routes: Mapping[str, UpstreamRoute],
        on_done: Callable[[Association], None],
        quickack: bool = True,
        limits: LimitTracker | None = None,
        client_address: tuple[str, int] | None = None,
        limited: LimitReason | None = None,
        recorder: AssociationRecorder = NULL_RECORDER,
        health: UpstreamHealth | None = None,
        identity_sources: identity.Sources | None = None,
    ) -> None:
        self.limits = limits
        self.client_address = client_address  # from a PROXY header: the real client
        self.limited = limited  # set at accept when the per-source rate refused the connection
        self.limit_hold: tuple[str, str, str] | None = None
        self.id = f"a{next(_ids)}"
        self.config = config
        self.listener = listener
        self.listener_name = listener.name
        self.client_cert: CertFacts | None = None  # a verified client certificate (TLS listeners)
        self.routes = routes
        self.on_done = on_done
        self.quickack = quickack
        self.loop = asyncio.get_running_loop()
        self.state = State.STA2_AWAITING_RQ
        cap = config.max_pdu_length
        self.framers = {
            Side.REQUESTOR: PDUFramer(
                max_pdata_length=cap, max_associate_length=config.limits.associate_cap(config.max_associate_length)
            ),
            Side.ACCEPTOR: PDUFramer(
                max_pdata_length=cap, max_associate_length=config.max_associate_length, sniff_foreign=False
            ),
        }
        self.legs: dict[Side, Leg] = {}
        self.peer = "?"
        self.calling_ae = ""
        self.called_ae = ""
        self.upstream_name: str | None = None
        self.started = self.loop.time()
        self._idle_since = self.started  # when the idle timer last saw the byte counts move
        self._idle_bytes = 0
        self.bytes_to_upstream = 0  # DICOM bytes received from the modality (and relayed)
        self.bytes_to_client = 0
        self._timer: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._done = False
        self.outcome = "open"
        self.tls_resumed = False
        self.rq: AAssociateRQ | None = None
        self.facts: AssociationFacts | None = None
        self.decision: Decision | None = None
        self.gate: RequestGate | None = None  # DIMSE rules: holds request commands until decided
        self.screened: identity.Screened | None = None  # the client_identity policy's verdict
        self.response_plan: identity.ResponsePlan | None = None  # what the AC's 0x59 must become
        self.accepted_contexts: frozenset[int] | None = None  # set when context filtering applies
        self.failure_reason = ""  # a bounded label (tls, timeout, unreachable, ...) when setup failed
        self.recorder = recorder  # metrics (proxy.metrics); NULL_RECORDER when they are off
        self.identity_sources = identity_sources or identity.Sources()
        self.health = health  # upstream health (proxy.upstream); None = every upstream counts as up

    # ---- naming for logs -------------------------------------------------------------------
    def _who(self) -> str:
        if self.calling_ae:
            return f"{self.id} {self.peer} {self.calling_ae}->{self.called_ae}"
        return f"{self.id} {self.peer}"

    # ---- timers ----------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _artim_expired(self) -> None:
        if self.state is State.STA2_AWAITING_RQ:
            log.warning("%s: no A-ASSOCIATE-RQ within %.0f s (ARTIM); closing", self._who(), self.config.timeouts.artim)
            self.outcome = "artim"
            self._close_all()

    def _idle_check(self) -> None:
        """Every quarter of the idle timeout: traffic since the last look restarts the count. The hot
        path only adds to the byte counters it keeps anyway (no clock read per read); an idle
        association is aborted between 1 and 1.25 idle timeouts after its last byte."""
        idle = self.config.timeouts.idle
        now = self.loop.time()
        moved = self.bytes_to_upstream + self.bytes_to_client
        if moved != self._idle_bytes:
            self._idle_bytes = moved
            self._idle_since = now
        quiet = now - self._idle_since
        if quiet < idle:
            self._arm(min(idle / 4, idle - quiet) + 0.01, self._idle_check)
            return
        log.warning("%s: idle for %.0f s; aborting both sides", self._who(), quiet)
        self._abort_both(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED, "idle")

    def _acse_expired(self) -> None:
        if self.state is State.STA5_AWAITING_AC:
            self._reject_transient(
                f"the archive sent no A-ASSOCIATE-AC within {self.config.timeouts.acse:.0f} s", "acse_timeout"
            )

    # ---- events from the legs ---------------------------------------------------------------
    def client_connected(self, leg: Leg) -> None:
        self.legs[Side.REQUESTOR] = leg
        peer = self.client_address or (leg.transport.get_extra_info("peername") if leg.transport else None)
        if isinstance(peer, tuple):
            host, port = peer[0], peer[1]
            self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if leg.transport is not None and self.listener.tls is not None:
            self.client_cert = tls.cert_facts(leg.transport.get_extra_info("ssl_object"))
        self._arm(self.config.timeouts.artim, self._artim_expired)
        log.debug("%s: connection on listener %s", self._who(), self.listener_name)

    def pause_reading(self, side: Side) -> None:
        leg = self.legs.get(side)
        if leg is not None and leg.transport is not None and not leg.closed:
            leg.transport.pause_reading()

    def resume_reading(self, side: Side) -> None:
        leg = self.legs.get(side)
        if leg is not None and leg.transport is not None and not leg.closed and not leg.transport.is_closing():
            leg.transport.resume_reading()

    def data_received(self, side: Side, data: bytes) -> None:
        try:
            self._data_received(side, data)
        except Exception:
            # A bug must cost one association, cleanly aborted on both sides, never the proxy.
            log.exception("%s: internal error while relaying; aborting the association", self._who())
            self._abort_both(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED, "internal_error")

    def _data_received(self, side: Side, data: bytes) -> None:
        if side is Side.REQUESTOR:
            self.bytes_to_upstream += len(data)
        else:
            self.bytes_to_client += len(data)
        framer = self.framers[side]
        try:
            frames = framer.feed(data)
        except ForeignProtocolError as exc:
            self.recorder.received(side, len(data), ())
            self.recorder.protocol_error(side, exc)
            log.warning("%s: %s; closing without a DICOM answer", self._who(), exc)
            self.outcome = f"foreign_{exc.protocol}"
            self._close_all()
            return
        except RemotePDUError as exc:
            self.recorder.received(side, len(data), ())
            self._protocol_error(side, exc)
            return
        self.recorder.received(side, len(data), frames)
        if frames:
            self._process(side, frames)
        if framer.error is not None and not self._done and self.state is not State.STA13_CLOSING:
            self._protocol_error(side, framer.error)

    def _process(self, side: Side, frames: list[Frame]) -> None:
        other = self.legs.get(_other(side))
        if self.state is State.STA6_ESTABLISHED and other is not None and not self._inspecting:
            # Hot path: a run of P-DATA-TF PDUs goes out in one write.
            batch: list[memoryview] = []
            dimse = self.recorder.dimse_enabled
            for i, frame in enumerate(frames):
                pdu_type = frame.pdu_type
                if pdu_type == P_DATA:
                    try:
                        check_pdvs(frame.data[6:])
                    except RemotePDUError as exc:
                        if batch:
                            other.writelines(batch)
                        self._protocol_error(side, exc)
                        return
                    if dimse:
                        self.recorder.pdata(side, frame.data)
                elif pdu_type == P_DATA_HEAD:  # cut-through: the framer checked its one PDV header
                    if dimse:
                        self.recorder.data_fragment(side, frame.data)
                elif pdu_type != P_DATA_REST:
                    if batch:
                        other.writelines(batch)
                    self._handle_frames(side, frames[i:])
                    return
                batch.append(frame.data)
            if len(batch) == 1:
                other.write(batch[0])
            else:
                other.writelines(batch)
            return
        self._handle_frames(side, frames)

    @property
    def _inspecting(self) -> bool:
        """P-DATA needs more than a header walk: DIMSE rules or presentation-context filtering."""
        return self.gate is not None or self.accepted_contexts is not None

    def _handle_frames(self, side: Side, frames: list[Frame]) -> None:
        for frame in frames:
            if self._done:
                return
            if frame.pdu_type == P_DATA_REST:  # the rest of a cut-through PDU that was forwarded
                other = self.legs.get(_other(side))
                if other is not None and self.state is not State.STA13_CLOSING:
                    other.write(frame.data)
                continue
            try:
                action, next_state = advance(self.state, side, frame.pdu_type & 7)
                if frame.pdu_type == P_DATA_HEAD:
                    if action is Action.FORWARD and self.recorder.dimse_enabled:
                        self.recorder.data_fragment(side, frame.data)
                    self._act(side, action, next_state, frame)
                    continue
                if frame.pdu_type == P_DATA:
                    if self._inspecting and action is Action.FORWARD:
                        self._forward_inspected(side, next_state, frame)
                        if self.recorder.dimse_enabled:
                            self.recorder.pdata(side, frame.data)
                        continue
                    check_pdvs(frame.data[6:])
                    if action is Action.FORWARD and self.recorder.dimse_enabled:
                        self.recorder.pdata(side, frame.data)
                self._act(side, action, next_state, frame)
            except RemotePDUError as exc:
                self._protocol_error(side, exc)
                return

    def _act(self, side: Side, action: Action, next_state: State, frame: Frame) -> None:
        other = self.legs.get(_other(side))
        if action is Action.ASSOCIATE:
            self.state = next_state
            self._associate(frame)
        elif action is Action.FORWARD:
            self.state = next_state
            if other is not None:
                other.write(frame.data)
        elif action is Action.FORWARD_AND_CLOSE:
            self.state = next_state
            if other is not None:
                other.write(frame.data)
            log.info("%s: released", self._who())
            self.outcome = "released"
            self._close_all()
        elif action is Action.RELAY_AC:
            self._relay_ac(frame)
        elif action is Action.RELAY_RJ:
            self.state = next_state
            rj = parse_pdu(frame.data)
            assert isinstance(rj, AAssociateRJ)
            log.info(
                "%s: the archive rejected the association (RJ %d/%d/%d); relayed unchanged",
                self._who(),
                rj.result,
                rj.source,
                rj.reason,
            )
            if other is not None:
                other.write(frame.data)
            self.outcome = "rejected_by_upstream"
            self._close_all()
        elif action is Action.RELAY_ABORT:
            self.state = next_state
            abort = parse_pdu(frame.data)
            assert isinstance(abort, AAbort)
            log.info(
                "%s: A-ABORT %d/%d from the %s; relayed unchanged", self._who(), abort.source, abort.reason, side.value
            )
            if other is not None:
                other.write(frame.data)
            self.outcome = "aborted"
            self._close_all()
        elif action is Action.CLOSE:
            self.state = next_state
            self.outcome = "aborted"
            self._close_all()
        # Action.IGNORE: AA-6

    def _forward_inspected(self, side: Side, next_state: State, frame: Frame) -> None:
        """P-DATA when rules look inside: contexts the modality was refused, and DIMSE requests."""
        self.state = next_state
        if self.accepted_contexts is not None:
            for pdv in iter_pdvs(frame.data[6:]):
                if pdv.context_id not in self.accepted_contexts:
                    raise RemotePDUError(
                        f"PDV on presentation context {pdv.context_id}, which was not accepted",
                        source=2,
                        reason=AbortReason.UNEXPECTED_PDU_PARAMETER,
                    )
        other = self.legs.get(_other(side))
        if side is Side.REQUESTOR and self.gate is not None:
            forward, answers = self.gate.feed(frame.data)
            if other is not None and forward:
                other.writelines(forward)
            client = self.legs.get(Side.REQUESTOR)
            for answer in answers:
                if client is not None:
                    client.write(answer)
            return
        check_pdvs(frame.data[6:])
        if other is not None:
            other.write(frame.data)

    def _decide_dimse(self, context_id: int, command: CommandSet) -> int | None:
        rules = self.config.rules
        if rules is None or self.facts is None or command.command_field is None:
            return None
        name = command_name(command.command_field)
        dimse = DimseFacts(
            command=name,
            affected_sop_class=command.sop_class_uid,
            move_destination=command.move_destination,
            priority=command.priority,
        )
        decision = rules.evaluate_dimse(self.facts, dimse)
        self.recorder.rule_decision(decision)
        for rule, action in decision.shadow_matches:
            log.info("%s: shadow rule %s would %s %s (not enforced)", self._who(), rule, action, name)
        if decision.action == "refuse":
            log.warning(
                "%s: %s (message %s%s) refused by rule %s with status 0x%04X",
                self._who(),
                name,
                command.message_id,
                f", destination {command.move_destination!r}" if command.move_destination else "",
                decision.rule,
                decision.status,
            )
            return decision.status
        return None

    # ---- association setup ------------------------------------------------------------------
    def _associate(self, frame: Frame) -> None:
        self._disarm()
        rq = parse_pdu(frame.data)
        assert isinstance(rq, AAssociateRQ)
        self.calling_ae = rq.calling_ae_title
        self.called_ae = rq.called_ae_title
        self.recorder.requested(self.calling_ae)
        if not rq.protocol_version & 1:
            self._reject(RejectResult.PERMANENT, RejectSource.SERVICE_PROVIDER_ACSE,
                         RejectReasonACSE.PROTOCOL_VERSION_NOT_SUPPORTED,
                         f"protocol version 0x{rq.protocol_version:04X} does not include version 1")
            return
        if rq.application_context != APPLICATION_CONTEXT_NAME:
            self._reject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                         RejectReasonUser.APPLICATION_CONTEXT_NOT_SUPPORTED,
                         f"application context {rq.application_context!r} is not DICOM's")
            return
        self.rq = rq
        if self.limited is not None:
            self._reject_limited(self.limited)
            return
        if self.listener.tls is not None and self.listener.tls.bind_ae:
            allowed = tls.bound_ae_titles(self.listener.tls.bind_ae, self.client_cert)
            if allowed is not None and self.calling_ae not in allowed:
                cert = self.client_cert
                who = (
                    f"certificate CN={cert.subject_cn!r} sha256={cert.fingerprint_sha256}" if cert else "no certificate"
                )
                self._reject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                             RejectReasonUser.CALLING_AE_NOT_RECOGNIZED,
                             f"calling AE title {self.calling_ae!r} is not bound to {who} "
                             f"(bind_ae allows {sorted(allowed) or 'none'})")
                return
        policy = self.listener.client_identity
        verify_context = identity.VerifyContext(datetime.now(UTC), self.identity_sources)
        if policy.blocking:  # scrypt or Kerberos: off the event loop, so other associations go on
            self._off_loop("checking the modality's user identity",
                           lambda: identity.screen(policy, rq, verify_context), self._screened)
        else:
            self._screened(identity.screen(policy, rq, verify_context))

    def _screened(self, screened: identity.Screened) -> None:
        """The client_identity policy has spoken: apply the rules, then build the identity to inject."""
        if screened.failure is not None:
            self._reject(*screened.reject, f"user identity: {screened.failure}", outcome="rejected_by_identity")
            return
        rq = screened.rq
        self.screened = screened
        upstream_names: tuple[str, ...] = ()
        identity_name: str | None = None
        rules = self.config.rules
        if rules is not None:
            self.facts = self._facts(rq)
            decision = rules.evaluate(self.facts)
            self.decision = decision
            self.recorder.rule_decision(decision)
            for rule, action in decision.shadow_matches:
                log.info("%s: shadow rule %s would %s (not enforced)", self._who(), rule, action)
            if decision.action == "reject":
                result, source, reason = decision.reject or (1, 1, 1)
                where = f" ({decision.location})" if decision.location else ""
                self._reject(result, source, reason, f"rule {decision.rule}{where}", outcome="rejected_by_rule")
                return
            if decision.action == "drop":
                log.warning("%s: dropped without a PDU by rule %s", self._who(), decision.rule)
                self.outcome = "dropped_by_rule"
                self._close_all()
                return
            log.info("%s: accepted by rule %s%s", self._who(), decision.rule,
                     f" ({decision.location})" if decision.location else "")
            upstream_names = decision.upstreams
            identity_name = decision.identity
            if rules.has_dimse_rules:
                self.gate = RequestGate(self._decide_dimse)
            if decision.rewrite_called_ae or decision.rewrite_calling_ae:
                rq = dataclasses.replace(
                    rq,
                    called_ae=decision.rewrite_called_ae or rq.called_ae,
                    calling_ae=decision.rewrite_calling_ae or rq.calling_ae,
                )
        name = identity_name or screened.profile
        profile = self.config.identities.get(name) if name else None
        if profile is None:
            self._route(rq, upstream_names, screened, None)
            return
        context = identity.BuildContext(self.calling_ae, self.called_ae, datetime.now(UTC), os.urandom,
                                        self.identity_sources)

        def injected(item: UserIdentityRQSubItem) -> None:
            try:
                with_identity = identity.inject(rq, item)
            except identity.IdentityError as exc:
                failed(exc)
                return
            self.recorder.identity_injection(profile.name, int(profile.identity_type), "injected")
            log.info("%s: user identity %s (type %d, %d bytes) injected", self._who(), profile.name,
                     item.identity_type, len(item.primary) + len(item.secondary))
            self._route(with_identity, upstream_names, screened, profile)

        def failed(exc: identity.IdentityError) -> None:
            self.recorder.identity_injection(profile.name, int(profile.identity_type), "failed")
            self._reject(*exc.reject, f"identity profile {profile.name}: {exc}", outcome="rejected_by_identity")

        if profile.blocking:  # Kerberos asks the KDC: off the event loop
            self._off_loop(f"building user identity {profile.name}", lambda: identity.build(profile, context),
                           injected, failed)
            return
        try:
            item = identity.build(profile, context)
        except identity.IdentityError as exc:
            failed(exc)
            return
        injected(item)

    def _off_loop(self, what: str, work: Callable[[], _T], then: Callable[[_T], None],
                  failed: Callable[[identity.IdentityError], None] | None = None) -> None:
        """Run blocking identity work in a worker thread, bounded by the connect timeout, and go on
        with `then` on the loop unless the association ended meanwhile (the modality gave up)."""

        async def run() -> None:
            try:
                async with asyncio.timeout(self.config.timeouts.connect):
                    result = await asyncio.to_thread(work)
            except identity.IdentityError as exc:
                if not self._done and self.state is State.STA5_AWAITING_AC:
                    if failed is not None:
                        failed(exc)
                    else:
                        self._reject(*exc.reject, f"{what}: {exc}", outcome="rejected_by_identity")
                return
            except TimeoutError:
                if not self._done and self.state is State.STA5_AWAITING_AC:
                    self._reject(*identity.REJECT_UNAVAILABLE,
                                 f"{what} took longer than {self.config.timeouts.connect:.0f} s",
                                 outcome="rejected_by_identity")
                return
            if not self._done and self.state is State.STA5_AWAITING_AC:
                try:
                    then(result)
                except Exception:  # as in data_received: a bug costs this association, never the proxy
                    log.exception("%s: internal error after %s; aborting the association", self._who(), what)
                    self._abort_both(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED, "internal_error")

        self._connect_task = self.loop.create_task(run(), name=f"{self.id}-identity")
        self._connect_task.add_done_callback(lambda _t: self._maybe_done())

    def _route(self, rq: AAssociateRQ, upstream_names: tuple[str, ...], screened: identity.Screened,
               profile: identity.IdentityProfile | None) -> None:
        """Pick the upstream (limits, health, failover) and open it."""
        self.response_plan = identity.plan(screened, profile)
        if self.limits is not None:
            source_ip = self._source_ip()
            refused = self.limits.try_acquire(self.listener_name, source_ip, self.calling_ae)
            if refused is not None:
                self._reject_limited(refused)
                return
            self.limit_hold = (self.listener_name, source_ip, self.calling_ae)
        if not upstream_names:
            upstream_names = self.config.upstream_names_for(self.called_ae)
        candidates = [n for n in upstream_names if n in self.routes]
        name = self.health.pick(candidates) if self.health is not None else next(iter(candidates), None)
        if candidates and name is None:
            self.recorder.routed(candidates[0])  # counted against the preferred upstream
            self._reject_transient(f"every upstream for called AE title {self.called_ae!r} is down "
                                   f"({', '.join(candidates)})", "all_down")
            return
        route = self.routes.get(name) if name else None
        if route is None:
            self._reject(RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                         RejectReasonUser.CALLED_AE_NOT_RECOGNIZED,
                         f"no route for called AE title {self.called_ae!r} and no default upstream")
            return
        self.upstream_name = name
        self.recorder.routed(name)
        self._connect_task = self.loop.create_task(self._open_upstream(route, rq), name=f"{self.id}-upstream")
        self._connect_task.add_done_callback(lambda _t: self._maybe_done())

    def _source_ip(self) -> str:
        if self.client_address is not None:
            return self.client_address[0]
        leg = self.legs.get(Side.REQUESTOR)
        peer = leg.transport.get_extra_info("peername") if leg and leg.transport else None
        return str(peer[0]) if isinstance(peer, tuple) else "unknown"

    def _reject_limited(self, reason: LimitReason) -> None:
        self.failure_reason = f"limit_{reason.value}"
        self._reject(RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                     RejectReasonPresentation.LOCAL_LIMIT_EXCEEDED, f"limit '{reason.value}' reached",
                     outcome="rejected_by_limit")

    def _facts(self, rq: AAssociateRQ) -> AssociationFacts:
        leg = self.legs.get(Side.REQUESTOR)
        peer = self.client_address or (leg.transport.get_extra_info("peername") if leg and leg.transport else None)
        source = ipaddress.ip_address(peer[0]) if isinstance(peer, tuple) else ipaddress.ip_address("0.0.0.0")
        contexts = rq.presentation_contexts
        return AssociationFacts(
            source=source,
            listener=self.listener_name,
            client_cert=self.client_cert,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            abstract_syntaxes=tuple(pc.abstract_syntax for pc in contexts if pc.abstract_syntax),
            transfer_syntaxes=tuple(dict.fromkeys(ts for pc in contexts for ts in pc.transfer_syntaxes)),
            user_identity=self.screened.facts if self.screened is not None else None,
            now=datetime.now(),
        )

    async def _open_upstream(self, route: UpstreamRoute, rq: AAssociateRQ) -> None:
        up = route.upstream
        timeout = self.config.timeouts.connect
        try:
            async with asyncio.timeout(timeout):
                started = self.loop.time()
                sock = await _connect_socket(self.loop, up.address.host, up.address.port)
                connected = self.loop.time()
                try:
                    if route.ssl_context is None:
                        _transport, leg = await self.loop.create_connection(
                            lambda: Leg(self, Side.ACCEPTOR), sock=sock)
                    else:
                        ctx = route.ssl_context
                        session = ctx.session if isinstance(ctx, tls.ResumingClientContext) else None
                        tls_sock = await tlssocket.open_tls(self.loop, sock, ctx, route.server_hostname, session)
                        leg = Leg(self, Side.ACCEPTOR)
                        tlssocket.TLSSocketTransport(self.loop, tls_sock, leg)
                except BaseException:
                    sock.close()
                    raise
                handshake = self.loop.time() - connected if route.ssl_context else None
                self.recorder.upstream_connected(connected - started, handshake)
        except ssl.SSLError as exc:
            label, words = tls.describe_tls_error(
                exc, server_name=route.server_hostname, profile=up.tls.profile if up.tls else None
            )
            self.recorder.tls_handshake_failure(label)
            self._reject_transient(f"TLS to upstream {up.name} ({up.address}) failed: {words}", "tls")
            return
        except TimeoutError:
            self._reject_transient(
                f"upstream {up.name} ({up.address}) did not complete connect/TLS within {timeout:.0f} s",
                "timeout",
            )
            return
        except OSError as exc:
            _label, words = tls.describe_connect_error(exc, up.address)
            self._reject_transient(f"cannot reach upstream {up.name} ({up.address}): {words}", "unreachable")
            return
        if self._done or self.state is not State.STA5_AWAITING_AC:
            leg.abort_now()
            return
        if up.tls is not None and up.tls.pin_sha256:
            sslobj = leg.transport.get_extra_info("ssl_object") if leg.transport else None
            if not tls.check_pin(sslobj, up.tls.pin_sha256):
                label, words = tls.describe_pin_mismatch(sslobj)
                self.recorder.tls_handshake_failure(label)
                leg.abort_now()
                self._reject_transient(f"TLS to upstream {up.name} ({up.address}) failed: {words}", "tls")
                return
        self.legs[Side.ACCEPTOR] = leg
        client_max = rq.max_length
        to_upstream = _clamp(client_max, self.config.max_pdu_length)
        # The upstream may send us P-DATA up to what we advertise on the client's behalf.
        self.framers[Side.ACCEPTOR].max_pdata_length = to_upstream
        leg.write(rq.with_max_length(to_upstream).encode())
        self._arm(self.config.timeouts.acse, self._acse_expired)
        log.debug("%s: A-ASSOCIATE-RQ relayed to %s (max length %d -> %d)", self._who(), up.name,
                  client_max or 0, to_upstream)

    def _relay_ac(self, frame: Frame) -> None:
        self._disarm()
        ac = parse_pdu(frame.data)
        assert isinstance(ac, AAssociateAC)
        upstream_max = ac.max_length
        to_client = _clamp(upstream_max, self.config.max_pdu_length)
        self.framers[Side.REQUESTOR].max_pdata_length = to_client
        client = self.legs.get(Side.REQUESTOR)
        if client is None:
            return
        ac = self._filter_contexts(ac)
        if self.response_plan is not None:
            try:
                ac = identity.finish_ac(ac, self.response_plan)
            except identity.IdentityError as exc:
                self._reject_identity_response(exc)
                return
        self.state = State.STA6_ESTABLISHED
        if not self._inspecting:  # nothing inside P-DATA needs a look: pass bulk PDUs on as they arrive
            for framer in self.framers.values():
                framer.cut_through = True
        if self.rq is not None:
            # PS3.8 9.3.3: the AC echoes the RQ's AE fields; restore the modality's own after a rewrite
            ac = dataclasses.replace(ac, called_ae=self.rq.called_ae, calling_ae=self.rq.calling_ae)
        client.write(ac.with_max_length(to_client).encode())
        self.recorder.accepted()
        self._keep_tls_session()
        accepted = sum(1 for pc in ac.presentation_contexts if pc.result == 0)
        log.info(
            "%s: association established via %s (%d of %d presentation contexts accepted%s)",
            self._who(),
            self.upstream_name,
            accepted,
            len(ac.presentation_contexts),
            ", TLS session resumed" if self.tls_resumed else "",
        )
        self.outcome = "accepted"
        self._idle_bytes = self.bytes_to_upstream + self.bytes_to_client
        self._idle_since = self.loop.time()
        self._arm(self.config.timeouts.idle / 4, self._idle_check)

    def _reject_identity_response(self, exc: Exception) -> None:
        """require_response and no 0x59 came back: A-ABORT to the archive, RJ 1/2/1 to the modality."""
        upstream = self.legs.get(Side.ACCEPTOR)
        if upstream is not None:
            upstream.write(AAbort(AbortSource.SERVICE_USER, 0).encode())
        self.state = State.STA5_AWAITING_AC
        self._reject(RejectResult.PERMANENT, RejectSource.SERVICE_PROVIDER_ACSE, RejectReasonACSE.NO_REASON,
                     f"user identity: {exc}", outcome="rejected_by_identity")

    def _filter_contexts(self, ac: AAssociateAC) -> AAssociateAC:
        """Contexts a rule does not allow are rejected in the AC the modality sees (result 1 or 3);
        the archive accepted them, but no PDV on them will ever reach it."""
        decision = self.decision
        if decision is None or decision.allowed_abstract_syntaxes is None or self.rq is None:
            return ac
        proposed = {pc.context_id: pc.abstract_syntax for pc in self.rq.presentation_contexts}
        items = []
        refused = []
        for item in ac.items:
            if isinstance(item, PresentationContextACItem) and item.result == 0:
                syntax = proposed.get(item.context_id)
                if syntax is None or not decision.context_allowed(syntax):
                    item = dataclasses.replace(item, result=decision.context_rejection)
                    refused.append(item.context_id)
            items.append(item)
        self.accepted_contexts = frozenset(
            i.context_id for i in items if isinstance(i, PresentationContextACItem) and i.result == 0
        )
        if refused:
            log.info("%s: rule %s refused presentation context(s) %s", self._who(), decision.rule,
                     ", ".join(map(str, refused)))
        return dataclasses.replace(ac, items=tuple(items))

    def _keep_tls_session(self) -> None:
        """After the AC the TLS 1.3 tickets have arrived: keep the session for the next association."""
        route = self.routes.get(self.upstream_name or "")
        upstream = self.legs.get(Side.ACCEPTOR)
        if route is None or upstream is None or upstream.transport is None:
            return
        ctx = route.ssl_context
        sslobj = upstream.transport.get_extra_info("ssl_object")
        if isinstance(ctx, tls.ResumingClientContext) and isinstance(sslobj, ssl.SSLSocket):
            self.tls_resumed = bool(sslobj.session_reused)
            if self.tls_resumed and ctx.session is not None:
                return  # the offered session still works; fetching a new one costs ~4% per association
            session = sslobj.session
            if session is not None:
                ctx.session = session

    # ---- endings ----------------------------------------------------------------------------
    def _reject(self, result: int, source: int, reason: int, why: str, outcome: str = "rejected") -> None:
        log.warning("%s: rejected (RJ %d/%d/%d): %s", self._who(), result, source, reason, why)
        client = self.legs.get(Side.REQUESTOR)
        if client is not None:
            client.write(AAssociateRJ(result, source, reason).encode())
        self.state = State.STA13_CLOSING
        self.outcome = outcome
        self._close_all()

    def _reject_transient(self, why: str, reason: str) -> None:
        self.failure_reason = reason
        upstream = self.legs.get(Side.ACCEPTOR)
        if upstream is not None and self.state is State.STA5_AWAITING_AC:
            upstream.write(AAbort(AbortSource.SERVICE_USER, 0).encode())
        self._reject(
            RejectResult.TRANSIENT,
            RejectSource.SERVICE_PROVIDER_PRESENTATION,
            RejectReasonPresentation.TEMPORARY_CONGESTION,
            why,
            outcome="upstream_unavailable",
        )

    def _protocol_error(self, side: Side, exc: RemotePDUError) -> None:
        self.recorder.protocol_error(side, exc)
        log.warning(
            "%s: protocol error from the %s: %s; sending A-ABORT %d/%d",
            self._who(),
            side.value,
            exc,
            exc.source,
            exc.reason,
        )
        self._write_abort(side, AAbort(exc.source, exc.reason).encode())
        self._write_abort(_other(side), AAbort(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED).encode())
        self.state = State.STA13_CLOSING
        self.outcome = "protocol_error"
        self._close_all()

    def _write_abort(self, side: Side, pdu: bytes) -> None:
        """An A-ABORT of our own to one side, unless a cut-through PDU is half-way to it: its
        bytes would be read as P-DATA, so closing the connection is then the only clean signal."""
        leg = self.legs.get(side)
        if leg is None:
            return
        if self.framers[_other(side)].mid_pdu:
            log.info("%s: a P-DATA-TF PDU is half-way to the %s; closing without an A-ABORT", self._who(),
                     side.value)
            return
        leg.write(pdu)

    def _abort_both(self, source: int, reason: int, outcome: str) -> None:
        abort = AAbort(source, reason).encode()
        for side in tuple(self.legs):
            self._write_abort(side, abort)
        self.state = State.STA13_CLOSING
        self.outcome = outcome
        self._close_all()

    def abort(self, why: str) -> None:
        """Server-initiated abort (shutdown deadline)."""
        if self._done:
            return
        log.warning("%s: aborting: %s", self._who(), why)
        self._abort_both(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED, "aborted")

    def peer_closed(self, side: Side, exc: Exception | None) -> None:
        """A transport closed (or half-closed) without a PDU telling us why."""
        if self._done or self.state is State.STA13_CLOSING:
            return
        if self.state is State.STA2_AWAITING_RQ:
            self.outcome = "closed_before_rq"
            self._close_all()
            return
        if side is Side.ACCEPTOR and self.state is State.STA5_AWAITING_AC:
            if isinstance(exc, ssl.SSLError):
                _label, words = tls.describe_tls_error(exc)
                why = f"TLS to upstream {self.upstream_name} failed after the handshake: {words}"
            else:
                why = f"upstream {self.upstream_name} closed the connection before answering the A-ASSOCIATE-RQ"
            self._reject_transient(why, "tls" if exc else "closed")
            return
        detail = f" ({exc})" if exc else ""
        log.warning("%s: the %s closed the connection without a PDU%s; A-ABORT to the other side",
                    self._who(), side.value, detail)
        self._write_abort(_other(side), AAbort(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED).encode())
        self.state = State.STA13_CLOSING
        self.outcome = "aborted"
        self._close_all()

    def _close_all(self) -> None:
        self.state = State.STA13_CLOSING
        self._disarm()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        grace = min(CLOSE_GRACE, self.config.timeouts.artim)
        for leg in self.legs.values():
            leg.finish(grace)
        self._maybe_done()

    def leg_lost(self, leg: Leg) -> None:
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._done or self.state is not State.STA13_CLOSING:
            return
        if all(leg.closed for leg in self.legs.values()) and (
            self._connect_task is None or self._connect_task.done()
        ):
            self._done = True
            self._disarm()
            if self.limit_hold is not None and self.limits is not None:
                self.limits.release(*self.limit_hold)
                self.limit_hold = None
            self.on_done(self)

    @property
    def established(self) -> bool:
        return self.state not in (State.STA2_AWAITING_RQ, State.STA5_AWAITING_AC, State.STA13_CLOSING)

    def summary(self) -> dict[str, Any]:
        """The end-of-association record: one log line per association (ids, names and counts
        only; AE titles as the modality sent them, never a secret)."""
        return {
            "id": self.id,
            "listener": self.listener_name,
            "peer": self.peer,
            "upstream": self.upstream_name,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "rule": self.decision.rule if self.decision else None,
            "outcome": self.outcome,
            "bytes_to_upstream": self.bytes_to_upstream,
            "bytes_to_client": self.bytes_to_client,
            "dimse": dict(self.recorder.dimse_counts),
            "duration_s": round(self.loop.time() - self.started, 3),
        }

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "peer": self.peer, "calling_ae": self.calling_ae, "called_ae": self.called_ae,
                "upstream": self.upstream_name, "state": self.state.value}
