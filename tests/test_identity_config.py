"""proxy.yaml `identities:` and a listener's `client_identity:`: what loads, and every mistake
reported as `path:line:col: error: ...` at its place, never with a secret in it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from proxy import config, identity
from proxy.config import ConfigErrors
from proxy.identity import (
    ClientIdentityPolicy,
    JwtProfile,
    PasscodeProfile,
    SamlProfile,
    UsernameProfile,
)
from tests.identity_keys import HMAC_SECRET, broken_pem, keys, private_pem, public_pem, self_signed, write

HEAD = """\
listeners:
  - name: ward
    address: "127.0.0.1:0"
upstreams:
  pacs: {address: "127.0.0.1:104"}
default_upstream: pacs
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    k = keys()
    write(tmp_path / "secrets/jwt-es256.pem", private_pem(k.ec))
    write(tmp_path / "secrets/jwt-rsa.pem", private_pem(k.rsa))
    write(tmp_path / "secrets/small-rsa.pem", private_pem(k.rsa_small))
    write(tmp_path / "secrets/ec384.pem", private_pem(k.ec384))
    write(tmp_path / "secrets/hs.key", HMAC_SECRET)
    write(tmp_path / "secrets/short.key", b"too-short")
    write(tmp_path / "secrets/ct.pass", "ct-passcode\n")
    write(tmp_path / "secrets/saml.xml", "<saml:Assertion xmlns:saml='urn:oasis:names:tc:SAML:2.0:assertion'/>")
    write(tmp_path / "secrets/saml.key", private_pem(k.rsa))
    write(tmp_path / "secrets/saml.crt", self_signed(k.rsa), 0o644)
    write(tmp_path / "secrets/static.jwt", "eyJhbGciOiJIUzI1NiJ9.e30.c2ln\n")
    write(tmp_path / "keys/idp.pub", public_pem(k.ec), 0o644)
    write(tmp_path / "keys/idp.jwks", json.dumps({"keys": [identity.public_jwk(k.ec.public_key(), "a")]}), 0o644)
    write(tmp_path / "secrets/users", identity.hash_passcode_line("tech", "pw", b"s" * 16, n=16) + "\n")
    write(tmp_path / "secrets/bad-users", "tech:nonsense\n")
    write(tmp_path / "secrets/empty.keytab", b"\x05\x02")
    return tmp_path


def load(site: Path, text: str) -> config.ProxyConfig:
    path = site / "proxy.yaml"
    path.write_text(textwrap.dedent(text))
    return config.load(path)


def errors(site: Path, text: str) -> list[str]:
    path = site / "proxy.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigErrors) as info:
        config.load(path)
    return [e.render() for e in info.value.errors]


def one_error(site: Path, text: str) -> str:
    found = errors(site, text)
    assert len(found) == 1, found
    return found[0]


CONTRACT = HEAD + """\
identities:
  pacs-jwt:
    type: jwt
    key: secrets/jwt-es256.pem      # PEM private key (or secret_file: for HS256)
    algorithm: ES256
    issuer: dicom-proxy
    audience: PACS
    subject: "{calling_ae}"
    ttl: 300
    positive_response: true
  ct-login:
    type: username_passcode
    username: "{calling_ae}"
    passcode_file: secrets/ct.pass
"""


def test_the_contract_example_loads(site: Path) -> None:
    cfg = load(site, CONTRACT)
    jwt = cfg.identities["pacs-jwt"]
    assert isinstance(jwt, JwtProfile)
    assert (jwt.algorithm, jwt.key, jwt.issuer, jwt.audience, jwt.ttl, jwt.positive_response) == (
        "ES256", site / "secrets/jwt-es256.pem", "dicom-proxy", ("PACS",), 300, True)
    assert jwt.subject is not None and jwt.subject.template == "{calling_ae}"
    login = cfg.identities["ct-login"]
    assert isinstance(login, PasscodeProfile) and login.passcode_file == site / "secrets/ct.pass"
    assert cfg.listeners[0].client_identity == ClientIdentityPolicy()  # default: pass


