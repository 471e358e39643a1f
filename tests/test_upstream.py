"""proxy.upstream: the rise/fall state machine, picking by priority, the probing loop, and real
C-ECHO probes against a pynetdicom TLS archive and against scripted misbehaving archives."""

from __future__ import annotations

import asyncio
import io
import logging
import ssl
import struct
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.config import ProxyConfig, Upstream
from proxy.dul.constants import APPLICATION_CONTEXT_NAME, IMPLICIT_VR_LITTLE_ENDIAN
from proxy.dul.dimse import MessageStream, parse_command_set, response_for
from proxy.dul.items import (
    ApplicationContextItem,
    MaximumLengthSubItem,
    PresentationContextACItem,
    TransferSyntaxSubItem,
    UserInformationItem,
)
from proxy.dul.pdus import AAbort, AAssociateAC, AAssociateRJ, AAssociateRQ, AReleaseRP, PDataTF, iter_pdvs, parse_pdu
from proxy.metrics import ProxyMetrics
from proxy.upstream import (
    PROBE_FAILURE_REASONS,
    HealthState,
    ProbeResult,
    UpstreamHealth,
    format_probe_result,
    probe_once,
    run_echo,
)
from tests.conftest import Pki
from tests.peers import LOOPBACK, PynetdicomArchive, closed_port, require_module, tls_server_context

# --------------------------------------------------------------------------- helpers


def make_config(upstreams: str, folder: Path | None = None) -> ProxyConfig:
    text = textwrap.dedent(
        """\
        listeners: [{name: l, address: "127.0.0.1:0"}]
        upstreams:
        """
    ) + textwrap.indent(textwrap.dedent(upstreams), "  ")
    first = next(line.split(":")[0].strip() for line in textwrap.dedent(upstreams).splitlines() if line.strip())
    text += f"default_upstream: {first}\n"
    base = folder or Path("/")
    return config.load_text(text, str(base / "proxy.yaml"), base_dir=base)


def tls_upstream(pki: Pki, port: int, health: str = "{called_ae: ARCHIVE}", extra: str = "") -> str:
    return textwrap.dedent(f"""\
        pacs:
          address: "127.0.0.1:{port}"
          tls: {{ca: {pki.ca}, cert: {pki.proxy_cert}, key: {pki.proxy_key}, server_name: localhost{extra}}}
          health: {health}
        """)


def result(name: str, ok: bool, reason: str | None = None) -> ProbeResult:
    return ProbeResult(name, ok, None if ok else reason or "refused", "x", (), None if ok else "connect", 0.01)


# --------------------------------------------------------------------------- state machine


def run(state: HealthState, outcomes: str, rise: int = 2, fall: int = 3) -> list[bool]:
    ups = []
    for char in outcomes:
        state = state.advance(char == "+", rise=rise, fall=fall, reason=None if char == "+" else "timeout")
        ups.append(state.up)
    return ups


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ("", []),
        ("-", [False]),  # the first result decides at once
        ("+", [True]),
        ("-+", [False, False]),  # then rise applies
        ("-++", [False, False, True]),
        ("-+-++", [False, False, False, False, True]),  # a failure resets the run of successes
        ("+--", [True, True, True]),
        ("+---", [True, True, True, False]),  # fall = 3
        ("+--+---", [True, True, True, True, True, True, False]),
        ("+---++", [True, True, True, False, False, True]),
    ],
)
def test_rise_and_fall(outcomes: str, expected: list[bool]) -> None:
    assert run(HealthState(), outcomes) == expected


def test_unknown_counts_as_up_and_the_last_reason_is_kept() -> None:
    state = HealthState()
    assert state.up and not state.known
    state = state.advance(False, rise=1, fall=1, reason="refused")
    assert (state.up, state.known, state.failures, state.last_reason) == (False, True, 1, "refused")
    state = state.advance(True, rise=1, fall=1)
    assert (state.up, state.successes, state.failures, state.last_reason) == (True, 1, 0, "refused")


# --------------------------------------------------------------------------- the registry

TWO = """\
    pacs: {address: "127.0.0.1:2762", health: {called_ae: A, rise: 2, fall: 2}}
    pacs-dr: {address: "127.0.0.1:2763", health: {called_ae: B, rise: 1, fall: 1}}
    plain: {address: "127.0.0.1:2764"}
    """


