"""proxy.sdnotify against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy import sdnotify
from tests.peers import LOOPBACK, Peer, free_port, wait_for_line

REPO_ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """The systemd side: a bound datagram socket; messages are read in the order sent."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what NOTIFY_SOCKET says

    def next(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode("utf-8")

    def pending(self) -> list[str]:
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode("utf-8"))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def path_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    # A short folder: sun_path holds 108 bytes, and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as folder:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield Receiver(sock, path)


@pytest.fixture
def abstract_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    name = f"dicom-proxy-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield Receiver(sock, "@" + name)


def _usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_lifecycle_messages_in_order(path_receiver: Receiver) -> None:
    assert sdnotify.ready() is True
    before = _usec()
    assert sdnotify.reloading() is True
    after = _usec()
    assert sdnotify.ready("reloaded") is True
    assert sdnotify.watchdog() is True
    assert sdnotify.status("serving 3 associations") is True
    assert sdnotify.stopping() is True

    assert path_receiver.next() == "READY=1"
    reload_message = path_receiver.next()
    head, stamp = reload_message.split("\n")
    assert head == "RELOADING=1"
    key, value = stamp.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert path_receiver.next() == "READY=1\nSTATUS=reloaded"
    assert path_receiver.next() == "WATCHDOG=1"
    assert path_receiver.next() == "STATUS=serving 3 associations"
    assert path_receiver.next() == "STOPPING=1"
    assert path_receiver.pending() == []


def test_abstract_namespace_socket(abstract_receiver: Receiver) -> None:
    assert abstract_receiver.address.startswith("@")
    assert sdnotify.ready("listening on 2 listeners") is True
    assert sdnotify.stopping() is True
    assert abstract_receiver.next() == "READY=1\nSTATUS=listening on 2 listeners"
    assert abstract_receiver.next() == "STOPPING=1"


def test_status_text_is_one_line(path_receiver: Receiver) -> None:
    sdnotify.reloading("reload failed:\nline 3:\tbad key")
    message = path_receiver.next()
    assert message.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert message.endswith("\nSTATUS=reload failed: line 3: bad key")
    assert message.count("\n") == 2


def test_raw_notify_sends_exactly_the_state(path_receiver: Receiver) -> None:
    assert sdnotify.notify("EXTEND_TIMEOUT_USEC=5000000") is True
    assert path_receiver.next() == "EXTEND_TIMEOUT_USEC=5000000"


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.reloading() is False
    assert sdnotify.stopping() is False
    assert sdnotify.watchdog() is False


@pytest.mark.parametrize(
    "value",
    [
        "/nonexistent/dicom-proxy/notify",  # nobody listens: ENOENT
        "vsock:2:1234",  # systemd >= 254 in a VM: not supported, silently skipped
        "relative/path",
        "@" + "x" * 200,  # longer than sun_path
    ],
)
def test_bad_notify_socket_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with caplog.at_level(logging.DEBUG, logger="proxy.sdnotify"):
        assert sdnotify.ready() is False
        assert sdnotify.reloading() is False
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    assert all(r.levelno <= logging.DEBUG for r in caplog.records)


def test_receiver_gone_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="sdn-") as folder:
        path = os.path.join(folder, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.close()  # the path stays, nobody reads: ECONNREFUSED
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.watchdog() is False


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "other", None),  # the variables were inherited from a parent
        ("30000000", "garbage", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert sdnotify.watchdog_interval() == expected


async def test_watchdog_loop_pings_at_half_the_interval(
    path_receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s -> a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    stop = asyncio.Event()
    task = asyncio.create_task(sdnotify.watchdog_loop(stop))
    await asyncio.sleep(0.35)
    stop.set()
    async with asyncio.timeout(1):
        await task  # returns promptly once stop is set, not after a full period
    pings = path_receiver.pending()
    assert set(pings) == {"WATCHDOG=1"}
    assert 3 <= len(pings) <= 5, pings


async def test_watchdog_loop_without_watchdog_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    async with asyncio.timeout(0.5):
        await sdnotify.watchdog_loop(asyncio.Event())


async def test_watchdog_loop_explicit_interval(path_receiver: Receiver) -> None:
    stop = asyncio.Event()
    stop.set()
    await sdnotify.watchdog_loop(stop, interval=10.0)
    assert path_receiver.pending() == []  # stopped before the first ping


# --------------------------------------------------------------------------- the real process




def test_proxy_process_talks_to_systemd(tmp_path: Path) -> None:
    """`dicom-proxy run` as systemd runs it: READY=1 once listening, RELOADING=1 + READY=1 on
    SIGHUP, WATCHDOG=1 pings, STOPPING=1 on SIGTERM, exit 0."""
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": [{"name": "modalities", "address": f"{LOOPBACK}:{port}"}],
        "upstreams": {"pacs": {"address": f"{LOOPBACK}:{free_port()}"}},
        "default_upstream": "pacs",
    }))
    with tempfile.TemporaryDirectory(prefix="sdn-") as folder, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = os.path.join(folder, "notify")
        sock.bind(path)
        receiver = Receiver(sock, path)
        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
        env.pop("WATCHDOG_PID", None)
        peer = Peer("proxy", [sys.executable, "-m", "proxy", "run", "-c", str(config)], tmp_path / "proxy.log",
                    env=env, cwd=REPO_ROOT).start()
        try:
            wait_for_line(peer, r"listening on", 15)

            def next_non_ping(timeout: float = 10.0) -> str:
                deadline = time.monotonic() + timeout
                while True:
                    message = receiver.next(max(0.1, deadline - time.monotonic()))
                    if message != "WATCHDOG=1":
                        return message

            assert next_non_ping().split("\n")[0] == "READY=1"
            os.kill(peer.pid, signal.SIGHUP)
            reload_message = next_non_ping()
            assert reload_message.startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert next_non_ping().split("\n")[0] == "READY=1"
            assert receiver.next(2.0) == "WATCHDOG=1"  # every 0.2 s
            os.kill(peer.pid, signal.SIGTERM)
            assert next_non_ping().split("\n")[0] == "STOPPING=1"
            assert peer.wait(15) == 0
        finally:
            peer.stop()
