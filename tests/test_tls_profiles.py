"""TLS both ways against real peers on 127.0.0.1: every PS3.15 profile probed with `openssl s_client`
and Python clients, mutual TLS, pins, IP SANs, certificate identity, AE binding, encrypted keys,
expiry, and dcmtk's echoscu talking to a TLS listener.

The TLS server is a blocking socket server on a thread that serves one connection at a time and
reports each handshake (or its failure) on a queue; every wait has a timeout, nothing sleeps.
A refused TLS 1.1 is proven on the server side (its own exception), not inferred from the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import queue
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import certs, config, tls
from proxy.config import CertPin, ListenerTLS, UpstreamTLS, parse_pin
from proxy.errors import ProxyError
from proxy.policy.model import CertFacts
from tests.peers import associate_rq_bytes, dcmtk_env, require_dcmtk, require_tool

WAIT = 10.0  # seconds; generous for a loaded 2-core machine, never reached when things work
PROFILE_NAMES = tuple(tls.PROFILES)


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    good: dict[str, Path]  # the CA everybody trusts: archive (server), proxy, modality (client-only)
    rogue: dict[str, Path]  # an unrelated CA with the same kinds of certificates
    ecdsa: tuple[Path, Path]  # a P-256 server certificate from the good CA, for the ECDSA suites
    dns_only: tuple[Path, Path]  # a server certificate with a DNS SAN only


def _ecdsa_server_cert(ca_dir: Path, out: Path) -> tuple[Path, Path]:
    ca = certs.load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "ecdsa.pem", out / "ecdsa.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    good = certs.init(tmp_path_factory.mktemp("good"))
    rogue = certs.init(tmp_path_factory.mktemp("rogue"))
    extra = tmp_path_factory.mktemp("extra")
    ecdsa = _ecdsa_server_cert(good["ca"].parent, extra)
    dns_only = certs.issue(good["ca"].parent, extra, "archive.example", ["DNS:localhost"], client=False, days=2,
                           name="dns-only")
    return Pki(good, rogue, ecdsa, dns_only)


# --------------------------------------------------------------------------- a TLS server on a thread


@dataclass
class Handshake:
    """What the server saw on one connection."""

    ok: bool
    version: str | None = None
    cipher: str | None = None
    error: BaseException | None = None
    facts: CertFacts | None = None

    def label(self, profile: str | None = None) -> str:
        assert self.error is not None, "the handshake succeeded"
        return tls.describe_listener_tls_error(self.error, profile)[0]

    def words(self, profile: str | None = None) -> str:
        assert self.error is not None, "the handshake succeeded"
        return tls.describe_listener_tls_error(self.error, profile)[1]


class TLSServer:
    """Accepts connections one after the other: handshake, report, read once, answer, close."""

    def __init__(self, ctx: ssl.SSLContext, answer: Callable[[bytes], bytes] = lambda data: data) -> None:
        self.ctx = ctx
        self.answer = answer
        self.results: queue.Queue[Handshake] = queue.Queue()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tls-server-{self.port}", daemon=True)

    def __enter__(self) -> TLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=WAIT):
            pass  # wakes the blocking accept()
        self._thread.join(WAIT)
        self._listener.close()
        assert not self._thread.is_alive()

    def next(self) -> Handshake:
        return self.results.get(timeout=WAIT)

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            conn.settimeout(WAIT)
            try:
                self._serve(conn)
            finally:
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls_conn = self.ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.results.put(Handshake(False, error=exc))
            return
        with tls_conn:
            cipher = tls_conn.cipher()
            self.results.put(
                Handshake(True, tls_conn.version(), cipher[0] if cipher else None, facts=tls.cert_facts(tls_conn))
            )
            with contextlib.suppress(OSError, ssl.SSLError):
                data = tls_conn.recv(4096)
                if data:
                    tls_conn.sendall(self.answer(data))


# --------------------------------------------------------------------------- clients


@dataclass
class Probe:
    returncode: int
    output: str
    version: str | None  # only when the handshake completed
    cipher: str | None


_NEW_SESSION = re.compile(r"^New, (\S+), Cipher is (\S+)$", re.MULTILINE)
_PROTOCOL = re.compile(r"^\s*Protocol\s*:\s*(TLSv[0-9.]+)$", re.MULTILINE)  # the negotiated version


def s_client(port: int, *args: str, ca: Path | None = None) -> Probe:
    """`openssl s_client` with empty stdin: handshake, then close. The version and cipher are only
    read from a completed handshake (rc 0 and a `New, X, Cipher is Y` line, not `(NONE)`).

    X is the version that introduced the *cipher*, not the negotiated one: a TLS 1.2 suite (GCM) is
    only negotiated in TLS 1.2 and a TLS 1.3 suite only in 1.3, but an older suite (AES128-SHA says
    SSLv3) needs the session's `Protocol :` line, which s_client prints for TLS 1.2 and older."""
    openssl = require_tool("openssl")
    argv = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args]
    if ca is not None:
        argv += ["-CAfile", str(ca), "-verify_return_error"]
    done = subprocess.run(argv, input=b"", capture_output=True, timeout=WAIT, check=False)
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    match = _NEW_SESSION.search(output) if done.returncode == 0 else None
    if match is None or match.group(2) == "(NONE)":
        return Probe(done.returncode, output, None, None)
    cipher_version, cipher = match.groups()
    protocol = _PROTOCOL.search(output)
    version = cipher_version if cipher_version in ("TLSv1.2", "TLSv1.3") else protocol and protocol.group(1)
    return Probe(done.returncode, output, version, cipher)


