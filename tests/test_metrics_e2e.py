"""Metrics and failover end to end: pynetdicom and dcmtk storescu through the real proxy process
(metrics on) to pynetdicom and dcmtk TLS archives; /metrics scraped over HTTP during and after the
transfers; health probes steer new associations."""

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


SITE_RULES = """\
version: 1
default: accept
rules:
  - name: no-mr
    match: {calling_ae: MR01}
    action: reject
"""


def test_dcmtk_storescu_traffic_scraped_during_and_after(
    proxy_factory: ProxyFactory, storescp_tls_factory: Any, tmp_path: Path
) -> None:
    """dcmtk storescu -> proxy -> dcmtk storescp +tls (which sleeps 1 s in each store, so the
    association is certainly live while we scrape); then a rule reject and an abort on purpose."""
    from tests.peers import associate_rq_bytes, dcmtk_env, read_pdu, require_dcmtk, run_tool

    archive = storescp_tls_factory(extra_args=("--sleep-during", "1"))
    metrics_port = free_port()
    (tmp_path / "site.yaml").write_text(SITE_RULES)
    proxy = proxy_factory(archive.port, extra={"metrics": {"address": f"{LOOPBACK}:{metrics_port}"},
                                               "rules": [str(tmp_path / "site.yaml")]})
    files = write_ct_files(tmp_path / "ct", 3)
    dataset_bytes = sum(path.stat().st_size for path in files)
    storescu = require_dcmtk("storescu")
    from tests.peers import Peer

    modality = Peer("storescu", [storescu, "-aet", "CT01", "-aec", "ARCHIVE", LOOPBACK, str(proxy.port),
                                 *map(str, files)], tmp_path / "storescu.log", env=dcmtk_env()).start()

    def live_and_counting() -> bool:
        text = scrape(metrics_port)
        return (sample(text, "dicomproxy_associations_active", listener="modalities") == 1
                and sample(text, "dicomproxy_bytes_total", upstream="pacs", direction="to_upstream") > 0)

    wait_until(live_and_counting, 20, "a live association with bytes in /metrics")
    assert modality.wait(60) == 0, modality.log_text()[-2000:]

    rejected = run_tool([storescu, "-aet", "MR01", "-aec", "ARCHIVE", LOOPBACK, str(proxy.port), str(files[0])],
                        tmp_path / "storescu-mr.log", timeout=60, env=dcmtk_env())
    assert rejected[0] != 0
    import socket

    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as raw:  # A-ASSOCIATE, then vanish
        raw.sendall(associate_rq_bytes(called="ARCHIVE", calling="CT02"))
        assert read_pdu(raw)[0] == 0x02

    def all_ended() -> bool:
        text = scrape(metrics_port)
        return sample(text, "dicomproxy_associations_active", listener="modalities") == 0 and sample(
            text, "dicomproxy_associations_total", upstream="pacs", outcome="aborted") == 1

    wait_until(all_ended, 20, "every association ended in /metrics")
    text = scrape(metrics_port)
    assert sample(text, "dicomproxy_dimse_requests_total", upstream="pacs", command="C-STORE") == 3
    assert sample(text, "dicomproxy_dimse_responses_total", upstream="pacs", command="C-STORE",
                  status_class="success") == 3
    assert sample(text, "dicomproxy_dimse_duration_seconds_count", upstream="pacs", command="C-STORE") == 3
    assert sample(text, "dicomproxy_dimse_duration_seconds_sum", upstream="pacs", command="C-STORE") >= 3.0
    assert sample(text, "dicomproxy_associations_total", upstream="pacs", outcome="released") == 1
    assert sample(text, "dicomproxy_associations_total", upstream="none", outcome="rejected_by_rule") == 1
    assert sample(text, "dicomproxy_rule_matches_total", rule="no-mr", action="reject", mode="enforce") == 1
    to_upstream = sample(text, "dicomproxy_bytes_total", upstream="pacs", direction="to_upstream")
    # the data sets, plus per object a command set and PDU/PDV headers, plus the RQ and release
    assert dataset_bytes - 132 * len(files) < to_upstream < dataset_bytes + 2048 * len(files) + 4096
    assert sample(text, "dicomproxy_pdus_total", type="release_rq", direction="to_upstream") == 1
    # PDUs the proxy received: per object one command and at least one data PDU (none twice, cut through or not)
    assert 6 <= sample(text, "dicomproxy_pdus_total", type="p_data_tf", direction="to_upstream") <= 6 + 3 * 8
    assert sample(text, "dicomproxy_pdus_total", type="p_data_tf", direction="to_client") == 3  # the responses
