"""dcmtk end to end: plaintext storescu/echoscu -> proxy -> TLS-only storescp (client cert required).

The data set bytes storescp writes (``+B``, bit preserving) must equal the data set bytes of the
files we sent; a direct storescu +tls -> storescp run proves the comparison holds without the proxy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Pki, ProxyFactory, Storescp, StorescpFactory
from tests.data import dataset_sha256, read_part10, write_ct_files
from tests.peers import LOOPBACK, dcmtk_env, require_dcmtk, run_tool

CALLING = "MODALITY01"


def _fingerprints(paths: list[Path]) -> dict[str, tuple[str, str, str]]:
    """SOP Instance UID -> (SOP Class UID, transfer syntax, SHA-256 of the data set bytes)."""
    out = {}
    for path in paths:
        info = read_part10(path)
        out[info.sop_instance] = (info.sop_class, info.transfer_syntax, dataset_sha256(path))
    assert len(out) == len(paths), "SOP Instance UIDs are not unique"
    return out


def _storescu(port: int, files: list[Path], log: Path, *, tls: Pki | None = None, timeout: float = 120) -> str:
    argv = [require_dcmtk("storescu"), "-v", "-aet", CALLING, "-aec", "ARCHIVE"]
    if tls is not None:
        argv += ["+tls", str(tls.proxy_key), str(tls.proxy_cert), "+cf", str(tls.ca)]
    argv += [LOOPBACK, str(port), *map(str, files)]
    code, output = run_tool(argv, log, timeout=timeout, env=dcmtk_env())
    assert code == 0, f"storescu failed with {code}:\n{output[-3000:]}"
    return output


def test_direct_tls_baseline_is_byte_identical(tmp_path: Path, dev_certs: Pki, storescp_tls: Storescp) -> None:
    """Control: without the proxy, storescu +tls -> storescp +tls +B keeps the data set bytes."""
    files = write_ct_files(tmp_path / "send", 5)
    _storescu(storescp_tls.port, files, tmp_path / "storescu.log", tls=dev_certs)
    assert _fingerprints(storescp_tls.received_files()) == _fingerprints(files)


def test_echoscu_through_proxy(tmp_path: Path, storescp_tls: Storescp, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(storescp_tls.port)
    argv = [require_dcmtk("echoscu"), "-v", "-aet", CALLING, "-aec", "ARCHIVE", LOOPBACK, str(proxy.port)]
    code, output = run_tool(argv, tmp_path / "echoscu.log", timeout=60, env=dcmtk_env())
    assert code == 0, output
    assert "Received Echo Response (Success)" in output
    # the archive itself answered, over TLS, to the calling AE of the modality
    archive_log = storescp_tls.log_text()
    assert "Received Echo Request" in archive_log
    assert "Association Received" in archive_log
    assert proxy.stop() == 0


def test_200_files_in_one_association(
    tmp_path: Path, storescp_tls: Storescp, proxy_factory: ProxyFactory
) -> None:
    files = write_ct_files(tmp_path / "send", 200, seed=200)
    proxy = proxy_factory(storescp_tls.port)
    output = _storescu(proxy.port, files, tmp_path / "storescu.log")
    assert output.count("Requesting Association") == 1
    assert output.count("Received Store Response (Success)") == 200
    received = storescp_tls.received_files()
    assert len(received) == 200
    assert _fingerprints(received) == _fingerprints(files)
    assert storescp_tls.log_text().count("Association Received") == 1


def test_50_files_in_50_associations(
    tmp_path: Path, storescp_tls: Storescp, proxy_factory: ProxyFactory
) -> None:
    files = write_ct_files(tmp_path / "send", 50, seed=50)
    proxy = proxy_factory(storescp_tls.port)
    for index, path in enumerate(files):
        _storescu(proxy.port, [path], tmp_path / f"storescu{index:02d}.log", timeout=60)
    received = storescp_tls.received_files()
    assert len(received) == 50
    assert _fingerprints(received) == _fingerprints(files)
    assert storescp_tls.log_text().count("Association Received") == 50


@pytest.mark.parametrize("max_pdu", ["4096", "131072"])
def test_pdu_sizes_at_both_ends_of_dcmtk_range(
    tmp_path: Path, storescp_tls_factory: StorescpFactory, proxy_factory: ProxyFactory, max_pdu: str
) -> None:
    """Small and large PDUs (storescp's receive limit, which storescu obeys) relay intact."""
    archive = storescp_tls_factory(extra_args=("-pdu", max_pdu))
    files = write_ct_files(tmp_path / "send", 10, seed=int(max_pdu))
    proxy = proxy_factory(archive.port)
    _storescu(proxy.port, files, tmp_path / "storescu.log")
    assert _fingerprints(archive.received_files()) == _fingerprints(files)
