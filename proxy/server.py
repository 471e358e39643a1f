"""Listeners, the live-association registry, signals, reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from proxy import config as config_mod
from proxy import identity, identity_kerberos, proxyproto, sdnotify, tls, tlssocket
from proxy.config import Listener, ProxyConfig
from proxy.dul.machine import Side
from proxy.errors import ConfigErrors, ProxyError
from proxy.limits import LimitReason, LimitTracker
from proxy.metrics import NULL_RECORDER, MetricsExporter, ProxyMetrics
from proxy.relay import Association, Leg, UpstreamRoute
from proxy.upstream import UpstreamHealth

log = logging.getLogger("proxy.server")
summary_log = logging.getLogger("proxy.association")


def build_routes(config: ProxyConfig) -> dict[str, UpstreamRoute]:
    """One TLS context per upstream, built once so every association shares it."""
    routes: dict[str, UpstreamRoute] = {}
    for name, upstream in config.upstreams.items():
        if upstream.tls is None:
            log.warning("upstream %s (%s) is plaintext: DICOM traffic to it is not encrypted", name, upstream.address)
            routes[name] = UpstreamRoute(upstream, None)
        else:
            if upstream.tls.insecure_skip_verify:
                log.warning("upstream %s: certificate verification is OFF (insecure_skip_verify)", name)
            routes[name] = UpstreamRoute(upstream, tls.upstream_context(upstream.tls))
    return routes


def _contexts(routes: dict[str, UpstreamRoute]) -> dict[str, ssl.SSLContext | None]:
    return {name: route.ssl_context for name, route in routes.items()}


def identity_sources() -> identity.Sources:
    """One per server: the secret-file cache and, when gssapi is installed, the Kerberos backend."""
    kerberos = identity_kerberos.GssapiBackend() if identity_kerberos.available() else None
    return identity.Sources(env=os.environ, kerberos=kerberos)


def build_listener_contexts(config: ProxyConfig) -> dict[str, ssl.SSLContext]:
    return {lst.name: tls.listener_context(lst.tls) for lst in config.listeners if lst.tls is not None}


def log_warnings(config: ProxyConfig) -> None:
    for warning in (*config.warnings, *tls.expiry_warnings(config)):
        log.warning("%s", warning)


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelayServer:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.routes = build_routes(config)
        self.identity_sources = identity_sources()
        self.listener_contexts = build_listener_contexts(config)
        self.live: set[Association] = set()
        self._servers: list[asyncio.Server] = []
        self._tls_sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.bound: dict[str, tuple[str, int]] = {}
        self.metrics: ProxyMetrics | None = None
        self.exporter: MetricsExporter | None = None
        if config.metrics is not None:
            from prometheus_client import CollectorRegistry

            self.metrics = ProxyMetrics(CollectorRegistry(), config)
            self.exporter = MetricsExporter(config.metrics, self.metrics.registry, before_scrape=self.metrics.flush)
        self.health = UpstreamHealth(config, contexts=_contexts(self.routes), observer=self.metrics)
        self.limits = LimitTracker(config.limits, time.monotonic)

    def _new_association(
        self, listener: Listener, client: tuple[str, int] | None = None, limited: LimitReason | None = None
    ) -> Association:
        assoc = Association(
            config=self.config, listener=listener, routes=self.routes, on_done=self._association_done,
            limits=self.limits, client_address=client, limited=limited,
            recorder=self.metrics.association(listener.name) if self.metrics else NULL_RECORDER,
            health=self.health,
            identity_sources=self.identity_sources,
        )
        self.live.add(assoc)
        self._idle.clear()
        return assoc

    def _new_leg(self, listener: Listener) -> Leg:
        leg = Leg(self._new_association(listener), Side.REQUESTOR)
        leg.admit_by_peername = True  # plaintext, no PROXY header: the rate check at connection_made
        return leg

    def _association_done(self, assoc: Association) -> None:
        assoc.recorder.finished(assoc.outcome)
        if self.metrics is not None and assoc.outcome == "rejected_by_limit":
            self.metrics.limit_rejection(assoc.listener_name, assoc.failure_reason.removeprefix("limit_"))
        if assoc.calling_ae or assoc.outcome not in ("closed_before_rq",):
            record = assoc.summary()
            text = " ".join(f"{k}={v}" for k, v in record.items() if k != "dimse")
            dimse = ",".join(f"{k}:{v}" for k, v in sorted(record["dimse"].items()))
            summary_log.info("association end: %s dimse=%s", text, dimse or "-", extra={"association": record})
        self.live.discard(assoc)
        if not self.live:
            self._idle.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        log_warnings(self.config)
        if self.exporter is not None:
            await self.exporter.start()
        self.health.start()
        for listener in self.config.listeners:
            host, port = listener.address.host, listener.address.port
            if listener.tls is None and not listener.proxy_protocol:
                server = await loop.create_server(
                    lambda listener=listener: self._new_leg(listener),  # type: ignore[misc]
                    host,
                    port,
                    reuse_address=True,
                    backlog=256,
                )
                self._servers.append(server)
                sockets = [s.getsockname()[:2] for s in server.sockets]
            else:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                lsock = socket.create_server((host, port), family=family, backlog=256, reuse_port=False)
                lsock.setblocking(False)
                self._tls_sockets.append(lsock)
                sockets = [lsock.getsockname()[:2]]
                self._spawn(self._accept(listener, lsock), f"accept-{listener.name}")
            for bound_host, bound_port in sockets:
                self.bound[listener.name] = (bound_host, bound_port)
                kind = f"TLS, profile {listener.tls.profile}" if listener.tls else "plaintext"
                log.info("listening on %s (listener %s, %s)", _shown(bound_host, bound_port), listener.name, kind)

    # ---- TLS listeners: peek before the handshake, so plaintext DICOM can be named ----------
    async def _accept(self, listener: Listener, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:
                if lsock.fileno() < 0:
                    return
                log.warning("listener %s: accept failed: %s", listener.name, exc)
                continue
            self._spawn(self._start_conn(listener, conn, addr), f"conn-{listener.name}")

    async def _start_conn(self, listener: Listener, conn: socket.socket, addr: tuple[str, int]) -> None:
        """A connection on a TLS or a proxy_protocol listener: PROXY header first (it comes before
        the TLS ClientHello), then the per-source rate, then TLS or straight to the relay."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        timeout = self.config.timeouts.artim
        client = (addr[0], addr[1])
        if listener.proxy_protocol:
            if not proxyproto.is_trusted(addr[0], listener.trusted_proxies):
                log.warning("%s: not in trusted_proxies of listener %s; closed", _shown(*client), listener.name)
                conn.close()
                return
            try:
                async with asyncio.timeout(timeout):
                    header = await proxyproto.read_header(loop, conn)
            except (proxyproto.ProxyProtocolError, TimeoutError, OSError) as exc:
                words = str(exc) or f"no PROXY header within {timeout:.0f} s"
                log.warning("%s: listener %s: %s; closed", _shown(*client), listener.name, words)
                conn.close()
                return
            if header.source is not None:  # None: LOCAL (HAProxy's own health check) or UNKNOWN
                client = header.source
        limited = self.limits.admit(client[0])
        if listener.tls is None:
            try:
                await loop.connect_accepted_socket(
                    lambda: Leg(self._new_association(listener, client, limited), Side.REQUESTOR), conn
                )
            except OSError:
                conn.close()
            return
        peer = _shown(*client)
        try:
            async with asyncio.timeout(timeout):
                first = await _peek(loop, conn)
        except (TimeoutError, OSError):
            conn.close()
            return
        if not first:
            conn.close()
            return
        if first[:1] == b"\x01" or tls.sniff_plain_dicom_on_tls(first):
            label, words = tls.describe_plain_dicom_on_tls(listener.name)
            if self.metrics is not None:
                self.metrics.tls_handshake_failure("client", label)
            log.warning("%s: %s", peer, words)
            conn.close()
            return
        ctx = self.listener_contexts.get(listener.name)
        if ctx is None:
            conn.close()
            return
        created: list[Association] = []

        def factory() -> Leg:
            assoc = self._new_association(listener, client, limited)
            created.append(assoc)
            return Leg(assoc, Side.REQUESTOR)

        try:
            async with asyncio.timeout(timeout):
                tls_conn = await tlssocket.open_tls(loop, conn, ctx, None, server_side=True)
            tlssocket.TLSSocketTransport(loop, tls_conn, factory())
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            profile = listener.tls.profile if listener.tls else None
            label, words = tls.describe_listener_tls_error(exc, profile)
            if self.metrics is not None:
                self.metrics.tls_handshake_failure("client", label)
            log.warning("%s: TLS handshake on listener %s failed: %s", peer, listener.name, words)
            for assoc in created:
                self._association_done(assoc)
            with contextlib.suppress(OSError):
                conn.close()

    def reload(self, path: Path) -> bool:
        """Swap in a new config for new associations; live ones keep the one they started with."""
        try:
            new = config_mod.load(path)
            routes = build_routes(new)
            contexts = build_listener_contexts(new)
        except ConfigErrors as exc:
            log.error("reload failed, keeping the running configuration:\n%s", exc)
            if self.metrics is not None:
                self.metrics.reload_failed()
            return False
        except (ProxyError, OSError, ValueError, ssl.SSLError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            if self.metrics is not None:
                self.metrics.reload_failed()
            return False
        if [(lst.name, lst.address, lst.tls is None) for lst in new.listeners] != [
            (lst.name, lst.address, lst.tls is None) for lst in self.config.listeners
        ]:
            log.warning("reload: added, removed or moved listeners take effect only after a restart")
        self.config = new
        self.limits.reconfigure(new.limits)
        self.routes = routes
        self.listener_contexts.update(contexts)
        self.health.reconfigure(new, _contexts(routes))
        if self.metrics is not None:
            self.metrics.reloaded(new)
        if self.exporter is not None and new.metrics is not None:
            self.exporter.reload(new.metrics)
        log_warnings(new)
        log.info("configuration reloaded from %s", path)
        return True

    async def shutdown(self, deadline: float) -> None:
        """Stop accepting, let live associations finish up to `deadline` seconds, then abort them."""
        for server in self._servers:
            server.close()
        for lsock in self._tls_sockets:
            lsock.close()
        for task in list(self._tasks):
            if task.get_name().startswith("accept-"):
                task.cancel()
        if self.live:
            log.info("shutting down: waiting up to %.0f s for %d association(s)", deadline, len(self.live))
            try:
                async with asyncio.timeout(deadline):
                    await self._idle.wait()
            except TimeoutError:
                for assoc in list(self.live):
                    assoc.abort("shutdown deadline reached")
                try:
                    async with asyncio.timeout(3):
                        await self._idle.wait()
                except TimeoutError:
                    log.warning("%d association(s) did not close after abort", len(self.live))
        for server in self._servers:
            await server.wait_closed()
        await self.health.stop()
        if self.exporter is not None:
            await self.exporter.close()
        log.info("stopped")


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The first bytes the client sent, left in the socket for the TLS handshake to read."""
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv(16, socket.MSG_PEEK)


async def run(path: Path) -> int:
    config = config_mod.load(path)
    server = RelayServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    watchdog_stop = asyncio.Event()
    watchdog = loop.create_task(sdnotify.watchdog_loop(watchdog_stop), name="watchdog")

    def on_sighup() -> None:
        sdnotify.reloading("reloading configuration")
        ok = server.reload(path)
        sdnotify.ready("configuration reloaded" if ok else "reload failed; running the previous configuration")

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    # What exists now (modules, configuration, rules, metric families) lives as long as the process:
    # keep it out of the collector's full passes, which otherwise rescan it while studies stream.
    gc.collect()
    gc.freeze()
    sdnotify.ready(f"relaying on {len(server.bound)} listener(s)")
    await stop.wait()
    sdnotify.stopping("draining live associations")
    log.info("SIGTERM: no longer accepting associations")
    await server.shutdown(server.config.timeouts.shutdown)
    watchdog_stop.set()
    await watchdog
    return 0