class Recorder:
    def __init__(self) -> None:
        self.probes: list[tuple[str, bool, bool]] = []
        self.states: dict[str, bool] = {}

    def probe_finished(self, res: ProbeResult, up: bool) -> None:
        self.probes.append((res.upstream, res.ok, up))

    def upstream_state(self, name: str, up: bool) -> None:
        self.states[name] = up


def test_pick_first_healthy_in_priority_order(caplog: pytest.LogCaptureFixture) -> None:
    observer = Recorder()
    health = UpstreamHealth(make_config(TWO), observer=observer)
    assert observer.states == {"pacs": True, "pacs-dr": True, "plain": True}
    assert health.probed_names == ("pacs", "pacs-dr")
    order = ("pacs", "pacs-dr", "plain")
    assert health.pick(order) == "pacs"
    with caplog.at_level(logging.INFO, "proxy.upstream"):
        health.record(result("pacs", False))
    assert "upstream pacs is DOWN" in caplog.text
    assert health.pick(order) == "pacs-dr"
    health.record(result("pacs-dr", False, "timeout"))
    assert health.pick(order) == "plain"  # no health: always up
    assert health.pick(("pacs", "pacs-dr")) is None  # all down: the relay sends RJ 2/3/1
    assert health.pick(("unknown-name",)) == "unknown-name"
    assert health.pick(()) is None
    health.record(result("pacs", True))
    assert health.pick(order) == "plain"
    assert not health.is_up("pacs")  # rise = 2
    health.record(result("pacs", True))
    assert health.pick(order) == "pacs"
    assert health.record(result("not-probed", True)) is None
    assert observer.probes == [
        ("pacs", False, False), ("pacs-dr", False, False), ("pacs", True, False), ("pacs", True, True)
    ]


def test_reconfigure_keeps_the_state_of_unchanged_upstreams() -> None:
    health = UpstreamHealth(make_config(TWO))
    health.record(result("pacs", False))
    health.record(result("pacs-dr", False))
    changed = TWO.replace("called_ae: B", "called_ae: C")
    health.reconfigure(make_config(changed))
    assert not health.is_up("pacs")  # same settings: still down
    assert health.is_up("pacs-dr")  # new settings: unknown again, counts as up
    health.reconfigure(make_config('pacs: {address: "127.0.0.1:2762"}\n'))
    assert health.is_up("pacs") and health.probed_names == ()


