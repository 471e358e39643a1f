"""proxy.limits: association counts, per-source token bucket (fake clock), bounded memory, and
the `limits:` keys of proxy.yaml."""

from __future__ import annotations

import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import load_text
from proxy.errors import ConfigErrors
from proxy.limits import LIMIT_REASONS, LimitReason, Limits, LimitTracker, source_key


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tracker(*, clock: FakeClock | None = None, **limits: Any) -> LimitTracker:
    return LimitTracker(Limits(**limits), clock or FakeClock())


# --------------------------------------------------------------------------- counts, table-driven


@dataclass(frozen=True)
class Case:
    name: str
    limits: dict[str, int]
    held: list[tuple[str, str, str]]  # acquired first, all must succeed
    attempt: tuple[str, str, str]  # then this one
    expected: LimitReason | None


CASES = [
    Case("no limits", {}, [("dicom", "10.0.0.1", "CT1")] * 50, ("dicom", "10.0.0.1", "CT1"), None),
    Case("global", {"max_associations": 3},
         [("dicom", "10.0.0.1", "CT1"), ("tls", "10.0.0.2", "CT2"), ("dicom", "10.0.0.3", "MR1")],
         ("tls", "10.0.0.4", "US1"), LimitReason.GLOBAL),
    Case("listener", {"per_listener": 2},
         [("dicom", "10.0.0.1", "CT1"), ("dicom", "10.0.0.2", "CT2"), ("tls", "10.0.0.3", "MR1")],
         ("dicom", "10.0.0.4", "US1"), LimitReason.LISTENER),
    Case("listener, other listener has room", {"per_listener": 2},
         [("dicom", "10.0.0.1", "CT1"), ("dicom", "10.0.0.2", "CT2")], ("tls", "10.0.0.4", "US1"), None),
    Case("source", {"per_source": 2},
         [("dicom", "10.0.0.1", "CT1"), ("tls", "10.0.0.1", "CT2")], ("dicom", "10.0.0.1", "MR1"),
         LimitReason.SOURCE),
    Case("source, other source has room", {"per_source": 2},
         [("dicom", "10.0.0.1", "CT1"), ("tls", "10.0.0.1", "CT2")], ("dicom", "10.0.0.2", "CT1"), None),
    Case("source, IPv6 counted per /64", {"per_source": 2},
         [("dicom", "2001:db8::1", "CT1"), ("dicom", "2001:db8::2", "CT2")], ("dicom", "2001:db8::ffff", "MR1"),
         LimitReason.SOURCE),
    Case("source, IPv4-mapped counts as IPv4", {"per_source": 1},
         [("dicom", "10.0.0.1", "CT1")], ("dicom", "::ffff:10.0.0.1", "CT2"), LimitReason.SOURCE),
    Case("calling AE", {"per_calling_ae": 2},
         [("dicom", "10.0.0.1", "CT1"), ("dicom", "10.0.0.2", "CT1 ")], ("tls", "10.0.0.3", " CT1"),
         LimitReason.CALLING_AE),
    Case("calling AE, case matters", {"per_calling_ae": 1},
         [("dicom", "10.0.0.1", "CT1")], ("dicom", "10.0.0.1", "ct1"), None),
    Case("first limit that bites wins: global before source", {"max_associations": 1, "per_source": 1},
         [("dicom", "10.0.0.1", "CT1")], ("dicom", "10.0.0.1", "CT1"), LimitReason.GLOBAL),
    Case("listener before source", {"per_listener": 1, "per_source": 1, "per_calling_ae": 1},
         [("dicom", "10.0.0.1", "CT1")], ("dicom", "10.0.0.1", "CT1"), LimitReason.LISTENER),
    Case("source before calling AE", {"per_source": 1, "per_calling_ae": 1},
         [("dicom", "10.0.0.1", "CT1")], ("tls", "10.0.0.1", "CT1"), LimitReason.SOURCE),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_count_limits(case: Case) -> None:
    t = LimitTracker(Limits(**case.limits), FakeClock())
    for listener, source, ae in case.held:
        assert t.try_acquire(listener, source, ae) is None
    assert t.try_acquire(*case.attempt) == case.expected
    assert t.held() == len(case.held) + (case.expected is None)


@pytest.mark.parametrize(
    ("kind", "vary"),
    [
        ("max_associations", lambda i: (f"l{i % 3}", f"10.0.0.{i}", f"AE{i}")),
        ("per_listener", lambda i: ("dicom", f"10.0.0.{i}", f"AE{i}")),
        ("per_source", lambda i: (f"l{i % 3}", "10.0.0.9", f"AE{i}")),
        ("per_calling_ae", lambda i: (f"l{i % 3}", f"10.0.0.{i}", "CT1")),
    ],
)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_n_plus_first_rejected_while_n_held_and_release_makes_room(kind: str, vary: Any, n: int) -> None:
    t = LimitTracker(Limits(**{kind: n}), FakeClock())
    keys = [vary(i) for i in range(n + 1)]
    for key in keys[:n]:
        assert t.try_acquire(*key) is None
    reason = t.try_acquire(*keys[n])
    assert reason is not None and reason.value in LIMIT_REASONS
    assert t.held() == n  # a refusal takes nothing
    assert t.try_acquire(*keys[n]) == reason  # still full
    assert t.release(*keys[0]) is True
    assert t.try_acquire(*keys[n]) is None
    for key in keys[1:]:
        assert t.release(*key) is True
    assert t.held() == 0
    assert t.release(*keys[0]) is False  # nothing left to give back


def test_release_is_per_hold_and_never_negative() -> None:
    t = tracker(per_source=2)
    assert t.release("dicom", "10.0.0.1", "CT1") is False
    assert t.try_acquire("dicom", "10.0.0.1", "CT1") is None
    assert t.release("dicom", "10.0.0.1", "CT2") is False  # not what was acquired
    assert t.release("tls", "10.0.0.1", "CT1") is False
    assert t.held(source_ip="10.0.0.1") == 1
    assert t.release("dicom", "10.0.0.1", "CT1") is True
    assert t.release("dicom", "10.0.0.1", "CT1") is False
    assert (t.held(), t.held(listener="dicom"), t.held(calling_ae="CT1")) == (0, 0, 0)


def test_counts_forget_released_keys() -> None:
    """Memory for counts is per live association: released keys leave no entry behind."""
    t = tracker(per_source=1, per_calling_ae=1, per_listener=1000)
    for i in range(500):
        key = ("dicom", f"10.{i // 250}.{i % 250}.1", f"AE{i}")
        assert t.try_acquire(*key) is None
        assert t.release(*key) is True
    assert (t._listeners, t._sources, t._aes, t._holds) == ({}, {}, {}, {})


def test_reconfigure_keeps_holds() -> None:
    t = tracker(max_associations=3)
    for i in range(3):
        assert t.try_acquire("dicom", f"10.0.0.{i}", "CT1") is None
    t.reconfigure(Limits(max_associations=1))
    assert t.try_acquire("dicom", "10.0.0.9", "CT1") == LimitReason.GLOBAL
    assert t.release("dicom", "10.0.0.0", "CT1") is True
    assert t.release("dicom", "10.0.0.1", "CT1") is True
    assert t.try_acquire("dicom", "10.0.0.9", "CT1") == LimitReason.GLOBAL  # 1 still held
    assert t.release("dicom", "10.0.0.2", "CT1") is True
    assert t.try_acquire("dicom", "10.0.0.9", "CT1") is None
    t.reconfigure(Limits())
    assert all(t.try_acquire("dicom", "10.0.0.9", "CT1") is None for _ in range(10))


def test_release_after_a_reload_changed_the_ipv6_prefix() -> None:
    t = tracker(per_source=1)
    assert t.try_acquire("dicom", "2001:db8::1", "CT1") is None
    t.reconfigure(Limits(per_source=1, ipv6_prefix=128))
    assert t.release("dicom", "2001:db8::1", "CT1") is True
    assert t._sources == {}


@pytest.mark.parametrize(
    ("address", "prefix", "key"),
    [
        ("10.1.2.3", 64, "10.1.2.3"),
        ("::ffff:10.1.2.3", 64, "10.1.2.3"),
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("unix", 64, "unix"),
    ],
)
def test_source_key(address: str, prefix: int, key: str) -> None:
    assert source_key(address, prefix) == key


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), max_size=80))
def test_counts_match_a_model(ops: list[tuple[bool, int, int, int]]) -> None:
    """Random acquire/release sequences: the tracker agrees with a plain list of holds, every
    limit is respected, and a refusal names a limit that is really full."""
    limits = {"max_associations": 6, "per_listener": 4, "per_source": 3, "per_calling_ae": 2}
    t = LimitTracker(Limits(**limits), FakeClock())
    holds: list[tuple[str, str, str]] = []
    for acquire, listener_i, source_i, ae_i in ops:
        key = (f"l{listener_i}", f"10.0.0.{source_i}", f"AE{ae_i}")
        if acquire:
            reason = t.try_acquire(*key)
            counts = {
                LimitReason.GLOBAL: len(holds) >= limits["max_associations"],
                LimitReason.LISTENER: sum(h[0] == key[0] for h in holds) >= limits["per_listener"],
                LimitReason.SOURCE: sum(h[1] == key[1] for h in holds) >= limits["per_source"],
                LimitReason.CALLING_AE: sum(h[2] == key[2] for h in holds) >= limits["per_calling_ae"],
            }
            expected = next((r for r, full in counts.items() if full), None)
            assert reason == expected
            if reason is None:
                holds.append(key)
        else:
            assert t.release(*key) is (key in holds)
            if key in holds:
                holds.remove(key)
        assert t.held() == len(holds)
    for key in list(holds):
        assert t.release(*key)
    assert t.held() == 0


