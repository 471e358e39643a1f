"""The dashboard and the alert rules against a real Prometheus scraping a real exporter.

One Prometheus (Debian `prometheus`) scrapes our MetricsExporter over HTTPS with Basic
authentication every second, with dashboards/alerts.yaml loaded as rule file. The exporter runs in
its own thread and event loop, with a little synthetic traffic going on. Then:

* every PromQL expression of dashboards/grafana-dicom-proxy.json and dashboards/alerts.yaml
  parses (`status: success` from /api/v1/query), and every dicomproxy_* name in them exists;
* promtool accepts the rule file, and Prometheus evaluates every rule without error;
* the alerts whose condition the synthetic state meets select series (labels and names right).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from proxy import certs, config
from proxy.config import ProxyConfig
from proxy.dul.dimse import (
    NO_DATA_SET,
    CommandField,
    CommandSet,
    Tag,
    encode_command_set,
    parse_command_set,
    response_for,
    us_value,
)
from proxy.dul.framer import Frame
from proxy.dul.machine import Side
from proxy.errors import RemotePDUError
from proxy.metrics import MetricsExporter, ProxyMetrics
from proxy.policy.model import Decision
from proxy.upstream import ProbeResult
from tests.prom import (
    Expression,
    Prometheus,
    alert_expressions,
    grafana_expressions,
    metric_names,
    promtool,
    start_prometheus,
    wait_for_result,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "grafana-dicom-proxy.json"
ALERTS = ROOT / "dashboards" / "alerts.yaml"


def dashboard_expressions() -> list[Expression]:
    return grafana_expressions(json.loads(DASHBOARD.read_text()))


def rule_expressions() -> list[Expression]:
    return alert_expressions(yaml.safe_load(ALERTS.read_text()))


# --------------------------------------------------------------------------- the exporter thread


@dataclass
class ExporterThread:
    """MetricsExporter in its own event loop; `tick()` runs there every 0.3 s."""

    exporter: MetricsExporter
    tick: Callable[[], None]
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> ExporterThread:
        self.thread = threading.Thread(target=self._run, name="exporter", daemon=True)
        self.thread.start()
        if not self.ready.wait(10) or self.error is not None:
            raise AssertionError(f"exporter did not start: {self.error!r}")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start() / stop()
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        await self.exporter.start()
        self.ready.set()
        while not self.stopping.is_set():
            self.tick()
            await asyncio.sleep(0.3)
        await self.exporter.close()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(10)


def proxy_config(folder: Path, pki: dict[str, Path]) -> ProxyConfig:
    password = folder / "scrape.pass"
    password.write_text("prom-secret\n")
    password.chmod(0o600)
    text = f"""\
listeners:
  - {{name: modalities, address: "127.0.0.1:0"}}
upstreams:
  pacs: {{address: "127.0.0.1:2762", health: {{called_ae: ARCHIVE}}}}
  pacs-dr: {{address: "127.0.0.1:2763", health: {{called_ae: ARCHIVE2}}}}
routes: {{PACS: [pacs, pacs-dr]}}
default_upstream: pacs
devices: {{ct-scanners: ["CT*"], mr: MR01}}
metrics:
  address: "127.0.0.1:0"
  tls: {{cert: {pki['archive']}, key: {pki['archive_key']}}}
  basic_auth: {{username: prometheus, password_file: scrape.pass}}
"""
    return config.load_text(text, str(folder / "proxy.yaml"), base_dir=folder)


def command(field_value: CommandField, message_id: int) -> CommandSet:
    return parse_command_set(encode_command_set([
        (Tag.COMMAND_FIELD, us_value(field_value)),
        (Tag.MESSAGE_ID, us_value(message_id)),
        (Tag.COMMAND_DATA_SET_TYPE, us_value(NO_DATA_SET)),
    ]))


class Traffic:
    """Synthetic but realistic events, through the same observer API the relay uses."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics
        self.n = 0

    def __call__(self) -> None:
        m = self.metrics
        self.n += 1
        ok = m.association("modalities")
        ok.received(Side.REQUESTOR, 400, [Frame(1, memoryview(b"\x01"))])
        ok.requested("CT0" + str(self.n % 3))
        ok.routed("pacs")
        ok.upstream_connected(0.001, 0.004)
        ok.received(Side.ACCEPTOR, 300, [Frame(2, memoryview(b"\x02"))])
        ok.accepted()
        store = command(CommandField.C_STORE_RQ, self.n)
        ok.commands(Side.REQUESTOR, [(1, store)])
        ok.received(Side.REQUESTOR, 512 * 1024, [Frame(4, memoryview(b"\x04"))] * 2)
        ok.commands(Side.ACCEPTOR, [(1, parse_command_set(response_for(store, 0xA700 if self.n % 2 else 0)))])
        ok.received(Side.REQUESTOR, 10, [Frame(5, memoryview(b"\x05"))])
        ok.received(Side.ACCEPTOR, 10, [Frame(6, memoryview(b"\x06"))])
        ok.finished("released")
        for outcome in ("rejected_by_rule", "upstream_unavailable", "rejected"):
            rejected = m.association("modalities")
            rejected.requested("MR01")
            rejected.finished(outcome)
        m.rule_decision(Decision("default", "reject", shadow_matches=(("trial", "drop"),)))
        m.tls_handshake_failure("client", "unknown_ca")
        m.protocol_error(Side.REQUESTOR, RemotePDUError("bad PDU", reason=2))
        m.identity_injection("pacs-jwt", 5, "injected")
        live = m.association("modalities")  # stays open: associations_active > 0
        live.requested("CT01")
        m.flush()


