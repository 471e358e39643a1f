"""Every malformed PDU in golden.MALFORMED, sent to the running proxy as a client's first bytes,
gets the specified A-ABORT (or a close without a PDU), and the proxy then serves a normal
association. MALFORMED_PDATA is sent inside an established association: A-ABORT 2/6 to the
modality, and the archive is told with A-ABORT too."""

from __future__ import annotations

import socket
import struct

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests import golden
from tests.conftest import ProxyFactory
from tests.peers import LOOPBACK, PynetdicomArchive, associate_rq_bytes, read_pdu, read_until_closed, wait_until


def _echo_works(port: int) -> bool:
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title="ARCHIVE")
    if not assoc.is_established:
        return False
    ok = bool(assoc.send_c_echo().Status == 0x0000)
    assoc.release()
    return ok


def _abort(source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)


def test_malformed_first_pdus_get_the_right_abort(
    pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(pynetdicom_tls_scp.port)
    wrong: list[str] = []
    assert len(golden.MALFORMED) >= 20
    for case in golden.MALFORMED:
        with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
            sock.sendall(case.raw)
            # a half-close tells the proxy nothing more is coming (the "incomplete" cases)
            sock.shutdown(socket.SHUT_WR)
            answer = read_until_closed(sock)
        expected = b"" if case.source is None else _abort(case.source, case.reason or 0)
        if answer != expected:
            wrong.append(f"{case.name}: expected {expected.hex()} got {answer.hex()}")
        elif not _echo_works(proxy.port):
            wrong.append(f"{case.name}: the proxy stopped serving afterwards")
    assert not wrong, "\n".join(wrong)
    assert proxy.peer.running()
    assert "Traceback" not in proxy.log_text()
    assert pynetdicom_tls_scp.echo_count == len(golden.MALFORMED)


@pytest.mark.parametrize("case", golden.MALFORMED_PDATA, ids=lambda c: c.name)
def test_malformed_pdata_in_an_association_is_aborted(
    pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory, case: golden.MalformedPData
) -> None:
    proxy = proxy_factory(pynetdicom_tls_scp.port)
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
        sock.sendall(associate_rq_bytes(called="ARCHIVE"))
        pdu_type, _body = read_pdu(sock)
        assert pdu_type == 0x02  # A-ASSOCIATE-AC
        sock.sendall(case.raw)
        assert read_until_closed(sock) == _abort(case.source, case.reason)
    proxy.wait_for_log(r"protocol error from the requestor")
    proxy.wait_for_log(r"aborted|A-ABORT")
    assert _echo_works(proxy.port)


def test_a_modality_that_vanishes_inside_a_cut_through_pdu(
    pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    """Bulk P-DATA is passed on as it arrives. When the modality disconnects half-way through such
    a PDU, the archive has half a PDU: an A-ABORT now would be read as P-DATA bytes, so the proxy
    closes the archive's connection instead (the archive sees the association end, nothing is
    stored), says so in the log, and serves the next association."""
    proxy = proxy_factory(pynetdicom_tls_scp.port)
    fragment = bytes(15000)
    pdv = struct.pack(">IBB", 2 + len(fragment), 1, 0x00) + fragment  # one data-set fragment
    pdu = struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
        sock.sendall(associate_rq_bytes(called="ARCHIVE"))
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(pdu[:7000])
        proxy.wait_for_log(r"association established")
    proxy.wait_for_log(r"a P-DATA-TF PDU is half-way to the acceptor; closing without an A-ABORT")
    wait_until(lambda: pynetdicom_tls_scp.aborts == 1, 10, "the archive to see its association end")
    assert pynetdicom_tls_scp.stored == {}
    assert _echo_works(proxy.port)
    assert "Traceback" not in proxy.log_text()
