"""Throughput, CPU and memory of dicom-proxy against stunnel and direct TLS, on 127.0.0.1.

    .venv/bin/python bench/run.py [--runs N] [--quick] [--sets w1 w2 w3 legacy] [--paths ...]

One storescp +tls --ignore archive serves every path:
  direct   storescu +tls               -> storescp +tls
  stunnel  storescu -> stunnel (client) -> storescp +tls
  proxy    storescu -> dicom-proxy      -> storescp +tls
Runs of one workload are interleaved across paths (the path order rotates each run) so drift
on the machine spreads over all of them. The intermediary's CPU is its user+system time over
the run (psutil), its peak RSS is sampled every 20 ms in a thread. Full runs write
bench/RESULTS.md (between the generated-block markers); --quick writes bench/out/RESULTS-quick.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"

sys.path.insert(0, str(BENCH))

import datasets  # noqa: E402
import echo_scu  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
from procs import HOST, Managed, RssSampler  # noqa: E402

PATHS = ("direct", "stunnel", "proxy", "proxy-metrics", "proxy-tls")
"""proxy-metrics: a second proxy process with `metrics:` on (and scraped every second, as Prometheus
would), to measure what the metrics cost (issue #6: under 3 % of throughput). proxy-tls: a third
with a mutual-TLS listener, storescu +tls -> proxy -> storescp +tls (compare with direct)."""
PDU = 131072  # storescu -pdu and storescp -pdu (dcmtk's maximum) on every path
PROXY_MAX_PDU = 262144  # the proxy's own cap; min(peer, cap) leaves dcmtk's 131072 in force
STORESCU_FLAGS = ("-xs", "-R", "-pdu", str(PDU))  # JPEG lossless + uncompressed, required contexts only
STORE_TIMEOUT = 900.0
MAX_ATTEMPTS = 4
FOREIGN_CPU_LIMIT = 0.05  # share of one core other processes may use during a run before it is repeated
FOREIGN_CPU_FLOOR = 0.06  # seconds: below this it is tick noise (10 ms ticks, several counters)
QUIET_WAIT = 180.0
PROFILE_SECONDS = 8.0
LEGACY_RUN_FACTOR = 3  # a Legacy run is short and whether it stalls varies from run to run


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    kind: str  # "store" or "echo"
    files: datasets.FileSet | None = None
    associations: int = 1
    nagle: bool = False  # storescu without TCP_NODELAY=1 (Debian dcmtk default: Nagle on)
    paths: tuple[str, ...] = PATHS
    run_factor: int = 1  # more runs where one run is cheap and the spread is the point (stalls)

    @property
    def label(self) -> str:
        if self.files is None:
            return f"{self.key} ({self.associations} associations)"
        suffix = ", Nagle on" if self.nagle else ""
        return f"{self.key} ({self.files.label}{suffix})"


def workloads(quick: bool) -> dict[str, Workload]:
    kib, mib = datasets.KIB, datasets.MIB
    if quick:
        w1, w2, w3, legacy = (40, 512 * kib), (2, 16 * mib), 50, (10, 512 * kib)
    else:
        w1, w2, w3, legacy = (400, 512 * kib), (4, 256 * mib), 500, (40, 512 * kib)
    return {
        "w1": Workload("W1", "many objects, one association", "store", datasets.FileSet(f"w1_{w1[0]}", *w1)),
        "w2": Workload("W2", "few large objects, one association", "store", datasets.FileSet(f"w2_{w2[0]}", *w2)),
        "w3": Workload("W3", "associate + C-ECHO + release", "echo", associations=w3,
                       paths=("direct", "stunnel", "proxy")),
        "legacy": Workload(
            "Legacy",
            "storescu with Nagle on (no TCP_NODELAY=1)",
            "store",
            datasets.FileSet(f"legacy_{legacy[0]}", *legacy),
            nagle=True,
            paths=("stunnel", "proxy"),
            run_factor=LEGACY_RUN_FACTOR,
        ),
    }


@dataclass
class RunRecord:
    workload: str
    path: str
    run: int
    wall: float
    bytes: int
    associations: int
    cpu: float | None
    peak_rss: int | None
    delayed_acks: int
    setups: list[float]
    totals: list[float]
    foreign_cpu: float = 0.0  # CPU seconds other processes on the machine used during the run
    steal: float = 0.0  # CPU seconds the hypervisor took from the VM during the run
    attempts: int = 1


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = OUT / ("run-quick" if args.quick else "run")
        self.certs = OUT / "certs"
        self.data = OUT / "data"
        self.archive_port = procs.free_port()
        self.ports = {"direct": self.archive_port, "stunnel": procs.free_port(), "proxy": procs.free_port(),
                      "proxy-metrics": procs.free_port(), "proxy-tls": procs.free_port()}
        self.metrics_port = procs.free_port()
        self.scraper: Scraper | None = None
        self.archive: Managed | None = None
        self.intermediaries: dict[str, Managed] = {}
        self.base_env = {
            k: v for k, v in os.environ.items() if k != "TCP_NODELAY" and not k.startswith("COVERAGE_")
        }
        self.proxy_version = ""
        self.commands: dict[str, str] = {}
        self.records: list[RunRecord] = []
        self.disturbed = 0  # runs kept although other processes were busy after MAX_ATTEMPTS
        self.repeated = 0  # runs measured again because other processes were busy
        self.external_kills: list[str] = []  # servers that died under the bench and were restarted

    # ---- set-up -----------------------------------------------------------------------------
    def env(self, nodelay: bool) -> dict[str, str]:
        env = dict(self.base_env)
        if nodelay:
            env["TCP_NODELAY"] = "1"
        return env

    def ensure_certs(self) -> None:
        if (self.certs / "ca.pem").exists() and (self.certs / "proxy.key").exists():
            return
        proxy_cli = Path(sys.executable).parent / "dicom-proxy"
        subprocess.run([str(proxy_cli), "certs", "init", str(self.certs)], check=True, stdout=subprocess.DEVNULL)

    def c(self, name: str) -> str:
        return str(self.certs / name)

    def start_all(self, paths: set[str]) -> None:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        archive_argv = [
            "storescp", "+tls", self.c("archive.key"), self.c("archive.pem"), "+cf", self.c("ca.pem"),
            "--ignore", "-pdu", str(PDU), "-dhl", str(self.archive_port),
        ]  # fmt: skip
        self.archive = Managed("storescp", archive_argv, self.work / "storescp.log", self.env(True), self.work)
        self.commands["archive"] = "TCP_NODELAY=1 " + " ".join(archive_argv)
        self.archive.start(self.archive_port)
        if "stunnel" in paths:
            conf = self.work / "stunnel.conf"
            conf.write_text(
                "foreground = yes\n"
                "pid =\n"
                "syslog = no\n"  # no /dev/log here: stunnel would write every line to /dev/console
                "debug = info\n"  # one 'session reused' line per connection, as the proxy's info log
                "[dicom]\n"
                "client = yes\n"
                f"accept = {HOST}:{self.ports['stunnel']}\n"
                f"connect = {HOST}:{self.archive_port}\n"
                f"CAfile = {self.c('ca.pem')}\n"
                "verifyChain = yes\n"
                "checkHost = localhost\n"
                f"cert = {self.c('proxy.pem')}\n"
                f"key = {self.c('proxy.key')}\n"
            )
            stunnel = Managed("stunnel", ["stunnel", str(conf)], self.work / "stunnel.log", self.env(False), self.work)
            stunnel.start(self.ports["stunnel"])
            self.intermediaries["stunnel"] = stunnel
            self.commands["stunnel"] = f"stunnel {conf.name}:\n" + conf.read_text()
        for name in ("proxy", "proxy-metrics", "proxy-tls"):
            if name in paths:
                self.start_proxy(name)
        if "proxy-metrics" in paths:
            self.scraper = Scraper(f"http://{HOST}:{self.metrics_port}/metrics")
            self.scraper.start()

    def start_proxy(self, name: str) -> None:
        conf = self.work / f"{name}.yaml"
        metrics = f"metrics: {{address: '{HOST}:{self.metrics_port}'}}\n" if name == "proxy-metrics" else ""
        listener_tls = (f"    tls: {{cert: {self.c('proxy.pem')}, key: {self.c('proxy.key')}, "
                        f"client_ca: {self.c('ca.pem')}, require_client_cert: true}}\n") if name == "proxy-tls" else ""
        conf.write_text(
            "listeners:\n"
            "  - name: modalities\n"
            f"    address: {HOST}:{self.ports[name]}\n" + listener_tls +
            "upstreams:\n"
            "  pacs:\n"
            f"    address: {HOST}:{self.archive_port}\n"
            f"    tls: {{ca: {self.c('ca.pem')}, cert: {self.c('proxy.pem')}, key: {self.c('proxy.key')}, "
            "server_name: localhost}\n"
            "default_upstream: pacs\n"
            f"max_pdu_length: {PROXY_MAX_PDU}\n" + metrics
        )
        env = self.env(False)
        env.update(unit_environment())  # run the proxy as the systemd unit does
        if self.args.proxy_rev:
            source = proxy_snapshot(self.args.proxy_rev)
            env["PYTHONPATH"] = str(source)
            argv = [sys.executable, "-m", "proxy", "run", "-c", str(conf)]
            short = git("rev-parse", "--short", self.args.proxy_rev)
            self.proxy_version = f"proxy/ as committed at {short} (`--proxy-rev {self.args.proxy_rev}`)"
        else:
            argv = [str(Path(sys.executable).parent / "dicom-proxy"), "run", "-c", str(conf)]
            dirty = " + uncommitted changes in proxy/" if git("status", "--porcelain", "proxy") else ""
            self.proxy_version = f"working tree at {git('rev-parse', '--short', 'HEAD')}{dirty}"
        proxy = Managed(f"dicom-{name}", argv, self.work / f"{name}.log", env, self.work)
        proxy.start(self.ports[name])
        self.intermediaries[name] = proxy
        scraped = " (/metrics scraped every second)" if metrics else ""
        self.commands[name] = f"dicom-proxy run -c {name}.yaml (log level info){scraped}:\n" + conf.read_text()

    def stop_all(self) -> None:
        if self.scraper is not None:
            self.scraper.stop()
        for proc in [*self.intermediaries.values(), self.archive]:
            if proc is not None:
                try:
                    proc.stop()
                except Exception as exc:  # keep stopping the others
                    print(f"warning: stopping {proc.name} (pid {proc.popen.pid if proc.popen else '?'}): {exc}",
                          file=sys.stderr)

    # ---- one run ----------------------------------------------------------------------------
    def storescu_argv(self, path: str, directory: Path) -> list[str]:
        tls: list[str] = []
        if path in ("direct", "proxy-tls"):
            tls = ["+tls", self.c("modality.key"), self.c("modality.pem"), "+cf", self.c("ca.pem")]
        return ["storescu", *tls, *STORESCU_FLAGS, "+sd", HOST, str(self.ports[path]), str(directory)]

    @contextlib.contextmanager
    def measure(self, path: str) -> Iterator[dict[str, float | int | None]]:
        """CPU, peak RSS and TCP counters of one run; fills the dict on exit."""
        inter = self.intermediaries.get(path)
        result: dict[str, float | int | None] = {}
        servers = [p for p in [self.archive, *self.intermediaries.values()] if p is not None]
        cpu0 = inter.cpu_seconds() if inter else None
        tcp0 = procs.tcp_counters()
        with procs.ForeignCpu(servers) as foreign, RssSampler(inter) as sampler:
            yield result
        result["foreign_cpu"] = foreign.seconds
        result["steal"] = foreign.steal
        time.sleep(0.05)  # let the intermediary finish closing the connections it was relaying
        if inter is not None:
            if not inter.alive():
                raise RuntimeError(f"{inter.name} died during the run:\n{inter.tail()}")
            result["cpu"] = inter.cpu_seconds() - (cpu0 or 0.0)
            result["peak_rss"] = sampler.peak
        tcp1 = procs.tcp_counters()
        result["delayed_acks"] = tcp1.get("TcpExt.DelayedACKs", 0) - tcp0.get("TcpExt.DelayedACKs", 0)

    def store_run(self, wl: Workload, path: str, directory: Path, total: int, run: int) -> RunRecord:
        argv = self.storescu_argv(path, directory)
        env = self.env(not wl.nagle)
        self.commands.setdefault(f"storescu {path}{' nagle' if wl.nagle else ''}",
                                 ("" if wl.nagle else "TCP_NODELAY=1 ") + " ".join(argv))
        with self.measure(path) as m:
            t0 = time.perf_counter()
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=STORE_TIMEOUT, check=False)
            wall = time.perf_counter() - t0
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("E:", "F:"))]
        if proc.returncode != 0 or errors:
            raise RuntimeError(f"storescu via {path} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return RunRecord(wl.key, path, run, wall, total, 1, _opt_float(m.get("cpu")), _opt_int(m.get("peak_rss")),
                         int(m.get("delayed_acks") or 0), [], [], float(m.get("foreign_cpu") or 0.0),
                         float(m.get("steal") or 0.0))

    def echo_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.c("ca.pem"))
        ctx.load_cert_chain(self.c("modality.pem"), self.c("modality.key"))
        return ctx

    def echo_run(self, wl: Workload, path: str, run: int) -> RunRecord:
        ctx = self.echo_context() if path == "direct" else None
        port = self.ports[path]
        setups: list[float] = []
        totals: list[float] = []
        with self.measure(path) as m:
            t0 = time.perf_counter()
            for i in range(wl.associations):
                t = echo_scu.echo_once(HOST, port, context=ctx, server_hostname="localhost" if ctx else None,
                                       max_pdu=PDU, message_id=i + 1)
                setups.append(t.setup)
                totals.append(t.total)
            wall = time.perf_counter() - t0
        return RunRecord(wl.key, path, run, wall, 0, wl.associations, _opt_float(m.get("cpu")),
                         _opt_int(m.get("peak_rss")), int(m.get("delayed_acks") or 0), setups, totals,
                         float(m.get("foreign_cpu") or 0.0), float(m.get("steal") or 0.0))

    def revive(self) -> bool:
        """Restart servers that something outside the bench killed; True when there was one."""
        revived = False
        for proc in [self.archive, *self.intermediaries.values()]:
            if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
                code = proc.popen.returncode
                print(f"  warning: {proc.name} (pid {proc.pid}) exited with {code}"
                      f"{' (killed by a signal the bench did not send)' if code < 0 else ''}; restarting it",
                      flush=True)
                self.external_kills.append(f"{proc.name} exit {code}")
                proc.restart()
                revived = True
        return revived

    def wait_quiet(self, limit: float = QUIET_WAIT) -> bool:
        """Wait (up to `limit` seconds) for a whole second in which other processes used < 5 % of a core."""
        servers = [p for p in [self.archive, *self.intermediaries.values()] if p is not None]
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with procs.ForeignCpu(servers) as foreign:
                time.sleep(1.0)
            if foreign.seconds < 0.05:
                return True
        print(f"  (the machine stayed busy for {limit:.0f} s; measuring anyway)", flush=True)
        return False

    def one(self, wl: Workload, path: str, run: int, directory: Path | None, total: int) -> RunRecord:
        """One run; repeated (up to MAX_ATTEMPTS) while other processes on the machine used more than
        FOREIGN_CPU_LIMIT of a core during it, because a 2-core machine has no slack for them."""
        rec: RunRecord | None = None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                if wl.kind == "echo":
                    rec = self.echo_run(wl, path, run)
                else:
                    assert directory is not None
                    rec = self.store_run(wl, path, directory, total, run)
            except (RuntimeError, OSError, echo_scu.EchoError, subprocess.TimeoutExpired) as exc:
                if attempt == MAX_ATTEMPTS or not self.revive():
                    raise
                print(f"  ({wl.key} {path}: run failed ({str(exc).splitlines()[0]}); repeating)", flush=True)
                self.repeated += 1
                continue
            rec.attempts = attempt
            if run < 0 or rec.foreign_cpu <= max(FOREIGN_CPU_FLOOR, FOREIGN_CPU_LIMIT * rec.wall):
                return rec
            print(f"  ({wl.key} {path}: other processes used {rec.foreign_cpu:.2f} CPU s during a "
                  f"{rec.wall:.2f} s run; repeating once the machine is quiet)", flush=True)
            self.repeated += 1
            self.wait_quiet()
        assert rec is not None
        self.disturbed += 1
        return rec

    # ---- a workload -------------------------------------------------------------------------
    def workload(self, wl: Workload, paths: list[str], runs: int) -> list[report.Row]:
        runs *= wl.run_factor
        directory: Path | None = None
        total = 0
        if wl.files is not None:
            t = time.perf_counter()
            directory, total = datasets.ensure(self.data, wl.files)
            took = time.perf_counter() - t
            if took > 1:
                print(f"  generated {wl.files.label} in {took:.1f} s", flush=True)
        active = [p for p in paths if p in wl.paths]
        for path in active:  # warm-up: page cache, first TLS session, interpreter caches
            self.one(wl, path, -1, directory, total)
        rows = {p: report.Row(wl.key, wl.label, p, runs, total, wl.associations) for p in active}
        handshakes = {p: self.handshakes(p) for p in active}
        for run in range(runs):
            order = active[run % len(active):] + active[: run % len(active)]
            for path in order:
                rec = self.one(wl, path, run, directory, total)
                self.records.append(rec)
                row = rows[path]
                row.walls.append(rec.wall)
                if rec.cpu is not None:
                    row.cpus.append(rec.cpu)
                if rec.peak_rss is not None:
                    row.peaks.append(rec.peak_rss)
                row.setups.extend(rec.setups)
                row.totals.extend(rec.totals)
                row.delayed_acks.append(rec.delayed_acks)
                rate = total / rec.wall / 1e6 if total else wl.associations / rec.wall
                detail = f"{rate:7.1f} MB/s" if total else f"{rate:6.0f} assoc/s"
                cpu = f" cpu {rec.cpu:6.2f} s" if rec.cpu is not None else ""
                other = f" (others {rec.foreign_cpu:.2f} s)" if rec.foreign_cpu > FOREIGN_CPU_FLOOR else ""
                print(f"  {wl.key} run {run + 1}/{runs} {path:8s} {rec.wall:8.3f} s {detail}{cpu}{other}", flush=True)
        for path in active:
            before, after = handshakes[path], self.handshakes(path)
            if before is None or after is None:
                rows[path].resumed = "no: full handshake every time"
            else:
                resumed, new = after[0] - before[0], after[1] - before[1]
                rows[path].resumed = f"{resumed} of {resumed + new}"
        return [rows[p] for p in active]

    def handshakes(self, path: str) -> tuple[int, int] | None:
        """(resumed, full) upstream TLS handshakes so far, from the intermediary's log."""
        inter = self.intermediaries.get(path)
        if inter is None:
            return None
        text = inter.log_path.read_text(errors="replace")
        if path == "stunnel":
            return text.count("previous session reused"), text.count("new session negotiated")
        resumed = text.count("TLS session resumed")
        return resumed, text.count("association established") - resumed

    # ---- profiling --------------------------------------------------------------------------
    def profile(self, wl: Workload) -> None:
        """Unmeasured runs on the proxy path under py-spy: an SVG and collapsed stacks."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        proxy = self.intermediaries["proxy"]
        directory, total = (datasets.ensure(self.data, wl.files) if wl.files else (None, 0))
        name = wl.key.lower()
        for fmt, out in (("flamegraph", OUT / f"profile-{name}.svg"), ("raw", OUT / f"profile-{name}.txt")):
            spy = subprocess.Popen([py_spy, "record", "--pid", str(proxy.pid), "--rate", "250", "--nonblocking",
                                    "--format", fmt, "-o", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(1.0)
                t_end = time.monotonic() + PROFILE_SECONDS
                while time.monotonic() < t_end:
                    self.one(wl, "proxy", -2, directory, total)
            finally:
                spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
                try:
                    spy.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
            print(f"  py-spy {fmt}: {out}", flush=True)
        print(f"{wl.label} on the proxy path:")
        print(summarise_profile(OUT / f"profile-{name}.txt"))


class Scraper(threading.Thread):
    """GET /metrics once a second, as a Prometheus server would, for the proxy-metrics path."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stopped = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)


def unit_environment() -> dict[str, str]:
    """The Environment= settings of systemd/dicom-proxy.service (e.g. the malloc tuning), so the
    bench measures the proxy as deployed."""
    unit = BENCH.parent / "systemd" / "dicom-proxy.service"
    out: dict[str, str] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment="):
            for item in line.removeprefix("Environment=").split():
                key, _, value = item.strip('"').partition("=")
                out[key] = value
    return out


def git(*argv: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else "?"


def proxy_snapshot(rev: str) -> Path:
    """proxy/ as of `rev`, exported with `git archive` (read-only for the repository)."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if commit == "?":
        raise SystemExit(f"error: unknown revision {rev!r}")
    target = OUT / f"proxy-{commit[:12]}"
    if not (target / "proxy" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "proxy"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def summarise_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed ('raw') output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; top self time:"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {frame}")
    lines.append("  top inclusive time (proxy/ frames):")
    ours = [(f, n) for f, n in inclusive.items() if "proxy/" in f]
    for frame, n in sorted(ours, key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines)


def _opt_float(value: float | int | None) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: float | int | None) -> int | None:
    return None if value is None else int(value)


def render(bench: Bench, rows: list[report.Row], machine: dict[str, str], args: argparse.Namespace,
           elapsed: float) -> str:
    store_rows = [r for r in rows if r.bytes_per_run]
    echo_rows = [r for r in rows if not r.bytes_per_run]
    lines = [
        f"Generated {machine['date']} by `bench/run.py {' '.join(sys.argv[1:])}` in {elapsed / 60:.1f} min; "
        f"median of {args.runs} run(s) per row ({LEGACY_RUN_FACTOR * args.runs} for Legacy), "
        "runs interleaved across paths. "
        f"{bench.repeated} run(s) were repeated because other processes used the CPU meanwhile or a server "
        "was killed from outside; "
        f"{bench.disturbed} disturbed run(s) kept after {MAX_ATTEMPTS} attempts."
        + (f" Servers killed from outside and restarted: {', '.join(bench.external_kills)}."
           if bench.external_kills else ""),
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} ({machine['cores']} cores; {machine['cpu_flags']})",
        f"- Kernel: {machine['kernel']}; OS: {machine['os']}",
        f"- Python {machine['python']} ({machine['python_openssl']})",
        f"- dcmtk: {machine['dcmtk']} ({machine['dcmtk_openssl']})",
        f"- stunnel: {machine['stunnel']} ({machine['stunnel_openssl']})",
        f"- dicom-proxy measured: {bench.proxy_version or 'not run'}",
        "",
    ]
    if store_rows:
        lines += [
            "## Throughput (C-STORE, one association per run)",
            "",
            "MB/s = 10^6 bytes of DICOM files sent / storescu wall time (process start to exit). "
            "Intermediary CPU = user+system seconds of the stunnel or dicom-proxy process over the run "
            "(mean over runs: the kernel counts it in 10 ms ticks), per 10^9 bytes. Peak RSS: highest 20 ms "
            "sample over all runs. Delayed ACKs: kernel TcpExt.DelayedACKs delta during each run (all loopback "
            "sockets; each one is a ~40 ms stall), summed over the runs.",
            "",
            report.throughput_table(store_rows),
        ]
    if echo_rows:
        lines += [
            "## Association setup (W3)",
            "",
            "A Python SCU in the bench process (bench/echo_scu.py) opens each association itself: TCP connect "
            "(+ TLS handshake for direct), A-ASSOCIATE-RQ/AC, C-ECHO, A-RELEASE, close. Setup = connect start "
            "to A-ASSOCIATE-AC received, measured client side; p50/p99 pooled over all runs "
            f"({args.runs} x {echo_rows[0].associations_per_run} associations). The direct path does a full "
            "TLS handshake every time (like dcmtk's SCUs); stunnel and the proxy resume their upstream session.",
            "",
            report.association_table(echo_rows),
        ]
    lines += [
        "## Set-up",
        "",
        f"- PDU: storescu `-pdu {PDU}`, storescp `-pdu {PDU}` on every path (storescu sends {PDU}-byte PDUs, "
        f"the archive's maximum); proxy `max_pdu_length: {PROXY_MAX_PDU}` (its cap; min(peer, cap) keeps {PDU}).",
        f"- storescu flags on every path: `{' '.join(STORESCU_FLAGS)} +sd`; files are Explicit VR Little Endian "
        "(Secondary Capture, Multi-frame Grayscale Byte SC for the large ones), random pixels.",
        "- `TCP_NODELAY=1` exported for storescp always and for storescu except in the Legacy rows.",
        "- Archive: one `storescp --ignore` (receives, stores nothing) shared by all paths; TLS 1.3 "
        "TLS_AES_256_GCM_SHA384 negotiated on every TLS leg.",
        "",
        "```",
        *(f"# {k}\n{v.rstrip()}" for k, v in bench.commands.items()),
        "```",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="measured runs per path (default 7; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="1 run and small workloads, for development")
    parser.add_argument("--sets", nargs="+", choices=["w1", "w2", "w3", "legacy"], default=["w1", "w2", "w3", "legacy"])
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--profile", nargs="+", choices=["w1", "w2", "w3"], default=[],
                        help="after measuring, run each of these sets on the proxy path for 8 s under py-spy "
                        "(bench/out/profile-SET.svg and .txt, collapsed stacks; unmeasured)")
    parser.add_argument("--proxy-rev", default=None, metavar="REV",
                        help="benchmark proxy/ as committed at REV (git archive into bench/out/) instead of the "
                        "working tree")
    parser.add_argument("--results", type=Path, default=None, help="Markdown output (default: see above)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 7
    if args.results is None:
        args.results = OUT / "RESULTS-quick.md" if args.quick else BENCH / "RESULTS.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"warning: 1-minute load average is {load1:.2f}; results may be disturbed", file=sys.stderr)
    for tool in ("storescu", "storescp", "stunnel"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found on PATH", file=sys.stderr)
            return 1
    OUT.mkdir(parents=True, exist_ok=True)
    all_workloads = workloads(args.quick)
    chosen = [all_workloads[k] for k in ("w1", "w2", "w3", "legacy") if k in args.sets]
    bench = Bench(args)
    bench.ensure_certs()
    rows: list[report.Row] = []
    try:
        needed = {p for wl in chosen for p in wl.paths if p in args.paths}
        if args.profile:
            needed.add("proxy")
        bench.start_all(needed)
        bench.wait_quiet(60.0)
        for wl in chosen:
            print(f"{wl.label}: {wl.title}", flush=True)
            rows += bench.workload(wl, list(args.paths), args.runs)
        for key in args.profile:
            bench.profile(all_workloads[key])
    finally:
        bench.stop_all()
    elapsed = time.perf_counter() - started
    machine = report.machine_info()
    text = render(bench, rows, machine, args, elapsed)
    report.write_results(args.results, text)
    raw = OUT / ("results-quick.json" if args.quick else "results.json")
    raw.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                               "runs": [asdict(r) for r in bench.records]}, indent=1) + "\n")
    print()
    print(text)
    print(f"wrote {args.results} and {raw} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
