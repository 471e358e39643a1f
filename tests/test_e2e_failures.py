"""Failures a site meets on day one, seen from the modality: the archive is down, the archive's
certificate is from a CA the proxy does not trust, and a TLS client talks to the plaintext
listener. Each must end the way PS3.8 says, quickly, with a log line an admin understands,
and must leave the proxy serving the next association."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from typing import Any

import pytest

from tests.conftest import Pki, ProxyFactory, StorescpFactory, UpstreamSpec
from tests.peers import (
    LOOPBACK,
    PynetdicomArchive,
    associate_rq_bytes,
    closed_port,
    read_pdu,
    read_until_closed,
    require_module,
    tls_server_context,
    wait_until,
)

require_module("pynetdicom")
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402

CALLING = "MODALITY01"
RJ_TRANSIENT_PRESENTATION_CONGESTION = (2, 3, 1)  # result, source, reason (PS3.8 9.3.4)
QUICK = 3.0  # seconds; well inside the 10 s connect timeout and the 30 s clients wait


def _associate(port: int, called: str = "ARCHIVE") -> tuple[Any, float]:
    ae = AE(ae_title=CALLING)
    ae.acse_timeout = 25
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate(LOOPBACK, port, ae_title=called)
    return assoc, time.monotonic() - started


def _assert_rejected_2_3_1(assoc: Any, elapsed: float) -> None:
    assert assoc.is_rejected, "expected A-ASSOCIATE-RJ"
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == RJ_TRANSIENT_PRESENTATION_CONGESTION
    assert elapsed < QUICK, f"the rejection took {elapsed:.2f}s"


def _echo(port: int, called: str = "ARCHIVE") -> int:
    assoc, _ = _associate(port, called)
    assert assoc.is_established, "the proxy did not establish a normal association"
    status = assoc.send_c_echo()
    assoc.release()
    assert status, "no C-ECHO response"
    return int(status.Status)


def test_archive_down_is_rejected_2_3_1_and_logged_as_refused(dev_certs: Pki, proxy_factory: ProxyFactory) -> None:
    port = closed_port()
    proxy = proxy_factory(port)

    mark = proxy.log_size()
    assoc, elapsed = _associate(proxy.port)
    _assert_rejected_2_3_1(assoc, elapsed)
    line = proxy.wait_for_log(r"(?i)refused", since=mark)
    assert str(port) in line.string, f"the log line does not name the archive's address: {line.string}"

    # the same on the wire, byte for byte: RJ then the proxy closes the connection
    with socket.create_connection((LOOPBACK, proxy.port), timeout=QUICK) as raw:
        raw.sendall(associate_rq_bytes())
        pdu_type, body = read_pdu(raw)
        assert (pdu_type, body) == (0x03, bytes([0, 2, 3, 1]))
        assert read_until_closed(raw) == b""

    # the archive comes up on that port: the very same proxy now relays
    ctx = tls_server_context(dev_certs.archive_cert, dev_certs.archive_key, dev_certs.ca)
    with PynetdicomArchive(ssl_context=ctx, port=port) as archive:
        assert _echo(proxy.port) == 0x0000
        assert archive.echo_count == 1


# storescp sends its CA along with its certificate (OpenSSL builds the chain from the store that
# +cf fills), so the proxy sees X509 error 19 "self-signed certificate in certificate chain";
# a Python archive sends the leaf alone, giving error 20 "unable to get local issuer certificate".
UNTRUSTED_CA_WORDS = {"storescp": r"(?i)unknown CA", "pynetdicom": r"(?i)unknown CA"}


@pytest.mark.parametrize("stranger_kind", ["storescp", "pynetdicom"])
def test_archive_certificate_from_unknown_ca(
    stranger_kind: str,
    request: pytest.FixtureRequest,
    dev_certs: Pki,
    other_ca_certs: Pki,
    storescp_tls_factory: StorescpFactory,
    pynetdicom_tls_scp: PynetdicomArchive,
    proxy_factory: ProxyFactory,
) -> None:
    # an archive whose certificate the proxy must not trust
    if stranger_kind == "storescp":
        storescp = storescp_tls_factory(other_ca_certs)
        stranger_port = storescp.port

        def stranger_associations() -> int:
            return storescp.log_text().count("Association Received")

    else:
        ctx = tls_server_context(other_ca_certs.archive_cert, other_ca_certs.archive_key, dev_certs.ca)
        stranger = PynetdicomArchive(ssl_context=ctx).start()
        request.addfinalizer(stranger.stop)
        stranger_port = stranger.port

        def stranger_associations() -> int:
            return len(stranger.associations)

    proxy = proxy_factory(
        {"pacs": UpstreamSpec(stranger_port, dev_certs), "good": UpstreamSpec(pynetdicom_tls_scp.port, dev_certs)},
        routes={"GOOD": "good"},
    )

    mark = proxy.log_size()
    assoc, elapsed = _associate(proxy.port)
    _assert_rejected_2_3_1(assoc, elapsed)
    proxy.wait_for_log(UNTRUSTED_CA_WORDS[stranger_kind], since=mark)
    assert stranger_associations() == 0, "DICOM reached an untrusted archive"

    assert _echo(proxy.port, called="GOOD") == 0x0000
    assert pynetdicom_tls_scp.echo_count == 1


def _client_hello() -> bytes:
    """The first flight of a real TLS client (Python's ssl), without any network."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100
    return hello


def test_tls_client_on_plaintext_listener_is_closed_and_named(
    pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(pynetdicom_tls_scp.port)
    mark = proxy.log_size()
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, proxy.port), timeout=QUICK) as raw:
        raw.sendall(_client_hello())
        answer = read_until_closed(raw)  # socket timeout -> the test fails if the proxy keeps it open
    assert time.monotonic() - started < QUICK
    assert answer == b"", f"expected the connection to be closed without an answer, got {answer[:16]!r}"

    line = proxy.wait_for_log(r"\bTLS\b", since=mark)
    new_log = proxy.log_text(since=mark)
    assert "too large" not in new_log.lower(), f"a ClientHello is not an oversized PDU: {line.string}"
    assert pynetdicom_tls_scp.associations == [], "nothing may reach the archive"

    assert _echo(proxy.port) == 0x0000


