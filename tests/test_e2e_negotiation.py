"""Extended negotiation passes through the proxy untouched; Max Length is clamped both ways.

A pynetdicom SCU (plaintext) proposes an asynchronous operations window, SCP/SCU role
selection, SOP class extended and common extended negotiation and a user identity; a
pynetdicom TLS archive records what its A-ASSOCIATE-RQ really carried.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import Pki, ProxyFactory
from tests.peers import LOOPBACK, free_port, require_module, tls_server_context

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class SeenRequest:
    event: threading.Event = field(default_factory=threading.Event)
    requestor: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def recording_archive(dev_certs: Pki) -> Iterator[tuple[int, SeenRequest]]:
    require_module("pynetdicom")
    from pynetdicom import AE, evt

    seen = SeenRequest()

    def on_requested(event: Any) -> None:
        req = event.assoc.requestor
        seen.requestor = {
            "maximum_length": req.maximum_length,
            "async_ops": req.asynchronous_operations,
            "roles": {
                uid: (item.scu_role, item.scp_role)
                for uid, item in ((i.sop_class_uid, i) for i in req.role_selection.values())
            },
            "sop_class_extended": dict(req.sop_class_extended),
            "sop_class_common_extended": {
                uid: (str(item.service_class_uid), [str(u) for u in item.related_general_sop_class_identification])
                for uid, item in req.sop_class_common_extended.items()
            },
            "user_identity": (
                req.user_identity.user_identity_type,
                req.user_identity.primary_field,
                req.user_identity.secondary_field,
            )
            if req.user_identity
            else None,
            "implementation_class_uid": str(req.implementation_class_uid),
            "implementation_version_name": req.implementation_version_name,
        }
        seen.event.set()

    ae = AE(ae_title="ARCHIVE")
    ae.maximum_pdu_size = 16382
    ae.add_supported_context(VERIFICATION)
    ae.add_supported_context(CT_IMAGE_STORAGE, scu_role=True, scp_role=True)
    ae.add_supported_context(MR_IMAGE_STORAGE)
    port = free_port()
    ctx = tls_server_context(dev_certs.archive_cert, dev_certs.archive_key, dev_certs.ca)
    server = ae.start_server(
        (LOOPBACK, port), block=False, ssl_context=ctx, evt_handlers=[(evt.EVT_REQUESTED, on_requested)]
    )
    try:
        yield port, seen
    finally:
        server.shutdown()


def _scu_ext_neg() -> list[Any]:
    from pynetdicom.pdu_primitives import (
        AsynchronousOperationsWindowNegotiation,
        SCP_SCU_RoleSelectionNegotiation,
        SOPClassCommonExtendedNegotiation,
        SOPClassExtendedNegotiation,
        UserIdentityNegotiation,
    )

    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 3
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT_IMAGE_STORAGE
    role.scu_role = True
    role.scp_role = True
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = MR_IMAGE_STORAGE
    ext.service_class_application_information = b"\x01\x00\x01\x00"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = CT_IMAGE_STORAGE
    common.service_class_uid = "1.2.840.10008.4.2"
    common.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"tech01"
    identity.secondary_field = b"s3cret-passcode"
    return [window, role, ext, common, identity]


@pytest.mark.parametrize(("scu_max", "expect_upstream"), [(0, 262144), (4096, 4096), (1_000_000, 262144)])
def test_negotiation_items_pass_through_and_max_length_is_clamped(
    recording_archive: tuple[int, SeenRequest], proxy_factory: ProxyFactory, scu_max: int, expect_upstream: int
) -> None:
    from pynetdicom import AE

    port, seen = recording_archive
    proxy = proxy_factory(port, extra={"max_pdu_length": 262144})
    ae = AE(ae_title="CT01")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT_IMAGE_STORAGE)
    ae.add_requested_context(MR_IMAGE_STORAGE)
    assoc = ae.associate(LOOPBACK, proxy.port, ae_title="ARCHIVE", ext_neg=_scu_ext_neg(), max_pdu=scu_max)
    try:
        assert assoc.is_established
        assert seen.event.wait(10)
        got = seen.requestor
        assert got["maximum_length"] == expect_upstream
        assert got["async_ops"] == (5, 3)
        assert got["roles"] == {CT_IMAGE_STORAGE: (True, True)}
        assert got["sop_class_extended"] == {MR_IMAGE_STORAGE: b"\x01\x00\x01\x00"}
        assert got["sop_class_common_extended"] == {
            CT_IMAGE_STORAGE: ("1.2.840.10008.4.2", ["1.2.840.10008.5.1.4.1.1.2.1"])
        }
        assert got["user_identity"] == (2, b"tech01", b"s3cret-passcode")
        assert got["implementation_class_uid"] == str(ae.implementation_class_uid)
        # the archive receives at most 16382 per PDU, so that is what the modality is told
        assert assoc.acceptor.maximum_length == 16382
        # the acceptor's role selection answer reaches the modality
        assert CT_IMAGE_STORAGE in assoc.acceptor.role_selection
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert "s3cret-passcode" not in proxy.log_text()