# --------------------------------------------------------------------------- rate


def test_rate_off_admits_everything() -> None:
    t = tracker()
    assert all(t.admit("10.0.0.1") is None for _ in range(1000))
    assert t.tracked_sources == 0


def test_token_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    t = tracker(clock=clock, rate=2.0, burst=5)
    assert [t.admit("10.0.0.1") for _ in range(6)] == [None] * 5 + [LimitReason.RATE]
    assert t.admit("10.0.0.2") is None  # another source has its own bucket
    clock.advance(0.25)  # half a token
    assert t.admit("10.0.0.1") == LimitReason.RATE
    clock.advance(0.25)  # one token
    assert t.admit("10.0.0.1") is None
    assert t.admit("10.0.0.1") == LimitReason.RATE
    clock.advance(60)  # refills to the burst, not beyond
    assert [t.admit("10.0.0.1") for _ in range(6)] == [None] * 5 + [LimitReason.RATE]


def test_refusals_do_not_cost_tokens() -> None:
    clock = FakeClock()
    t = tracker(clock=clock, rate=1.0, burst=1)
    assert t.admit("10.0.0.1") is None
    for _ in range(100):
        clock.advance(0.001)
        assert t.admit("10.0.0.1") == LimitReason.RATE
    clock.advance(0.9)  # 1.0 s after the first connection in all
    assert t.admit("10.0.0.1") is None