def test_an_idle_association_is_aborted_on_both_sides_and_a_busy_one_is_not(
    pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    """timeouts.idle: no PDU either way for that long -> A-ABORT to the modality and the archive.
    An association that keeps talking (a C-ECHO every 0.3 s for 2 idle timeouts) stays up."""
    proxy = proxy_factory(pynetdicom_tls_scp.port, timeouts={"idle": 1})
    busy, _ = _associate(proxy.port)
    assert busy.is_established
    deadline = time.monotonic() + 2.2
    while time.monotonic() < deadline:
        assert busy.send_c_echo().Status == 0
        time.sleep(0.3)  # the traffic pattern under test, not a wait for a condition
    assert busy.is_established
    busy.release()

    mark = proxy.log_size()
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as raw:
        raw.sendall(associate_rq_bytes(called="ARCHIVE", calling=CALLING))
        assert read_pdu(raw)[0] == 0x02  # A-ASSOCIATE-AC
        started = time.monotonic()
        pdu_type, body = read_pdu(raw)  # then silence until the proxy gives up
        waited = time.monotonic() - started
    assert pdu_type == 0x07, f"expected A-ABORT, got PDU type 0x{pdu_type:02X}"
    assert body[2:4] == bytes([2, 0])  # source 2 (service provider), reason 0
    assert 0.9 <= waited < 3.0, f"aborted after {waited:.2f} s with idle: 1"
    proxy.wait_for_log(r"idle for \d+ s; aborting both sides", since=mark)
    wait_until(lambda: pynetdicom_tls_scp.aborts == 1, 10, "the archive to see the A-ABORT")


def test_an_upstream_named_by_host_name_is_resolved_and_each_address_tried(
    pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory, dev_certs: Pki
) -> None:
    """`address: localhost:PORT` goes through the resolver (an address literal does not); where
    localhost also resolves to ::1, that address is refused and the next one is used."""
    upstream = {"address": f"localhost:{pynetdicom_tls_scp.port}",
                "tls": {"ca": str(dev_certs.ca), "cert": str(dev_certs.proxy_cert), "key": str(dev_certs.proxy_key)}}
    proxy = proxy_factory(pynetdicom_tls_scp.port, extra={"upstreams": {"pacs": upstream}})
    assert _echo(proxy.port) == 0x0000
    assert pynetdicom_tls_scp.echo_count == 1
