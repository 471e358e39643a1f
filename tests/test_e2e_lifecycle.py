"""SIGTERM: stop accepting, let live associations finish, abort them at the deadline."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import ProxyFactory
from tests.data import write_ct_files
from tests.peers import LOOPBACK, PynetdicomArchive, require_module, wait_until


def _associate(port: int) -> object:
    ae = AE(ae_title="CT01")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOOPBACK, port, ae_title="ARCHIVE")
    assert assoc.is_established
    return assoc


def _refused(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_lets_a_live_association_finish(
    tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    require_module("pynetdicom")
    files = write_ct_files(tmp_path / "ct", 3)
    proxy = proxy_factory(pynetdicom_tls_scp.port, timeouts={"shutdown": 30})
    assoc = _associate(proxy.port)
    mark = proxy.log_size()
    proxy.peer.signal(signal.SIGTERM)
    proxy.wait_for_log(r"no longer accepting", since=mark)
    # new associations are turned away while the live one goes on
    wait_until(lambda: _refused(proxy.port), 5, "the listener to close")
    for path in files:
        status = assoc.send_c_store(dcmread(path))  # type: ignore[attr-defined]
        assert status.Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert proxy.peer.wait(15) == 0
    stored = pynetdicom_tls_scp.stored
    assert {dcmread(p).SOPInstanceUID for p in files} <= set(stored)
    assert "shutdown deadline reached" not in proxy.log_text()


def test_shutdown_deadline_aborts_associations_still_open(
    pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    require_module("pynetdicom")
    proxy = proxy_factory(pynetdicom_tls_scp.port, timeouts={"shutdown": 1})
    assoc = _associate(proxy.port)
    proxy.peer.signal(signal.SIGTERM)
    assert proxy.peer.wait(15) == 0
    wait_until(lambda: bool(assoc.is_aborted), 10, "the SCU to see A-ABORT")  # type: ignore[attr-defined]
    log = proxy.log_text()
    assert "shutdown deadline reached" in log
