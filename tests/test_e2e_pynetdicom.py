"""pynetdicom end to end: plaintext SCU -> proxy -> pynetdicom TLS archive (client cert required).

C-ECHO, C-STORE, C-FIND, C-GET (sub-operations on the same association, SCP/SCU role selection)
and C-MOVE (sub-operations on a separate, direct association to a plaintext destination).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import Pki, ProxyFactory
from tests.data import dataset_bytes, make_find_identifiers, read_part10, write_ct_files
from tests.peers import LOOPBACK, PynetdicomArchive, PynetdicomStorageSCP, require_module, tls_client_context

require_module("pynetdicom")
from pynetdicom import AE, build_role, evt  # noqa: E402
from pynetdicom.association import Association  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

CALLING = "MODALITY01"
FIND_KEYS = (
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)


def _scu() -> Any:
    ae = AE(ae_title=CALLING)
    ae.acse_timeout = 20
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


class _Collector:
    def __init__(self) -> None:
        self.datasets: dict[str, bytes] = {}
        self.transfer_syntaxes: set[str] = set()

    def on_store(self, event: Any) -> int:
        self.datasets[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        self.transfer_syntaxes.add(str(event.context.transfer_syntax))
        return 0x0000


def _associate(port: int, *, collector: _Collector | None = None, tls: Pki | None = None) -> Association:
    kwargs: dict[str, Any] = {"ae_title": "ARCHIVE"}
    if collector is not None:
        kwargs["ext_neg"] = [build_role(CTImageStorage, scp_role=True)]
        kwargs["evt_handlers"] = [(evt.EVT_C_STORE, collector.on_store)]
    if tls is not None:
        kwargs["tls_args"] = (tls_client_context(tls.ca, tls.proxy_cert, tls.proxy_key), "localhost")
    assoc: Association = _scu().associate(LOOPBACK, port, **kwargs)
    assert assoc.is_established, "association through the proxy was not established"
    return assoc


STUDY_UID = "1.2.826.0.1.3680043.10.1499.7.1"


@pytest.fixture
def archive_files(tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive) -> list[Path]:
    """20 images of one study in the archive, plus 3 of another study that must not be retrieved."""
    files = write_ct_files(tmp_path / "archive-files", 20, seed=7, study_uid=STUDY_UID)
    others = write_ct_files(tmp_path / "other-study", 3, seed=8, study_uid=STUDY_UID + ".2")
    pynetdicom_tls_scp.retrievable = files + others
    return files


def _study_query() -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY_UID
    return query


@pytest.fixture
def via_proxy(pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory) -> Iterator[int]:
    yield proxy_factory(pynetdicom_tls_scp.port).port


def _get_study(assoc: Association) -> list[tuple[int, Dataset]]:
    """(status code, status data set) of every C-GET response for the test study."""
    out = []
    for status, _ in assoc.send_c_get(_study_query(), StudyRootQueryRetrieveInformationModelGet):
        assert status, "C-GET: no response (timeout or abort)"
        out.append((int(status.Status), status))
    return out


def test_c_echo(pynetdicom_tls_scp: PynetdicomArchive, via_proxy: int) -> None:
    assoc = _associate(via_proxy)
    status = assoc.send_c_echo()
    assoc.release()
    assert status and status.Status == 0x0000
    assert pynetdicom_tls_scp.echo_count == 1
    assert pynetdicom_tls_scp.associations == [CALLING]
    assert assoc.is_released


def test_c_store(tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, via_proxy: int) -> None:
    from pydicom import dcmread

    files = write_ct_files(tmp_path / "send", 10, seed=11)
    assoc = _associate(via_proxy)
    for path in files:
        status = assoc.send_c_store(dcmread(path))
        assert status and status.Status == 0x0000
    assoc.release()
    stored = pynetdicom_tls_scp.sink.wait_for_count(10, 10)
    for path in files:
        info = read_part10(path)
        assert stored[info.sop_instance].dataset == dataset_bytes(path)
        assert stored[info.sop_instance].transfer_syntax == ExplicitVRLittleEndian


def test_c_find_identifiers_arrive_intact(pynetdicom_tls_scp: PynetdicomArchive, via_proxy: int) -> None:
    identifiers = make_find_identifiers(60)
    pynetdicom_tls_scp.find_identifiers = list(identifiers)
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 100"
    query.QueryRetrieveLevel = "STUDY"
    for keyword in FIND_KEYS:
        setattr(query, keyword, "")
    query.PatientID = "FIND*"

    def values(ds: Dataset) -> tuple[str, ...]:
        return tuple(str(ds.get(k)) for k in FIND_KEYS)

    assoc = _associate(via_proxy)
    statuses = []
    answers = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        assert status, "C-FIND: no response (timeout or abort)"
        statuses.append(int(status.Status))
        if identifier is not None:
            answers.append(values(identifier))

    query.PatientID = "FIND00007"
    single = [ident for _, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    assoc.release()

    assert statuses == [0xFF00] * 60 + [0x0000]
    assert answers == [values(ds) for ds in identifiers]  # same values, same order
    assert "M\u00fcller^J\u00fcrgen007" in {a[0] for a in answers}
    assert len(single) == 2 and single[1] is None
    assert single[0] is not None and values(single[0]) == values(identifiers[7])


def test_direct_c_get_baseline(
    dev_certs: Pki, pynetdicom_tls_scp: PynetdicomArchive, archive_files: list[Path]
) -> None:
    """Control: straight to the archive over TLS, C-GET returns the files' data set bytes."""
    collector = _Collector()
    assoc = _associate(pynetdicom_tls_scp.port, collector=collector, tls=dev_certs)
    responses = _get_study(assoc)
    assoc.release()
    assert responses[-1][0] == 0x0000
    assert collector.datasets == {read_part10(p).sop_instance: dataset_bytes(p) for p in archive_files}


