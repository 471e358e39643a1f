"""User identity end to end, with real peers on 127.0.0.1 and the proxy as a subprocess.

1. Every identity type the proxy injects (username 1, username_passcode 2, kerberos 3, saml 4,
   jwt 5): dcmtk ``storescu`` (plaintext, sends no identity) -> proxy -> a pynetdicom TLS Storage SCP
   whose EVT_USER_ID handler really verifies the identity (user name, passcode, the JWT's ES256
   signature and claims, the SAML assertion's enveloped XML signature with signxml, the Kerberos
   token accepted with python-gssapi and the service keytab of a throwaway MIT KDC). The file
   arrives; with a wrong user name / passcode / key / service principal the archive refuses, storescu
   sees the A-ASSOCIATE-RJ and nothing is stored.
2. ``client_identity: {mode: verify}`` on the listener: a pynetdicom SCU's JWT is verified by the
   proxy, its subject reaches the rules as ``user_identity``; expired, wrongly signed or missing
   tokens get A-ASSOCIATE-RJ 1/2/1 and nothing reaches the archive.
3. Expensive identity work (scrypt) runs off the event loop: an association without identity work
   gets its A-ASSOCIATE-AC while an earlier one still waits for its passcode check.

Every test also searches the proxy's log (debug level) for the secrets that crossed it.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.identity import hash_passcode_line
from tests import kdc
from tests.conftest import Pki, ProxyFactory, RunningProxy
from tests.data import CT_IMAGE_STORAGE, make_ct_dataset
from tests.identity_keys import decode_and_check, keys, private_pem, public_pem, sign_token, write
from tests.peers import (
    LOOPBACK,
    PynetdicomArchive,
    associate_rq_bytes,
    dcmtk_env,
    free_port,
    read_pdu,
    require_dcmtk,
    require_module,
    run_tool,
    tls_server_context,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

CALLING = "CT01"
ARCHIVE_AE = "PACS"
PASSCODE = "correct horse battery staple"
WRONG_PASSCODE = "Tr0ub4dor&3-not-it"
OTHER_SERVICE = f"dicom/elsewhere@{kdc.REALM}"  # a real principal, but not the archive's
SAML_NS = {"saml": "urn:oasis:names:tc:SAML:2.0:assertion"}
KINDS = ("username", "username_passcode", "kerberos", "saml", "jwt")
TYPE_CODE = {"username": 1, "username_passcode": 2, "kerberos": 3, "saml": 4, "jwt": 5}
WHY_REFUSED = {  # what the archive's check says about the wrong variant: the intended failure, nothing else
    "username": "unexpected user name",
    "username_passcode": "wrong passcode",
    "kerberos": "GSSError",  # a ticket for OTHER_SERVICE: no key for it in the archive's keytab
    "saml": "InvalidSignature",
    "jwt": "InvalidSignature",
}

RULES = f"""\
version: 1
default: reject
rules:
  - name: ct-with-identity
    match: {{calling_ae: {CALLING}}}
    action: accept
    identity: archive-id