@pytest.mark.parametrize(("rate", "burst"), [(0.5, 1.0), (1.0, 1.0), (2.5, 3.0), (10.0, 10.0)])
def test_default_burst_is_rate_rounded_up(rate: float, burst: float) -> None:
    assert Limits(rate=rate).bucket_size == burst
    clock = FakeClock()
    t = tracker(clock=clock, rate=rate)
    admitted = 0
    while t.admit("10.0.0.1") is None:
        admitted += 1
    assert admitted == int(burst)


def test_slow_rate_refill() -> None:
    clock = FakeClock()
    t = tracker(clock=clock, rate=0.1, burst=1)  # one connection per 10 s
    assert t.admit("10.0.0.1") is None
    clock.advance(9.9)
    assert t.admit("10.0.0.1") == LimitReason.RATE
    clock.advance(0.1)
    assert t.admit("10.0.0.1") is None


def test_clock_going_backwards_does_not_mint_tokens() -> None:
    clock = FakeClock()
    t = tracker(clock=clock, rate=1.0, burst=1)
    assert t.admit("10.0.0.1") is None
    clock.advance(-100)
    assert t.admit("10.0.0.1") == LimitReason.RATE


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    t = tracker(rate=1.0, burst=2)
    assert t.admit("2001:db8::1") is None
    assert t.admit("2001:db8::2") is None
    assert t.admit("2001:db8::3") == LimitReason.RATE
    assert t.admit("2001:db8:0:1::1") is None


