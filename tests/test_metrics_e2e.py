"""Metrics and failover end to end: a pynetdicom SCU through the real proxy process (metrics on)
to a pynetdicom TLS archive; /metrics scraped over HTTP; health probes steer new associations."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import Pki, ProxyFactory, UpstreamSpec
from tests.data import write_ct_files
from tests.peers import LOOPBACK, PynetdicomArchive, closed_port, free_port, require_module, wait_until

require_module("pynetdicom")
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # noqa: E402


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels}")


def scu(calling: str) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


def test_traffic_shows_up_in_metrics(
    proxy_factory: ProxyFactory, pynetdicom_tls_scp: PynetdicomArchive, tmp_path: Path
) -> None:
    metrics_port = free_port()
    proxy = proxy_factory(
        pynetdicom_tls_scp.port,
        extra={"metrics": {"address": f"{LOOPBACK}:{metrics_port}"}, "devices": {"ct-scanners": ["CT*"]}},
    )
    files = write_ct_files(tmp_path / "ct", 3)
    assoc = scu("CT01").associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    from pydicom import dcmread

    for path in files:
        assert assoc.send_c_store(dcmread(path)).Status == 0
    live = scrape(metrics_port)  # flushed before the scrape: bytes of the open association count already
    assert sample(live, "dicomproxy_associations_active", listener="modalities") == 1
    sent = sum(path.stat().st_size for path in files) - 132 * len(files)  # without the Part 10 preambles
    assert sample(live, "dicomproxy_bytes_total", upstream="pacs", direction="to_upstream") > sent
    assoc.release()
    rejected = scu("MR01").associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    rejected.release()

    def released() -> bool:
        return sample(scrape(metrics_port), "dicomproxy_associations_total", upstream="pacs",
                      outcome="released") >= 2

    wait_until(released, 10, "two released associations in /metrics")
    text = scrape(metrics_port)
    assert sample(text, "dicomproxy_associations_total", listener="modalities", upstream="pacs",
                  outcome="accepted") == 2
    assert sample(text, "dicomproxy_associations_active", listener="modalities") == 0
    assert sample(text, "dicomproxy_association_setup_seconds_count", upstream="pacs") == 2
    assert sample(text, "dicomproxy_upstream_connect_seconds_count", upstream="pacs") == 2
    assert sample(text, "dicomproxy_upstream_tls_handshake_seconds_count", upstream="pacs") == 2
    assert sample(text, "dicomproxy_dimse_requests_total", upstream="pacs", command="C-STORE") == 3
    assert sample(text, "dicomproxy_dimse_requests_total", upstream="pacs", command="C-ECHO") == 1
    assert sample(text, "dicomproxy_dimse_responses_total", upstream="pacs", command="C-STORE",
                  status_class="success") == 3
    assert sample(text, "dicomproxy_dimse_duration_seconds_count", upstream="pacs", command="C-STORE") == 3
    assert sample(text, "dicomproxy_device_bytes_total", device="ct-scanners", direction="to_upstream") > sent
    assert sample(text, "dicomproxy_device_associations_total", device="other", outcome="released") == 1
    assert sample(text, "dicomproxy_pdus_total", type="release_rq", direction="to_upstream") == 2
    assert sample(text, "dicomproxy_upstream_up", upstream="pacs") == 1
    for name in ("CT01", "MR01", "ARCHIVE", LOOPBACK):
        assert f'"{name}"' not in text  # no AE title or peer input as a label value


def test_failover_to_the_next_healthy_upstream_and_rj_when_all_are_down(
    proxy_factory: ProxyFactory, pynetdicom_tls_scp: PynetdicomArchive, dev_certs: Pki
) -> None:
    metrics_port = free_port()
    dead = closed_port()
    fast = {"called_ae": "ARCHIVE", "interval": 0.2, "timeout": 2, "rise": 1, "fall": 1}
    proxy = proxy_factory(
        {"dead": UpstreamSpec(dead, dev_certs), "pacs": UpstreamSpec(pynetdicom_tls_scp.port, dev_certs)},
        default_upstream=None,
        routes={"ARCHIVE": "dead"},
        extra={"metrics": {"address": f"{LOOPBACK}:{metrics_port}"}},
    )
    text = proxy.config_path.read_text()
    text = text.replace("routes:\n  ARCHIVE: dead", "routes:\n  ARCHIVE: [dead, pacs]\n  ONLYDEAD: dead")
    import yaml

    data = yaml.safe_load(text)
    for name in ("dead", "pacs"):
        data["upstreams"][name]["health"] = dict(fast)
    proxy.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    since = proxy.log_size()
    import signal

    proxy.peer.signal(signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", since=since)
    proxy.wait_for_log(r"upstream dead is DOWN: connect failed \(refused\)", since=since)

    assoc = scu("CT01").associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    assert assoc.is_established  # via pacs, the second choice
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    started = time.monotonic()
    refused = scu("CT01").associate(LOOPBACK, proxy.port, ae_title="ONLYDEAD")
    assert refused.is_rejected
    assert time.monotonic() - started < 2  # at once, no connect attempt

    def counted() -> bool:
        return sample(scrape(metrics_port), "dicomproxy_associations_total", upstream="dead",
                      outcome="upstream_unavailable") == 1

    wait_until(counted, 10, "the rejected association in /metrics")
    text = scrape(metrics_port)
    assert sample(text, "dicomproxy_upstream_up", upstream="dead") == 0
    assert sample(text, "dicomproxy_upstream_up", upstream="pacs") == 1
    assert sample(text, "dicomproxy_upstream_probe_failures_total", upstream="dead", reason="refused") >= 1
    assert sample(text, "dicomproxy_associations_total", upstream="pacs", outcome="released") == 1
    assert sample(text, "dicomproxy_config_last_reload_successful") == 1
    assert pytest.approx(time.time(), abs=60) == sample(text, "dicomproxy_config_last_reload_success_timestamp_seconds")