def test_an_observer_that_raises_does_not_stop_anything(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def probe_finished(self, res: ProbeResult, up: bool) -> None:
            raise RuntimeError("observer bug")

    health = UpstreamHealth(make_config(TWO), observer=Broken())
    assert health.record(result("pacs", False)) is not None
    assert "health observer failed" in caplog.text
    assert not health.is_up("pacs")


async def test_the_probe_loop_feeds_the_state_machine() -> None:
    script = iter([False, False, True, True] + [True] * 1000)
    calls: list[int] = []

    async def fake_probe(upstream: Upstream, *, ssl_context: ssl.SSLContext | None, message_id: int) -> ProbeResult:
        calls.append(message_id)
        return result(upstream.name, next(script))

    cfg = make_config('pacs: {address: "127.0.0.1:2762", health: {called_ae: A, interval: 0.01, timeout: 0.01}}\n')
    health = UpstreamHealth(cfg, probe=fake_probe)
    health.start()
    ups: list[bool] = []
    for _ in range(500):
        await asyncio.sleep(0.005)
        ups.append(health.is_up("pacs"))
        if len(calls) >= 5:
            break
    await health.stop()
    assert len(calls) >= 5 and calls[:3] == [1, 2, 3]
    assert False in ups and ups[-1] is True


async def test_a_crashing_probe_counts_as_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(upstream: Upstream, **_kw: object) -> ProbeResult:
        raise RuntimeError("bug")

    cfg = make_config('pacs: {address: "127.0.0.1:2762", health: {called_ae: A, interval: 5, timeout: 1}}\n')
    health = UpstreamHealth(cfg, probe=broken)
    health.start()
    for _ in range(200):
        await asyncio.sleep(0.005)
        if not health.is_up("pacs"):
            break
    await health.stop()
    state = health.state("pacs")
    assert state is not None and state.last_reason == "other"
    assert "the probe crashed" in caplog.text


# --------------------------------------------------------------------------- real probes


@pytest.fixture
def archive_ctx(dev_certs: Pki) -> ssl.SSLContext:
    require_module("pynetdicom")
    return tls_server_context(dev_certs.archive_cert, dev_certs.archive_key, dev_certs.ca)


async def test_probe_a_real_tls_archive(pynetdicom_tls_scp: PynetdicomArchive, dev_certs: Pki) -> None:
    cfg = make_config(tls_upstream(dev_certs, pynetdicom_tls_scp.port, "{called_ae: ARCHIVE, calling_ae: PROBER}"))
    res = await probe_once(cfg.upstreams["pacs"], message_id=42)
    assert res.ok, res
    assert [name for name, _ in res.steps] == ["connect", "tls", "associate", "echo", "release"]
    assert res.reason is None and res.failed_step is None
    assert res.duration >= sum(seconds for _, seconds in res.steps)
    assert pynetdicom_tls_scp.echo_count == 1
    assert pynetdicom_tls_scp.associations == ["PROBER"]
    text = format_probe_result(res)
    assert text.splitlines()[0].startswith("connect") and "ok: upstream pacs" in text


async def test_probe_a_stopped_archive_is_refused(dev_certs: Pki) -> None:
    cfg = make_config(tls_upstream(dev_certs, closed_port()))
    res = await probe_once(cfg.upstreams["pacs"])
    assert (res.ok, res.reason, res.failed_step, res.steps) == (False, "refused", "connect", ())
    assert "FAILED (refused)" in format_probe_result(res)


async def test_probe_an_archive_of_another_ca_fails_in_tls(
    archive_ctx: ssl.SSLContext, other_ca_certs: Pki, dev_certs: Pki
) -> None:
    ctx = tls_server_context(other_ca_certs.archive_cert, other_ca_certs.archive_key, dev_certs.ca)
    with PynetdicomArchive(ssl_context=ctx) as stranger:
        cfg = make_config(tls_upstream(dev_certs, stranger.port))
        res = await probe_once(cfg.upstreams["pacs"])
    assert (res.ok, res.reason, res.failed_step) == (False, "tls", "tls")
    assert [name for name, _ in res.steps] == ["connect"]
    assert "CA" in res.detail or "certificate" in res.detail


async def test_probe_checks_pins(pynetdicom_tls_scp: PynetdicomArchive, dev_certs: Pki) -> None:
    cfg = make_config(tls_upstream(dev_certs, pynetdicom_tls_scp.port, extra=", pin_sha256: 'spki:" + "ab" * 32 + "'"))
    res = await probe_once(cfg.upstreams["pacs"])
    assert (res.ok, res.reason, res.failed_step) == (False, "tls", "tls")


async def test_health_goes_down_and_up_with_a_real_archive(archive_ctx: ssl.SSLContext, dev_certs: Pki) -> None:
    archive = PynetdicomArchive(ssl_context=archive_ctx).start()
    port = archive.port
    cfg = make_config(tls_upstream(dev_certs, port, "{called_ae: ARCHIVE, interval: 0.2, timeout: 2, rise: 2, fall: 2}")
                      + 'backup: {address: "127.0.0.1:9"}\n')
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, cfg)
    health = UpstreamHealth(cfg, observer=metrics)
    health.start()

    async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
        assert predicate(), what

    def up() -> float | None:
        return registry.get_sample_value("dicomproxy_upstream_up", {"upstream": "pacs"})

    try:
        await until(lambda: (s := health.state("pacs")) is not None and s.known and s.successes >= 2, "first probes")
        assert health.pick(("pacs", "backup")) == "pacs" and up() == 1
        archive.stop()
        await until(lambda: not health.is_up("pacs"), "down after two failures")
        state = health.state("pacs")
        assert state is not None and state.failures == 2 and state.last_reason == "refused"
        assert health.pick(("pacs", "backup")) == "backup"
        assert up() == 0
        assert (registry.get_sample_value("dicomproxy_upstream_probe_failures_total",
                                          {"upstream": "pacs", "reason": "refused"}) or 0) >= 2
        archive = PynetdicomArchive(ssl_context=archive_ctx, port=port).start()
        await until(lambda: health.is_up("pacs"), "up again after two successes")
        assert up() == 1
        assert registry.get_sample_value("dicomproxy_upstream_probe_step_seconds",
                                         {"upstream": "pacs", "step": "echo"}) is not None
    finally:
        await health.stop()
        archive.stop()


def test_run_echo_prints_every_step(pynetdicom_tls_scp: PynetdicomArchive, dev_certs: Pki) -> None:
    cfg = make_config(tls_upstream(dev_certs, pynetdicom_tls_scp.port))
    out = io.StringIO()
    assert run_echo(cfg, "pacs", out=out) == 0
    text = out.getvalue()
    assert text.startswith("C-ECHO DICOMPROXY -> ARCHIVE at 127.0.0.1:")
    for step in ("connect", "tls", "associate", "echo", "release", "total"):
        assert f"\n{step}" in text or text.startswith(step)
    out = io.StringIO()
    assert run_echo(cfg, "nope", out=out) == 1
    assert "unknown upstream 'nope'" in out.getvalue()