# --------------------------------------------------------------------------- bounded memory


def test_buckets_are_bounded_under_a_spray_of_sources() -> None:
    clock = FakeClock()
    t = tracker(clock=clock, rate=1.0, burst=3, max_tracked_sources=100)
    for i in range(20_000):
        t.admit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert t.tracked_sources <= 100
    assert t.tracked_sources == 100


def test_idle_full_buckets_are_dropped() -> None:
    clock = FakeClock()
    t = tracker(clock=clock, rate=1.0, burst=2)
    for i in range(50):
        t.admit(f"10.0.0.{i}")
    assert t.tracked_sources == 50
    clock.advance(5)  # every bucket has refilled: they carry no information any more
    for _ in range(20):
        t.admit("10.0.1.1")  # each call sweeps a few of the idlest
    assert t.tracked_sources == 1


def test_busy_sources_keep_their_bucket_while_idle_ones_go() -> None:
    clock = FakeClock()
    t = tracker(clock=clock, rate=1.0, burst=2, max_tracked_sources=100)
    assert t.admit("10.9.9.9") is None
    assert t.admit("10.9.9.9") is None
    assert t.admit("10.9.9.9") == LimitReason.RATE  # empty bucket
    for i in range(500):  # a spray of other sources pushes out the least recently seen
        t.admit(f"10.0.{i // 256}.{i % 256}")
        if i % 50 == 0:
            assert t.admit("10.9.9.9") == LimitReason.RATE  # recently seen: still limited
    assert t.tracked_sources <= 100


def test_reconfigure_rate_off_frees_buckets_and_caps_tokens() -> None:
    clock = FakeClock()
    t = tracker(clock=clock, rate=1.0, burst=10)
    t.admit("10.0.0.1")
    t.reconfigure(Limits(rate=1.0, burst=2))
    assert [t.admit("10.0.0.1") for _ in range(3)] == [None, None, LimitReason.RATE]
    t.reconfigure(Limits(rate=None))
    assert t.tracked_sources == 0
    t.reconfigure(Limits(rate=1.0, max_tracked_sources=100))
    assert t.admit("10.0.0.1") is None


def test_associate_cap() -> None:
    assert Limits().associate_cap(262144) == 262144
    assert Limits(max_associate_rq_size=65536).associate_cap(262144) == 65536
    assert Limits(max_associate_rq_size=1 << 20).associate_cap(262144) == 262144


def test_reason_labels_are_bounded_and_stable() -> None:
    assert LIMIT_REASONS == ("global", "listener", "source", "calling_ae", "rate")
    assert str(LimitReason.CALLING_AE) == "calling_ae"


# --------------------------------------------------------------------------- proxy.yaml

BASE = """\
listeners:
  - name: modalities
    address: 127.0.0.1:0
upstreams:
  pacs: {{address: "127.0.0.1:11112"}}
default_upstream: pacs
{limits}"""


def test_config_without_limits() -> None:
    config = load_text(BASE.format(limits=""))
    assert config.limits == Limits()
    assert not config.limits.any_count


def test_config_all_limits() -> None:
    config = load_text(BASE.format(limits="""\
limits:
  max_associations: 200
  per_listener: 150
  per_source: 20
  per_calling_ae: 10
  rate: 2.5
  burst: 10
  max_associate_rq_size: 65536
  ipv6_prefix: 56
  max_tracked_sources: 5000
"""))
    assert config.limits == Limits(
        max_associations=200, per_listener=150, per_source=20, per_calling_ae=10, rate=2.5, burst=10,
        max_associate_rq_size=65536, ipv6_prefix=56, max_tracked_sources=5000,
    )
    assert config.limits.any_count
    assert config.warnings == ()