def test_every_profile_type_loads(site: Path) -> None:
    cfg = load(site, HEAD + textwrap.dedent("""\
        identities:
          user: {type: username, username: "svc-{called_ae}", ae_map: {CT01: ct-one, "MR 1": mr}}
          env-pass: {type: username_passcode, username: tech, passcode_env: CT_PASS_FOR_TEST}
          hs: {type: jwt, secret_file: secrets/hs.key, issuer: p, audience: [A, B], ae_map: {CT01: ct},
               claims: {site: north, n: 1, ok: true, roles: [a, b], nested: {x: null}}, key_id: k1,
               require_response: true}
          rsa: {type: jwt, key: secrets/jwt-rsa.pem, issuer: p, audience: A, subject: "{calling_ae}"}
          static: {type: jwt, token_file: secrets/static.jwt}
          saml-file: {type: saml, assertion_file: secrets/saml.xml}
          saml-minted: {type: saml, key: secrets/saml.key, cert: secrets/saml.crt, issuer: p, audience: urn:x,
                        subject: "{calling_ae}", ttl: 60, attributes: {role: [modality, ct]}}
    """))
    user = cfg.identities["user"]
    assert isinstance(user, UsernameProfile) and dict(user.user.ae_map) == {"CT01": "ct-one", "MR 1": "mr"}
    hs = cfg.identities["hs"]
    assert isinstance(hs, JwtProfile) and hs.algorithm == "HS256" and hs.audience == ("A", "B")
    assert hs.require_response and hs.positive_response  # require implies asking
    assert dict(hs.claims) == {"site": "north", "n": 1, "ok": True, "roles": ["a", "b"], "nested": {"x": None}}
    rsa = cfg.identities["rsa"]
    assert isinstance(rsa, JwtProfile) and rsa.algorithm == "RS256"  # from the key
    assert isinstance(cfg.identities["saml-minted"], SamlProfile)
    assert any("CT_PASS_FOR_TEST is not set" in w for w in cfg.warnings)


def test_a_rule_may_name_a_profile_and_an_unknown_one_is_an_error(site: Path) -> None:
    rules = site / "rules.yaml"
    rules.write_text("version: 1\ndefault: reject\nrules:\n  - name: ct\n    match: {calling_ae: CT01}\n"
                     "    action: accept\n    identity: pacs-jwt\n")
    cfg = load(site, CONTRACT + "rules: rules.yaml\n")
    assert cfg.rules is not None
    rules.write_text(rules.read_text().replace("pacs-jwt", "pacs-jtw"))
    message = one_error(site, CONTRACT + "rules: rules.yaml\n")
    assert "rules.yaml:7:" in message and "unknown identity profile 'pacs-jtw'" in message
    assert "'ct-login', 'pacs-jwt'" in message


def test_client_identity_policies_load(site: Path) -> None:
    cfg = load(site, """\
        listeners:
          - name: a
            address: "127.0.0.1:0"
            client_identity: {mode: strip}
          - name: b
            address: "127.0.0.1:0"
            client_identity: {mode: replace, identity: svc}
          - name: c
            address: "127.0.0.1:0"
            client_identity:
              mode: verify
              required: false
              forward: true
              jwt: {jwks: keys/idp.jwks, issuer: idp, audience: [dicom-proxy], leeway: 10, username_claim: upn}
              passcodes: secrets/users
          - name: d
            address: "127.0.0.1:0"
            client_identity:
              mode: verify
              jwt: {public_key: keys/idp.pub, algorithms: [ES256]}
          - name: e
            address: "127.0.0.1:0"
            client_identity: {mode: verify, jwt: {secret_file: secrets/hs.key}}
        upstreams:
          pacs: {address: "127.0.0.1:104"}
        default_upstream: pacs
        identities:
          svc: {type: username, username: proxy}
    """)
    a, b, c, d, e = (listener.client_identity for listener in cfg.listeners)
    assert a.mode == "strip" and b.mode == "replace" and b.identity == "svc"
    assert c.mode == "verify" and not c.required and c.forward and c.passcodes == site / "secrets/users"
    assert c.jwt is not None and c.jwt.jwks == site / "keys/idp.jwks" and c.jwt.issuer == ("idp",)
    assert c.jwt.leeway == 10 and c.jwt.username_claim == "upn"
    assert d.jwt is not None and d.jwt.algorithms == ("ES256",) and d.required and not d.forward
    assert e.jwt is not None and e.jwt.secret_file == site / "secrets/hs.key"


