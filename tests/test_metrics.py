"""proxy.metrics as an observer: label values are bounded and initialised, an association's counts
reach Prometheus on flush and at its end (never twice), DIMSE requests pair with their final
responses, and a failing observation never raises."""

from __future__ import annotations

import random
import string
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.config import ProxyConfig
from proxy.dul.dimse import (
    NO_DATA_SET,
    CommandField,
    CommandSet,
    Tag,
    encode_command_set,
    parse_command_set,
    response_for,
    uid_value,
    us_value,
)
from proxy.dul.framer import ForeignProtocolError, Frame
from proxy.dul.machine import Side
from proxy.errors import RemotePDUError
from proxy.metrics import (
    DIMSE_COMMANDS,
    OUTCOMES,
    PDU_TYPES,
    DeviceMap,
    DimseEvent,
    DimseTracker,
    ProxyMetrics,
    outcome_label,
)
from proxy.policy.model import Decision, DimseDecision
from proxy.tls import TLS_ERROR_LABELS
from proxy.upstream import PROBE_FAILURE_REASONS, ProbeResult

CONFIG = """\
listeners:
  - {name: modalities, address: "127.0.0.1:0"}
  - {name: ward, address: "127.0.0.1:0"}
upstreams:
  pacs: {address: "127.0.0.1:2762", health: {called_ae: ARCHIVE}}
  pacs-dr: {address: "127.0.0.1:2763"}
routes: {PACS: [pacs, pacs-dr]}
default_upstream: pacs
devices:
  ct-scanners: ["CT*", "SCANNER?"]
  mr: MR01
metrics: {address: "127.0.0.1:0"}
"""

STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def load(text: str = CONFIG) -> ProxyConfig:
    return config.load_text(textwrap.dedent(text), "proxy.yaml", base_dir=Path("/"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry, clock: Clock) -> ProxyMetrics:
    return ProxyMetrics(registry, load(), clock=clock, wall_clock=lambda: 1_700_000_000.0, version="9.9")


def value(registry: CollectorRegistry, metric: str, **labels: str) -> float:
    got = registry.get_sample_value(metric, labels)
    assert got is not None, f"no series {metric}{labels}"
    return got


def series(registry: CollectorRegistry) -> Iterator[tuple[str, tuple[tuple[str, str], ...]]]:
    for family in registry.collect():
        for sample in family.samples:
            yield sample.name, tuple(sorted(sample.labels.items()))


def frame(pdu_type: int, length: int = 10) -> Frame:
    return Frame(pdu_type, memoryview(bytes([pdu_type]) + bytes(length - 1)))


def request(command: CommandField, message_id: int) -> CommandSet:
    return parse_command_set(
        encode_command_set(
            [
                (Tag.AFFECTED_SOP_CLASS_UID, uid_value(STORAGE)),
                (Tag.COMMAND_FIELD, us_value(command)),
                (Tag.MESSAGE_ID, us_value(message_id)),
                (Tag.COMMAND_DATA_SET_TYPE, us_value(NO_DATA_SET)),
            ]
        )
    )


def response(rq: CommandSet, status: int) -> CommandSet:
    return parse_command_set(response_for(rq, status))


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("relay", "label"),
    [
        ("released", "released"),
        ("aborted", "aborted"),
        ("idle", "aborted"),
        ("internal_error", "aborted"),
        ("rejected_by_rule", "rejected_by_rule"),
        ("dropped_by_rule", "rejected_by_rule"),
        ("rejected_by_upstream", "rejected_by_upstream"),
        ("upstream_unavailable", "upstream_unavailable"),
        ("acse_timeout", "upstream_unavailable"),
        ("rejected", "rejected"),
        ("rejected_by_limit", "rejected_by_limit"),
        ("protocol_error", "protocol_error"),
        ("artim", "no_association"),
        ("closed_before_rq", "no_association"),
        ("foreign_tls", "no_association"),
        ("foreign_http", "no_association"),
        ("something new", "aborted"),
    ],
)
def test_relay_outcomes_map_to_bounded_labels(relay: str, label: str) -> None:
    assert outcome_label(relay) == label
    assert label in OUTCOMES


def test_without_a_request_every_outcome_is_no_association() -> None:
    assert outcome_label("aborted", requested=False) == "no_association"
    assert outcome_label("open", requested=False) == "no_association"


