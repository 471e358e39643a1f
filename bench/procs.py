"""Processes under test: start, wait until listening, sample, stop by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import psutil

HOST = "127.0.0.1"


def free_port() -> int:
    """A port the kernel just gave us on 127.0.0.1 (released again; the race is acceptable here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class StartError(RuntimeError):
    pass


class Managed:
    """One long-running server process with its stdout+stderr in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.port = 0
        self.restarts = 0
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise StartError(f"{self.name} is not running")
        return self.popen.pid

    def start(self, port: int, timeout: float = 20.0) -> None:
        self.port = port
        self._log = self.log_path.open("ab")  # appended: a restart keeps the earlier log
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
        )
        self.ps = psutil.Process(self.popen.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise StartError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            if self._listening(port):
                return
            time.sleep(0.05)
        raise StartError(f"{self.name} not listening on {HOST}:{port} after {timeout:.0f} s:\n{self.tail()}")

    def _listening(self, port: int) -> bool:
        assert self.ps is not None
        try:
            conns = self.ps.net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)

    def restart(self) -> None:
        """Start again after the process died (its log is closed and reopened for appending)."""
        self.stop()
        self.restarts += 1
        self.start(self.port)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the process, all threads included."""
        assert self.ps is not None
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        assert self.ps is not None
        return int(self.ps.memory_info().rss)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to our own PID, SIGKILL after `grace` seconds."""
        popen = self.popen
        try:
            if popen is not None and popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(popen.pid, signal.SIGKILL)
                    popen.wait(timeout=5)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


class RssSampler:
    """Peak RSS of one process, sampled every `interval` seconds in a daemon thread."""

    def __init__(self, proc: Managed | None, interval: float = 0.02) -> None:
        self.proc = proc
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        assert self.proc is not None and self.proc.ps is not None
        ps = self.proc.ps
        while True:
            try:
                rss = ps.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        if self.proc is not None:
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            if self.proc is not None and self.proc.alive():
                # one last sample so a run shorter than the interval still has a value
                self.peak = max(self.peak, self.proc.rss())


def tcp_counters() -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat (DelayedACKs and friends)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for header, values in zip(lines[0::2], lines[1::2], strict=False):
        names = header.split()
        prefix = names[0].rstrip(":")
        for name, value in zip(names[1:], values.split()[1:], strict=False):
            with contextlib.suppress(ValueError):
                out[f"{prefix}.{name}"] = int(value)
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> tuple[float, float]:
    """(busy, steal): CPU seconds the whole machine spent busy since boot (user, nice, system, irq,
    softirq), and those the hypervisor took from this VM."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


class ForeignCpu:
    """CPU used by processes that are not ours (other sessions on the machine) during a run:
    the machine's busy time minus the bench process, its reaped children and the servers."""

    def __init__(self, servers: list[Managed]) -> None:
        self.servers = servers
        self.me = psutil.Process()
        self.seconds = 0.0
        self.steal = 0.0

    def _ours(self) -> float:
        t = self.me.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        for server in self.servers:
            if server.alive():
                with contextlib.suppress(psutil.Error):
                    total += server.cpu_seconds()
        return total

    def __enter__(self) -> ForeignCpu:
        self._busy0, self._steal0 = busy_cpu_seconds()
        self._ours0 = self._ours()
        return self

    def __exit__(self, *_exc: object) -> None:
        busy, steal = busy_cpu_seconds()
        self.seconds = (busy - self._busy0) - (self._ours() - self._ours0)
        self.steal = steal - self._steal0