@dataclass
class ClientResult:
    version: str | None = None
    cipher: str | None = None
    echoed: bytes = b""
    error: BaseException | None = None


def py_client(
    port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost", *, send: bytes | None = b"ping"
) -> ClientResult:
    """A blocking Python client; with send=None it only reads (a TLS 1.3 rejection arrives on read)."""
    result = ClientResult()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw, ctx.wrap_socket(
            raw, server_hostname=server_hostname
        ) as conn:
            cipher = conn.cipher()
            result.version, result.cipher = conn.version(), cipher[0] if cipher else None
            if send is not None:
                conn.sendall(send)
            result.echoed = conn.recv(4096)
    except (OSError, ssl.SSLError) as exc:
        result.error = exc
    return result


def legacy_client(
    pki: Pki, *, ciphers: str | None = None, version: ssl.TLSVersion | None = None, cert: str | None = None
) -> ssl.SSLContext:
    """A plain standard-library client (not built by proxy.tls), narrowed as a test needs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.good["ca"])
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if cert is not None:
        ctx.load_cert_chain(pki.good[cert], pki.good[f"{cert}_key"])
    return ctx


def listener(pki: Pki, profile: str = "bcp195-nd", **kwargs: object) -> ssl.SSLContext:
    fields: dict[str, object] = {"cert": pki.good["archive"], "key": pki.good["archive_key"], "profile": profile}
    fields.update(kwargs)
    return tls.listener_context(ListenerTLS(**fields))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the profile table


def test_profile_table_matches_config_names_and_contexts() -> None:
    assert tuple(tls.PROFILES) == config.TLS_PROFILE_NAMES
    assert config.DEFAULT_TLS_PROFILE == "bcp195-nd"
    for name, profile in tls.PROFILES.items():
        assert profile.name == name
        assert ssl.TLSVersion.TLSv1_2 <= profile.minimum <= profile.maximum
        for server_side in (False, True):
            ctx = tls.profile_context(name, server_side)
            assert (ctx.minimum_version, ctx.maximum_version) == (profile.minimum, profile.maximum)
            assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
            assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE or not server_side
            tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2" or c["name"] == "AES128-SHA"]
            if profile.tls12_suites:
                assert tls12 == [s.openssl for s in profile.tls12_suites], name
    versions = {name: p.versions for name, p in tls.PROFILES.items()}
    assert versions == {
        "bcp195-nd": ("TLS 1.2", "TLS 1.3"),
        "bcp195": ("TLS 1.2", "TLS 1.3"),
        "bcp195-ex": ("TLS 1.2",),
        "tls13-only": ("TLS 1.3",),
    }
    nd = {s.iana for s in tls.PROFILES["bcp195-nd"].tls12_suites}
    assert nd == {
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    }  # fmt: skip
    with pytest.raises(ProxyError, match="unknown TLS profile 'bcp195-x'"):
        tls.profile_context("bcp195-x", server_side=False)


# --------------------------------------------------------------------------- openssl s_client probes


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_tls11_is_refused_by_the_server(pki: Pki, profile: str) -> None:
    """The client is told to allow TLS 1.1 (@SECLEVEL=0); the refusal must come from our server."""
    with TLSServer(listener(pki, profile)) as server:
        probe = s_client(server.port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
        seen = server.next()
    assert probe.returncode != 0 and probe.version is None
    assert "alert protocol version" in probe.output  # the server's alert reached the client
    assert not seen.ok
    assert isinstance(seen.error, ssl.SSLError) and seen.error.reason == "UNSUPPORTED_PROTOCOL"
    assert seen.label(profile) == "protocol_version"
    assert seen.words(profile).startswith("the client and the proxy share no TLS version: "
                                          f"profile {profile!r} allows")


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_s_client_versions_and_negotiated_suite(pki: Pki, profile: str, flag: str) -> None:
    p = tls.PROFILES[profile]
    version = "TLSv1.2" if flag == "-tls1_2" else "TLSv1.3"
    allowed = ("TLS 1.2" if flag == "-tls1_2" else "TLS 1.3") in p.versions
    with TLSServer(listener(pki, profile)) as server:
        probe = s_client(server.port, flag, ca=pki.good["ca"])
        seen = server.next()
    if allowed:
        assert probe.returncode == 0, probe.output
        assert probe.version == version and seen.ok and seen.version == version
        suites = [s.openssl for s in p.tls12_suites] if version == "TLSv1.2" else list(p.tls13_suites)
        assert probe.cipher in suites and probe.cipher == seen.cipher
        if version == "TLSv1.2":
            # server preference: the strongest suite an RSA certificate can use
            assert probe.cipher == "ECDHE-RSA-AES256-GCM-SHA384"
    else:
        assert probe.returncode != 0 and probe.version is None
        assert not seen.ok and seen.label(profile) == "protocol_version", seen.error


_OUTSIDE_EVERY_PROFILE = (
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-RSA-AES256-SHA",
    "AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
)


@pytest.mark.parametrize("profile", [n for n in PROFILE_NAMES if tls.PROFILES[n].tls12_suites])
def test_every_tls12_suite_of_the_profile_and_nothing_else(pki: Pki, profile: str) -> None:
    """Python clients pinned to one suite each: the profile's suites connect, every other is refused."""
    p = tls.PROFILES[profile]
    rsa_server = listener(pki, profile)
    ecdsa_server = listener(pki, profile, cert=pki.ecdsa[0], key=pki.ecdsa[1])
    for suite in p.tls12_suites:
        ctx = ecdsa_server if "ECDSA" in suite.openssl else rsa_server
        with TLSServer(ctx) as server:
            got = py_client(server.port, legacy_client(pki, ciphers=suite.openssl, version=ssl.TLSVersion.TLSv1_2))
            seen = server.next()
        assert got.error is None, (suite, got.error, seen.error)
        assert (got.version, got.cipher, got.echoed) == ("TLSv1.2", suite.openssl, b"ping")
    offered = {s.openssl for s in p.tls12_suites}
    outside = [s for s in (*_OUTSIDE_EVERY_PROFILE, "AES128-SHA", "DHE-RSA-AES128-GCM-SHA256") if s not in offered]
    for suite_name in outside:
        with TLSServer(rsa_server) as server:
            got = py_client(server.port, legacy_client(pki, ciphers=suite_name, version=ssl.TLSVersion.TLSv1_2))
            seen = server.next()
        assert got.error is not None, suite_name
        assert seen.label(profile) == "no_shared_cipher", (suite_name, seen.error)
        assert f"the proxy uses profile {profile!r}" in seen.words(profile)