def test_run_echo_without_health_uses_the_defaults(dev_certs: Pki) -> None:
    cfg = make_config(f'pacs: {{address: "127.0.0.1:{closed_port()}"}}\n')
    out = io.StringIO()
    assert run_echo(cfg, "pacs", called_ae="STORESCP", out=out) == 1
    assert out.getvalue().startswith("C-ECHO DICOMPROXY -> STORESCP at 127.0.0.1:")
    assert "FAILED (refused)" in out.getvalue()


# --------------------------------------------------------------------------- scripted archives


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Scripted:
    port: int


async def read_pdu(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(6)
    (length,) = struct.unpack(">I", head[2:])
    return head + await reader.readexactly(length)


def ac_for(rq_bytes: bytes, result_code: int = 0) -> bytes:
    rq = parse_pdu(rq_bytes)
    assert isinstance(rq, AAssociateRQ)
    items = (
        ApplicationContextItem(APPLICATION_CONTEXT_NAME),
        PresentationContextACItem(1, result_code, (TransferSyntaxSubItem(IMPLICIT_VR_LITTLE_ENDIAN),)),
        UserInformationItem((MaximumLengthSubItem(16384),)),
    )
    return AAssociateAC(1, rq.called_ae, rq.calling_ae, items).encode()


async def echo_answer(reader: asyncio.StreamReader, status: int) -> bytes:
    pdu = await read_pdu(reader)
    assert len(MessageStream().observe(memoryview(pdu)[6:])) == 1  # one whole command
    (pdv,) = iter_pdvs(memoryview(pdu)[6:])
    return PDataTF.from_pdvs([(1, 0x03, response_for(parse_command_set(pdv.fragment), status))]).encode()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Handler], Awaitable[Scripted]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Scripted:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(wrapped, LOOPBACK, 0)
        servers.append(server)
        return Scripted(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


async def reject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_pdu(reader)
    writer.write(AAssociateRJ(1, 1, 7).encode())


async def abort(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_pdu(reader)
    writer.write(AAbort(2, 0).encode())


async def no_verification(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(ac_for(await read_pdu(reader), result_code=3))


async def echo_refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(ac_for(await read_pdu(reader)))
    writer.write(await echo_answer(reader, 0x0211))


async def abort_at_release(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(ac_for(await read_pdu(reader)))
    writer.write(await echo_answer(reader, 0))
    await read_pdu(reader)
    writer.write(AAbort(0, 0).encode())


async def silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_pdu(reader)
    await asyncio.sleep(5)


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_pdu(reader)


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_pdu(reader)
    writer.write(b"\x09\x00\x00\x00\x00\x04abcd")


async def release_rp_for_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(ac_for(await read_pdu(reader)))
    await read_pdu(reader)
    writer.write(AReleaseRP().encode())


async def plain_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(ac_for(await read_pdu(reader)))
    writer.write(await echo_answer(reader, 0))
    await read_pdu(reader)
    writer.write(AReleaseRP().encode())
    await writer.drain()


@pytest.mark.parametrize(
    ("handler", "reason", "step"),
    [
        (reject, "rejected", "associate"),
        (abort, "aborted", "associate"),
        (no_verification, "rejected", "associate"),
        (echo_refused, "echo_failed", "echo"),
        (abort_at_release, "aborted", "release"),
        (silence, "timeout", "associate"),
        (hang_up, "closed", "associate"),
        (garbage, "protocol", "associate"),
        (release_rp_for_echo, "protocol", "echo"),
        (plain_ok, None, None),
    ],
)
async def test_probe_failure_reasons(
    scripted: Callable[[Handler], Awaitable[Scripted]], handler: Handler, reason: str | None, step: str | None
) -> None:
    server = await scripted(handler)
    cfg = make_config(f'pacs: {{address: "127.0.0.1:{server.port}", health: {{called_ae: X, interval: 1, '
                      f'timeout: 0.5}}}}\n')
    res = await probe_once(cfg.upstreams["pacs"])
    assert (res.reason, res.failed_step) == (reason, step), res
    assert res.reason is None or res.reason in PROBE_FAILURE_REASONS
    assert res.ok is (reason is None)
