"""One object larger than 1 GiB through the proxy: it must stream, not buffer.

storescu (plaintext) -> proxy -> storescp +tls +B, which writes the object to disk as it arrives.
The proxy's resident memory is sampled every 50 ms during the transfer.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ProxyFactory, Storescp
from tests.data import dataset_sha256, pixel_data_sha256, read_part10, write_big_file, write_ct_files
from tests.peers import LOOPBACK, dcmtk_env, missing, require_dcmtk, run_tool

MiB = 1 << 20
GiB = 1 << 30
RSS_GROWTH_LIMIT = 64 * MiB


class RssSampler(threading.Thread):
    """Peak RSS of one process, sampled every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5)
        return max(self.samples)


def _storescu(port: int, files: list[Path], log: Path, timeout: float) -> str:
    argv = [require_dcmtk("storescu"), "-v", "-aet", "MODALITY01", "-aec", "ARCHIVE", LOOPBACK, str(port)]
    code, output = run_tool([*argv, *map(str, files)], log, timeout=timeout, env=dcmtk_env())
    assert code == 0, f"storescu failed with {code}:\n{output[-3000:]}"
    return output


def _remove_big_files(sent: Path, received_dir: Path) -> None:
    """pytest keeps the last temporary directories: do not leave 2 GiB behind."""
    sent.unlink(missing_ok=True)
    for path in received_dir.iterdir():
        if path.stat().st_size > 100 * MiB:
            path.unlink()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_one_gibibyte_object_streams_through_the_proxy(
    request: pytest.FixtureRequest, tmp_path: Path, storescp_tls: Storescp, proxy_factory: ProxyFactory
) -> None:
    if shutil.disk_usage(tmp_path).free < 3 * GiB:
        missing("3 GiB of free disk space in the temporary directory")
    big = write_big_file(tmp_path / "send" / "big.dcm", min_bytes=GiB)
    assert big.pixel_length >= GiB

    request.addfinalizer(lambda: _remove_big_files(big.path, storescp_tls.out_dir))

    proxy = proxy_factory(storescp_tls.port)
    # warm up: one small association, so imports, TLS and buffers are part of the baseline
    warmup = write_ct_files(tmp_path / "warmup", 2)
    _storescu(proxy.port, warmup, tmp_path / "storescu-warmup.log", timeout=60)
    baseline = psutil.Process(proxy.pid).memory_info().rss

    sampler = RssSampler(proxy.pid)
    sampler.start()
    started = time.monotonic()
    try:
        output = _storescu(proxy.port, [big.path], tmp_path / "storescu-big.log", timeout=900)
    finally:
        peak = sampler.stop()
    elapsed = time.monotonic() - started

    assert "Received Store Response (Success)" in output
    received = [p for p in storescp_tls.received_files() if read_part10(p).sop_instance == big.sop_instance_uid]
    assert len(received) == 1, "the big object did not arrive"
    assert pixel_data_sha256(received[0]) == (big.pixel_length, big.pixel_sha256)
    assert dataset_sha256(received[0]) == big.dataset_sha256

    print(
        f"\nbig object: {big.pixel_length / MiB:.0f} MiB in {elapsed:.1f}s, proxy RSS baseline "
        f"{baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, {len(sampler.samples)} samples"
    )
    assert len(sampler.samples) >= 10, f"only {len(sampler.samples)} RSS samples in {elapsed:.1f}s"
    growth = peak - baseline
    assert growth < RSS_GROWTH_LIMIT, (
        f"proxy RSS grew by {growth / MiB:.1f} MiB (baseline {baseline / MiB:.1f} MiB, "
        f"peak {peak / MiB:.1f} MiB) while relaying {big.pixel_length / MiB:.0f} MiB in {elapsed:.1f}s"
    )
