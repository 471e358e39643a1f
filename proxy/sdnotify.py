"""A tiny sd_notify(3) client: readiness, reload, stop and watchdog messages to systemd.

systemd passes `NOTIFY_SOCKET` to a `Type=notify` service: a filesystem path, or an abstract
socket name written with a leading '@'. Each message is one datagram of `KEY=VALUE` lines.
Without `NOTIFY_SOCKET` (a terminal, a container, the tests) every call is a silent no-op, and
no call ever raises into the proxy: a failed notification is logged at debug level and
reported as False. systemd's watchdog then notices a silent proxy by itself.

Messages (systemd.service(5), sd_notify(3)):
    READY=1                       every listener is bound; after a reload, the reload is over
    RELOADING=1 + MONOTONIC_USEC= SIGHUP received; systemd >= 253 requires the timestamp
    STOPPING=1                    SIGTERM received, graceful shutdown started
    WATCHDOG=1                    the event loop is alive (every WATCHDOG_USEC/2)
    STATUS=...                    one line for `systemctl status`
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

log = logging.getLogger("proxy.sdnotify")

__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
    "watchdog_loop",
]


def _address(value: str) -> str | bytes | None:
    """`NOTIFY_SOCKET` -> what sendto() takes: a path, or b'\\0name' for an abstract socket."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:CID:PORT (systemd >= 254 in VMs): not supported here


def notify(state: str) -> bool:
    """Send `state` (newline-separated KEY=VALUE assignments) to $NOTIFY_SOCKET.

    True when the datagram went out; False without NOTIFY_SOCKET or on any error (never raises).
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = _address(target)
    if address is None:
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r; %r not sent", target, state)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8", "replace"), address)
    except (OSError, ValueError) as exc:
        log.debug("sd_notify: cannot send %r to %s: %s", state, target, exc)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status_text: str | None = None) -> bool:
    """READY=1: startup (or a reload) is complete. An optional STATUS= line goes with it."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC= with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading(status_text: str | None = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC=: a reload started. Send ready() when it is over,
    whether the new configuration was taken or the old one kept."""
    message = f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}"
    if status_text:
        message += f"\nSTATUS={_one_line(status_text)}"
    return notify(message)


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1: graceful shutdown started (systemd shows the unit as deactivating)."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def watchdog() -> bool:
    """WATCHDOG=1: keep-alive ping for WatchdogSec=."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """STATUS=...: a one-line state shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval() -> float | None:
    """WatchdogSec= in seconds when systemd expects pings from this process, else None.

    systemd sets WATCHDOG_USEC (and WATCHDOG_PID, which must then be our own PID: a child that
    inherited the environment must not ping for its parent).
    """
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID", "")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            log.debug("sd_notify: WATCHDOG_PID=%r is not a number", pid_text)
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.debug("sd_notify: WATCHDOG_USEC=%r is not a number", usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


async def watchdog_loop(stop: asyncio.Event, interval: float | None = None) -> None:
    """Ping WATCHDOG=1 every `interval`/2 seconds (default: watchdog_interval()) until `stop`.

    Run it as a task of the proxy's event loop: the pings stop when the loop stops turning,
    which is exactly what the watchdog is meant to catch. Returns at once without a watchdog.
    Keep it running through a graceful shutdown (set `stop` after it), so a long drain is not
    mistaken for a hang.
    """
    if interval is None:
        interval = watchdog_interval()
    if interval is None or interval <= 0:
        return
    period = interval / 2
    while not stop.is_set():
        watchdog()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period)