def test_bcp195_dhe_uses_a_2048_bit_group(pki: Pki) -> None:
    openssl = require_tool("openssl")
    with TLSServer(listener(pki, "bcp195")) as server:
        probe = s_client(server.port, "-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256", ca=pki.good["ca"])
        assert server.next().ok
    assert probe.cipher == "DHE-RSA-AES128-GCM-SHA256", probe.output
    assert re.search(r"Server Temp Key: DH, 2048 bits", probe.output), f"{openssl}: {probe.output}"


def _small_rsa_server_cert(ca_dir: Path, out: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    ca = certs.load_ca(ca_dir)
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = out / "rsa1024.pem", out / "rsa1024.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_rsa_keys_below_2048_bits_are_refused_both_ways(pki: Pki, tmp_path: Path, profile: str) -> None:
    """Security level 2 in every profile: dcmtk and RFC 9325 refuse RSA keys under 2048 bits."""
    cert, key = _small_rsa_server_cert(pki.good["ca"].parent, tmp_path)
    with pytest.raises(ssl.SSLError, match=r"EE_KEY_TOO_SMALL|ee key too small"):
        tls.server_context(cert, key, profile=profile)
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    weak.set_ciphers("DEFAULT:@SECLEVEL=0")
    weak.load_cert_chain(cert, key)
    client = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], profile=profile))  # type: ignore[arg-type]
    with TLSServer(weak) as server:
        got = py_client(server.port, client)
        server.next()
    assert isinstance(got.error, ssl.SSLCertVerificationError)
    label, words = tls.describe_upstream_error(got.error)
    assert label == "weak_certificate" and label in tls.TLS_ERROR_LABELS
    assert words.startswith("the archive's certificate chain uses a key or signature hash that the TLS profiles "
                            "refuse (EE certificate key too weak)")


# --------------------------------------------------------------------------- upstream_context per profile


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_upstream_context_connects_to_a_server_of_the_same_profile(pki: Pki, profile: str) -> None:
    client = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], profile=profile))  # type: ignore[arg-type]
    with TLSServer(listener(pki, profile)) as server:
        got = py_client(server.port, client)
        assert server.next().ok
    p = tls.PROFILES[profile]
    expected = "TLSv1.3" if p.maximum == ssl.TLSVersion.TLSv1_3 else "TLSv1.2"
    assert got.error is None and got.version == expected and got.echoed == b"ping"
    assert got.cipher in (p.tls13_suites if expected == "TLSv1.3" else [s.openssl for s in p.tls12_suites])