@dataclass
class Setup:
    prometheus: Prometheus
    metrics: ProxyMetrics
    exporter: ExporterThread


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    folder = tmp_path_factory.mktemp("prom")
    pki = certs.init(folder / "pki", days=10)  # expires within 21 days: the expiry alert must select it
    cfg = proxy_config(folder, pki)
    assert cfg.metrics is not None
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, cfg)
    for name in ("pacs", "pacs-dr"):  # every upstream down: both upstream alerts select series
        metrics.probe_finished(ProbeResult(name, False, "refused", "refused", (), "connect", 0.001), False)
    metrics.probe_finished(ProbeResult("pacs", True, None, "ok", (("connect", 0.001), ("echo", 0.002)), None,
                                       0.003), False)
    metrics.reload_failed()
    exporter = ExporterThread(MetricsExporter(cfg.metrics, registry, before_scrape=metrics.flush),
                              Traffic(metrics)).start()
    assert exporter.exporter.bound is not None
    try:
        prom = start_prometheus(
            folder / "prometheus",
            [f"127.0.0.1:{exporter.exporter.bound[1]}"],
            scheme="https",
            ca_file=pki["ca"],
            server_name="localhost",
            basic_auth=("prometheus", folder / "scrape.pass"),
            rule_files=[ALERTS],
        )
    except BaseException:
        exporter.stop()
        raise
    try:
        prom.wait_for_scrape("dicomproxy")
        # a few scrapes, so rate() and increase() have samples to work with
        wait_for_result(prom, 'increase(dicomproxy_associations_total{outcome="released"}[1m]) > 0')
        yield Setup(prom, metrics, exporter)
    finally:
        prom.stop()
        exporter.stop()


# --------------------------------------------------------------------------- tests


def test_the_files_hold_what_the_dashboard_needs() -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 30
    text = " ".join(e.expr for e in expressions)
    for needle in ("dicomproxy_upstream_up", "dicomproxy_association_setup_seconds_bucket",
                   "dicomproxy_device_bytes_total", "dicomproxy_dimse_responses_total",
                   "dicomproxy_rule_matches_total", "dicomproxy_tls_handshake_failures_total",
                   "dicomproxy_tls_certificate_expiry_timestamp_seconds", "histogram_quantile(0.99",
                   "histogram_quantile(0.5"):
        assert needle in text, needle
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    alerts = {e.where for e in rule_expressions()}
    assert alerts == {"alert DicomProxyUpstreamDown", "alert DicomProxyAllUpstreamsDown",
                      "alert DicomProxyRejectRateHigh", "alert DicomProxyTLSHandshakeFailures",
                      "alert DicomProxyCertificateExpiringSoon", "alert DicomProxyConfigReloadFailed"}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    code, output = promtool("check", "rules", str(ALERTS), log_path=tmp_path / "promtool.log")
    assert code == 0, output
    assert "SUCCESS: 6 rules found" in output


def test_every_expression_parses_and_names_existing_metrics(setup: Setup) -> None:
    prom = setup.prometheus
    exported = prom.names()
    failures = []
    for item in [*dashboard_expressions(), *rule_expressions()]:
        try:
            prom.query(item.expr)
        except AssertionError as exc:
            failures.append(f"{item.where}: {exc}")
        for name in metric_names(item.expr) - exported:
            failures.append(f"{item.where}: no metric {name} in Prometheus")
    assert not failures, "\n".join(failures)


def test_template_variables_list_values(setup: Setup) -> None:
    prom = setup.prometheus
    for item in dashboard_expressions():
        if item.where.startswith("variable"):
            assert prom.query(item.expr), item


def test_every_rule_evaluates_without_error(setup: Setup) -> None:
    prom = setup.prometheus
    deadline = time.monotonic() + 30
    while True:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if (len(rules) == 6 and all(r.get("health") == "ok" for r in rules)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == 6
    assert {r["name"]: r.get("health") for r in rules} == {r["name"]: "ok" for r in rules}, \
        [(r["name"], r.get("lastError")) for r in rules]


@pytest.mark.parametrize(
    ("alert", "labels"),
    [
        ("DicomProxyUpstreamDown", {"upstream": "pacs-dr"}),
        ("DicomProxyAllUpstreamsDown", {"job": "dicomproxy"}),
        ("DicomProxyRejectRateHigh", {"job": "dicomproxy"}),
        ("DicomProxyTLSHandshakeFailures", {"side": "client", "reason": "unknown_ca"}),
        ("DicomProxyCertificateExpiringSoon", {"role": "metrics", "name": "exporter"}),
        ("DicomProxyConfigReloadFailed", {"job": "dicomproxy"}),
    ],
)
def test_alert_conditions_select_the_right_series(setup: Setup, alert: str, labels: dict[str, str]) -> None:
    expr = next(e.expr for e in rule_expressions() if e.where == f"alert {alert}")
    result = wait_for_result(setup.prometheus, expr, timeout=30)
    assert result, f"{alert} selects nothing: {expr}"
    assert any(labels.items() <= r["metric"].items() for r in result), result


def test_the_dashboard_shows_data(setup: Setup) -> None:
    """Not just valid: the main panels have series with our synthetic traffic."""
    prom = setup.prometheus
    for item in dashboard_expressions():
        if any(word in item.where for word in ("Association rate by outcome", "Throughput per device",
                                               "DIMSE failures", "Rule hits", "TLS handshake failures",
                                               "Days until certificate expiry", "setup latency")):
            assert wait_for_result(prom, item.expr, timeout=15), item
    devices = {r["metric"]["device"] for r in prom.query("sum by (device) (dicomproxy_device_bytes_total)")}
    assert devices == {"ct-scanners", "mr", "other"}