def test_c_get_objects_arrive_byte_identical(archive_files: list[Path], via_proxy: int) -> None:
    collector = _Collector()
    assoc = _associate(via_proxy, collector=collector)
    responses = _get_study(assoc)
    assoc.release()

    codes = [code for code, _ in responses]
    assert codes == [0xFF00] * 20 + [0x0000]
    final = responses[-1][1]
    assert final.NumberOfCompletedSuboperations == 20
    assert final.NumberOfFailedSuboperations == 0
    assert final.NumberOfWarningSuboperations == 0
    assert collector.transfer_syntaxes == {ExplicitVRLittleEndian}
    assert collector.datasets == {read_part10(p).sop_instance: dataset_bytes(p) for p in archive_files}


def test_c_move_reaches_destination(
    pynetdicom_tls_scp: PynetdicomArchive,
    archive_files: list[Path],
    move_destination: PynetdicomStorageSCP,
    via_proxy: int,
) -> None:
    pynetdicom_tls_scp.move_destinations["MOVEDEST"] = (LOOPBACK, move_destination.port)
    query = _study_query()

    assoc = _associate(via_proxy)
    responses = []
    for status, _ in assoc.send_c_move(query, "MOVEDEST", StudyRootQueryRetrieveInformationModelMove):
        assert status, "C-MOVE: no response (timeout or abort)"
        responses.append(status)
    unknown = [
        int(s.Status) for s, _ in assoc.send_c_move(query, "NOWHERE", StudyRootQueryRetrieveInformationModelMove)
    ]
    assoc.release()

    assert [int(s.Status) for s in responses] == [0xFF00] * 20 + [0x0000]
    remaining = [int(s.NumberOfRemainingSuboperations) for s in responses[:-1]]
    assert remaining == list(range(19, -1, -1))
    final = responses[-1]
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (20, 0)
    assert final.NumberOfWarningSuboperations == 0
    assert unknown == [0xA801]  # move destination unknown, relayed as the archive said it

    arrived = move_destination.sink.wait_for_count(20, 10)
    assert {uid: r.dataset for uid, r in arrived.items()} == {
        read_part10(p).sop_instance: dataset_bytes(p) for p in archive_files
    }
    assert {r.calling_ae for r in arrived.values()} == {"ARCHIVE"}
    assert {r.transfer_syntax for r in arrived.values()} == {ExplicitVRLittleEndian}


def test_demo_command(tmp_path: Path) -> None:
    """`dicom-proxy demo` runs the whole chain and reports every object as arrived intact."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "requires client certificates" in out.stdout
    table = [line for line in out.stdout.splitlines() if line.startswith("    ") and "0x0000" in line]
    assert len(table) >= 5
    assert all(line.rstrip().endswith("yes") for line in table)
    assert "proxy exited with status 0" in out.stdout
    assert len(list((tmp_path / "demo" / "archive").glob("*.dcm"))) == len(table)