def test_known_label_values_exist_at_zero_from_the_start(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    assert value(registry, "dicomproxy_build_info", version="9.9") == 1
    for listener in ("modalities", "ward"):
        assert value(registry, "dicomproxy_associations_active", listener=listener) == 0
        for upstream in ("pacs", "pacs-dr", "none"):
            for outcome in OUTCOMES:
                assert value(registry, "dicomproxy_associations_total", listener=listener, upstream=upstream,
                             outcome=outcome) == 0
            for direction in ("to_upstream", "to_client"):
                assert value(registry, "dicomproxy_bytes_total", listener=listener, upstream=upstream,
                             direction=direction) == 0
    for side in ("client", "upstream"):
        for reason in TLS_ERROR_LABELS:
            assert value(registry, "dicomproxy_tls_handshake_failures_total", side=side, reason=reason) == 0
    for reason in PROBE_FAILURE_REASONS:
        assert value(registry, "dicomproxy_upstream_probe_failures_total", upstream="pacs", reason=reason) == 0
    for device in ("ct-scanners", "mr", "other"):
        assert value(registry, "dicomproxy_device_associations_total", device=device, outcome="released") == 0
    for name in PDU_TYPES.values():
        assert value(registry, "dicomproxy_pdus_total", type=name, direction="to_client") == 0
    for command in DIMSE_COMMANDS:
        assert value(registry, "dicomproxy_dimse_requests_total", upstream="pacs", command=command) == 0
    # an upstream without health checks is always up; a probed one counts as up until its first probe
    assert value(registry, "dicomproxy_upstream_up", upstream="pacs-dr") == 1
    assert value(registry, "dicomproxy_upstream_up", upstream="pacs") == 1
    assert value(registry, "dicomproxy_config_last_reload_successful") == 1
    assert value(registry, "dicomproxy_config_last_reload_success_timestamp_seconds") == 1_700_000_000.0


def test_every_metric_name_follows_the_contract(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    names = {name for name, _labels in series(registry)}
    for name in names:
        assert name.startswith("dicomproxy_"), name
    for required in (
        "dicomproxy_build_info",
        "dicomproxy_associations_active",
        "dicomproxy_associations_total",
        "dicomproxy_association_setup_seconds_bucket",
        "dicomproxy_upstream_connect_seconds_bucket",
        "dicomproxy_bytes_total",
        "dicomproxy_pdus_total",
        "dicomproxy_dimse_requests_total",
        "dicomproxy_dimse_responses_total",
        "dicomproxy_upstream_up",
        "dicomproxy_upstream_probe_failures_total",
        "dicomproxy_tls_handshake_failures_total",
        "dicomproxy_protocol_errors_total",
        "dicomproxy_config_last_reload_successful",
        "dicomproxy_config_last_reload_success_timestamp_seconds",
    ):
        assert required in names, required


# --------------------------------------------------------------------------- one association


def test_an_association_from_request_to_release(
    metrics: ProxyMetrics, registry: CollectorRegistry, clock: Clock
) -> None:
    rec = metrics.association("modalities")
    assert value(registry, "dicomproxy_associations_active", listener="modalities") == 1
    rec.received(Side.REQUESTOR, 300, [frame(1, 300)])
    rec.requested("CT01")
    rec.routed("pacs")
    rec.upstream_connected(0.002, 0.010)
    clock.now += 0.25
    rec.received(Side.ACCEPTOR, 200, [frame(2, 200)])
    rec.accepted()
    assert value(registry, "dicomproxy_associations_total", listener="modalities", upstream="pacs",
                 outcome="accepted") == 1
    assert value(registry, "dicomproxy_association_setup_seconds_sum", upstream="pacs") == pytest.approx(0.25)
    assert value(registry, "dicomproxy_upstream_connect_seconds_count", upstream="pacs") == 1
    assert value(registry, "dicomproxy_upstream_tls_handshake_seconds_sum", upstream="pacs") == pytest.approx(0.01)

    # hot path: nothing reaches Prometheus before a flush
    rec.received(Side.REQUESTOR, 65536 * 2, [frame(4), frame(4)])
    assert value(registry, "dicomproxy_bytes_total", listener="modalities", upstream="pacs",
                 direction="to_upstream") == 0
    metrics.flush()
    assert value(registry, "dicomproxy_bytes_total", listener="modalities", upstream="pacs",
                 direction="to_upstream") == 300 + 65536 * 2
    assert value(registry, "dicomproxy_pdus_total", type="p_data_tf", direction="to_upstream") == 2
    assert value(registry, "dicomproxy_pdus_total", type="associate_ac", direction="to_client") == 1
    metrics.flush()  # a second flush adds nothing
    assert value(registry, "dicomproxy_pdus_total", type="p_data_tf", direction="to_upstream") == 2

    rec.received(Side.REQUESTOR, 10, [frame(5)])
    rec.received(Side.ACCEPTOR, 10, [frame(6)])
    rec.finished("released")
    rec.finished("released")  # idempotent
    assert value(registry, "dicomproxy_associations_active", listener="modalities") == 0
    assert value(registry, "dicomproxy_associations_total", listener="modalities", upstream="pacs",
                 outcome="released") == 1
    assert value(registry, "dicomproxy_device_associations_total", device="ct-scanners", outcome="released") == 1
    assert value(registry, "dicomproxy_device_associations_total", device="ct-scanners", outcome="accepted") == 1
    assert value(registry, "dicomproxy_device_bytes_total", device="ct-scanners",
                 direction="to_upstream") == 300 + 65536 * 2 + 10
    assert value(registry, "dicomproxy_pdus_total", type="release_rp", direction="to_client") == 1
    assert metrics.live == 0


def test_a_connection_without_request_counts_as_no_association(
    metrics: ProxyMetrics, registry: CollectorRegistry
) -> None:
    rec = metrics.association("ward")
    rec.received(Side.REQUESTOR, 4, [])
    rec.finished("closed_before_rq")
    assert value(registry, "dicomproxy_associations_total", listener="ward", upstream="none",
                 outcome="no_association") == 1
    assert value(registry, "dicomproxy_bytes_total", listener="ward", upstream="none", direction="to_upstream") == 4
    # not a device's association
    assert value(registry, "dicomproxy_device_associations_total", device="other", outcome="aborted") == 0


def test_rejections_are_counted_by_outcome_with_upstream_none(
    metrics: ProxyMetrics, registry: CollectorRegistry
) -> None:
    rec = metrics.association("modalities")
    rec.requested("MR01")
    rec.finished("rejected_by_rule")
    assert value(registry, "dicomproxy_associations_total", listener="modalities", upstream="none",
                 outcome="rejected_by_rule") == 1
    assert value(registry, "dicomproxy_device_associations_total", device="mr", outcome="rejected_by_rule") == 1


def test_dimse_requests_responses_and_durations(
    metrics: ProxyMetrics, registry: CollectorRegistry, clock: Clock
) -> None:
    rec = metrics.association("modalities")
    assert rec.dimse_enabled
    rec.requested("CT01")
    rec.routed("pacs")
    store = request(CommandField.C_STORE_RQ, 7)
    rec.commands(Side.REQUESTOR, [(1, store)])
    clock.now += 0.5
    rec.commands(Side.ACCEPTOR, [(1, response(store, 0xA700))])
    rec.finished("released")
    assert value(registry, "dicomproxy_dimse_requests_total", upstream="pacs", command="C-STORE") == 1
    assert value(registry, "dicomproxy_dimse_responses_total", upstream="pacs", command="C-STORE",
                 status_class="failure") == 1
    assert value(registry, "dicomproxy_dimse_duration_seconds_sum", upstream="pacs", command="C-STORE") == 0.5
    assert value(registry, "dicomproxy_dimse_duration_seconds_count", upstream="pacs", command="C-STORE") == 1


def test_dimse_can_be_switched_off(registry: CollectorRegistry) -> None:
    metrics = ProxyMetrics(registry, load(), dimse=False)
    rec = metrics.association("modalities")
    assert not rec.dimse_enabled
    rec.commands(Side.REQUESTOR, [(1, request(CommandField.C_ECHO_RQ, 1))])
    rec.finished("released")
    assert value(registry, "dicomproxy_dimse_requests_total", upstream="pacs", command="C-ECHO") == 0


# --------------------------------------------------------------------------- DimseTracker


def test_tracker_pairs_by_message_id_and_ignores_pending() -> None:
    tracker = DimseTracker()
    find = request(CommandField.C_FIND_RQ, 3)
    echo = request(CommandField.C_ECHO_RQ, 4)
    assert tracker.feed(True, [(1, find), (3, echo)], 10.0) == [DimseEvent("C-FIND"), DimseEvent("C-ECHO")]
    assert tracker.outstanding == 2
    assert tracker.feed(False, [(3, response(echo, 0))], 10.1) == [DimseEvent("C-ECHO", "success", pytest.approx(0.1))]
    pending = tracker.feed(False, [(1, response(find, 0xFF00)), (1, response(find, 0xFF01))], 11.0)
    assert pending == [DimseEvent("C-FIND", "pending"), DimseEvent("C-FIND", "pending")]
    assert tracker.feed(False, [(1, response(find, 0x0000))], 12.0) == [DimseEvent("C-FIND", "success", 2.0)]
    assert tracker.outstanding == 0


def test_tracker_keeps_the_two_directions_apart() -> None:
    """A C-GET's C-STORE sub-operations come from the archive with their own MessageIDs, which may
    equal the modality's: a response is matched against the other direction's request only."""
    tracker = DimseTracker()
    get = request(CommandField.C_GET_RQ, 1)
    sub = request(CommandField.C_STORE_RQ, 1)
    tracker.feed(True, [(1, get)], 0.0)
    tracker.feed(False, [(3, sub)], 1.0)
    assert tracker.feed(True, [(3, response(sub, 0))], 1.5) == [DimseEvent("C-STORE", "success", 0.5)]
    assert tracker.feed(False, [(1, response(get, 0))], 3.0) == [DimseEvent("C-GET", "success", 3.0)]


def test_tracker_cancel_unknown_and_unmatched() -> None:
    tracker = DimseTracker()
    cancel = parse_command_set(encode_command_set([
        (Tag.COMMAND_FIELD, us_value(CommandField.C_CANCEL_RQ)),
        (Tag.MESSAGE_ID_BEING_RESPONDED_TO, us_value(5)),
        (Tag.COMMAND_DATA_SET_TYPE, us_value(NO_DATA_SET)),
    ]))
    odd = parse_command_set(encode_command_set([(Tag.COMMAND_FIELD, us_value(0x0042))]))
    nothing = parse_command_set(encode_command_set([(Tag.MESSAGE_ID, us_value(1))]))
    assert tracker.feed(True, [(1, cancel), (1, odd), (1, nothing)], 0.0) == [
        DimseEvent("C-CANCEL"), DimseEvent("unknown"), DimseEvent("unknown")
    ]
    assert tracker.outstanding == 0  # a cancel ends nothing; without a MessageID nothing can be paired
    stray = response(request(CommandField.C_STORE_RQ, 99), 0x0001)
    assert tracker.feed(False, [(1, stray)], 1.0) == [DimseEvent("C-STORE", "warning", None)]
    no_status = parse_command_set(encode_command_set([(Tag.COMMAND_FIELD, us_value(CommandField.C_ECHO_RSP))]))
    assert tracker.feed(False, [(1, no_status)], 1.0) == [DimseEvent("C-ECHO", "failure", None)]


def test_tracker_forgets_the_oldest_beyond_its_bound() -> None:
    tracker = DimseTracker(max_outstanding=10)
    rqs = [request(CommandField.C_STORE_RQ, i) for i in range(1, 31)]
    tracker.feed(True, [(1, rq) for rq in rqs], 0.0)
    assert tracker.outstanding == 10
    assert tracker.feed(False, [(1, response(rqs[0], 0))], 1.0)[0].duration is None
    assert tracker.feed(False, [(1, response(rqs[-1], 0))], 1.0)[0].duration == 1.0


# --------------------------------------------------------------------------- devices and cardinality


def test_device_map_first_listed_device_wins() -> None:
    devices = DeviceMap({"ct": ("CT*",), "ct-special": ("CT01",), "mr": ("MR0?", "MRI")})
    assert devices.classify("CT01") == "ct"  # the glob of the first device matches first
    assert devices.classify("CT01      ") == "ct"
    assert devices.classify("MR07") == "mr"
    assert devices.classify("MRI") == "mr"
    assert devices.classify("MR100") == "other"
    assert devices.classify("ct01") == "other"  # case-sensitive, as AE titles are
    assert DeviceMap({}).classify("CT01") == "other"


def test_a_thousand_random_calling_ae_titles_add_no_series(
    metrics: ProxyMetrics, registry: CollectorRegistry
) -> None:
    before = set(series(registry))
    rng = random.Random(6)
    alphabet = string.ascii_uppercase + string.digits + " _-*?[]"
    for _ in range(1000):
        title = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
        rec = metrics.association(rng.choice(["modalities", "ward"]))
        rec.received(Side.REQUESTOR, 100, [frame(1), frame(4)])
        rec.requested(title)
        rec.routed(rng.choice(["pacs", "pacs-dr", "not-configured-" + title]))
        rec.accepted()
        rec.received(Side.ACCEPTOR, 100, [frame(2), frame(4)])
        rec.finished(rng.choice(["released", "aborted", "weird-" + title]))
    after = set(series(registry))
    new = {name for name, _ in after - before}
    # only histogram/created samples of already-initialised label sets, and "other" upstream for
    # routes to names the config does not know
    labels_seen = {dict(labels).get("device") for _name, labels in after} - {None}
    assert labels_seen == {"ct-scanners", "mr", "other"}
    upstreams_seen = {dict(labels).get("upstream") for _name, labels in after} - {None}
    assert upstreams_seen <= {"pacs", "pacs-dr", "none", "other"}
    assert len(after) - len(before) < 200, sorted(new)
    total = sum(registry.get_sample_value("dicomproxy_associations_total",
                                          {"listener": listener, "upstream": upstream, "outcome": outcome}) or 0
                for listener in ("modalities", "ward") for upstream in ("pacs", "pacs-dr", "other")
                for outcome in OUTCOMES if outcome != "accepted")
    assert total == 1000


# --------------------------------------------------------------------------- decisions, errors, health


def test_rule_decisions_count_enforcing_and_shadow_rules(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    metrics.rule_decision(Decision("default", "reject", shadow_matches=(("trial", "drop"),)))
    metrics.rule_decision(DimseDecision("default", "forward"))
    metrics.rule_decision(Decision("typo-or-injected-name", "accept"))
    assert value(registry, "dicomproxy_rule_matches_total", rule="default", action="reject", mode="enforce") == 1
    assert value(registry, "dicomproxy_rule_matches_total", rule="other", action="drop", mode="shadow") == 1
    assert value(registry, "dicomproxy_rule_matches_total", rule="default", action="forward", mode="enforce") == 1
    assert value(registry, "dicomproxy_rule_matches_total", rule="other", action="accept", mode="enforce") == 1


def test_errors_use_bounded_labels(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    metrics.tls_handshake_failure("client", "unknown_ca")
    metrics.tls_handshake_failure("client", "something the peer said")
    metrics.protocol_error(Side.ACCEPTOR, RemotePDUError("bad", source=2, reason=2))
    metrics.protocol_error(Side.REQUESTOR, ForeignProtocolError("http", "http"))
    metrics.protocol_error("client", RemotePDUError("odd", reason=99))
    metrics.identity_injection("pacs-jwt", 5, "injected")
    metrics.identity_injection("user name with spaces", 9, "who knows")
    assert value(registry, "dicomproxy_tls_handshake_failures_total", side="client", reason="unknown_ca") == 1
    assert value(registry, "dicomproxy_tls_handshake_failures_total", side="client", reason="other") == 1
    assert value(registry, "dicomproxy_protocol_errors_total", side="upstream", reason="unexpected_pdu") == 1
    assert value(registry, "dicomproxy_protocol_errors_total", side="client", reason="foreign_http") == 1
    assert value(registry, "dicomproxy_protocol_errors_total", side="client", reason="not_specified") == 1
    assert value(registry, "dicomproxy_identity_injections_total", profile="pacs-jwt", type="jwt",
                 result="injected") == 1
    assert value(registry, "dicomproxy_identity_injections_total", profile="other", type="other",
                 result="other") == 1


def test_probe_results_and_states(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    good = ProbeResult("pacs", True, None, "ok", (("connect", 0.001), ("associate", 0.01)), None, 0.011)
    bad = ProbeResult("pacs", False, "refused", "refused", (), "connect", 0.0004)
    metrics.probe_finished(good, True)
    assert value(registry, "dicomproxy_upstream_probe_duration_seconds", upstream="pacs") == 0.011
    assert value(registry, "dicomproxy_upstream_probe_step_seconds", upstream="pacs", step="associate") == 0.01
    metrics.probe_finished(bad, False)
    assert value(registry, "dicomproxy_upstream_up", upstream="pacs") == 0
    assert value(registry, "dicomproxy_upstream_probe_failures_total", upstream="pacs", reason="refused") == 1
    assert value(registry, "dicomproxy_upstream_probes_total", upstream="pacs") == 2
    metrics.upstream_state("pacs", True)
    metrics.upstream_state("never-configured", False)
    assert value(registry, "dicomproxy_upstream_up", upstream="pacs") == 1
    assert registry.get_sample_value("dicomproxy_upstream_up", {"upstream": "never-configured"}) is None


def test_reload_updates_labels_and_gauges(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    metrics.probe_finished(ProbeResult("pacs", False, "timeout", "t", (), "connect", 5.0), False)
    metrics.reload_failed()
    assert value(registry, "dicomproxy_config_last_reload_successful") == 0
    new = load(CONFIG.replace("pacs-dr", "archive2").replace("mr: MR01", "us: [US*]"))
    metrics.reloaded(new)
    assert value(registry, "dicomproxy_config_last_reload_successful") == 1
    assert registry.get_sample_value("dicomproxy_upstream_up", {"upstream": "pacs-dr"}) is None
    assert value(registry, "dicomproxy_upstream_up", upstream="archive2") == 1
    assert value(registry, "dicomproxy_upstream_up", upstream="pacs") == 0  # kept: the health registry owns it
    assert value(registry, "dicomproxy_associations_total", listener="ward", upstream="archive2",
                 outcome="released") == 0
    assert value(registry, "dicomproxy_device_bytes_total", device="us", direction="to_client") == 0
    rec = metrics.association("ward")
    rec.requested("US1")
    rec.routed("pacs-dr")  # an association that raced the reload: folded, not a new label value
    rec.finished("released")
    assert value(registry, "dicomproxy_associations_total", listener="ward", upstream="other",
                 outcome="released") == 1


def test_certificate_expiry_gauges(registry: CollectorRegistry, tmp_path: Path) -> None:
    from proxy import certs
    from proxy.tls import certificate_expiry

    files = certs.init(tmp_path / "pki")
    cfg = load(f"""\
        listeners:
          - name: secure
            address: "127.0.0.1:0"
            tls: {{cert: {files['proxy']}, key: {files['proxy_key']}, client_ca: {files['ca']}}}
        upstreams:
          pacs:
            address: "127.0.0.1:2762"
            tls: {{ca: {files['ca']}, cert: {files['proxy']}, key: {files['proxy_key']}}}
        default_upstream: pacs
        metrics:
          address: "127.0.0.1:0"
          tls: {{cert: {files['archive']}, key: {files['archive_key']}}}
        """)
    ProxyMetrics(registry, cfg)
    expected = certificate_expiry(files["proxy"]).timestamp()
    assert value(registry, "dicomproxy_tls_certificate_expiry_timestamp_seconds", role="listener",
                 name="secure") == expected
    assert value(registry, "dicomproxy_tls_certificate_expiry_timestamp_seconds", role="upstream_client",
                 name="pacs") == expected
    assert value(registry, "dicomproxy_tls_certificate_expiry_timestamp_seconds", role="ca",
                 name="upstream:pacs") == certificate_expiry(files["ca"]).timestamp()
    assert value(registry, "dicomproxy_tls_certificate_expiry_timestamp_seconds", role="metrics",
                 name="exporter") == certificate_expiry(files["archive"]).timestamp()


def test_a_failing_observation_is_counted_not_raised(
    metrics: ProxyMetrics, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_args: object) -> None:
        raise RuntimeError("bug in an observer")

    rec = metrics.association("modalities")
    monkeypatch.setattr(metrics, "observe_accepted", boom)
    rec.accepted()  # does not raise
    assert value(registry, "dicomproxy_metrics_errors_total") == 1


def test_the_global_registry_is_untouched(metrics: ProxyMetrics) -> None:
    from prometheus_client import REGISTRY

    assert not any(name.startswith("dicomproxy_") for name in REGISTRY._names_to_collectors)


# --------------------------------------------------------------------------- P-DATA observation


def pdata_pdu(*pdvs: tuple[int, int, bytes]) -> memoryview:
    from proxy.dul.pdus import PDataTF

    return memoryview(PDataTF.from_pdvs(list(pdvs)).encode())


def test_pdata_reassembles_commands_and_skips_data_fragments(
    metrics: ProxyMetrics, registry: CollectorRegistry, clock: Clock
) -> None:
    rec = metrics.association("modalities")
    rec.requested("CT01")
    rec.routed("pacs")
    store_rq = encode_command_set([
        (Tag.AFFECTED_SOP_CLASS_UID, uid_value(STORAGE)),
        (Tag.COMMAND_FIELD, us_value(CommandField.C_STORE_RQ)),
        (Tag.MESSAGE_ID, us_value(9)),
        (Tag.COMMAND_DATA_SET_TYPE, us_value(0x0000)),
    ])
    rec.pdata(Side.REQUESTOR, pdata_pdu((1, 0x01, store_rq[:20])))  # command, first fragment
    rec.pdata(Side.REQUESTOR, pdata_pdu((1, 0x03, store_rq[20:])))  # command, last fragment
    for _ in range(3):
        rec.pdata(Side.REQUESTOR, pdata_pdu((1, 0x00, bytes(1000))))  # data fragments: the fast path
    rec.pdata(Side.REQUESTOR, pdata_pdu((1, 0x02, bytes(10))))
    clock.now += 2.0
    rsp = response_for(parse_command_set(store_rq), 0x0000)
    rec.pdata(Side.ACCEPTOR, pdata_pdu((1, 0x03, rsp)))
    rec.finished("released")
    assert value(registry, "dicomproxy_dimse_requests_total", upstream="pacs", command="C-STORE") == 1
    assert value(registry, "dicomproxy_dimse_responses_total", upstream="pacs", command="C-STORE",
                 status_class="success") == 1
    assert value(registry, "dicomproxy_dimse_duration_seconds_sum", upstream="pacs", command="C-STORE") == 2.0


def test_pdata_stops_observing_a_broken_direction_without_raising(
    metrics: ProxyMetrics, registry: CollectorRegistry
) -> None:
    rec = metrics.association("modalities")
    rec.routed("pacs")
    echo = encode_command_set([(Tag.COMMAND_FIELD, us_value(CommandField.C_ECHO_RQ)), (Tag.MESSAGE_ID, us_value(1)),
                               (Tag.COMMAND_DATA_SET_TYPE, us_value(NO_DATA_SET))])
    rec.pdata(Side.REQUESTOR, pdata_pdu((1, 0x01, echo[:8]), (3, 0x03, echo[8:])))  # contexts differ: broken
    rec.pdata(Side.REQUESTOR, pdata_pdu((1, 0x03, echo)))  # no longer observed
    rec.pdata(Side.ACCEPTOR, pdata_pdu((1, 0x03, response_for(parse_command_set(echo), 0))))  # still observed
    rec.finished("released")
    assert value(registry, "dicomproxy_dimse_requests_total", upstream="pacs", command="C-ECHO") == 0
    assert value(registry, "dicomproxy_dimse_responses_total", upstream="pacs", command="C-ECHO",
                 status_class="success") == 1


def test_the_null_recorder_accepts_everything() -> None:
    from proxy.metrics import NULL_RECORDER

    rec = NULL_RECORDER
    assert not rec.dimse_enabled
    rec.received(Side.REQUESTOR, 10, [frame(4)])
    rec.requested("CT01")
    rec.routed("pacs")
    rec.upstream_connected(0.1, None)
    rec.accepted()
    rec.pdata(Side.REQUESTOR, pdata_pdu((1, 0x03, b"xx")))
    rec.commands(Side.REQUESTOR, [])
    rec.rule_decision(Decision("default", "accept"))
    rec.tls_handshake_failure("expired")
    rec.protocol_error(Side.REQUESTOR, RemotePDUError("x"))
    rec.identity_injection("p", 1, "injected")
    rec.flush()
    rec.finished("released")
    assert rec.bytes_to_upstream == 0


def test_recorder_delegates_errors_to_the_registry(metrics: ProxyMetrics, registry: CollectorRegistry) -> None:
    rec = metrics.association("modalities")
    rec.tls_handshake_failure("pin_mismatch")
    rec.protocol_error(Side.ACCEPTOR, RemotePDUError("x", reason=6))
    rec.rule_decision(Decision("default", "accept"))
    rec.identity_injection("svc", 2, "failed")
    assert value(registry, "dicomproxy_tls_handshake_failures_total", side="upstream", reason="pin_mismatch") == 1
    assert value(registry, "dicomproxy_protocol_errors_total", side="upstream",
                 reason="invalid_pdu_parameter_value") == 1
    assert value(registry, "dicomproxy_identity_injections_total", profile="svc", type="username_passcode",
                 result="failed") == 1
