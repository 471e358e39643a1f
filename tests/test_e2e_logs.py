"""One structured line per association end: ids, names, outcome, bytes each way, DIMSE counts, duration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import ProxyFactory
from tests.data import write_ct_files
from tests.peers import LOOPBACK, PynetdicomArchive, wait_until


def _records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        entry = json.loads(line)  # every line is JSON: a parse error fails the test
        if "association" in entry:
            out.append(entry["association"])
    return out


def test_json_log_has_one_record_per_association(
    tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        pynetdicom_tls_scp.port,
        extra={"log_format": "json", "metrics": {"address": "127.0.0.1:0"}},
    )
    files = write_ct_files(tmp_path / "ct", 3)
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    assert assoc.is_established
    for path in files:
        assert assoc.send_c_store(dcmread(path)).Status == 0
    assoc.release()
    wait_until(lambda: len(_records(proxy.log_text())) == 1, 10, "the association-end record")
    (record,) = _records(proxy.log_text())
    assert record["outcome"] == "released"
    assert record["listener"] == "modalities"
    assert record["upstream"] == "pacs"
    assert (record["calling_ae"], record["called_ae"]) == ("CT01", "ARCHIVE")
    assert record["dimse"] == {"C-STORE": 3}
    # every object's data set crossed, plus commands and the association PDUs
    assert record["bytes_to_upstream"] > sum(p.stat().st_size for p in files) - 3 * 1024
    assert 0 < record["bytes_to_client"] < 4096
    assert record["duration_s"] >= 0