IDENTITY_MISTAKES = [
    ("  x: {type: password}\n", "8:13: error: unknown identity type 'password' in identity profile 'x' "
                                "(expected one of: username, username_passcode, jwt, saml, kerberos)"),
    ("  x: {username: a}\n", "8:6: error: missing required key 'type'"),
    ("  x: {type: jwt, key: secrets/missing.pem, issuer: i, audience: a, subject: s}\n",
     "8:23: error: 'key' in identity profile 'x': cannot read"),
    ("  x: {type: jwt, key: secrets/jwt-es256.pem, secret_file: secrets/hs.key, issuer: i, audience: a, subject: s}\n",
     "8:46: error: identity profile 'x' has both 'key' and 'secret_file': use only one of 'key', 'secret_file', "
     "'token_file'"),
    ("  x: {type: jwt, issuer: i, audience: a, subject: s}\n",
     "8:6: error: identity profile 'x' needs one of 'key', 'secret_file', 'token_file'"),
    ("  x: {type: username_passcode, username: u, passcode: hunter2}\n",
     "8:45: error: 'passcode' must not be written in proxy.yaml (identity profile 'x'): put it in a file named "
     "by 'passcode_file' (chmod 600) or an environment variable named by 'passcode_env'"),
    ("  x: {type: username_passcode, username: u, password: hunter2, passcode_file: secrets/ct.pass}\n",
     "8:45: error: 'password' must not be written in proxy.yaml"),
    ("  x: {type: jwt, secret: hunter2hunter2, issuer: i, audience: a, subject: s}\n",
     "8:18: error: 'secret' must not be written in proxy.yaml (identity profile 'x'): put it in a file named by "
     "'secret_file'"),
    ("  x: {type: username_passcode, username: u}\n", "needs one of 'passcode_file', 'passcode_env'"),
    ("  x: {type: username_passcode, username: u, passcode_env: 'not a name'}\n",
     "must be an environment variable name"),
    ("  x: {type: username}\n", "8:6: error: identity profile 'x' needs 'username'"),
    ("  x: {type: username, username: '{calling}'}\n", "unknown placeholder {calling}"),
    ("  x: {type: username, ae_map: {CT01: a, 'CT01 ': b}}\n", "AE title 'CT01' is listed twice"),
    ("  x: {type: jwt, key: secrets/jwt-es256.pem, algorithm: RS256, issuer: i, audience: a, subject: s}\n",
     "the key in"),
    ("  x: {type: jwt, key: secrets/jwt-es256.pem, algorithm: HS512, issuer: i, audience: a, subject: s}\n",
     "unknown JWT algorithm 'HS512'"),
    ("  x: {type: jwt, key: secrets/small-rsa.pem, issuer: i, audience: a, subject: s}\n",
     "an RSA key of 1024 bits is too small"),
    ("  x: {type: jwt, key: secrets/ec384.pem, issuer: i, audience: a, subject: s}\n", "secp384r1 is not supported"),
    ("  x: {type: jwt, key: secrets/ct.pass, issuer: i, audience: a, subject: s}\n", "not a PEM private key"),
    ("  x: {type: jwt, secret_file: secrets/short.key, issuer: i, audience: a, subject: s}\n",
     "an HS256 secret needs at least 32 bytes, the file holds 9"),
    ("  x: {type: jwt, secret_file: secrets/hs.key, algorithm: ES256, issuer: i, audience: a, subject: s}\n",
     "'secret_file' is for HS256"),
    ("  x: {type: jwt, key: secrets/jwt-es256.pem, audience: a, subject: s}\n", "missing required key 'issuer'"),
    ("  x: {type: jwt, key: secrets/jwt-es256.pem, issuer: i, audience: a, subject: s, claims: {exp: 1}}\n",
     "claim 'exp' in identity profile 'x' is set by the proxy"),
    ("  x: {type: jwt, key: secrets/jwt-es256.pem, issuer: i, audience: a, subject: s, ttl: 0}\n",
     "'ttl' in identity profile 'x' (seconds) must be between 1 and 86400"),
    ("  x: {type: jwt, token_file: secrets/static.jwt, issuer: i}\n", "'issuer' has no effect with 'token_file'"),
    ("  x: {type: jwt, token_file: secrets/ct.pass}\n", "a compact JWS has 3 parts, this token has 1"),
    ("  x: {type: jwt, token: abc.def.ghi}\n", "'token' must not be written in proxy.yaml"),
    ("  x: {type: saml, assertion_file: secrets/ct.pass}\n", "does not hold XML"),
    ("  x: {type: saml, assertion: '<a/>'}\n", "'assertion' must not be written in proxy.yaml"),
    ("  x: {type: saml, assertion_file: secrets/saml.xml, issuer: i}\n", "'issuer' has no effect with"),
    ("  x: {type: saml, key: secrets/saml.key, issuer: i, audience: a, subject: s}\n", "missing required key 'cert'"),
    ("  x: {type: saml, key: secrets/saml.key, cert: secrets/ct.pass, issuer: i, audience: a, subject: s}\n",
     "not a PEM certificate"),
    ("  x: {type: username, username: u, positive_response: false, require_response: true}\n",
     "'require_response: true' needs 'positive_response: true'"),
    ("  x: {type: username, username: u, positive_response: yes}\n", "must be true or false"),
    ("  x: {type: username, username: u, keytab: k}\n", "unknown key 'keytab' in identity profile 'x' (type username)"),
    ("  x: {type: kerberos, keytab: secrets/empty.keytab}\n", "missing required key 'service'"),
    ("  x: {type: kerberos, service: 'not a principal', keytab: secrets/empty.keytab}\n",
     "must be a Kerberos principal"),
    ("  'bad name': {type: username, username: u}\n", "identity profile name 'bad name' must be"),
]