@pytest.mark.parametrize(
    ("client_profile", "server_profile"), [("tls13-only", "bcp195-ex"), ("bcp195-ex", "tls13-only")]
)
def test_upstream_context_against_a_mismatching_profile(pki: Pki, client_profile: str, server_profile: str) -> None:
    client = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], profile=client_profile))  # type: ignore[arg-type]
    with TLSServer(listener(pki, server_profile)) as server:
        got = py_client(server.port, client)
        seen = server.next()
    assert got.error is not None and not seen.ok
    label, words = tls.describe_upstream_error(got.error, server_name="localhost", profile=client_profile)
    assert label == "protocol_version"
    allowed = " and ".join(tls.PROFILES[client_profile].versions)
    assert words.startswith(f"the archive and the proxy share no TLS version: profile {client_profile!r} "
                            f"allows {allowed} only")
    assert seen.label(server_profile) == "protocol_version"


def test_default_profile_refuses_a_legacy_archive_that_bcp195_accepts(pki: Pki) -> None:
    """An old archive with only TLS_RSA_WITH_AES_128_CBC_SHA: bcp195 is the profile for it."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old.load_cert_chain(pki.good["archive"], pki.good["archive_key"])
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.set_ciphers("AES128-SHA")
    strict = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    broad = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], profile="bcp195"))
    with TLSServer(old) as server:
        refused = py_client(server.port, strict)
        assert not server.next().ok
        accepted = py_client(server.port, broad)
        assert server.next().ok
    assert refused.error is not None
    assert tls.describe_upstream_error(refused.error)[0] == "handshake_failure"
    assert accepted.error is None and accepted.cipher == "AES128-SHA"


# --------------------------------------------------------------------------- mutual TLS


@pytest.mark.parametrize("profile", ["bcp195-nd", "bcp195-ex"])  # TLS 1.3 and TLS 1.2 report it differently
def test_required_client_certificate_missing(pki: Pki, profile: str) -> None:
    ctx = listener(pki, profile, client_ca=pki.good["ca"], require_client_cert=True)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    client = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], profile=profile))  # type: ignore[arg-type]
    with TLSServer(ctx) as server:
        got = py_client(server.port, client, send=None)
        seen = server.next()
    assert got.error is not None and not seen.ok
    assert seen.label() == "no_client_certificate"
    assert seen.words().startswith("the client sent no certificate, but the listener requires one")
    label, words = tls.describe_upstream_error(got.error)
    if profile == "bcp195-nd":  # TLS 1.3: the alert names the cause
        assert (label, "requires a client certificate" in words) == ("peer_rejected_certificate", True)
    else:  # TLS 1.2: one generic alert, the words name the likely causes
        assert (label, "client certificate" in words) == ("handshake_failure", True)


def test_client_certificate_from_another_ca(pki: Pki) -> None:
    ctx = listener(pki, client_ca=pki.good["ca"], require_client_cert=True)
    client = legacy_client(pki)
    client.load_cert_chain(pki.rogue["modality"], pki.rogue["modality_key"])
    with TLSServer(ctx) as server:
        got = py_client(server.port, client, send=None)
        seen = server.next()
    assert not seen.ok and seen.label() == "unknown_ca"
    assert seen.words().startswith("the client's certificate is signed by an unknown CA")
    assert "'client_ca' file of the listener" in seen.words()
    assert got.error is not None
    label, words = tls.describe_upstream_error(got.error)
    assert label == "peer_rejected_certificate" and "does not trust the CA" in words


def test_client_that_does_not_trust_the_listener(pki: Pki) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(pki.rogue["ca"])
    with TLSServer(listener(pki)) as server:
        got = py_client(server.port, client)
        seen = server.next()
    assert got.error is not None and not seen.ok
    assert seen.label() == "peer_rejected_certificate"
    assert seen.words().startswith("the client does not trust the CA of the listener's certificate")


def test_optional_client_certificate(pki: Pki) -> None:
    ctx = listener(pki, client_ca=pki.good["ca"])
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    with TLSServer(ctx) as server:
        anonymous = py_client(server.port, legacy_client(pki))
        assert server.next().facts is None
        named = py_client(server.port, legacy_client(pki, cert="modality"))
        facts = server.next().facts
    assert anonymous.error is None and named.error is None
    assert facts is not None and facts.subject_cn == "MODALITY01"


def test_plain_dicom_on_a_tls_listener(pki: Pki) -> None:
    rq = associate_rq_bytes(called="ARCHIVE", calling="CT01")
    assert tls.sniff_plain_dicom_on_tls(rq[:6]) and not tls.sniff_tls_client_hello(rq[:6])
    with TLSServer(listener(pki)) as server, socket.create_connection(("127.0.0.1", server.port), WAIT) as raw:
        raw.sendall(rq)
        seen = server.next()
    assert not seen.ok and seen.label() == "not_tls"
    assert "did not start TLS" in seen.words()
    label, words = tls.describe_plain_dicom_on_tls("modalities")
    assert label == "not_tls" and label in tls.TLS_ERROR_LABELS and "'modalities'" in words


def test_a_real_client_hello_is_not_plain_dicom(pki: Pki) -> None:
    """Capture the first bytes a TLS client sends and feed them to both sniffers."""
    with socket.create_server(("127.0.0.1", 0)) as plain:
        plain.settimeout(WAIT)
        port = plain.getsockname()[1]
        result: list[ClientResult] = []
        thread = threading.Thread(target=lambda: result.append(py_client(port, legacy_client(pki))), daemon=True)
        thread.start()
        conn, _ = plain.accept()
        with conn:
            conn.settimeout(WAIT)
            first = conn.recv(6)
        thread.join(WAIT)
    assert len(first) == 6
    assert tls.sniff_tls_client_hello(first) and not tls.sniff_plain_dicom_on_tls(first)


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"\x01\x00\x00\x00\x00\x44", True),  # exactly the fixed part of an RQ (68)
        (b"\x01\x00\x00\x00\x01\x00", True),
        (b"\x01\x00\x00\x00\x00\x43", False),  # too short to be an RQ
        (b"\x01\x01\x00\x00\x01\x00", False),  # reserved byte not zero
        (b"\x02\x00\x00\x00\x01\x00", False),  # an AC is not what a client sends first
        (b"\x01\x00\x00\x00", False),  # too short to tell
        (b"\x16\x03\x01\x02\x00\x01", False),
        (b"", False),
    ],
)
def test_sniff_plain_dicom_on_tls(first: bytes, expected: bool) -> None:
    assert tls.sniff_plain_dicom_on_tls(first) is expected


# --------------------------------------------------------------------------- certificate identity


def _openssl_fingerprint(path: Path) -> str:
    out = subprocess.run(
        [require_tool("openssl"), "x509", "-in", str(path), "-noout", "-fingerprint", "-sha256"],
        capture_output=True, text=True, timeout=WAIT, check=True,
    ).stdout  # fmt: skip
    return out.strip().split("=", 1)[1].replace(":", "").lower()


def _openssl_spki_sha256(path: Path) -> str:
    openssl = require_tool("openssl")
    pem = subprocess.run([openssl, "x509", "-in", str(path), "-noout", "-pubkey"],
                         capture_output=True, timeout=WAIT, check=True).stdout
    der = subprocess.run([openssl, "pkey", "-pubin", "-outform", "DER"], input=pem,
                         capture_output=True, timeout=WAIT, check=True).stdout
    return hashlib.sha256(der).hexdigest()


async def test_cert_facts_of_a_modality_on_an_asyncio_listener(pki: Pki, tmp_path: Path) -> None:
    """As the relay will: asyncio TLS server, facts from the transport's ssl_object."""
    device, device_key = certs.issue(
        pki.good["ca"].parent, tmp_path, "CT01", ["ct01.ward.example", "IP:10.0.0.7", "2001:db8::7"],
        client=True, days=3,
    )  # fmt: skip
    ctx = listener(pki, client_ca=pki.good["ca"], require_client_cert=True)
    seen: asyncio.Queue[CertFacts | None] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await seen.put(tls.cert_facts(writer.get_extra_info("ssl_object")))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    client = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], cert=device, key=device_key))
    try:
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
            facts = await seen.get()
            await reader.read()
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    ca = x509.load_pem_x509_certificate(pki.good["ca"].read_bytes())
    assert facts == CertFacts(
        subject_cn="CT01",
        sans=("ct01.ward.example", "10.0.0.7", "2001:db8::7"),
        issuer=ca.subject.rfc4514_string(),
        fingerprint_sha256=_openssl_fingerprint(device),
    )
    assert facts.issuer.startswith("CN=dicom-tls-proxy dev CA ") and "O=dicom-tls-proxy development" in facts.issuer


