"""A real Prometheus server for tests (Debian package `prometheus`: /usr/bin/prometheus, promtool).

`start_prometheus()` writes a config that scrapes the given targets on 127.0.0.1 every second
(optionally over HTTPS with Basic authentication, and with rule files loaded), starts the server
on a free loopback port with its data in a temporary folder, and waits until it is ready.
`Prometheus.query()` runs PromQL through the HTTP API. Missing binaries skip the test on a
developer machine and fail it in CI (tests.peers.require_tool).

Also: `grafana_expressions()` / `alert_expressions()` pull every PromQL expression out of the
dashboard JSON and the alert rules, with Grafana's variables replaced by values Prometheus accepts.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.peers import LOOPBACK, Peer, free_port, require_tool, wait_until

GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__range_s": "300"}
"""Grafana's built-in variables as a dashboard would send them; every other `$var` becomes `.*`
(all our template variables are used in regex matchers `=~"$var"`)."""

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$")


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return GRAFANA_VARIABLES.get(name, ".*")

    return _VARIABLE.sub(value, expr)


@dataclass(frozen=True)
class Expression:
    where: str  # "dashboard panel 'Title' A", "alert DicomProxyUpstreamDown", ...
    expr: str  # PromQL, variables substituted


def grafana_expressions(dashboard: Mapping[str, Any]) -> list[Expression]:
    """Every target expression of every panel (rows' nested panels included), and the query of
    every template variable (`label_values(selector, label)` becomes `selector`)."""
    found: list[Expression] = []

    def panels(items: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                where = f"panel {panel.get('title')!r} {target.get('refId')}"
                found.append(Expression(where, substitute(target["expr"])))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query") if isinstance(query, Mapping) else query
        match = _LABEL_VALUES.match(text or "")
        expr = match.group("selector") if match else text
        found.append(Expression(f"variable {variable.get('name')!r}", substitute(expr)))
    return found


def alert_expressions(rules: Mapping[str, Any]) -> list[Expression]:
    return [
        Expression(f"alert {rule['alert']}" if "alert" in rule else f"record {rule.get('record')}", rule["expr"])
        for group in rules.get("groups", [])
        for rule in group.get("rules", [])
    ]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(dicomproxy_[a-z_]+)\b", expr))


class PromQLError(AssertionError):
    pass


@dataclass
class Prometheus:
    peer: Peer
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"{self.url}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the JSON error body
            return json.loads(exc.read())

    def query(self, expr: str) -> list[Any]:
        """Instant query; PromQLError unless Prometheus says `success`."""
        answer = self.get("/api/v1/query", query=expr)
        if answer.get("status") != "success":
            raise PromQLError(f"{answer.get('errorType')}: {answer.get('error')}\n  in: {expr}")
        result: list[Any] = answer["data"]["result"]
        return result

    def names(self) -> set[str]:
        answer = self.get("/api/v1/label/__name__/values")
        return set(answer["data"])

    def targets_up(self, job: str) -> bool:
        return any(float(r["value"][1]) == 1 for r in self.query(f'up{{job="{job}"}}'))

    def wait_for_scrape(self, job: str, timeout: float = 30.0) -> None:
        wait_until(lambda: self.targets_up(job), timeout, f"prometheus to scrape job {job!r}", peer=self.peer)

    def stop(self) -> None:
        self.peer.stop()


def start_prometheus(
    workdir: Path,
    targets: Sequence[str],
    *,
    job: str = "dicomproxy",
    scheme: str = "http",
    ca_file: Path | None = None,
    server_name: str | None = None,
    basic_auth: tuple[str, Path] | None = None,
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
    startup_timeout: float = 30.0,
) -> Prometheus:
    binary = require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    scrape: dict[str, Any] = {
        "job_name": job,
        "scheme": scheme,
        "scrape_interval": scrape_interval,
        "scrape_timeout": scrape_interval,
        "static_configs": [{"targets": list(targets)}],
    }
    if ca_file is not None or server_name is not None:
        scrape["tls_config"] = {k: v for k, v in (("ca_file", str(ca_file) if ca_file else None),
                                                  ("server_name", server_name)) if v}
    if basic_auth is not None:
        scrape["basic_auth"] = {"username": basic_auth[0], "password_file": str(basic_auth[1])}
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [scrape],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    peer = Peer(
        "prometheus",
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=info",
        ],
        workdir / "prometheus.log",
        cwd=workdir,
    )
    peer.start()
    prom = Prometheus(peer, port, workdir)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    try:
        wait_until(ready, startup_timeout, "prometheus to become ready", peer=peer)
    except AssertionError:
        peer.stop()
        raise
    return prom


def promtool(*args: str, log_path: Path, timeout: float = 60.0) -> tuple[int, str]:
    from tests.peers import run_tool

    return run_tool([require_tool("promtool"), *args], log_path, timeout=timeout)


def wait_for_result(prom: Prometheus, expr: str, timeout: float = 30.0) -> list[Any]:
    """Poll an instant query until it returns at least one series."""
    deadline = time.monotonic() + timeout
    while True:
        result = prom.query(expr)
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(0.25)