@pytest.mark.parametrize(("profile", "expected"), IDENTITY_MISTAKES)
def test_identity_profile_mistakes(site: Path, profile: str, expected: str) -> None:
    message = one_error(site, HEAD + "identities:\n" + profile)
    assert message.startswith(f"{site / 'proxy.yaml'}:") or message.startswith("proxy.yaml:") or ":" in message
    assert expected in message, message
    assert "hunter2" not in message


def test_error_format_is_path_line_col(site: Path) -> None:
    message = one_error(site, HEAD + "identities:\n  x: {type: password}\n")
    assert message == (f"{site / 'proxy.yaml'}:8:13: error: unknown identity type 'password' in identity profile "
                       "'x' (expected one of: username, username_passcode, jwt, saml, kerberos)")


def test_key_file_content_is_never_shown(site: Path) -> None:
    write(site / "secrets/not-a-key.pem", broken_pem("SECRETSECRETSECRET"))
    message = one_error(site, HEAD + "identities:\n  x: {type: jwt, key: secrets/not-a-key.pem, issuer: i, "
                                     "audience: a, subject: s}\n")
    assert "not a PEM private key" in message and "SECRETSECRET" not in message


def test_world_readable_secret_is_warned_about(site: Path) -> None:
    (site / "secrets/ct.pass").chmod(0o644)
    cfg = load(site, CONTRACT)
    assert any("ct.pass is readable by other users; chmod 600 it" in w for w in cfg.warnings)


CLIENT_MISTAKES = [
    ("{mode: trust}", "unknown mode 'trust'"),
    ("{mode: replace}", "'mode: replace' needs 'identity'"),
    ("{mode: replace, identity: nope}", "unknown identity profile 'nope'"),
    ("{mode: verify}", "'mode: verify' needs at least one of 'jwt', 'passcodes', 'kerberos'"),
    ("{mode: pass, jwt: {jwks: keys/idp.jwks}}", "'jwt' in 'client_identity' of listener 'ward' is only used with "
                                                 "'mode: verify' (mode is 'pass')"),
    ("{mode: strip, identity: svc}", "'identity' in 'client_identity' of listener 'ward' is only used with "
                                     "'mode: replace'"),
    ("{mode: verify, jwt: {}}", "needs one of 'public_key', 'jwks', 'secret_file'"),
    ("{mode: verify, jwt: {jwks: keys/idp.jwks, public_key: keys/idp.pub}}", "has both 'public_key' and 'jwks'"),
    ("{mode: verify, jwt: {public_key: keys/idp.pub, algorithms: [HS256]}}", "HS256 goes with 'secret_file' only"),
    ("{mode: verify, jwt: {public_key: keys/idp.pub, algorithms: [RS256]}}", "verifies ES256"),
    ("{mode: verify, jwt: {secret: abcdefabcdefabcdefabcdefabcdefabcdef}}", "'secret' must not be written"),
    ("{mode: verify, jwt: {jwks: secrets/ct.pass}}", "'jwks' in 'jwt' in 'client_identity' of listener 'ward': "),
    ("{mode: verify, jwt: {jwks: keys/idp.jwks, leeway: -1}}", "must not be negative"),
    ("{mode: verify, passcodes: secrets/bad-users}", "line 1: expected 'username:scrypt$N$r$p$salt$hash'"),
    ("{mode: verify, passcodes: secrets/none}", "cannot read"),
    ("{mode: verify, jwt: {jwks: keys/idp.jwks}, extra: 1}", "unknown key 'extra' in 'client_identity'"),
]


@pytest.mark.parametrize(("policy", "expected"), CLIENT_MISTAKES)
def test_client_identity_mistakes(site: Path, policy: str, expected: str) -> None:
    text = HEAD.replace('    address: "127.0.0.1:0"\n',
                        f'    address: "127.0.0.1:0"\n    client_identity: {policy}\n')
    text += "identities:\n  svc: {type: username, username: u}\n"
    message = one_error(site, text)
    assert expected in message, message
    assert message.startswith(str(site / "proxy.yaml") + ":4:")


def test_missing_optional_packages_are_reported(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import identity_kerberos, identity_saml

    monkeypatch.setattr(identity_kerberos, "available", lambda: False)
    monkeypatch.setattr(identity_saml, "available", lambda: False)
    found = errors(site, HEAD + textwrap.dedent("""\
        identities:
          k: {type: kerberos, service: dicom/pacs@R, keytab: secrets/empty.keytab}
          s: {type: saml, key: secrets/saml.key, cert: secrets/saml.crt, issuer: i, audience: a, subject: s}
    """))
    assert any("needs the optional python-gssapi package" in m for m in found)
    assert any("needs the optional signxml package" in m for m in found)