def test_cert_facts_on_the_modality_certificate(pki: Pki) -> None:
    ctx = listener(pki, client_ca=pki.good["ca"], require_client_cert=True)
    with TLSServer(ctx) as server:
        got = py_client(server.port, legacy_client(pki, cert="modality"))
        facts = server.next().facts
    assert got.error is None and facts is not None
    assert (facts.subject_cn, facts.sans) == ("MODALITY01", ())
    assert facts.fingerprint_sha256 == _openssl_fingerprint(pki.good["modality"])
    assert re.fullmatch(r"[0-9a-f]{64}", facts.fingerprint_sha256)


def test_cert_facts_needs_a_verifying_context(pki: Pki) -> None:
    """A server that does not verify client certificates must not turn one into policy facts."""
    with TLSServer(listener(pki)) as server:  # no client_ca: no certificate is even asked for
        py_client(server.port, legacy_client(pki, cert="modality"))
        assert server.next().facts is None
    assert tls.cert_facts(None) is None


def _facts(cn: str | None, *sans: str) -> CertFacts:
    return CertFacts(subject_cn=cn, sans=sans, issuer="CN=x", fingerprint_sha256="0" * 64)


def test_bound_ae_titles_decisions() -> None:
    bind = MappingProxyType({
        config.cert_name_key("MODALITY01"): frozenset({"CT01"}),
        config.cert_name_key("ct02.ward.example"): frozenset({"CT02", "CT02B"}),
        config.cert_name_key("10.0.0.9"): frozenset({"US01"}),
        config.cert_name_key("2001:DB8:0::9"): frozenset({"US02"}),
    })  # fmt: skip
    assert tls.bound_ae_titles(MappingProxyType({}), _facts("MODALITY01")) is None  # no binding: anything goes
    assert tls.bound_ae_titles(bind, None) == frozenset()  # no certificate: nothing allowed
    assert tls.bound_ae_titles(bind, _facts("MODALITY01")) == frozenset({"CT01"})
    assert tls.bound_ae_titles(bind, _facts("modality01")) == frozenset({"CT01"})  # case does not matter
    assert tls.bound_ae_titles(bind, _facts(None, "CT02.Ward.Example")) == frozenset({"CT02", "CT02B"})
    assert tls.bound_ae_titles(bind, _facts("other", "10.0.0.9")) == frozenset({"US01"})
    assert tls.bound_ae_titles(bind, _facts("other", "2001:db8::9")) == frozenset({"US02"})  # canonical IPv6
    assert tls.bound_ae_titles(bind, _facts("MODALITY01", "10.0.0.9")) == frozenset({"CT01", "US01"})  # union
    assert tls.bound_ae_titles(bind, _facts("stranger", "stranger.example")) == frozenset()