def test_config_empty_limits_mapping() -> None:
    assert load_text(BASE.format(limits="limits: {}\n")).limits == Limits()


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        ("limits:\n  max_associations: 0\n", "8:21", "'max_associations' in 'limits' must be between 1 and 1000000"),
        ("limits:\n  per_source: -3\n", "8:15", "'per_source' in 'limits' must be between 1"),
        ("limits:\n  per_listener: 2.5\n", "8:17", "must be an integer"),
        ("limits:\n  per_calling_ae: \"10\"\n", "8:19", "must be an integer"),
        ("limits:\n  rate: 0\n", "8:9", "'rate' in 'limits' (connections per second from one source) must be greater"),
        ("limits:\n  rate: .inf\n", "8:9", "must be a finite number"),
        ("limits:\n  rate: 1\n  burst: 0\n", "9:10", "'burst' in 'limits' must be between 1"),
        ("limits:\n  burst: 5\n", "8:3", "'burst' in 'limits' needs 'rate'"),
        ("limits:\n  max_associate_rq_size: 100\n", "8:26", "must be between 4096 and 16777216"),
        ("limits:\n  ipv6_prefix: 129\n", "8:16", "'ipv6_prefix' in 'limits' must be between 32 and 128"),
        ("limits:\n  max_tracked_sources: 5\n", "8:24", "must be between 100 and"),
        ("limits:\n  per_ae: 5\n", "8:3", "unknown key 'per_ae' in 'limits' (expected one of: 'max_associations'"),
        ("limits: 10\n", "7:9", "'limits' must be a mapping"),
        ("limits:\n", "7:8", "'limits' must be a mapping"),
    ],
)
def test_config_limit_errors(body: str, where: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        load_text(BASE.format(limits=body))
    rendered = [str(e) for e in info.value.errors]
    assert any(e.startswith(f"proxy.yaml:{where}: error: ") and message in e for e in rendered), rendered


def test_config_limit_warnings() -> None:
    config = load_text(BASE.format(limits="""\
max_associate_length: 65536
limits:
  max_associations: 10
  per_source: 20
  max_associate_rq_size: 131072
"""))
    assert any("'per_source' (20) is above 'max_associations' (10)" in w for w in config.warnings)
    assert any("'max_associate_rq_size' (131072) is above 'max_associate_length' (65536)" in w
               for w in config.warnings)
    assert config.limits.associate_cap(config.max_associate_length) == 65536


# --------------------------------------------------------------------------- the real proxy

REPO_ROOT = Path(__file__).resolve().parent.parent




def _associate(port: int, calling: str) -> tuple[int, bytes, socket.socket]:
    """Send an A-ASSOCIATE-RQ; (PDU type, body, the open socket) of the answer."""
    from tests.peers import associate_rq_bytes, read_pdu

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq_bytes(called="PACS", calling=calling))
    pdu_type, body = read_pdu(sock)
    return pdu_type, body, sock


def _release(sock: socket.socket) -> None:
    from tests.peers import read_pdu

    with sock:
        sock.sendall(bytes.fromhex("05000000000400000000"))
        assert read_pdu(sock)[0] == 0x06


LIMIT_RJ = bytes([0, 2, 3, 2])  # reserved, result 2 transient, source 3 presentation, reason 2 local limit


