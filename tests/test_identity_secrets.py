"""Secrets stay secret: every identity type is minted, injected, verified and made to fail with
logging at DEBUG captured, and every log line, exception message and repr is searched for the
secret values (passcodes, HMAC secret, private key material, tokens, assertions, Kerberos tickets)."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from proxy import config, identity
from proxy.dul.items import UserIdentityACSubItem, UserIdentityRQSubItem
from proxy.errors import ProxyError
from proxy.identity import (
    BuildContext,
    ClientIdentityPolicy,
    JwtCheck,
    JwtProfile,
    KerberosCheck,
    KerberosProfile,
    PasscodeProfile,
    SamlMint,
    SamlProfile,
    Sources,
    UsernameProfile,
    UserTemplate,
    VerifyContext,
)
from tests import kdc
from tests.identity_keys import (
    HMAC_SECRET,
    NOW,
    broken_pem,
    counter_random,
    keys,
    private_pem,
    public_pem,
    rq,
    self_signed,
    sign_token,
    write,
)
from tests.peers import require_module

PASSCODE = "Pa55-word-never-logged"
ENV_PASSCODE = "env-passcode-never-logged"
WRONG_PASSCODE = "wrong-guess-never-logged"
KEY_MARKER = "NOTAKEYNOTAKEYNOTAKEY"


class Transcript:
    """Everything the code under test said: log records (at DEBUG), exception texts, reprs."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.texts: list[str] = []
        self.secrets: list[bytes] = []
        self.expect_records = False  # proxy.identity is pure and does not log; identity_kerberos does

    def secret(self, value: bytes | str) -> None:
        raw = value.encode() if isinstance(value, str) else value
        self.secrets.append(raw)

    def saw(self, *objects: object) -> None:
        for obj in objects:
            self.texts += [str(obj), repr(obj)]

    def expect_error(self, call: Callable[[], object]) -> None:
        try:
            result = call()
        except (ProxyError, ValueError) as exc:
            self.saw(exc, exc.__cause__, exc.__context__)
        else:
            self.saw(result)

    def check(self) -> None:
        records = self.caplog.get_records("call")  # checked at teardown: look at the test's own phase
        if self.expect_records:
            assert any(r.levelno == logging.DEBUG and r.name.startswith("proxy.") for r in records), \
                "the test should have produced DEBUG records from the proxy"
        haystack = "\n".join(self.texts) + "\n" + "\n".join(
            f"{r.name} {r.levelname} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in records)
        for secret in self.secrets:
            for form in _forms(secret):
                assert form not in haystack, f"a secret ({len(secret)} bytes) leaked as {form[:12]!r}..."


def _forms(secret: bytes) -> set[str]:
    """The ways a secret could show up in text: as text, in a bytes repr, base64, hex; for long
    values a middle slice too (a truncated dump still leaks)."""
    forms = {repr(secret)[2:-1], secret.hex(), base64.b64encode(secret).decode().rstrip("=")}
    with contextlib.suppress(UnicodeDecodeError):
        forms.add(secret.decode())
    if len(secret) > 48:
        middle = len(secret) // 2
        forms |= {f[middle // 2: middle // 2 + 24] for f in list(forms) if len(f) > 48}
    return {f for f in forms if len(f) >= 8}


@pytest.fixture
def transcript(caplog: pytest.LogCaptureFixture) -> Iterator[Transcript]:
    caplog.set_level(logging.DEBUG)
    t = Transcript(caplog)
    yield t
    t.check()


def _ctx(sources: Sources, calling: str = "CT01") -> BuildContext:
    return BuildContext(calling, "PACS", NOW, counter_random(), sources)


def test_no_secret_in_logs_errors_or_reprs(tmp_path: Path, transcript: Transcript) -> None:
    t = transcript
    k = keys()
    pem = private_pem(k.ec)
    t.secret(HMAC_SECRET)
    t.secret(PASSCODE)
    t.secret(ENV_PASSCODE)
    t.secret(WRONG_PASSCODE)
    for line in pem.decode().splitlines()[1:-1]:
        t.secret(line)
    env = MappingProxyType({"CT_PASS": ENV_PASSCODE})
    sources = Sources(env=env)
    t.saw(sources)

    # type 1 and 2, from a file and from the environment; and a missing variable
    pass_file = write(tmp_path / "ct.pass", PASSCODE + "\n")
    template = UserTemplate("{calling_ae}", MappingProxyType({}))
    for profile in (UsernameProfile(name="u", user=template, positive_response=True),
                    PasscodeProfile(name="p", user=template, passcode_file=pass_file),
                    PasscodeProfile(name="e", user=template, passcode_env="CT_PASS")):
        item = identity.build(profile, _ctx(sources))
        t.saw(profile, item, identity.inject(rq(), item))
    t.expect_error(lambda: identity.build(PasscodeProfile(name="e", user=template, passcode_env="NOPE"),
                                          _ctx(sources)))

    # type 5 minted (ES256, HS256) and verified; then every failure path
    es_key = write(tmp_path / "es.pem", pem)
    hs_file = write(tmp_path / "hs.key", HMAC_SECRET)
    tokens: list[bytes] = []
    for profile in (JwtProfile(name="j", algorithm="ES256", key=es_key, issuer="p", audience=("PACS",),
                               subject=template),
                    JwtProfile(name="h", algorithm="HS256", secret_file=hs_file, issuer="p", audience=("PACS",),
                               subject=template)):
        item = identity.build(profile, _ctx(sources))
        tokens.append(item.primary)
        t.secret(item.primary)
        t.secret(item.primary.split(b".")[2])  # the signature alone
        t.saw(profile, item, identity.inject(rq(), item))
    check = JwtCheck(public_key=write(tmp_path / "es.pub", public_pem(k.ec)), issuer=("p",), audience=("PACS",))
    verify = VerifyContext(NOW, sources)
    policy = ClientIdentityPolicy(mode="verify", jwt=check)
    t.saw(identity.screen(policy, rq(identity=UserIdentityRQSubItem(5, True, tokens[0])), verify))
    expired = VerifyContext(NOW + dt.timedelta(hours=2), sources)
    t.saw(identity.screen(policy, rq(identity=UserIdentityRQSubItem(5, True, tokens[0])), expired))
    t.saw(identity.screen(policy, rq(identity=UserIdentityRQSubItem(5, True, tokens[1])), verify))  # HS256 refused
    forged = tokens[0][:-6] + b"AAAAAA"
    t.secret(forged)
    t.saw(identity.screen(policy, rq(identity=UserIdentityRQSubItem(5, True, forged)), verify))
    hs_policy = ClientIdentityPolicy(mode="verify", jwt=JwtCheck(secret_file=hs_file))
    t.saw(identity.screen(hs_policy, rq(identity=UserIdentityRQSubItem(5, True, tokens[1])), verify))

    # a static token file, and one that does not parse (its content must not be echoed)
    static = sign_token({"alg": "ES256"}, {"sub": "x", "exp": int(NOW.timestamp()) + 60}, k.ec)
    t.secret(static)
    t.saw(identity.build(JwtProfile(name="s", token_file=write(tmp_path / "s.jwt", static)), _ctx(sources)))
    garbage = "garbage-token-" + "Z" * 30
    t.secret(garbage)
    t.expect_error(lambda: identity.build(JwtProfile(name="g", token_file=write(tmp_path / "g.jwt", garbage)),
                                          _ctx(sources)))
    bad_key = write(tmp_path / "bad.pem", broken_pem(KEY_MARKER))
    t.secret(KEY_MARKER)
    t.expect_error(lambda: identity.build(JwtProfile(name="b", algorithm="ES256", key=bad_key, issuer="p",
                                                     audience=("A",), subject=template), _ctx(sources)))

    # type 2 verified: right and wrong passcodes
    users = write(tmp_path / "users", identity.hash_passcode_line("tech", PASSCODE, os.urandom(16), n=1024))
    pw_policy = ClientIdentityPolicy(mode="verify", passcodes=users)
    for guess in (PASSCODE, WRONG_PASSCODE):
        item = UserIdentityRQSubItem(2, True, b"tech", guess.encode())
        t.saw(item, identity.screen(pw_policy, rq(identity=item), verify))

    # type 4 from a file and minted; a too-large one (size error carries no content)
    assertion = b"<saml:Assertion ID='_secret-assertion-id-42'>secret-assertion-body</saml:Assertion>"
    t.secret(assertion)
    t.secret(b"secret-assertion-body")
    saml_file = write(tmp_path / "a.xml", assertion)
    t.saw(identity.build(SamlProfile(name="sf", assertion_file=saml_file), _ctx(sources)))
    if identity_saml_available():
        mint = SamlMint(key=write(tmp_path / "saml.key", private_pem(k.rsa)),
                        cert=write(tmp_path / "saml.crt", self_signed(k.rsa)), issuer="p", audience=("A",),
                        subject=template)
        signed = identity.build(SamlProfile(name="sm", mint=mint), _ctx(sources))
        signature = signed.primary.split(b"SignatureValue>")[1].split(b"<")[0].strip()
        t.secret(signature)
        t.saw(signed)
    big = b"<a>" + b"secret-bulk-" * 6000 + b"</a>"
    t.secret(b"secret-bulk-secret-bulk-")
    t.expect_error(lambda: identity.build(SamlProfile(name="big", assertion_file=write(tmp_path / "big.xml", big)),
                                          _ctx(sources)))
    t.expect_error(lambda: identity.inject(rq(), UserIdentityRQSubItem(4, False, big[:65000])))

    # the AC side
    plan = identity.ResponsePlan(injected=True, require_response=True)
    t.expect_error(lambda: identity.finish_ac(_ac(), plan))
    t.saw(plan, identity.add_response(_ac(), b"server-response-secret"))
    t.secret(b"server-response-secret")

    # the config loader: an inline passcode is refused without repeating it
    text = textwrap.dedent(f"""\
        listeners: [{{name: l, address: "127.0.0.1:0"}}]
        upstreams: {{pacs: {{address: "127.0.0.1:104"}}}}
        default_upstream: pacs
        identities:
          x: {{type: username_passcode, username: u, passcode: "{PASSCODE}"}}
    """)
    t.expect_error(lambda: config.load_text(text, str(tmp_path / "proxy.yaml"), base_dir=tmp_path))


def identity_saml_available() -> bool:
    from proxy import identity_saml

    return identity_saml.available()


def _ac() -> Any:
    from tests.test_identity import ac

    return ac(UserIdentityACSubItem(b""))


def test_no_kerberos_secret_in_logs(tmp_path: Path, transcript: Transcript, monkeypatch: pytest.MonkeyPatch) -> None:
    require_module("gssapi")
    from proxy.identity_kerberos import GssapiBackend

    with kdc.realm(tmp_path / "krb5", dict(os.environ)) as realm:
        for name, value in realm.env.items():
            if name.startswith("KRB5"):
                monkeypatch.setenv(name, value)
        backend = GssapiBackend()
        sources = Sources(kerberos=backend)
        profile = KerberosProfile(name="k", service=kdc.SERVICE, keytab=realm.client_keytab, principal=kdc.CLIENT,
                                  renew_before=7200.0)
        t = transcript
        t.expect_records = True
        for keytab in (realm.client_keytab, realm.service_keytab):
            data = keytab.read_bytes()
            t.secret(data[len(data) // 2: len(data) // 2 + 16])  # key bytes from the middle of the keytab
        first = identity.build(profile, _ctx(sources))
        second = identity.build(profile, _ctx(sources))  # renewed credentials, DEBUG logged
        for item in (first, second):
            t.secret(item.primary)
        policy = ClientIdentityPolicy(mode="verify", kerberos=KerberosCheck(keytab=realm.service_keytab))
        verify = VerifyContext(dt.datetime.now(dt.UTC), sources)
        ok = identity.screen(policy, rq(identity=UserIdentityRQSubItem(3, True, first.primary)), verify)
        assert ok.failure is None and ok.local_response
        t.secret(ok.local_response)
        replay = identity.screen(policy, rq(identity=UserIdentityRQSubItem(3, True, first.primary)), verify)
        assert replay.failure is not None
        t.saw(first, second, ok, replay, backend, identity.inject(rq(), second))
        t.expect_error(lambda: backend.accept(KerberosCheck(keytab=realm.service_keytab), b"\x60\x01garbage"))