# --------------------------------------------------------------------------- pins and IP SANs


def test_parse_pin_accepts_openssl_fingerprints(pki: Pki) -> None:
    colon_hex = subprocess.run(
        [require_tool("openssl"), "x509", "-in", str(pki.good["archive"]), "-noout", "-fingerprint", "-sha256"],
        capture_output=True, text=True, timeout=WAIT, check=True,
    ).stdout.strip().split("=", 1)[1]  # fmt: skip
    pin = parse_pin(f"cert:{colon_hex}")
    assert pin == CertPin("cert", colon_hex.replace(":", "").lower()) and str(pin) == f"cert:{pin.sha256}"
    for bad in ("sha256:" + "a" * 64, "a" * 64, "spki:" + "a" * 63, "cert:" + "g" * 64):
        with pytest.raises(ValueError):
            parse_pin(bad)


async def test_pins_on_a_real_handshake_and_after_resumption(pki: Pki) -> None:
    cert_pin = CertPin("cert", _openssl_fingerprint(pki.good["archive"]))
    spki_pin = CertPin("spki", _openssl_spki_sha256(pki.good["archive"]))
    wrong = CertPin("spki", _openssl_spki_sha256(pki.good["proxy"]))
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"], pin_sha256=(spki_pin,)))
    with TLSServer(listener(pki)) as server:
        for attempt in range(2):
            async with asyncio.timeout(WAIT):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", server.port, ssl=ctx, server_hostname="localhost"
                )
                writer.write(b"ping")
                assert await reader.read(4) == b"ping"  # the TLS 1.3 ticket has arrived by now
                sslobj = writer.get_extra_info("ssl_object")
                assert isinstance(sslobj, ssl.SSLObject)
                assert sslobj.session_reused is (attempt == 1)
                assert tls.check_pin(sslobj, spki_pin) and tls.check_pin(sslobj, cert_pin)
                assert tls.check_pin(sslobj, [wrong, cert_pin])  # any pin of a list
                assert not tls.check_pin(sslobj, wrong)
                label, words = tls.describe_pin_mismatch(sslobj)
                ctx.session = sslobj.session
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
            assert server.next().ok
    assert label == "pin_mismatch" and label in tls.TLS_ERROR_LABELS
    assert f"cert:{cert_pin.sha256}" in words and f"spki:{spki_pin.sha256}" in words
    assert not tls.check_pin(None, cert_pin)
    with pytest.raises(ValueError):
        tls.check_pin(b"", [])