def test_proxy_enforces_limits(tmp_path: Path) -> None:
    """`dicom-proxy run` with `limits:`: per_calling_ae held then released, then (after a SIGHUP
    that swaps in a rate limit) the per-source token bucket; refusals are A-ASSOCIATE-RJ 2/3/2."""
    from pynetdicom import AE

    from tests.peers import LOOPBACK, Peer, free_port, require_module, wait_for_line

    require_module("pynetdicom")
    scp = AE(ae_title="PACS")
    scp.require_called_aet = False
    scp.add_supported_context("1.2.840.10008.1.1")
    upstream = free_port()
    server = scp.start_server((LOOPBACK, upstream), block=False)
    assert server is not None
    port = free_port()
    config = tmp_path / "proxy.yaml"
    base = (f"listeners: [{{name: modalities, address: '{LOOPBACK}:{port}'}}]\n"
            f"upstreams: {{pacs: {{address: '{LOOPBACK}:{upstream}'}}}}\ndefault_upstream: pacs\n")
    config.write_text(base + "limits: {per_calling_ae: 1, max_associations: 5}\n")
    proxy = Peer("proxy", [sys.executable, "-m", "proxy", "run", "-c", str(config)], tmp_path / "proxy.log",
                 cwd=REPO_ROOT).start()
    try:
        wait_for_line(proxy, r"listening on", 15)
        first, _, held = _associate(port, "CT1")
        assert first == 0x02
        refused, body, sock = _associate(port, "CT1")
        sock.close()
        assert (refused, body) == (0x03, LIMIT_RJ)
        wait_for_line(proxy, r"2/3/2.*calling_ae", 10)
        other, _, sock = _associate(port, "CT2")
        assert other == 0x02
        _release(sock)
        _release(held)
        wait_until_ok = time.monotonic() + 5
        while True:  # the slot comes back once the proxy has closed both legs of the first one
            again, _, sock = _associate(port, "CT1")
            if again == 0x02 or time.monotonic() > wait_until_ok:
                break
            sock.close()
            time.sleep(0.05)
        assert again == 0x02
        _release(sock)

        config.write_text(base + "limits: {rate: 0.01, burst: 2}\n")
        since = proxy.log_size()
        proxy.signal(signal.SIGHUP)
        wait_for_line(proxy, r"configuration reloaded", 10, since=since)
        answers = []
        for _ in range(3):
            pdu_type, body, sock = _associate(port, "US1")
            answers.append((pdu_type, body if pdu_type == 0x03 else b""))
            if pdu_type == 0x02:
                _release(sock)
            else:
                sock.close()
        assert answers == [(0x02, b""), (0x02, b""), (0x03, LIMIT_RJ)]
        wait_for_line(proxy, r"2/3/2.*rate", 10)
    finally:
        assert proxy.stop(15) == 0, proxy.log_text()
        server.shutdown()


@pytest.mark.parametrize(
    ("limits", "callers", "reason"),
    [
        ("max_associations: 2", ["CT1", "CT2", "CT3"], "global"),
        ("per_listener: 2", ["CT1", "CT2", "CT3"], "listener"),
        ("per_source: 2", ["CT1", "CT2", "CT3"], "source"),
        ("per_calling_ae: 2", ["CT1", "CT1", "CT1"], "calling_ae"),
    ],
)
def test_the_next_association_over_a_count_limit_gets_2_3_2(
    tmp_path: Path, limits: str, callers: list[str], reason: str
) -> None:
    """The first N associations are held open and work; the N+1th is refused 2/3/2 with the reason."""
    from pynetdicom import AE

    from tests.peers import LOOPBACK, Peer, free_port, wait_for_line, wait_until

    scp = AE(ae_title="PACS")
    scp.require_called_aet = False
    scp.add_supported_context("1.2.840.10008.1.1")
    upstream = free_port()
    server = scp.start_server((LOOPBACK, upstream), block=False)
    port = free_port()
    metrics_port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"listeners: [{{name: modalities, address: '{LOOPBACK}:{port}'}}]\n"
        f"upstreams: {{pacs: {{address: '{LOOPBACK}:{upstream}'}}}}\ndefault_upstream: pacs\n"
        f"limits: {{{limits}}}\n"
        f"metrics: {{address: '{LOOPBACK}:{metrics_port}'}}\n"
    )
    proxy = Peer("proxy", [sys.executable, "-m", "proxy", "run", "-c", str(config)], tmp_path / "proxy.log",
                 cwd=REPO_ROOT).start()
    try:
        wait_for_line(proxy, r"listening on", 15)
        held = []
        for calling in callers[:2]:
            answer, _, sock = _associate(port, calling)
            assert answer == 0x02
            held.append(sock)
        refused, body, sock = _associate(port, callers[2])
        sock.close()
        assert (refused, body) == (0x03, LIMIT_RJ)
        wait_for_line(proxy, rf"2/3/2.*limit '{reason}'", 10)
        for sock in held:  # the first N complete normally
            _release(sock)
        import urllib.request

        series = f'dicomproxy_limit_rejections_total{{listener="modalities",reason="{reason}"}} 1.0'
        wait_until(lambda: series in urllib.request.urlopen(
            f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=5).read().decode(), 10, series)
    finally:
        assert proxy.stop(15) == 0, proxy.log_text()
        server.shutdown()
