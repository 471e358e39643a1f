"""User identity injected by the running proxy, verified by a real pynetdicom TLS SCP's EVT_USER_ID
handler (JWT signature and claims with the public key; username and passcode), and the 0x59 the
modality sees when it sent no 0x58."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from tests.conftest import Pki, ProxyFactory
from tests.identity_keys import decode_and_check, keys, private_pem, write
from tests.peers import LOOPBACK, associate_rq_bytes, free_port, read_pdu, tls_server_context

RULES = """\
version: 1
default: reject
rules:
  - name: ct-with-jwt
    match: {calling_ae: CT01}
    action: accept
    identity: pacs-jwt
  - name: mr-with-passcode
    match: {calling_ae: MR01}
    action: accept
    identity: mr-login
"""


class Checker:
    """The archive's EVT_USER_ID handler: accepts only what really verifies."""

    def __init__(self, jwt_key: Any, passcode: bytes) -> None:
        self.jwt_key = jwt_key
        self.passcode = passcode
        self.seen: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def __call__(self, event: Any) -> tuple[bool, bytes | None]:
        kind, primary, secondary = event.user_id_type, event.primary_field, event.secondary_field
        ok = False
        if kind == 5:
            try:
                _header, claims = decode_and_check(primary, self.jwt_key)
                ok = claims["aud"] == "PACS" and claims["sub"] == "CT01" and claims["exp"] > time.time()
            except Exception:
                ok = False
        elif kind == 2:
            ok = primary == b"mr-tech" and secondary == self.passcode
        with self.lock:
            self.seen.append((kind, "ok" if ok else "refused"))
        # a JWT the proxy asked a positive response for gets one (pynetdicom sends it as 0x59)
        return ok, (b"archive-says-ok" if ok and kind == 5 else None)


@pytest.fixture
def identity_archive(dev_certs: Pki) -> Iterator[tuple[int, Checker]]:
    checker = Checker(keys().ec, b"correct horse battery")
    ae = AE(ae_title="PACS")
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    port = free_port()
    ctx = tls_server_context(dev_certs.archive_cert, dev_certs.archive_key, dev_certs.ca)
    server = ae.start_server((LOOPBACK, port), block=False, ssl_context=ctx, evt_handlers=[(evt.EVT_USER_ID, checker)])
    try:
        yield port, checker
    finally:
        server.shutdown()


def _proxy(tmp_path: Path, proxy_factory: ProxyFactory, port: int, passcode: bytes) -> Any:
    jwt_key = write(tmp_path / "jwt-es256.pem", private_pem(keys().ec))
    passcode_file = write(tmp_path / "mr.pass", passcode + b"\n")
    (tmp_path / "site.yaml").write_text(RULES)
    identities = {
        "pacs-jwt": {"type": "jwt", "key": str(jwt_key), "algorithm": "ES256", "issuer": "dicom-proxy",
                     "audience": "PACS", "subject": "{calling_ae}", "ttl": 300,
                     "positive_response": True},
        "mr-login": {"type": "username_passcode", "username": "mr-tech", "passcode_file": str(passcode_file)},
    }
    return proxy_factory(port, extra={"identities": identities, "rules": [str(tmp_path / "site.yaml")]})


def _echo(port: int, calling: str) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate(LOOPBACK, port, ae_title="PACS")


def test_injected_identities_verify_at_the_archive(
    tmp_path: Path, identity_archive: tuple[int, Checker], proxy_factory: ProxyFactory
) -> None:
    port, checker = identity_archive
    proxy = _proxy(tmp_path, proxy_factory, port, b"correct horse battery")
    for calling in ("CT01", "MR01"):
        assoc = _echo(proxy.port, calling)
        assert assoc.is_established, calling
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    assert checker.seen == [(5, "ok"), (2, "ok")]
    log = proxy.log_text()
    assert "user identity pacs-jwt (type 5" in log
    assert "correct horse battery" not in log
    token_start = b"eyJ"  # base64url of '{"' : no token in the log
    assert token_start.decode() not in log


def test_wrong_passcode_is_rejected_by_the_archive_and_the_rj_reaches_the_modality(
    tmp_path: Path, identity_archive: tuple[int, Checker], proxy_factory: ProxyFactory
) -> None:
    port, checker = identity_archive
    proxy = _proxy(tmp_path, proxy_factory, port, b"wrong passcode")
    assoc = _echo(proxy.port, "MR01")
    assert assoc.is_rejected
    assert checker.seen == [(2, "refused")]
    proxy.wait_for_log(r"the archive rejected the association \(RJ \d/\d/\d\); relayed unchanged")


def test_no_0x59_reaches_a_modality_that_sent_no_0x58(
    tmp_path: Path, identity_archive: tuple[int, Checker], proxy_factory: ProxyFactory
) -> None:
    """The proxy asked for a positive response and the archive sent a 0x59; the modality sent no
    0x58, so the AC it receives must carry no 0x59 (PS3.7 D.3.3.7)."""
    port, checker = identity_archive
    proxy = _proxy(tmp_path, proxy_factory, port, b"correct horse battery")
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
        sock.sendall(associate_rq_bytes(called="PACS", calling="CT01"))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x02
        # walk the AC's items down to the user information sub-items: no 0x59 among them
        offset = 68
        subitems: list[int] = []
        while offset < len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, offset)
            if item_type == 0x50:
                inner = offset + 4
                while inner < offset + 4 + length:
                    sub_type, _, sub_length = struct.unpack_from(">BBH", body, inner)
                    subitems.append(sub_type)
                    inner += 4 + sub_length
            offset += 4 + length
        assert 0x51 in subitems
        assert 0x59 not in subitems
    assert checker.seen == [(5, "ok")]
    proxy.wait_for_log(r"user identity pacs-jwt \(type 5")
