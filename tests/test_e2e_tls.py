"""TLS both ways through the running proxy, with real dcmtk and pynetdicom peers.

TLS listeners with mutual TLS and bind_ae, TLS -> plaintext upstreams, archive certificates that
are expired or for the wrong host, certificate rotation on SIGHUP, plaintext DICOM on a TLS port.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from proxy import certs
from tests.conftest import Pki, ProxyFactory, Storescp, StorescpFactory, UpstreamSpec
from tests.data import dataset_sha256, write_ct_files
from tests.peers import (
    LOOPBACK,
    Peer,
    PynetdicomArchive,
    dcmtk_env,
    free_port,
    require_dcmtk,
    run_tool,
    tls_client_context,
    wait_for_listen,
)


def _mutual(pki: Pki, **more: Any) -> dict[str, Any]:
    return {
        "cert": str(pki.proxy_cert),
        "key": str(pki.proxy_key),
        "client_ca": str(pki.ca),
        "require_client_cert": True,
        **more,
    }


def _storescu_tls(
    tmp_path: Path, port: int, files: list[Path], key: Path, cert: Path, ca: Path, *, aet: str = "MODALITY01"
) -> tuple[int, str]:
    argv = [
        require_dcmtk("storescu"), "-v", "-aet", aet, "-aec", "ARCHIVE",
        "+tls", str(key), str(cert), "+cf", str(ca),
        LOOPBACK, str(port), *map(str, files),
    ]  # fmt: skip
    return run_tool(argv, tmp_path / f"storescu-{aet}-{port}.log", timeout=60, env=dcmtk_env())


def test_storescu_tls_with_a_good_client_certificate_stores(
    tmp_path: Path, dev_certs: Pki, storescp_tls: Storescp, proxy_factory: ProxyFactory
) -> None:
    files = write_ct_files(tmp_path / "ct", 3)
    proxy = proxy_factory(storescp_tls.port, listener_tls=_mutual(dev_certs))
    code, out = _storescu_tls(
        tmp_path, proxy.port, files, dev_certs.modality_key, dev_certs.modality_cert, dev_certs.ca
    )
    assert code == 0, out
    received = storescp_tls.received_files()
    assert sorted(dataset_sha256(p) for p in received) == sorted(dataset_sha256(p) for p in files)
    assert "listener modalities, TLS, profile bcp195-nd" in proxy.log_text()


@pytest.mark.parametrize("client", ["none", "other-ca"])
def test_listener_refuses_clients_without_a_trusted_certificate(
    tmp_path: Path,
    dev_certs: Pki,
    other_ca_certs: Pki,
    storescp_tls: Storescp,
    proxy_factory: ProxyFactory,
    client: str,
) -> None:
    files = write_ct_files(tmp_path / "ct", 1)
    proxy = proxy_factory(storescp_tls.port, listener_tls=_mutual(dev_certs))
    storescu = require_dcmtk("storescu")
    if client == "none":
        # +tla: TLS without a client certificate
        argv = [storescu, "-aec", "ARCHIVE", "+tla", "+cf", str(dev_certs.ca), LOOPBACK, str(proxy.port), str(files[0])]
        code, out = run_tool(argv, tmp_path / "storescu-anon.log", timeout=60, env=dcmtk_env())
        expected = r"no client certificate|did not send a certificate|client certificate"
    else:
        code, out = _storescu_tls(
            tmp_path, proxy.port, files, other_ca_certs.modality_key, other_ca_certs.modality_cert, dev_certs.ca
        )
        expected = r"unknown CA|not trusted|unknown ca"
    assert code != 0, out
    proxy.wait_for_log(r"TLS handshake on listener modalities failed: .*(" + expected + ")")
    assert storescp_tls.received_files() == []


def test_bind_ae_rejects_a_foreign_calling_ae(
    tmp_path: Path, dev_certs: Pki, storescp_tls: Storescp, proxy_factory: ProxyFactory
) -> None:
    files = write_ct_files(tmp_path / "ct", 1)
    listener = _mutual(dev_certs, bind_ae={"MODALITY01": ["CT01"]})
    proxy = proxy_factory(storescp_tls.port, listener_tls=listener)
    ok, out = _storescu_tls(
        tmp_path, proxy.port, files, dev_certs.modality_key, dev_certs.modality_cert, dev_certs.ca, aet="CT01"
    )
    assert ok == 0, out
    code, out = _storescu_tls(
        tmp_path, proxy.port, files, dev_certs.modality_key, dev_certs.modality_cert, dev_certs.ca, aet="MR09"
    )
    assert code != 0
    assert "Calling AE Title Not Recognized" in out or "calling-AE-title-not-recognized" in out.lower(), out
    proxy.wait_for_log(r"rejected \(RJ 1/1/3\): calling AE title 'MR09' is not bound to certificate CN='MODALITY01'")
    assert len(storescp_tls.received_files()) == 1


def test_tls_client_reaches_a_plaintext_archive(
    tmp_path: Path, dev_certs: Pki, proxy_factory: ProxyFactory
) -> None:
    """TLS -> plain: storescu +tls to the proxy, plaintext storescp behind it."""
    storescp = require_dcmtk("storescp")
    out_dir = tmp_path / "plain-archive"
    out_dir.mkdir()
    port = free_port()
    archive = Peer("storescp-plain", [storescp, "+B", "-od", str(out_dir), str(port)], tmp_path / "scp.log",
                   env=dcmtk_env()).start()
    try:
        wait_for_listen(archive, port)
        files = write_ct_files(tmp_path / "ct", 2)
        proxy = proxy_factory(UpstreamSpec(port, None), listener_tls=_mutual(dev_certs))
        code, out = _storescu_tls(
            tmp_path, proxy.port, files, dev_certs.modality_key, dev_certs.modality_cert, dev_certs.ca
        )
        assert code == 0, out
        assert sorted(dataset_sha256(p) for p in out_dir.iterdir()) == sorted(dataset_sha256(p) for p in files)
        assert "is plaintext" in proxy.log_text()
    finally:
        archive.stop()


def test_plaintext_dicom_on_a_tls_listener_is_named(
    tmp_path: Path, dev_certs: Pki, storescp_tls: Storescp, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(storescp_tls.port, listener_tls=_mutual(dev_certs))
    ae = AE(ae_title="PLAIN01")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    assert not assoc.is_established
    proxy.wait_for_log(r"plain(text)? DICOM.*TLS listener|TLS listener.*plain(text)? DICOM")


@pytest.mark.parametrize("problem", ["expired", "wrong-host"])
def test_bad_archive_certificates_give_transient_reject(
    tmp_path: Path, dev_certs: Pki, storescp_tls_factory: StorescpFactory, proxy_factory: ProxyFactory, problem: str
) -> None:
    bad = tmp_path / "bad"
    if problem == "expired":
        cert, key = certs.issue(dev_certs.directory, bad, "localhost", ["localhost", "IP:127.0.0.1"],
                                client=False, days=-1, name="archive")
        words = r"expired"
    else:
        cert, key = certs.issue(dev_certs.directory, bad, "elsewhere.example", ["elsewhere.example"],
                                client=False, days=5, name="archive")
        words = r"does not match|hostname"
    pki = Pki(bad, dev_certs.ca, dev_certs.ca_key, cert, key, dev_certs.proxy_cert, dev_certs.proxy_key,
              dev_certs.modality_cert, dev_certs.modality_key)
    archive = storescp_tls_factory(pki)
    proxy = proxy_factory(archive.port)
    ae = AE(ae_title="CT01")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 1)
    proxy.wait_for_log(r"TLS to upstream pacs .* failed: .*(" + words + ")")


def test_certificate_rotation_on_sighup_keeps_live_associations(
    tmp_path: Path, dev_certs: Pki, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    rotated = tmp_path / "rotated"
    cert, key = certs.issue(dev_certs.directory, rotated, "localhost", ["localhost", "IP:127.0.0.1"],
                            client=False, days=20, name="listener")
    live_cert = tmp_path / "listener.pem"
    live_key = tmp_path / "listener.key"
    live_cert.write_bytes(dev_certs.proxy_cert.read_bytes())
    live_key.write_bytes(dev_certs.proxy_key.read_bytes())
    live_key.chmod(0o600)
    listener = {"cert": str(live_cert), "key": str(live_key), "client_ca": str(dev_certs.ca)}
    proxy = proxy_factory(pynetdicom_tls_scp.port, listener_tls=listener)
    files = write_ct_files(tmp_path / "ct", 2)

    def client() -> Any:
        ae = AE(ae_title="MODALITY01")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        ctx = tls_client_context(dev_certs.ca, dev_certs.modality_cert, dev_certs.modality_key)
        assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE", tls_args=(ctx, "localhost"))
        assert assoc.is_established
        return assoc

    def served_serial() -> int:
        import ssl

        ctx = tls_client_context(dev_certs.ca, dev_certs.modality_cert, dev_certs.modality_key)
        with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as raw, ctx.wrap_socket(
            raw, server_hostname="localhost"
        ) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
        from cryptography import x509

        assert isinstance(ctx, ssl.SSLContext)
        return x509.load_der_x509_certificate(der).serial_number

    from cryptography import x509

    old_serial = x509.load_pem_x509_certificate(dev_certs.proxy_cert.read_bytes()).serial_number
    new_serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    assert served_serial() == old_serial
    live = client()
    assert live.send_c_store(dcmread(files[0])).Status == 0
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    mark = proxy.log_size()
    proxy.peer.signal(signal.SIGHUP)
    proxy.wait_for_log(r"configuration reloaded", since=mark)
    # the live association goes on after the reload; new connections get the new certificate
    assert live.send_c_store(dcmread(files[1])).Status == 0
    live.release()
    assert served_serial() == new_serial
    assert {dcmread(p).SOPInstanceUID for p in files} <= set(pynetdicom_tls_scp.stored)


def test_cmove_sub_operations_from_a_tls_archive_reach_a_plaintext_workstation(
    tmp_path: Path,
    dev_certs: Pki,
    pynetdicom_tls_scp: PynetdicomArchive,
    move_destination: Any,
    proxy_factory: ProxyFactory,
) -> None:
    """The workstation asks through proxy A (plain -> TLS); the TLS-only archive opens its C-STORE
    sub-association to proxy B's TLS listener (mutual TLS), which relays it to the plaintext
    workstation."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    files = write_ct_files(tmp_path / "ct", 3, study_uid="1.2.826.0.1.3680043.8.498.1")
    inbound = proxy_factory(UpstreamSpec(move_destination.port, None), listener_tls=_mutual(dev_certs))
    archive_ctx = tls_client_context(dev_certs.ca, dev_certs.archive_cert, dev_certs.archive_key)
    pynetdicom_tls_scp.retrievable = files
    pynetdicom_tls_scp.move_destinations = {
        "WS1": (LOOPBACK, inbound.port, {"tls_args": (archive_ctx, "localhost")})  # type: ignore[dict-item]
    }
    outbound = proxy_factory(pynetdicom_tls_scp.port)
    ae = AE(ae_title="WS1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(LOOPBACK, outbound.port, ae_title="ARCHIVE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    responses = assoc.send_c_move(query, "WS1", StudyRootQueryRetrieveInformationModelMove)
    statuses = [status.Status for status, _ in responses]
    assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    received = move_destination.sink.wait_for_count(3, timeout=30)
    assert set(received) == {dcmread(p).SOPInstanceUID for p in files}
    inbound.wait_for_log(r"association established via pacs")
    assert "listener modalities, TLS" in inbound.log_text()


def test_tls_in_and_out_carries_a_large_object_and_many_small_ones_byte_for_byte(
    tmp_path: Path, dev_certs: Pki, storescp_tls: Storescp, proxy_factory: ProxyFactory
) -> None:
    """storescu +tls -> mutual-TLS listener -> storescp +tls: both legs on the SSLSocket transport,
    bulk PDUs cut through, backpressure both ways; what arrives is what was sent."""
    from tests.data import write_big_file

    big = write_big_file(tmp_path / "big.dcm", min_bytes=64 << 20)
    files = [big.path, *write_ct_files(tmp_path / "ct", 20)]
    proxy = proxy_factory(storescp_tls.port, listener_tls=_mutual(dev_certs))
    argv = [
        require_dcmtk("storescu"), "-aet", "MODALITY01", "-aec", "ARCHIVE", "-pdu", "131072",
        "+tls", str(dev_certs.modality_key), str(dev_certs.modality_cert), "+cf", str(dev_certs.ca),
        LOOPBACK, str(proxy.port), *map(str, files),
    ]  # fmt: skip
    code, out = run_tool(argv, tmp_path / "storescu-big.log", timeout=180, env=dcmtk_env())
    assert code == 0, out[-2000:]
    received = storescp_tls.received_files()
    assert sorted(dataset_sha256(p) for p in received) == sorted(dataset_sha256(p) for p in files)