def test_insecure_skip_verify_with_a_pin_against_a_self_signed_archive(pki: Pki) -> None:
    """A foreign self-signed archive: the chain cannot verify, the pin is what protects."""
    self_signed = tls.server_context(pki.rogue["ca"], pki.rogue["ca_key"])
    pin = CertPin("cert", _openssl_fingerprint(pki.rogue["ca"]))
    checked = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    skipping = tls.upstream_context(UpstreamTLS(insecure_skip_verify=True, pin_sha256=(pin,)))
    assert skipping.verify_mode == ssl.CERT_NONE and not skipping.check_hostname
    with TLSServer(self_signed) as server:
        refused = py_client(server.port, checked)
        server.next()
        with socket.create_connection(("127.0.0.1", server.port), WAIT) as raw, skipping.wrap_socket(
            raw, server_hostname="wrong.example"
        ) as conn:
            assert tls.check_pin(conn, pin)
            assert not tls.check_pin(conn, CertPin("cert", _openssl_fingerprint(pki.good["archive"])))
        assert server.next().ok
    assert refused.error is not None and tls.describe_upstream_error(refused.error)[0] == "self_signed"


def test_ip_san_is_checked_like_a_host_name(pki: Pki) -> None:
    """check_hostname with an IP address matches IP SANs (the archive certificate has 127.0.0.1)."""
    ctx = tls.upstream_context(UpstreamTLS(ca=pki.good["ca"]))
    dns_only = tls.server_context(*pki.dns_only)
    with TLSServer(listener(pki)) as server:
        by_ip = py_client(server.port, ctx, "127.0.0.1")
        server.next()
        wrong_ip = py_client(server.port, ctx, "127.0.0.2")
        server.next()
    with TLSServer(dns_only) as server:
        ip_vs_dns = py_client(server.port, ctx, "127.0.0.1")  # an IP never matches a DNS SAN or the CN
        server.next()
        by_name = py_client(server.port, ctx, "localhost")
        server.next()
    assert by_ip.error is None and by_ip.echoed == b"ping" and by_name.error is None
    for failed in (wrong_ip, ip_vs_dns):
        assert failed.error is not None
        label, words = tls.describe_upstream_error(failed.error, server_name="127.0.0.x")
        assert label == "hostname_mismatch", words
        assert "IP address mismatch" in words


# --------------------------------------------------------------------------- encrypted keys


def _encrypt(key_path: Path, target: Path, passphrase: bytes) -> Path:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    target.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    ))  # fmt: skip
    return target


def test_encrypted_keys_with_a_passphrase_file(pki: Pki, tmp_path: Path) -> None:
    secret = b"correct horse battery"
    listener_key = _encrypt(pki.good["archive_key"], tmp_path / "archive.key", secret)
    client_key = _encrypt(pki.good["proxy_key"], tmp_path / "proxy.key", secret)
    right = tmp_path / "right.pass"
    right.write_bytes(secret + b"\n")  # one trailing newline is not part of the passphrase
    server_ctx = tls.listener_context(ListenerTLS(
        cert=pki.good["archive"], key=listener_key, passphrase_file=right,
        client_ca=pki.good["ca"], require_client_cert=True,
    ))  # fmt: skip
    client_ctx = tls.upstream_context(
        UpstreamTLS(ca=pki.good["ca"], cert=pki.good["proxy"], key=client_key, passphrase_file=right)
    )
    with TLSServer(server_ctx) as server:
        got = py_client(server.port, client_ctx)
        seen = server.next()
    assert got.error is None and seen.facts is not None and seen.facts.subject_cn == "dicom-proxy"

    wrong = tmp_path / "wrong.pass"
    wrong.write_bytes(b"Tr0ub4dor&3\n")
    builds: tuple[Callable[[], ssl.SSLContext], ...] = (
        lambda: tls.upstream_context(UpstreamTLS(cert=pki.good["proxy"], key=client_key, passphrase_file=wrong)),
        lambda: tls.listener_context(ListenerTLS(cert=pki.good["archive"], key=listener_key, passphrase_file=wrong)),
    )
    for build in builds:
        with pytest.raises(ProxyError) as info:
            build()
        message = str(info.value)
        assert "wrong passphrase?" in message and str(wrong) in message
        assert "Tr0ub4dor" not in message and "correct horse" not in message
        assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(ProxyError, match="cannot read the passphrase file"):
        tls.upstream_context(UpstreamTLS(cert=pki.good["proxy"], key=client_key, passphrase_file=tmp_path / "none"))
    with pytest.raises(ProxyError, match="set 'passphrase_file'"):
        tls.upstream_context(UpstreamTLS(cert=pki.good["proxy"], key=client_key))


# --------------------------------------------------------------------------- expiry


