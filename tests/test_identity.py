"""proxy.identity: profiles (types 1, 2, 4, 5; Kerberos in test_identity_kerberos.py), templates,
injection into the A-ASSOCIATE-RQ, the AC's 0x59, the client_identity policies and verification."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from proxy import identity
from proxy.dul.constants import APPLICATION_CONTEXT_NAME
from proxy.dul.items import (
    ApplicationContextItem,
    MaximumLengthSubItem,
    PresentationContextACItem,
    UnknownItem,
    UserIdentityACSubItem,
    UserIdentityRQSubItem,
    UserInformationItem,
)
from proxy.dul.pdus import AAssociateAC, AAssociateRQ, parse_pdu
from proxy.identity import (
    BuildContext,
    ClientIdentityPolicy,
    IdentityError,
    IdentitySizeError,
    JwtCheck,
    JwtProfile,
    PasscodeProfile,
    SamlMint,
    SamlProfile,
    Sources,
    UsernameProfile,
    UserTemplate,
    VerifyContext,
)
from proxy.policy.model import IdentityFacts
from tests.identity_keys import (
    HMAC_SECRET,
    NOW,
    b64url,
    counter_random,
    decode_and_check,
    keys,
    private_pem,
    public_pem,
    rq,
    self_signed,
    sign_token,
    unb64url,
    write,
)

# ---------------------------------------------------------------------------------------- helpers


def ctx(calling: str = "CT01", called: str = "PACS", *, now: dt.datetime = NOW, sources: Sources | None = None,
        env: dict[str, str] | None = None) -> BuildContext:
    return BuildContext(calling, called, now, counter_random(),
                        sources or Sources(env=MappingProxyType(env or {})))


def vctx(now: dt.datetime = NOW, sources: Sources | None = None) -> VerifyContext:
    return VerifyContext(now, sources or Sources())


def template(text: str | None = None, **ae_map: str) -> UserTemplate:
    return UserTemplate(text, MappingProxyType(ae_map))


def ac(*user_items: Any) -> AAssociateAC:
    return AAssociateAC(
        protocol_version=1,
        called_ae="PACS".ljust(16),
        calling_ae="CT01".ljust(16),
        items=(
            ApplicationContextItem(APPLICATION_CONTEXT_NAME),
            PresentationContextACItem(1, 0, ()),
            UserInformationItem((MaximumLengthSubItem(16384), *user_items)),
        ),
    )


def roundtrip(pdu: AAssociateRQ | AAssociateAC) -> Any:
    """Encode and parse again: the codec recomputes every length."""
    return parse_pdu(pdu.encode())


# ---------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("tmpl", "calling", "called", "expected"),
    [
        ("{calling_ae}", "CT01", "PACS", "CT01"),
        ("svc-{calling_ae}@{called_ae}", "CT01  ", "PACS", "svc-CT01@PACS"),
        ("fixed-user", "ANY", "PACS", "fixed-user"),
        ("{{literal}}-{calling_ae}", "MR1", "PACS", "{literal}-MR1"),
    ],
)
def test_template_renders(tmpl: str, calling: str, called: str, expected: str) -> None:
    assert template(identity.check_template(tmpl)).render(calling, called) == expected


@pytest.mark.parametrize("bad", ["{calling}", "{calling_ae.__class__}", "{calling_ae!r}", "{calling_ae:>10}",
                                 "{0}", "{}", "{calling_ae", "x}"])
def test_bad_templates_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="template"):
        identity.check_template(bad)


def test_ae_map_wins_and_unknown_ae_falls_back_to_the_template() -> None:
    t = template("generic-{calling_ae}", CT01="ct-scanner-1", MR01="mr-1")
    assert t.render("CT01", "PACS") == "ct-scanner-1"
    assert t.render("CT01      ", "PACS") == "ct-scanner-1"  # padding does not count
    assert t.render("US07", "PACS") == "generic-US07"


def test_unknown_ae_without_a_template_is_refused_as_calling_ae_not_recognized() -> None:
    t = template(None, CT01="ct-scanner-1")
    with pytest.raises(IdentityError, match="US07") as caught:
        t.render("US07", "PACS")
    assert caught.value.reject == (1, 1, 3)


# ---------------------------------------------------------------------------------------- type 1 and 2


def test_username_profile() -> None:
    profile = UsernameProfile(name="u", user=template("{calling_ae}"), positive_response=True)
    item = identity.build(profile, ctx("CT01"))
    assert (item.identity_type, item.positive_response_requested, item.primary, item.secondary) == (
        1, True, b"CT01", b"")


def test_username_is_utf8() -> None:
    item = identity.build(UsernameProfile(name="u", user=template("Jürgen")), ctx())
    assert item.primary == "Jürgen".encode()


def test_require_response_implies_asking_for_one() -> None:
    item = identity.build(UsernameProfile(name="u", user=template("x"), require_response=True), ctx())
    assert item.positive_response_requested


def test_passcode_from_file_and_reread_when_it_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "ct.pass", "first-passcode\n")
    profile = PasscodeProfile(name="p", user=template(None, CT01="ct-user"), passcode_file=path)
    sources = Sources()
    item = identity.build(profile, ctx(sources=sources))
    assert (item.identity_type, item.primary, item.secondary) == (2, b"ct-user", b"first-passcode")
    write(path, "second-passcode-longer\n")
    assert identity.build(profile, ctx(sources=sources)).secondary == b"second-passcode-longer"


def test_passcode_from_environment() -> None:
    profile = PasscodeProfile(name="p", user=template("{calling_ae}"), passcode_env="CT_PASS")
    item = identity.build(profile, ctx(env={"CT_PASS": "from-env"}))
    assert item.secondary == b"from-env"
    with pytest.raises(IdentityError, match="CT_PASS") as caught:
        identity.build(profile, ctx(env={}))
    assert caught.value.reject == (2, 3, 1)


def test_missing_or_empty_passcode_file(tmp_path: Path) -> None:
    profile = PasscodeProfile(name="p", user=template("x"), passcode_file=tmp_path / "nope")
    with pytest.raises(IdentityError, match="cannot read passcode file"):
        identity.build(profile, ctx())
    empty = PasscodeProfile(name="p", user=template("x"), passcode_file=write(tmp_path / "empty", "\n"))
    with pytest.raises(IdentityError, match="empty"):
        identity.build(empty, ctx())


# ---------------------------------------------------------------------------------------- type 5: JWT


def jwt_profile(tmp_path: Path, algorithm: str, **extra: Any) -> tuple[JwtProfile, Any]:
    k = keys()
    if algorithm == "HS256":
        path = write(tmp_path / "hs.key", HMAC_SECRET)
        return JwtProfile(name="j", algorithm="HS256", secret_file=path, issuer="dicom-proxy", audience=("PACS",),
                          subject=template("{calling_ae}"), **extra), HMAC_SECRET
    key = {"RS256": k.rsa, "ES256": k.ec, "EdDSA": k.ed}[algorithm]
    path = write(tmp_path / f"{algorithm}.pem", private_pem(key))
    return JwtProfile(name="j", algorithm=algorithm, key=path, issuer="dicom-proxy",  # type: ignore[arg-type]
                      audience=("PACS",), subject=template("{calling_ae}"), **extra), key


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA", "HS256"])
def test_minted_jwt_verifies_independently(tmp_path: Path, algorithm: str) -> None:
    profile, key = jwt_profile(tmp_path, algorithm, ttl=300, key_id="k1", positive_response=True,
                               claims=MappingProxyType({"site": "north", "roles": ["modality"]}))
    item = identity.build(profile, ctx("CT01", "PACS"))
    assert item.identity_type == 5 and item.positive_response_requested and item.secondary == b""
    header, claims = decode_and_check(item.primary, key)
    assert header == {"alg": algorithm, "typ": "JWT", "kid": "k1"}
    now = int(NOW.timestamp())
    assert claims["iss"] == "dicom-proxy" and claims["sub"] == "CT01" and claims["aud"] == "PACS"
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (now, now, now + 300)
    assert claims["site"] == "north" and claims["roles"] == ["modality"]
    assert len(unb64url(claims["jti"])) == 16
    assert item.primary.count(b".") == 2 and not item.primary.startswith(b"Bearer")


def test_each_token_has_its_own_jti_and_several_audiences_are_a_list(tmp_path: Path) -> None:
    profile, key = jwt_profile(tmp_path, "ES256")
    profile = JwtProfile(**{**profile.__dict__, "audience": ("PACS", "VNA")})
    context = ctx()
    first = decode_and_check(identity.build(profile, context).primary, key)[1]
    second = decode_and_check(identity.build(profile, context).primary, key)[1]
    assert first["jti"] != second["jti"]
    assert first["aud"] == ["PACS", "VNA"]


def test_a_naive_clock_is_refused(tmp_path: Path) -> None:
    profile, _key = jwt_profile(tmp_path, "HS256")
    with pytest.raises(IdentityError, match="timezone-aware"):
        identity.build(profile, ctx(now=NOW.replace(tzinfo=None)))


def test_key_rotation_is_picked_up_without_reload(tmp_path: Path) -> None:
    profile, key = jwt_profile(tmp_path, "ES256")
    sources = Sources()
    decode_and_check(identity.build(profile, ctx(sources=sources)).primary, key)
    other = keys().ed
    assert profile.key is not None
    write(profile.key, private_pem(other))
    rotated = JwtProfile(**{**profile.__dict__, "algorithm": "EdDSA"})
    decode_and_check(identity.build(rotated, ctx(sources=sources)).primary, other)


def test_wrong_key_for_algorithm_fails_cleanly(tmp_path: Path) -> None:
    profile, _key = jwt_profile(tmp_path, "ES256")
    wrong = JwtProfile(**{**profile.__dict__, "algorithm": "RS256"})
    with pytest.raises(IdentityError, match="RS256"):
        identity.build(wrong, ctx())


def test_static_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    k = keys().ec
    exp = int(NOW.timestamp()) + 3600
    first = sign_token({"alg": "ES256"}, {"sub": "a", "exp": exp}, k)
    second = sign_token({"alg": "ES256"}, {"sub": "bb", "exp": exp}, k)
    path = write(tmp_path / "static.jwt", first + b"\n")
    profile = JwtProfile(name="s", token_file=path)
    sources = Sources()
    assert identity.build(profile, ctx(sources=sources)).primary == first
    assert identity.build(profile, ctx(sources=sources)).primary == first  # cached
    write(path, second)
    assert identity.build(profile, ctx(sources=sources)).primary == second


def test_static_token_that_expired_or_is_not_a_jwt_is_refused(tmp_path: Path) -> None:
    k = keys().ec
    old = sign_token({"alg": "ES256"}, {"exp": int(NOW.timestamp()) - 10}, k)
    profile = JwtProfile(name="s", token_file=write(tmp_path / "old.jwt", old))
    with pytest.raises(IdentityError, match="expired 10 s ago"):
        identity.build(profile, ctx())
    junk = JwtProfile(name="s", token_file=write(tmp_path / "junk.jwt", "not-a-token"))
    with pytest.raises(IdentityError, match="3 parts"):
        identity.build(junk, ctx())


# ---------------------------------------------------------------------------------------- type 4: SAML


SAML_A = b'<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_a">A</saml:Assertion>'
SAML_B = b'<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_b">BB</saml:Assertion>'


def test_saml_assertion_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "assertion.xml", SAML_A + b"\n")
    profile = SamlProfile(name="s", assertion_file=path, positive_response=True)
    sources = Sources()
    item = identity.build(profile, ctx(sources=sources))
    assert (item.identity_type, item.primary, item.positive_response_requested) == (4, SAML_A, True)
    write(path, SAML_B)
    assert identity.build(profile, ctx(sources=sources)).primary == SAML_B
    write(path, "not xml")
    with pytest.raises(IdentityError, match="does not hold XML"):
        identity.build(profile, ctx(sources=sources))


def test_saml_minted_and_signed(tmp_path: Path) -> None:
    signxml = pytest.importorskip("signxml")
    k = keys().rsa
    cert = self_signed(k)
    mint = SamlMint(key=write(tmp_path / "saml.key", private_pem(k)), cert=write(tmp_path / "saml.crt", cert),
                    issuer="dicom-proxy", audience=("urn:pacs",), subject=template("{calling_ae}"), ttl=120,
                    attributes=MappingProxyType({"role": ("modality",)}))
    item = identity.build(SamlProfile(name="s", mint=mint), ctx("CT01"))
    assert item.identity_type == 4
    verified = signxml.XMLVerifier().verify(item.primary, x509_cert=cert.decode()).signed_xml
    ns = {"saml": "urn:oasis:names:tc:SAML:2.0:assertion"}
    assert verified.findtext("saml:Issuer", namespaces=ns) == "dicom-proxy"
    assert verified.findtext("saml:Subject/saml:NameID", namespaces=ns) == "CT01"
    assert verified.findtext("saml:Conditions/saml:AudienceRestriction/saml:Audience", namespaces=ns) == "urn:pacs"
    conditions = verified.find("saml:Conditions", namespaces=ns)
    assert conditions.get("NotBefore") == "2025-03-01T12:00:00Z"
    assert conditions.get("NotOnOrAfter") == "2025-03-01T12:02:00Z"
    # the signature sits right after the Issuer (SAML schema order) and covers the whole assertion
    assert b"<ds:Signature" in item.primary and item.primary.index(b"Issuer>") < item.primary.index(b"<ds:Signature")
    tampered = item.primary.replace(b">CT01<", b">MR01<")
    with pytest.raises(signxml.exceptions.InvalidSignature):
        signxml.XMLVerifier().verify(tampered, x509_cert=cert.decode())


# ---------------------------------------------------------------------------------------- inject


def test_inject_adds_the_subitem_and_the_codec_recomputes_lengths() -> None:
    item = UserIdentityRQSubItem(1, True, b"ct-user")
    original = rq()
    assert original.user_information is not None and original.user_information.find(UserIdentityRQSubItem) is None
    injected = roundtrip(identity.inject(original, item))
    assert isinstance(injected, AAssociateRQ)
    assert injected.user_information.find(UserIdentityRQSubItem) == item
    assert len(injected.encode()) == len(original.encode()) + 4 + 2 + 2 + 7 + 2
    # the other sub-items stay, in order, before the identity
    assert [type(i).__name__ for i in injected.user_information.items][-1] == "UserIdentityRQSubItem"


def test_inject_replaces_the_modality_identity_at_its_place() -> None:
    theirs = UserIdentityRQSubItem(2, True, b"them", b"their-pass")
    base = rq(identity=theirs)
    info = base.user_information
    assert info is not None
    base = base.with_user_information(UserInformationItem((*info.items, UnknownItem(0x5F, b"\x5f\x00\x00\x01z"))))
    ours = UserIdentityRQSubItem(5, False, b"a.b.c")
    out = roundtrip(identity.inject(base, ours))
    kinds = [i for i in out.user_information.items if isinstance(i, UserIdentityRQSubItem)]
    assert kinds == [ours]
    assert isinstance(out.user_information.items[-1], UnknownItem)  # order kept: replaced in place


def test_inject_into_an_rq_without_user_information() -> None:
    bare = rq()
    bare = AAssociateRQ(bare.protocol_version, bare.called_ae, bare.calling_ae,
                        tuple(i for i in bare.items if not isinstance(i, UserInformationItem)))
    out = roundtrip(identity.inject(bare, UserIdentityRQSubItem(1, False, b"u")))
    assert out.user_information.items == (UserIdentityRQSubItem(1, False, b"u"),)


def test_inject_refuses_a_user_information_item_over_65535_bytes() -> None:
    base = rq()
    info = base.user_information
    assert info is not None
    used = sum(len(i.encode()) for i in info.items)
    fits = 0xFFFF - used - 10  # exactly fills the item
    out = identity.inject(base, UserIdentityRQSubItem(5, False, b"x" * fits))
    assert len(out.user_information.encode()) == 4 + 0xFFFF  # type: ignore[union-attr]
    roundtrip(out)
    secret = b"S" * (fits + 1)
    with pytest.raises(IdentitySizeError) as caught:
        identity.inject(base, UserIdentityRQSubItem(5, False, secret))
    message = str(caught.value)
    assert "65,536 bytes" in message and "65,535" in message and "JWT" in message
    assert "SSSS" not in message and caught.value.reject == (1, 3, 2)


def test_inject_refuses_a_field_over_65535_bytes() -> None:
    with pytest.raises(IdentitySizeError, match="70,000 bytes"):
        identity.inject(rq(), UserIdentityRQSubItem(4, False, b"<" * 70000))


def test_build_refuses_a_too_large_assertion(tmp_path: Path) -> None:
    path = write(tmp_path / "big.xml", b"<a>" + b"x" * 70000 + b"</a>")
    with pytest.raises(IdentitySizeError, match="SAML assertion field is 70,007 bytes"):
        identity.build(SamlProfile(name="big", assertion_file=path), ctx())


def test_remove_identity() -> None:
    base = rq(identity=UserIdentityRQSubItem(1, False, b"u"))
    out = identity.remove_identity(base)
    assert out.user_information is not None and out.user_information.find(UserIdentityRQSubItem) is None
    assert identity.remove_identity(out) is out


# ---------------------------------------------------------------------------------------- the AC side


def test_strip_response() -> None:
    with_response = ac(UserIdentityACSubItem(b"ticket"))
    out = roundtrip(identity.strip_response(with_response))
    assert out.user_information.find(UserIdentityACSubItem) is None
    assert out.user_information.max_length == 16384
    plain = ac()
    assert identity.strip_response(plain) is plain


def test_add_response_replaces_any_other() -> None:
    out = roundtrip(identity.add_response(ac(UserIdentityACSubItem(b"theirs")), b""))
    assert [i for i in out.user_information.items if isinstance(i, UserIdentityACSubItem)] == [
        UserIdentityACSubItem(b"")]


def _screened(**kw: Any) -> identity.Screened:
    return identity.Screened(rq(), None, **kw)


def test_finish_ac_injected_without_client_identity_strips_the_response() -> None:
    profile = UsernameProfile(name="u", user=template("x"), positive_response=True)
    plan = identity.plan(_screened(), profile)
    out = identity.finish_ac(ac(UserIdentityACSubItem(b"")), plan)
    assert out.user_information is not None and out.user_information.find(UserIdentityACSubItem) is None


def test_finish_ac_passes_the_response_to_the_modality_own_identity() -> None:
    plan = identity.plan(_screened(client_sent=True, client_asked=True, forwarded=True), None)
    reply = ac(UserIdentityACSubItem(b"server-ticket"))
    assert identity.finish_ac(reply, plan) is reply


def test_finish_ac_require_response() -> None:
    profile = UsernameProfile(name="u", user=template("x"), require_response=True, positive_response=True)
    plan = identity.plan(_screened(), profile)
    with pytest.raises(IdentityError, match="require_response") as caught:
        identity.finish_ac(ac(), plan)
    assert caught.value.reject == (1, 2, 1)
    out = identity.finish_ac(ac(UserIdentityACSubItem(b"")), plan)
    assert out.user_information.find(UserIdentityACSubItem) is None  # type: ignore[union-attr]


def test_finish_ac_answers_for_an_identity_the_proxy_verified() -> None:
    plan = identity.plan(_screened(client_sent=True, client_asked=True, local_response=b"ap-rep"), None)
    out = roundtrip(identity.finish_ac(ac(UserIdentityACSubItem(b"upstream's")), plan))
    assert out.user_information.find(UserIdentityACSubItem) == UserIdentityACSubItem(b"ap-rep")


def test_finish_ac_replaced_identity_drops_the_upstream_response() -> None:
    screened = _screened(client_sent=True, client_asked=True, forwarded=True)
    profile = UsernameProfile(name="u", user=template("x"), positive_response=True)
    out = identity.finish_ac(ac(UserIdentityACSubItem(b"for-the-proxy")), identity.plan(screened, profile))
    assert out.user_information.find(UserIdentityACSubItem) is None  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------- screen (policies)


def test_screen_pass_keeps_the_item_and_shows_unverified_facts() -> None:
    base = rq(identity=UserIdentityRQSubItem(2, True, b"tech", b"pw"))
    out = identity.screen(ClientIdentityPolicy(), base, vctx())
    assert out.rq is base and out.forwarded and out.client_asked and out.failure is None
    assert out.facts == IdentityFacts(2, "tech")
    assert identity.screen(ClientIdentityPolicy(), rq(), vctx()).facts is None


@pytest.mark.parametrize("mode", ["strip", "replace"])
def test_screen_strip_and_replace_remove_the_item(mode: str) -> None:
    base = rq(identity=UserIdentityRQSubItem(1, True, b"tech"))
    policy = ClientIdentityPolicy(mode=mode, identity="svc" if mode == "replace" else None)  # type: ignore[arg-type]
    out = identity.screen(policy, base, vctx())
    assert out.rq.user_information.find(UserIdentityRQSubItem) is None  # type: ignore[union-attr]
    assert out.facts is None and not out.forwarded and out.client_sent
    assert out.profile == ("svc" if mode == "replace" else None)


def jwt_policy(tmp_path: Path, **kw: Any) -> ClientIdentityPolicy:
    check = JwtCheck(public_key=write(tmp_path / "pub.pem", public_pem(keys().ec), 0o644), issuer=("idp",),
                     audience=("dicom-proxy",), **kw)
    return ClientIdentityPolicy(mode="verify", jwt=check)


def claims(**kw: Any) -> dict[str, Any]:
    now = int(NOW.timestamp())
    base: dict[str, Any] = {"iss": "idp", "sub": "dr.who", "aud": "dicom-proxy", "iat": now, "exp": now + 60}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def es256(payload: dict[str, Any], **header: Any) -> UserIdentityRQSubItem:
    return UserIdentityRQSubItem(5, True, sign_token({"alg": "ES256", **header}, payload, keys().ec))


def test_screen_verify_jwt_valid(tmp_path: Path) -> None:
    out = identity.screen(jwt_policy(tmp_path), rq(identity=es256(claims())), vctx())
    assert out.failure is None and out.facts == IdentityFacts(5, "dr.who")
    assert out.rq.user_information.find(UserIdentityRQSubItem) is None  # type: ignore[union-attr]
    assert out.local_response == b"" and not out.forwarded


def test_screen_verify_forward_keeps_the_item(tmp_path: Path) -> None:
    policy = ClientIdentityPolicy(**{**jwt_policy(tmp_path).__dict__, "forward": True})
    base = rq(identity=es256(claims()))
    out = identity.screen(policy, base, vctx())
    assert out.rq is base and out.forwarded and out.local_response is None


@pytest.mark.parametrize(
    ("payload", "header", "reason"),
    [
        (claims(exp=int(NOW.timestamp()) - 31), {}, "expired 31 s ago"),
        (claims(nbf=int(NOW.timestamp()) + 100), {}, "not valid for another 100 s"),
        (claims(iat=int(NOW.timestamp()) + 100), {}, "issued 100 s in the future"),
        (claims(aud="other"), {}, "audience 'other' is not accepted"),
        (claims(aud=["x", "y"]), {}, "audience"),
        (claims(iss="evil"), {}, "issuer 'evil'"),
        (claims(exp=None), {}, "no 'exp'"),
        (claims(exp="soon"), {}, "'exp' is not a number"),
        (claims(sub=None), {}, "'sub' is missing"),
        (claims(), {"crit": ["x"]}, "crit"),
    ],
)
def test_screen_verify_jwt_claim_failures(tmp_path: Path, payload: dict[str, Any], header: dict[str, Any],
                                          reason: str) -> None:
    out = identity.screen(jwt_policy(tmp_path), rq(identity=es256(payload, **header)), vctx())
    assert out.failure is not None and reason in out.failure and out.reject == (1, 2, 1)
    assert out.facts is None


def test_leeway_tolerates_small_clock_skew(tmp_path: Path) -> None:
    skewed = claims(exp=int(NOW.timestamp()) - 20, nbf=int(NOW.timestamp()) + 20)
    assert identity.screen(jwt_policy(tmp_path), rq(identity=es256(skewed)), vctx()).failure is None


def test_audience_in_a_list_is_accepted(tmp_path: Path) -> None:
    item = es256(claims(aud=["vna", "dicom-proxy"]))
    assert identity.screen(jwt_policy(tmp_path), rq(identity=item), vctx()).failure is None


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: sign_token({"alg": "ES256"}, claims(), keys().ec_other), "signature does not verify"),
        (lambda: sign_token({"alg": "RS256"}, claims(), keys().rsa), "algorithm 'RS256' is not accepted"),
        (lambda: sign_token({"alg": "none"}, claims(), None), "algorithm 'none' is not accepted"),
        (lambda: sign_token({"alg": "HS256"}, claims(), public_pem(keys().ec)), "algorithm 'HS256'"),
        (lambda: b"a.b", "3 parts"),
        (lambda: b"\xff\xfe.x.y", "not ASCII"),
        (lambda: b"e30.!!!.sig", "not base64url"),
        (lambda: b64url(b"[1]").encode() + b".e30.", "header is not a JSON object"),
    ],
)
def test_screen_verify_jwt_signature_failures(tmp_path: Path, make: Any, reason: str) -> None:
    item = UserIdentityRQSubItem(5, False, make())
    out = identity.screen(jwt_policy(tmp_path), rq(identity=item), vctx())
    assert out.failure is not None and reason in out.failure, out.failure


def test_tampered_payload_fails(tmp_path: Path) -> None:
    token = es256(claims()).primary
    head, _body, sig = token.split(b".")
    forged = head + b"." + b64url(json.dumps(claims(sub="admin")).encode()).encode() + b"." + sig
    out = identity.screen(jwt_policy(tmp_path), rq(identity=UserIdentityRQSubItem(5, False, forged)), vctx())
    assert out.failure is not None and "signature" in out.failure


def test_bearer_prefix_is_tolerated(tmp_path: Path) -> None:
    item = es256(claims())
    bearer = UserIdentityRQSubItem(5, False, b"Bearer " + item.primary)
    assert identity.screen(jwt_policy(tmp_path), rq(identity=bearer), vctx()).failure is None


def jwks_file(tmp_path: Path) -> Path:
    k = keys()
    doc = {"keys": [identity.public_jwk(k.rsa.public_key(), "rsa-1"), identity.public_jwk(k.ec.public_key(), "ec-1"),
                    identity.public_jwk(k.ed.public_key(), "ed-1"), {"kty": "oct", "k": "c2VjcmV0"},
                    {**identity.public_jwk(k.ec.public_key(), "enc-1"), "use": "enc"}]}
    return write(tmp_path / "idp.jwks", json.dumps(doc), 0o644)


@pytest.mark.parametrize(("alg", "kid"), [("RS256", "rsa-1"), ("ES256", "ec-1"), ("EdDSA", "ed-1"), ("ES256", None)])
def test_verify_with_jwks(tmp_path: Path, alg: str, kid: str | None) -> None:
    key = {"RS256": keys().rsa, "ES256": keys().ec, "EdDSA": keys().ed}[alg]
    header = {"alg": alg, **({"kid": kid} if kid else {})}
    item = UserIdentityRQSubItem(5, False, sign_token(header, claims(), key))
    policy = ClientIdentityPolicy(mode="verify", jwt=JwtCheck(jwks=jwks_file(tmp_path), audience=("dicom-proxy",)))
    out = identity.screen(policy, rq(identity=item), vctx())
    assert out.failure is None and out.facts == IdentityFacts(5, "dr.who")


def test_jwks_unknown_kid_and_wrong_key_for_kid(tmp_path: Path) -> None:
    policy = ClientIdentityPolicy(mode="verify", jwt=JwtCheck(jwks=jwks_file(tmp_path)))
    unknown = UserIdentityRQSubItem(5, False, sign_token({"alg": "ES256", "kid": "nope"}, claims(), keys().ec))
    assert "no key with the token's 'kid'" in (identity.screen(policy, rq(identity=unknown), vctx()).failure or "")
    mislabeled = UserIdentityRQSubItem(5, False, sign_token({"alg": "RS256", "kid": "ec-1"}, claims(), keys().rsa))
    assert "kid" in (identity.screen(policy, rq(identity=mislabeled), vctx()).failure or "")


def test_jwks_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = jwks_file(tmp_path)
    policy = ClientIdentityPolicy(mode="verify", jwt=JwtCheck(jwks=path))
    sources = Sources()
    item = rq(identity=es256(claims(), kid="ec-1"))
    assert identity.screen(policy, item, vctx(sources=sources)).failure is None
    write(path, json.dumps({"keys": [identity.public_jwk(keys().ed.public_key(), "ed-1")]}))
    out = identity.screen(policy, item, vctx(sources=sources))
    assert out.failure is not None and "not accepted" in out.failure


def test_verify_hs256_with_secret_file(tmp_path: Path) -> None:
    policy = ClientIdentityPolicy(mode="verify", jwt=JwtCheck(secret_file=write(tmp_path / "s", HMAC_SECRET)))
    good = UserIdentityRQSubItem(5, False, sign_token({"alg": "HS256"}, claims(), HMAC_SECRET))
    assert identity.screen(policy, rq(identity=good), vctx()).facts == IdentityFacts(5, "dr.who")
    bad = UserIdentityRQSubItem(5, False, sign_token({"alg": "HS256"}, claims(), b"x" * 40))
    assert "signature" in (identity.screen(policy, rq(identity=bad), vctx()).failure or "")


def test_minted_tokens_pass_our_own_verifier(tmp_path: Path) -> None:
    profile, key = jwt_profile(tmp_path, "EdDSA")
    item = identity.build(profile, ctx("CT01"))
    check = JwtCheck(public_key=write(tmp_path / "ed.pub", public_pem(key)), issuer=("dicom-proxy",),
                     audience=("PACS",))
    assert identity.verify_jwt(check, item.primary, vctx()) == "CT01"


def test_verify_required_and_optional(tmp_path: Path) -> None:
    policy = jwt_policy(tmp_path)
    out = identity.screen(policy, rq(), vctx())
    assert out.failure is not None and "sent none" in out.failure and out.reject == (1, 2, 1)
    lenient = ClientIdentityPolicy(**{**policy.__dict__, "required": False})
    out = identity.screen(lenient, rq(), vctx())
    assert out.failure is None and out.facts is None


@pytest.mark.parametrize("kind", [1, 3, 4])
def test_types_without_a_check_fail(tmp_path: Path, kind: int) -> None:
    out = identity.screen(jwt_policy(tmp_path), rq(identity=UserIdentityRQSubItem(kind, False, b"x")), vctx())
    assert out.failure is not None and "cannot be verified" in out.failure


def test_kerberos_check_without_backend_fails(tmp_path: Path) -> None:
    policy = ClientIdentityPolicy(mode="verify", kerberos=identity.KerberosCheck(keytab=tmp_path / "k"))
    out = identity.screen(policy, rq(identity=UserIdentityRQSubItem(3, False, b"tok")), vctx())
    assert out.failure is not None and "not available" in out.failure


# ---------------------------------------------------------------------------------------- passcode hashes


def unb64(text: str) -> bytes:
    import base64

    return base64.b64decode(text + "=" * (-len(text) % 4))


def test_passcode_line_format_and_check() -> None:
    salt = bytes(range(16))
    line = identity.hash_passcode_line("tech", "s3cret", salt, n=1024)
    user, spec = line.split(":", 1)
    scheme, n, r, p, salt_b64, hash_b64 = spec.split("$")
    assert (user, scheme, n, r, p) == ("tech", "scrypt", "1024", "8", "1")
    assert len(unb64(salt_b64)) == 16 and len(unb64(hash_b64)) == 32
    table = identity.parse_passcode_file(f"# comment\n\n{line}\n".encode())
    assert identity.check_passcode(table, "tech", b"s3cret")
    assert not identity.check_passcode(table, "tech", b"wrong")
    assert not identity.check_passcode(table, "nobody", b"s3cret")
    assert "s3cret" not in line and "s3cret" not in repr(table)


def test_same_passcode_different_salt_different_line() -> None:
    a = identity.hash_passcode_line("u", "pw", b"a" * 16, n=1024)
    b = identity.hash_passcode_line("u", "pw", b"b" * 16, n=1024)
    assert a != b


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("tech:bcrypt$1$2$3$AA$AA", "line 1: expected"),
        ("no-colon", "line 1: expected"),
        ("u:scrypt$1000$8$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAA", "power of 2"),
        ("u:scrypt$x$8$1$AA$AA", "integers"),
        ("u:scrypt$1024$8$1$!!$AA", "base64"),
        ("u:scrypt$1024$8$1$AAAA$AAAA", "too short"),
    ],
)
def test_bad_passcode_files(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        identity.parse_passcode_file(text.encode())


def test_duplicate_user_in_passcode_file() -> None:
    line = identity.hash_passcode_line("u", "pw", b"a" * 16, n=16)
    with pytest.raises(ValueError, match="line 2: user 'u' is listed twice"):
        identity.parse_passcode_file(f"{line}\n{line}\n".encode())


@pytest.mark.parametrize("name", ["", "a:b", "#x", "x ", "a\nb"])
def test_bad_user_names_for_a_line(name: str) -> None:
    with pytest.raises(ValueError):
        identity.hash_passcode_line(name, "pw", os.urandom(16), n=16)


def test_screen_verify_passcode(tmp_path: Path) -> None:
    lines = [identity.hash_passcode_line("tech", "right", b"s" * 16, n=1024),
             identity.hash_passcode_line("other", "x", b"t" * 16, n=1024)]
    policy = ClientIdentityPolicy(mode="verify", passcodes=write(tmp_path / "users", "\n".join(lines)))
    ok = identity.screen(policy, rq(identity=UserIdentityRQSubItem(2, True, b"tech", b"right")), vctx())
    assert ok.failure is None and ok.facts == IdentityFacts(2, "tech") and ok.local_response == b""
    for user, pw in ((b"tech", b"wrong"), (b"ghost", b"right"), (b"tech", b""), (b"\xff", b"right")):
        out = identity.screen(policy, rq(identity=UserIdentityRQSubItem(2, True, user, pw)), vctx())
        assert out.failure is not None and out.reject == (1, 2, 1) and out.facts is None
