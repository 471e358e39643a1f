"""Listeners, the live-association registry, signals, reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from proxy import config as config_mod
from proxy import tls
from proxy.config import Listener, ProxyConfig
from proxy.dul.machine import Side
from proxy.errors import ConfigErrors, ProxyError
from proxy.relay import Association, Leg, UpstreamRoute

log = logging.getLogger("proxy.server")


def build_routes(config: ProxyConfig) -> dict[str, UpstreamRoute]:
    """One TLS context per upstream, built once so every association shares it."""
    routes: dict[str, UpstreamRoute] = {}
    for name, upstream in config.upstreams.items():
        if upstream.tls is None:
            log.warning("upstream %s (%s) is plaintext: DICOM traffic to it is not encrypted", name, upstream.address)
            routes[name] = UpstreamRoute(upstream, None)
        else:
            routes[name] = UpstreamRoute(upstream, tls.upstream_context(upstream.tls))
    return routes


class RelayServer:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.routes = build_routes(config)
        self.live: set[Association] = set()
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.bound: dict[str, tuple[str, int]] = {}

    def _new_leg(self, listener: Listener) -> Leg:
        assoc = Association(
            config=self.config, listener_name=listener.name, routes=self.routes, on_done=self._association_done
        )
        self.live.add(assoc)
        self._idle.clear()
        return Leg(assoc, Side.REQUESTOR)

    def _association_done(self, assoc: Association) -> None:
        self.live.discard(assoc)
        if not self.live:
            self._idle.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.config.listeners:
            server = await loop.create_server(
                lambda listener=listener: self._new_leg(listener),  # type: ignore[misc]
                listener.address.host,
                listener.address.port,
                reuse_address=True,
                backlog=256,
            )
            self._servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.bound[listener.name] = (host, port)
                shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                log.info("listening on %s (listener %s)", shown, listener.name)

    def reload(self, path: Path) -> bool:
        """Swap in a new config for new associations; live ones keep the one they started with."""
        try:
            new = config_mod.load(path)
            routes = build_routes(new)
        except ConfigErrors as exc:
            log.error("reload failed, keeping the running configuration:\n%s", exc)
            return False
        except (ProxyError, OSError, ValueError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        if [(lst.name, lst.address) for lst in new.listeners] != [
            (lst.name, lst.address) for lst in self.config.listeners
        ]:
            log.warning("reload: listener changes take effect only after a restart")
        self.config = new
        self.routes = routes
        log.info("configuration reloaded from %s", path)
        return True

    async def shutdown(self, deadline: float) -> None:
        """Stop accepting, let live associations finish up to `deadline` seconds, then abort them."""
        for server in self._servers:
            server.close()
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
        log.info("stopped")


async def run(path: Path) -> int:
    config = config_mod.load(path)
    server = RelayServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server.reload(path))
    await stop.wait()
    log.info("SIGTERM: no longer accepting associations")
    await server.shutdown(server.config.timeouts.shutdown)
    return 0