def test_certificate_expiry_and_warnings(pki: Pki, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    soon, soon_key = certs.issue(pki.good["ca"].parent, tmp_path, "soon", ["localhost"], client=False, days=5)
    later, later_key = certs.issue(pki.good["ca"].parent, tmp_path, "later", [], client=True, days=200)
    gone, gone_key = certs.issue(pki.good["ca"].parent, tmp_path, "gone", [], client=True, days=-2)
    enddate = subprocess.run(
        [require_tool("openssl"), "x509", "-in", str(soon), "-noout", "-enddate"],
        capture_output=True, text=True, timeout=WAIT, check=True,
    ).stdout.strip().split("=", 1)[1]  # fmt: skip
    expiry = tls.certificate_expiry(soon)
    assert expiry.tzinfo is not None
    assert expiry == datetime.datetime.strptime(enddate, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=datetime.UTC)

    cfg = config.ProxyConfig(
        path=tmp_path / "proxy.yaml",
        listeners=(
            config.Listener("modalities", config.Address("127.0.0.1", 0),
                            ListenerTLS(cert=soon, key=soon_key, client_ca=pki.good["ca"])),
            config.Listener("plain", config.Address("127.0.0.1", 0)),
        ),
        upstreams=MappingProxyType({
            "pacs": config.Upstream("pacs", config.Address("127.0.0.1", 2762),
                                    UpstreamTLS(ca=pki.good["ca"], cert=later, key=later_key)),
            "old": config.Upstream("old", config.Address("127.0.0.1", 2763), UpstreamTLS(cert=gone, key=gone_key)),
            "system": config.Upstream("system", config.Address("127.0.0.1", 2764), UpstreamTLS()),
        }),
    )  # fmt: skip
    listed = [(c.role, c.name, c.path) for c in tls.configured_certificates(cfg)]
    assert listed == [
        ("listener", "modalities", soon),
        ("ca", "listener:modalities", pki.good["ca"]),
        ("upstream_client", "pacs", later),
        ("ca", "upstream:pacs", pki.good["ca"]),
        ("upstream_client", "old", gone),
    ]
    # the dev CA itself lives 90 days: within 20 days only the 5-day certificate is close
    warnings = tls.expiry_warnings(cfg, now=now, within=datetime.timedelta(days=20))
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"the listener certificate of modalities ({soon}) expires on ")
    # 5 days from issue, seen from just before it (certificate times have whole seconds): 4 or 5
    assert warnings[0].endswith(("(in 4 days)", "(in 5 days)")), warnings[0]
    assert warnings[1].startswith(f"the upstream_client certificate of old ({gone}) has EXPIRED on ")
    assert len(tls.expiry_warnings(cfg, now=now)) == 2  # the default 30-day window: the CA has 90 days
    assert len(tls.expiry_warnings(cfg, now=now, within=datetime.timedelta(days=100))) == 4  # now the CA too
    gone.unlink()
    assert any(w.startswith("cannot read the upstream_client certificate of old") for w in tls.expiry_warnings(cfg))


# --------------------------------------------------------------------------- dcmtk as the TLS client

_RJ = bytes.fromhex("03 00 00000004 00 01 01 07")  # A-ASSOCIATE-RJ permanent, service-user, calling AE


@pytest.mark.parametrize(
    ("profile", "dcmtk_profile", "version"),
    [
        ("bcp195-nd", "+py", "TLSv1.3"),
        ("bcp195", "+px", "TLSv1.3"),
        ("bcp195-ex", "+pz", "TLSv1.2"),
        ("bcp195-nd", "+pz", "TLSv1.2"),
        ("tls13-only", "+pz", None),  # dcmtk's B.11 is TLS 1.2 only: refused by our server
    ],
)
def test_echoscu_against_a_tls_listener(
    pki: Pki, tmp_path: Path, profile: str, dcmtk_profile: str, version: str | None
) -> None:
    """dcmtk negotiates TLS with the listener context, sends its A-ASSOCIATE-RQ inside TLS and gets
    our reject back: the reject in echoscu's output proves both directions of the TLS channel."""
    echoscu = require_dcmtk("echoscu")
    ctx = listener(pki, profile, client_ca=pki.good["ca"], require_client_cert=True)
    with TLSServer(ctx, answer=lambda data: _RJ if data[:1] == b"\x01" else b"") as server:
        done = subprocess.run(
            [echoscu, "-v", "+tls", str(pki.good["modality_key"]), str(pki.good["modality"]),
             "+cf", str(pki.good["ca"]), dcmtk_profile, "-aet", "CT01", "-aec", "ARCHIVE",
             "127.0.0.1", str(server.port)],
            capture_output=True, text=True, timeout=WAIT * 3, env=dcmtk_env(), check=False,
        )  # fmt: skip
        seen = server.next()
    output = done.stdout + done.stderr
    if version is None:
        assert not seen.ok and seen.label(profile) == "protocol_version", seen.error
        assert done.returncode != 0
        return
    assert seen.ok, (seen.error, output)
    assert seen.version == version
    p = tls.PROFILES[profile]
    assert seen.cipher in (p.tls13_suites if version == "TLSv1.3" else [s.openssl for s in p.tls12_suites])
    assert seen.facts is not None and seen.facts.subject_cn == "MODALITY01"
    assert "Association Rejected" in output, output
