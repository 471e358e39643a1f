"""Association and DIMSE rules in the running proxy, against real dcmtk and pynetdicom peers."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import Pki, ProxyFactory, RunningProxy
from tests.data import make_find_identifiers, write_ct_files
from tests.peers import (
    LOOPBACK,
    PynetdicomArchive,
    PynetdicomStorageSCP,
    dcmtk_env,
    require_dcmtk,
    run_tool,
)

RULES = """\
version: 1
default: reject
sets:
  modalities: {type: ae_title, elements: [CT01, "MR*"]}
rules:
  - name: retired-scanner
    match: {calling_ae: CT_OLD}
    action: reject
  - name: ct-stores-only
    match: {calling_ae: CT01}
    action: accept
    contexts: {allow: [storage]}
  - name: workstations
    match: {calling_ae: "WS*"}
    action: accept
  - name: moves-only-to-workstations
    on: dimse
    match: {command: C-MOVE, move_destination: "!WS*"}
    action: refuse
  - name: ws-no-push
    on: dimse
    match: {calling_ae: "WS*", command: C-STORE}
    action: refuse
"""


def _proxy_with_rules(factory: ProxyFactory, tmp_path: Path, archive_port: int, text: str = RULES) -> RunningProxy:
    rules = tmp_path / "site.yaml"
    rules.write_text(text)
    return factory(archive_port, extra={"rules": [str(rules)]})


def _storescu(tmp_path: Path, port: int, aet: str, files: list[Path]) -> tuple[int, str]:
    argv = [require_dcmtk("storescu"), "-v", "-aet", aet, "-aec", "ARCHIVE", LOOPBACK, str(port), *map(str, files)]
    return run_tool(argv, tmp_path / f"storescu-{aet}.log", timeout=60, env=dcmtk_env())


def test_allowed_ae_stores_and_denied_ae_gets_the_specific_reject(
    tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy_with_rules(proxy_factory, tmp_path, pynetdicom_tls_scp.port)
    files = write_ct_files(tmp_path / "ct", 2)
    code, out = _storescu(tmp_path, proxy.port, "CT01", files)
    assert code == 0, out
    assert {dcmread(p).SOPInstanceUID for p in files} <= set(pynetdicom_tls_scp.stored)
    code, out = _storescu(tmp_path, proxy.port, "CT_OLD", files)
    assert code != 0
    assert "Calling AE Title Not Recognized" in out, out
    code, out = _storescu(tmp_path, proxy.port, "STRANGER", files)
    assert code != 0
    assert "No Reason" in out or "no-reason" in out.lower(), out
    log = proxy.log_text()
    assert "rejected (RJ 1/1/3): rule retired-scanner" in log
    assert "rejected (RJ 1/1/1): rule default" in log
    assert "accepted by rule ct-stores-only" in log
    assert pynetdicom_tls_scp.associations.count("CT01") == 1  # the rejected ones never reached it


def test_context_filtering_refuses_echo_while_storage_passes(
    tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy_with_rules(proxy_factory, tmp_path, pynetdicom_tls_scp.port)
    argv = [require_dcmtk("echoscu"), "-v", "-aet", "CT01", "-aec", "ARCHIVE", LOOPBACK, str(proxy.port)]
    code, out = run_tool(argv, tmp_path / "echoscu.log", timeout=60, env=dcmtk_env())
    assert code != 0
    assert "No Acceptable Presentation Contexts" in out, out
    assert pynetdicom_tls_scp.echo_count == 0
    # with pynetdicom, see the result byte of the AC: 1 = user-rejection, same context ID proposed
    ae = AE(ae_title="CT01")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    assert assoc.is_established
    results = {cx.abstract_syntax: (cx.context_id, cx.result) for cx in assoc.rejected_contexts}
    assert results[Verification][1] == 1
    assert results[Verification][0] == 1  # the first proposed context keeps its ID
    files = write_ct_files(tmp_path / "ct", 1)
    assert assoc.send_c_store(dcmread(files[0])).Status == 0x0000
    assoc.release()
    code, out = _storescu(tmp_path, proxy.port, "CT01", write_ct_files(tmp_path / "ct2", 1, seed=9))
    assert code == 0, out


def test_findscu_allowed_and_movescu_to_a_forbidden_destination_refused(
    tmp_path: Path,
    pynetdicom_tls_scp: PynetdicomArchive,
    move_destination: PynetdicomStorageSCP,
    proxy_factory: ProxyFactory,
) -> None:
    identifiers = make_find_identifiers(5)
    pynetdicom_tls_scp.find_identifiers = list(identifiers)
    files = write_ct_files(tmp_path / "ct", 2, study_uid=str(identifiers[0].StudyInstanceUID))
    pynetdicom_tls_scp.retrievable = files
    pynetdicom_tls_scp.move_destinations = {"WS_DEST": (LOOPBACK, move_destination.port), "EVIL": (LOOPBACK, 9)}
    proxy = _proxy_with_rules(proxy_factory, tmp_path, pynetdicom_tls_scp.port)

    findscu = [require_dcmtk("findscu"), "-v", "-S", "-aet", "WS1", "-aec", "ARCHIVE",
               "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=FIND*", "-k", "StudyInstanceUID",
               LOOPBACK, str(proxy.port)]  # fmt: skip
    code, out = run_tool(findscu, tmp_path / "findscu.log", timeout=60, env=dcmtk_env())
    assert code == 0, out
    assert out.count("Find Response:") >= 5, out

    def movescu(dest: str) -> tuple[int, str]:
        argv = [require_dcmtk("movescu"), "-v", "-S", "-aet", "WS1", "-aec", "ARCHIVE", "-aem", dest,
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={identifiers[0].StudyInstanceUID}",
                LOOPBACK, str(proxy.port)]  # fmt: skip
        return run_tool(argv, tmp_path / f"movescu-{dest}.log", timeout=60, env=dcmtk_env())

    code, out = movescu("EVIL")
    assert "Refused: MoveDestinationUnknown" in out, out
    proxy.wait_for_log(r"C-MOVE \(message \d+, destination 'EVIL'\) refused by rule moves-only-to-workstations "
                       r"with status 0xA801")
    assert move_destination.sink.snapshot() == {}
    code, out = movescu("WS_DEST")
    assert code == 0, out
    received = move_destination.sink.wait_for_count(2, timeout=30)
    assert {dcmread(p).SOPInstanceUID for p in files} == set(received)


def test_dimse_refusal_keeps_the_association_going(
    tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy_with_rules(proxy_factory, tmp_path, pynetdicom_tls_scp.port)
    files = write_ct_files(tmp_path / "ct", 1)
    ae = AE(ae_title="WS1")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    assert assoc.is_established
    status = assoc.send_c_store(dcmread(files[0]))
    assert status.Status == 0x0124  # Refused: Not authorized, made by the proxy
    assert assoc.send_c_echo().Status == 0x0000  # the association goes on
    assoc.release()
    assert pynetdicom_tls_scp.stored == {}
    assert pynetdicom_tls_scp.echo_count == 1


def test_reload_under_load_drops_nothing_and_new_associations_follow_new_rules(
    tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    proxy = _proxy_with_rules(proxy_factory, tmp_path, pynetdicom_tls_scp.port)
    files = write_ct_files(tmp_path / "ct", 20)
    live: list[Any] = []
    for index in range(20):
        ae = AE(ae_title="CT01")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
        assert assoc.is_established, index
        live.append(assoc)
    # the new rules no longer accept CT01
    (tmp_path / "site.yaml").write_text(RULES.replace("match: {calling_ae: CT01}", "match: {calling_ae: CT99}"))
    mark = proxy.log_size()
    proxy.peer.signal(signal.SIGHUP)
    proxy.wait_for_log(r"configuration reloaded", since=mark)
    statuses: list[int] = []
    lock = threading.Lock()

    def store(assoc: Any, path: Path) -> None:
        status = assoc.send_c_store(dcmread(path)).Status
        assoc.release()
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=store, args=(a, p)) for a, p in zip(live, files, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [0] * 20
    assert {dcmread(p).SOPInstanceUID for p in files} <= set(pynetdicom_tls_scp.stored)
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage)
    assert ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE").is_rejected
    # a broken rule file is reported and the running rules stay
    (tmp_path / "site.yaml").write_text(RULES + "  - name: broken\n    match: {calling_aet: X}\n    action: accept\n")
    mark = proxy.log_size()
    proxy.peer.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reload failed, keeping the running configuration", since=mark)
    assert "calling_aet" in proxy.log_text()[mark:]
    ae = AE(ae_title="CT99")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE")
    assert assoc.is_established
    assoc.release()


def test_explain_names_the_rule_and_why_earlier_ones_did_not_match(tmp_path: Path, dev_certs: Pki) -> None:
    (tmp_path / "site.yaml").write_text(RULES)
    config = tmp_path / "proxy.yaml"
    config.write_text(
        "listeners:\n  - {name: modalities, address: 127.0.0.1:11112}\n"
        "upstreams:\n  pacs: {address: 127.0.0.1:2762}\n"
        "default_upstream: pacs\nrules: [site.yaml]\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "explain", "-c", str(config), "--source", "10.1.2.3",
         "--calling-ae", "WS7", "--called-ae", "PACS", "--command", "C-MOVE", "--move-destination", "EVIL"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "workstations" in text
    assert "retired-scanner" in text and "CT_OLD" in text
    assert "moves-only-to-workstations" in text and "refuse" in text