"""


# --------------------------------------------------------------------------- key material


def _self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cn: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Material:
    """Files the proxy reads (good and bad variants) and what the archive trusts."""

    jwt_key: Path  # ES256, the archive verifies with its public half
    jwt_wrong_key: Path  # another P-256 key
    saml_key: Path  # RSA; the archive trusts saml_cert only
    saml_cert: Path
    saml_wrong_key: Path  # another RSA key, with its own self-signed certificate of the same name
    saml_wrong_cert: Path
    passcode: Path
    wrong_passcode: Path
    rules: Path


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    d = tmp_path_factory.mktemp("identity-material")
    wrong_rsa = rsa.generate_private_key(65537, 2048)
    (d / "site.yaml").write_text(RULES)
    return Material(
        jwt_key=write(d / "jwt.pem", private_pem(keys().ec)),
        jwt_wrong_key=write(d / "jwt-wrong.pem", private_pem(keys().ec_other)),
        saml_key=write(d / "saml.pem", private_pem(keys().rsa)),
        saml_cert=write(d / "saml.crt", _self_signed(keys().rsa, "dicom-proxy saml"), 0o644),
        saml_wrong_key=write(d / "saml-wrong.pem", private_pem(wrong_rsa)),
        saml_wrong_cert=write(d / "saml-wrong.crt", _self_signed(wrong_rsa, "dicom-proxy saml"), 0o644),
        passcode=write(d / "ct.pass", PASSCODE + "\n"),
        wrong_passcode=write(d / "ct-wrong.pass", WRONG_PASSCODE + "\n"),
        rules=d / "site.yaml",
    )


@pytest.fixture(scope="module")
def kdc_realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kdc.Realm]:
    require_module("gssapi")
    with kdc.realm(tmp_path_factory.mktemp("krb5"), dict(os.environ)) as made:
        made.kadmin(f"addprinc -randkey {OTHER_SERVICE}")  # tickets for it exist; the archive cannot read them
        yield made


@pytest.fixture
def krb_env(kdc_realm: kdc.Realm, monkeypatch: pytest.MonkeyPatch) -> kdc.Realm:
    """The throwaway realm for this process (the archive's gssapi) and, through os.environ, for the
    proxy subprocess started afterwards (tests.peers.Peer passes env=None: the child inherits it)."""
    for name, value in kdc_realm.env.items():
        if name.startswith("KRB5"):
            monkeypatch.setenv(name, value)
    return kdc_realm


# --------------------------------------------------------------------------- the archive


@dataclass(frozen=True)
class Seen:
    """One identity as the archive's EVT_USER_ID handler got it."""

    type: int
    verified: bool
    why: str  # "ok", or what failed (no secret)
    primary: bytes = field(repr=False)
    secondary: bytes = field(repr=False)


Check = Callable[[bytes, bytes], bytes | None]
"""Verifies (primary, secondary); raises on failure; returns the server response (or None)."""


class IdentityStorageArchive:
    """A pynetdicom TLS Storage SCP (CT Image Storage, client certificate required) that accepts an
    association only when `checks[type]` verifies its user identity."""

    def __init__(self, ssl_context: Any, checks: Mapping[int, Check], store_dir: Path) -> None:
        self.ssl_context = ssl_context
        self.checks = checks
        self.store_dir = store_dir
        self.port = free_port()
        self.seen: list[Seen] = []
        self.stored: dict[str, bytes] = {}  # SOP Instance UID -> data set as sent
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> IdentityStorageArchive:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        ae = AE(ae_title=ARCHIVE_AE)
        ae.require_called_aet = False
        ae.add_supported_context(CT_IMAGE_STORAGE, ALL_TRANSFER_SYNTAXES)
        handlers: list[Any] = [(evt.EVT_USER_ID, self._on_user_id), (evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server((LOOPBACK, self.port), block=False, ssl_context=self.ssl_context,
                                       evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_user_id(self, event: Any) -> tuple[bool, bytes | None]:
        kind = int(event.user_id_type)
        primary, secondary = bytes(event.primary_field), bytes(event.secondary_field or b"")
        check = self.checks.get(kind)
        response: bytes | None = None
        try:
            if check is None:
                raise AssertionError(f"no check for type {kind}")
            response = check(primary, secondary)
            ok, why = True, "ok"
        except Exception as exc:  # every failure is a refusal, as in a real archive
            ok, why = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        with self._lock:
            self.seen.append(Seen(kind, ok, why, primary, secondary))
        return ok, (response if ok else None)

    def _on_store(self, event: Any) -> int:
        data = event.encoded_dataset(include_meta=False)
        uid = str(event.request.AffectedSOPInstanceUID)
        (self.store_dir / f"{uid}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
        with self._lock:
            self.stored[uid] = data
        return 0x0000

    def verdicts(self) -> list[tuple[int, bool]]:
        with self._lock:
            return [(s.type, s.verified) for s in self.seen]


ArchiveFactory = Callable[[Mapping[int, Check]], IdentityStorageArchive]


def _check_username(primary: bytes, secondary: bytes) -> None:
    assert primary == f"{CALLING}-op".encode(), "unexpected user name"  # template "{calling_ae}-op"
    assert secondary == b""


def _check_passcode(primary: bytes, secondary: bytes) -> None:
    assert primary == b"ct-tech", "unexpected user name"  # ae_map CT01 -> ct-tech
    assert secondary == PASSCODE.encode(), "wrong passcode"


def _check_jwt(primary: bytes, secondary: bytes) -> bytes:
    header, claims = decode_and_check(primary, keys().ec)  # raises InvalidSignature for another key
    now = time.time()
    assert header["alg"] == "ES256"
    assert claims["iss"] == "dicom-proxy" and claims["aud"] == ARCHIVE_AE and claims["sub"] == CALLING
    assert claims["nbf"] <= now + 5 and now < claims["exp"] <= now + 125, "exp/nbf"
    assert claims["jti"]
    assert secondary == b""
    return b"archive-accepts-the-jwt"


def _saml_check(trusted_cert: bytes) -> Check:
    def check(primary: bytes, secondary: bytes) -> None:
        from signxml.verifier import VerifyResult, XMLVerifier

        result = XMLVerifier().verify(primary, x509_cert=trusted_cert.decode("ascii"), id_attribute="ID")
        assert isinstance(result, VerifyResult)
        signed = result.signed_xml  # only what the signature covers is trusted ("see what is signed")
        assert signed is not None
        assert signed.tag == f"{{{SAML_NS['saml']}}}Assertion"
        assert signed.findtext("saml:Issuer", namespaces=SAML_NS) == "dicom-proxy"
        assert signed.findtext("saml:Subject/saml:NameID", namespaces=SAML_NS) == CALLING
        audiences = signed.findall("saml:Conditions/saml:AudienceRestriction/saml:Audience", namespaces=SAML_NS)
        assert [a.text for a in audiences] == [ARCHIVE_AE]
        conditions = signed.find("saml:Conditions", namespaces=SAML_NS)
        until = dt.datetime.strptime(conditions.get("NotOnOrAfter"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        assert until > dt.datetime.now(dt.UTC), "the assertion has expired"
        assert secondary == b""

    return check


def _kerberos_check(realm: kdc.Realm) -> Check:
    def check(primary: bytes, secondary: bytes) -> bytes:
        import gssapi

        name = gssapi.Name(kdc.SERVICE, gssapi.NameType.kerberos_principal)
        creds = gssapi.Credentials(name=name, usage="accept", store={"keytab": str(realm.service_keytab)})
        context = gssapi.SecurityContext(creds=creds, usage="accept")
        response = context.step(primary)
        # step() may not raise for a bad token: only a complete context names a trusted initiator
        assert context.complete, "the security context is not complete"
        assert str(context.initiator_name) == kdc.CLIENT, "unexpected initiator"
        assert secondary == b""
        return bytes(response or b"")

    return check


def _checks(kind: str, material: Material, realm: kdc.Realm | None) -> dict[int, Check]:
    """The archive knows how to verify only the type under test (anything else is refused)."""
    if kind == "username":
        return {1: _check_username}
    if kind == "username_passcode":
        return {2: _check_passcode}
    if kind == "jwt":
        return {5: _check_jwt}
    if kind == "saml":
        return {4: _saml_check(material.saml_cert.read_bytes())}
    assert realm is not None
    return {3: _kerberos_check(realm)}


def _profile(kind: str, good: bool, material: Material, realm: kdc.Realm | None) -> dict[str, Any]:
    """The proxy's identity profile `archive-id`; `good=False` is the same profile with a wrong user
    name, passcode, signing key or service principal."""
    if kind == "username":
        return {"type": "username", "username": "{calling_ae}-op" if good else "{called_ae}-op"}
    if kind == "username_passcode":
        return {"type": "username_passcode", "username": "{calling_ae}", "ae_map": {CALLING: "ct-tech"},
                "passcode_file": str(material.passcode if good else material.wrong_passcode)}
    if kind == "jwt":
        return {"type": "jwt", "key": str(material.jwt_key if good else material.jwt_wrong_key),
                "algorithm": "ES256", "issuer": "dicom-proxy", "audience": ARCHIVE_AE, "subject": "{calling_ae}",
                "ttl": 120, "positive_response": True}
    if kind == "saml":
        return {"type": "saml", "key": str(material.saml_key if good else material.saml_wrong_key),
                "cert": str(material.saml_cert if good else material.saml_wrong_cert), "issuer": "dicom-proxy",
                "audience": ARCHIVE_AE, "subject": "{calling_ae}", "ttl": 120}
    assert realm is not None
    return {"type": "kerberos", "service": kdc.SERVICE if good else OTHER_SERVICE,
            "keytab": str(realm.client_keytab), "principal": kdc.CLIENT, "positive_response": True}


# --------------------------------------------------------------------------- helpers


def _fragments(secret: bytes) -> list[str]:
    """Ways a secret could show up in a text log: as text, hex, base64 or a bytes repr, from slices
    at its start, middle and end (short enough to catch a truncated dump)."""
    out: list[str] = []
    size = min(20, len(secret))
    if size < 8:
        return [secret.decode("latin-1")] if secret else []
    for start in {0, (len(secret) - size) // 2, len(secret) - size}:
        part = secret[start:start + size]
        out.append(part.hex())
        out.append(repr(part)[2:-1])
        if all(32 <= b < 127 for b in part):
            out.append(part.decode("ascii"))
    encoded = base64.b64encode(secret).decode()
    out.append(encoded[4:28])
    out.append(base64.urlsafe_b64encode(secret).decode().rstrip("=")[4:28])
    return out


def assert_no_secret(proxy: RunningProxy, secrets: list[bytes]) -> None:
    log = proxy.log_text()
    assert log, "the proxy wrote no log"
    for secret in secrets:
        for fragment in _fragments(secret):
            assert fragment not in log, f"a secret ({len(secret)} bytes) appears in the proxy log as {fragment!r}"


def _dicom_file(tmp_path: Path, seed: int) -> tuple[Path, str]:
    ds = make_ct_dataset(seed, random.Random(seed))
    path = tmp_path / f"ct{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def _storescu(port: int, path: Path, log: Path) -> tuple[int, str]:
    argv = [require_dcmtk("storescu"), "-v", "-aet", CALLING, "-aec", ARCHIVE_AE, LOOPBACK, str(port), str(path)]
    return run_tool(argv, log, timeout=60, env=dcmtk_env())


@pytest.fixture
def archive_factory(tmp_path: Path, dev_certs: Pki) -> Iterator[ArchiveFactory]:
    require_module("pynetdicom")
    started: list[IdentityStorageArchive] = []

    def start(checks: Mapping[int, Check]) -> IdentityStorageArchive:
        store = tmp_path / f"archive{len(started)}"
        store.mkdir()
        ctx = tls_server_context(dev_certs.archive_cert, dev_certs.archive_key, dev_certs.ca)
        archive = IdentityStorageArchive(ctx, checks, store).start()
        started.append(archive)
        return archive

    yield start
    for archive in started:
        archive.stop()


def _injecting_proxy(
    kind: str, good: bool, material: Material, realm: kdc.Realm | None, archive: IdentityStorageArchive,
    proxy_factory: ProxyFactory,
) -> RunningProxy:
    identities = {"archive-id": _profile(kind, good, material, realm)}
    return proxy_factory(archive.port, extra={"identities": identities, "rules": [str(material.rules)],
                                              "log_level": "debug"})


def _secrets_of(kind: str, archive: IdentityStorageArchive) -> list[bytes]:
    """What must not be logged: the passcodes, and every token or assertion the archive received."""
    out = [PASSCODE.encode(), WRONG_PASSCODE.encode()]
    if kind in ("kerberos", "saml", "jwt"):
        out += [s.primary for s in archive.seen]
    return out


def _realm_for(kind: str, request: pytest.FixtureRequest) -> kdc.Realm | None:
    """The throwaway realm for kind kerberos (None otherwise); signxml for saml (the archive's
    verifier and the proxy's signer). Missing: skipped locally, failed under CI=true."""
    if kind == "saml":
        require_module("signxml")
    if kind != "kerberos":
        return None
    realm = request.getfixturevalue("krb_env")
    assert isinstance(realm, kdc.Realm)
    return realm


# --------------------------------------------------------------------------- 1. injected, verified upstream


@pytest.mark.parametrize("kind", KINDS)
def test_injected_identity_is_verified_by_the_archive_and_the_file_is_stored(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, material: Material,
    archive_factory: ArchiveFactory, proxy_factory: ProxyFactory,
) -> None:
    realm = _realm_for(kind, request)
    archive = archive_factory(_checks(kind, material, realm))
    proxy = _injecting_proxy(kind, True, material, realm, archive, proxy_factory)
    path, uid = _dicom_file(tmp_path, 1)

    code, output = _storescu(proxy.port, path, tmp_path / "storescu.log")

    assert code == 0, f"storescu failed ({code}):\n{output[-3000:]}\narchive saw: {archive.seen}"
    assert archive.verdicts() == [(TYPE_CODE[kind], True)], archive.seen
    assert list(archive.stored) == [uid]
    assert (archive.store_dir / f"{uid}.dcm").is_file()
    proxy.wait_for_log(rf"user identity archive-id \(type {TYPE_CODE[kind]}, \d+ bytes\) injected")
    assert_no_secret(proxy, _secrets_of(kind, archive))


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_identity_is_refused_by_the_archive_and_storescu_sees_the_rj(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, material: Material,
    archive_factory: ArchiveFactory, proxy_factory: ProxyFactory,
) -> None:
    """Wrong user name (1), passcode (2), service principal (3), signing key (4, 5): the archive's
    EVT_USER_ID handler refuses, pynetdicom answers RJ 2/2/1, the proxy relays it unchanged."""
    realm = _realm_for(kind, request)
    archive = archive_factory(_checks(kind, material, realm))
    proxy = _injecting_proxy(kind, False, material, realm, archive, proxy_factory)
    path, _uid = _dicom_file(tmp_path, 2)

    code, output = _storescu(proxy.port, path, tmp_path / "storescu.log")

    assert code != 0, f"storescu succeeded with a wrong identity:\n{output[-3000:]}"
    assert "Association Rejected" in output, output[-3000:]
    assert "Rejected Transient" in output, output[-3000:]  # pynetdicom's 2/2/1, relayed unchanged
    # the identity did reach the archive (the proxy built it) and was refused there
    assert archive.verdicts() == [(TYPE_CODE[kind], False)], archive.seen
    assert WHY_REFUSED[kind] in archive.seen[0].why, archive.seen[0].why
    assert archive.stored == {}
    assert not any(archive.store_dir.iterdir())
    proxy.wait_for_log(r"the archive rejected the association \(RJ 2/2/1\); relayed unchanged")
    assert_no_secret(proxy, _secrets_of(kind, archive))


# --------------------------------------------------------------------------- 2. client_identity: verify

VERIFY_RULES = """\
version: 1
default: reject
rules:
  - name: radiology-users
    match: {user_identity: {type: jwt, username: "rad-*"}}
    action: accept
"""


@pytest.fixture
def verifying_proxy(
    tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> RunningProxy:
    issuer_key = write(tmp_path / "issuer.pub", public_pem(keys().ec), 0o644)
    rules = tmp_path / "verify.yaml"
    rules.write_text(VERIFY_RULES)
    client_identity = {"mode": "verify",
                       "jwt": {"public_key": str(issuer_key), "issuer": "idp", "audience": "dicom-proxy"}}
    return proxy_factory(pynetdicom_tls_scp.port, listener={"client_identity": client_identity},
                         extra={"rules": [str(rules)], "log_level": "debug"})


def _token(subject: str, *, key: Any = None, exp_in: int = 300) -> bytes:
    now = int(time.time())
    claims = {"iss": "idp", "aud": "dicom-proxy", "sub": subject, "iat": now - 10, "exp": now + exp_in}
    return sign_token({"alg": "ES256", "typ": "JWT"}, claims, key if key is not None else keys().ec)


@dataclass
class ScuResult:
    assoc: Any
    answer: Any  # the A-ASSOCIATE primitive (AC or RJ) the SCU received


def _associate(port: int, token: bytes | None, calling: str = "WS01") -> ScuResult:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.pdu_primitives import A_ASSOCIATE, UserIdentityNegotiation

    answers: list[Any] = []

    def on_acse(event: Any) -> None:
        if isinstance(event.primitive, A_ASSOCIATE):
            answers.append(event.primitive)

    ae = AE(ae_title=calling)
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ext: list[Any] = []
    if token is not None:
        item = UserIdentityNegotiation()
        item.user_identity_type = 5
        item.primary_field = token
        item.positive_response_requested = True
        ext.append(item)
    assoc = ae.associate(LOOPBACK, port, ae_title="ARCHIVE", ext_neg=ext or None,
                         evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])
    assert len(answers) == 1, f"expected one A-ASSOCIATE answer, got {answers}"
    return ScuResult(assoc, answers[0])


def test_verified_jwt_subject_is_matched_by_a_rule_and_the_store_goes_through(
    tmp_path: Path, verifying_proxy: RunningProxy, pynetdicom_tls_scp: PynetdicomArchive
) -> None:
    token = _token("rad-alice")
    result = _associate(verifying_proxy.port, token)
    assert result.assoc.is_established
    assert result.answer.result == 0
    # the proxy verified the token itself and answers the requested positive response (an empty 0x59)
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    responses = [i for i in result.answer.user_information if isinstance(i, UserIdentityNegotiation)]
    assert len(responses) == 1 and not responses[0].server_response
    ds = make_ct_dataset(7, random.Random(7))
    status = result.assoc.send_c_store(ds)
    assert status.Status == 0x0000
    result.assoc.release()
    assert list(pynetdicom_tls_scp.stored) == [str(ds.SOPInstanceUID)]
    assert pynetdicom_tls_scp.associations == ["WS01"]
    verifying_proxy.wait_for_log(r"accepted by rule radiology-users")
    assert_no_secret(verifying_proxy, [token])


@pytest.mark.parametrize(
    ("case", "rj", "log_line"),
    [
        pytest.param("subject-not-in-rule", (1, 1, 1), r"rejected \(RJ 1/1/1\): rule", id="rule-mismatch"),
        pytest.param("expired", (1, 2, 1), r"rejected \(RJ 1/2/1\): user identity: JWT refused: expired \d+ s ago",
                     id="expired"),
        pytest.param("wrong-signer", (1, 2, 1),
                     r"rejected \(RJ 1/2/1\): user identity: JWT refused: the signature does not verify",
                     id="wrong-signer"),
        pytest.param("no-identity", (1, 2, 1),
                     r"rejected \(RJ 1/2/1\): user identity: the listener requires a verified user identity",
                     id="no-identity"),
    ],
)
def test_refused_client_identities_get_the_rj_and_never_reach_the_archive(
    case: str, rj: tuple[int, int, int], log_line: str, verifying_proxy: RunningProxy,
    pynetdicom_tls_scp: PynetdicomArchive,
) -> None:
    token: bytes | None = {
        "subject-not-in-rule": _token("guest-bob"),  # valid, but the rule wants rad-*
        "expired": _token("rad-alice", exp_in=-3600),  # beyond the 30 s leeway
        "wrong-signer": _token("rad-alice", key=keys().ec_other),
        "no-identity": None,
    }[case]
    result = _associate(verifying_proxy.port, token)
    assert result.assoc.is_rejected
    assert (result.answer.result, result.answer.result_source, result.answer.diagnostic) == rj
    verifying_proxy.wait_for_log(log_line)
    assert pynetdicom_tls_scp.associations == []
    assert pynetdicom_tls_scp.stored == {}
    assert "A-ASSOCIATE-RQ relayed" not in verifying_proxy.log_text()
    if token is not None:
        assert_no_secret(verifying_proxy, [token])


# --------------------------------------------------------------------------- 3. identity work off the event loop

# scrypt cost for the slow user: N=2**16, r=8 (64 MiB) and p=8 sequential rounds, about 1.7 s on the
# 2-core dev machine, the same again for the test to compute the hash line. Within the limits of
# proxy.passcodes._check_scrypt_parameters (N <= 2**20, r <= 32, p <= 16).
SLOW_SCRYPT = {"n": 2**16, "r": 8, "p": 8}
A_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def _user_identity_subitem(kind: int, primary: bytes, secondary: bytes = b"", positive: bool = False) -> bytes:
    """A 0x58 User Identity sub-item (PS3.7 D.3.3.7.1), built by hand."""
    body = struct.pack(">BBH", kind, int(positive), len(primary)) + primary + struct.pack(">H", len(secondary))
    body += secondary
    return struct.pack(">BBH", 0x58, 0, len(body)) + body


def _rq_with(rq: bytes, subitem: bytes) -> bytes:
    """`rq` (an A-ASSOCIATE-RQ PDU) with `subitem` appended to its User Information item."""
    body = rq[6:]
    offset = 68  # protocol version, reserved, AE titles, reserved (PS3.8 9.3.2)
    while offset < len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, offset)
        if item_type == 0x50:
            inner = body[offset + 4:offset + 4 + length] + subitem
            body = body[:offset] + struct.pack(">BBH", 0x50, 0, len(inner)) + inner + body[offset + 4 + length:]
            return struct.pack(">BBI", 0x01, 0, len(body)) + body
        offset += 4 + length
    raise AssertionError("no User Information item in the RQ")


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def test_scrypt_check_does_not_hold_up_another_association(
    tmp_path: Path, pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory
) -> None:
    """A (passcode checked with an expensive scrypt line) starts first; B (no identity) starts once
    A's check is burning CPU in the proxy, and must get its AC while A still has no answer.

    Ordering, not durations: B's AC is read while A's socket has nothing to read. This needs A's
    check to outlast B's whole handshake (connect + TLS + AC upstream, tens of ms); the scrypt cost
    (seconds) makes that robust, and a slower machine slows both sides alike. Were the check on the
    event loop, the proxy could not relay B at all until it had finished."""
    line = hash_passcode_line("ct-tech", PASSCODE, os.urandom(16), **SLOW_SCRYPT)
    passcodes = write(tmp_path / "users.scrypt", line + "\n")
    proxy = proxy_factory(
        pynetdicom_tls_scp.port,
        listener={"client_identity": {"mode": "verify", "passcodes": str(passcodes), "required": False}},
        timeouts={"connect": 60},
        extra={"log_level": "debug"},
    )
    rq_a = _rq_with(associate_rq_bytes(called="ARCHIVE", calling="SLOW01"),
                    _user_identity_subitem(2, b"ct-tech", PASSCODE.encode()))
    rq_b = associate_rq_bytes(called="ARCHIVE", calling="FAST01")
    with socket.create_connection((LOOPBACK, proxy.port), timeout=30) as a, \
            socket.create_connection((LOOPBACK, proxy.port), timeout=30) as b:
        idle_cpu = _cpu_seconds(proxy.pid)
        a.sendall(rq_a)
        # A's scrypt is under way once the otherwise idle proxy has burnt 0.3 s of CPU
        wait_until(lambda: _cpu_seconds(proxy.pid) - idle_cpu >= 0.3, 30, "the proxy to work on A's passcode",
                   peer=proxy.peer)
        b.sendall(rq_b)
        b_type, _ = read_pdu(b)
        a_pending, _, _ = select.select([a], [], [], 0)
        assert b_type == 0x02, f"B got PDU type {b_type:#x}, expected an A-ASSOCIATE-AC"
        assert not a_pending, "A was answered before B: the passcode check held up the other association"
        a_type, a_body = read_pdu(a)
        assert a_type == 0x02, f"A got PDU type {a_type:#x} {a_body[:4].hex()}, expected an A-ASSOCIATE-AC"
        for sock in (a, b):
            sock.sendall(A_RELEASE_RQ)
            assert read_pdu(sock)[0] == 0x06
    assert pynetdicom_tls_scp.associations == ["FAST01", "SLOW01"]
    assert_no_secret(proxy, [PASSCODE.encode()])


STALL_RULES = """\
version: 1
default: reject
rules:
  - name: slow-kerberos
    match: {calling_ae: SLOW01}
    action: accept
    identity: krb
  - name: fast-plain
    match: {calling_ae: FAST01}
    action: accept
"""


def test_kerberos_waiting_for_its_kdc_does_not_hold_up_another_association(
    tmp_path: Path, kdc_realm: kdc.Realm, monkeypatch: pytest.MonkeyPatch,
    pynetdicom_tls_scp: PynetdicomArchive, proxy_factory: ProxyFactory,
) -> None:
    """The same ordering, made deterministic: A's Kerberos identity needs a ticket from a "KDC" that
    is a socket of this test, which accepts and does not answer. Once it has A's request, A cannot
    finish before the test lets it; B (no identity) must get its AC meanwhile. Released, A gets the
    transient RJ 2/3/1 of an unavailable KDC and never reaches the archive."""
    kdc_socket = socket.create_server((LOOPBACK, 0))
    kdc_port = kdc_socket.getsockname()[1]
    conf = tmp_path / "krb5-stalled.conf"
    conf.write_text(
        f"[libdefaults]\n  default_realm = {kdc.REALM}\n  dns_lookup_kdc = false\n  dns_lookup_realm = false\n"
        f"  rdns = false\n  udp_preference_limit = 1\n"
        f"[realms]\n  {kdc.REALM} = {{\n    kdc = {LOOPBACK}:{kdc_port}\n  }}\n",
        encoding="utf-8",
    )
    for name, value in kdc_realm.env.items():
        if name.startswith("KRB5"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("KRB5_CONFIG", str(conf))  # the proxy subprocess inherits this environment
    rules = tmp_path / "stall.yaml"
    rules.write_text(STALL_RULES)
    identities = {"krb": {"type": "kerberos", "service": kdc.SERVICE, "keytab": str(kdc_realm.client_keytab),
                          "principal": kdc.CLIENT}}
    proxy = proxy_factory(pynetdicom_tls_scp.port, timeouts={"connect": 60},
                          extra={"identities": identities, "rules": [str(rules)], "log_level": "debug"})
    with kdc_socket, socket.create_connection((LOOPBACK, proxy.port), timeout=30) as a, \
            socket.create_connection((LOOPBACK, proxy.port), timeout=30) as b:
        a.sendall(associate_rq_bytes(called="ARCHIVE", calling="SLOW01"))
        kdc_socket.settimeout(30)
        held, _ = kdc_socket.accept()  # the proxy is asking for A's ticket, and waits for us
        with held:
            b.sendall(associate_rq_bytes(called="ARCHIVE", calling="FAST01"))
            b.settimeout(15)  # a deadline for a failing proxy; B needs a fraction of a second
            try:
                b_type, _ = read_pdu(b)
            except TimeoutError:
                pytest.fail("B got no answer while A's KDC request was pending: the Kerberos request "
                            "holds up the event loop")
            a_pending, _, _ = select.select([a], [], [], 0)
            assert b_type == 0x02, f"B got PDU type {b_type:#x}, expected an A-ASSOCIATE-AC"
            assert not a_pending, "A was answered while its KDC request was still unanswered"
            assert pynetdicom_tls_scp.associations == ["FAST01"]
            b.sendall(A_RELEASE_RQ)
            assert read_pdu(b)[0] == 0x06
            kdc_socket.close()  # no second chance: a reconnect is refused
        a_type, a_body = read_pdu(a)  # the KDC hung up: A's ticket cannot be had
        assert (a_type, tuple(a_body[1:4])) == (0x03, (2, 3, 1)), f"A got {a_type:#x} {a_body.hex()}"
    proxy.wait_for_log(r"SLOW01->ARCHIVE: rejected \(RJ 2/3/1\): identity profile krb: Kerberos")
    assert pynetdicom_tls_scp.associations == ["FAST01"]
