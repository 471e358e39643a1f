"""Kerberos (User Identity type 3) against a throwaway MIT KDC (tests/kdc.py): the proxy mints a
GSS-API token with its client keytab, and accepts one with its service keytab. Skipped locally
when the KDC tools or python-gssapi are missing, failed under CI=true (tests.peers.missing)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import identity
from proxy.dul.items import UserIdentityRQSubItem
from proxy.identity import (
    BuildContext,
    ClientIdentityPolicy,
    IdentityError,
    KerberosCheck,
    KerberosProfile,
    Sources,
    VerifyContext,
)
from proxy.policy.model import IdentityFacts
from tests import kdc
from tests.identity_keys import counter_random, rq
from tests.peers import require_module

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kdc.Realm]:
    require_module("gssapi")
    with kdc.realm(tmp_path_factory.mktemp("krb5"), dict(os.environ)) as made:
        yield made


@pytest.fixture
def krb_env(realm: kdc.Realm, monkeypatch: pytest.MonkeyPatch) -> kdc.Realm:
    """Point the in-process Kerberos library at the throwaway realm (never /etc/krb5.conf)."""
    for name, value in realm.env.items():
        if name.startswith("KRB5"):
            monkeypatch.setenv(name, value)
    return realm


@pytest.fixture
def backend() -> identity.KerberosBackend:
    from proxy.identity_kerberos import GssapiBackend

    return GssapiBackend()


def profile(realm: kdc.Realm, **kw: object) -> KerberosProfile:
    return KerberosProfile(name="krb", service=kdc.SERVICE, keytab=realm.client_keytab, principal=kdc.CLIENT,
                           **kw)  # type: ignore[arg-type]


def build_ctx(backend: identity.KerberosBackend) -> BuildContext:
    return BuildContext("CT01", "PACS", dt.datetime.now(dt.UTC), counter_random(), Sources(kerberos=backend))


def verify_ctx(backend: identity.KerberosBackend) -> VerifyContext:
    return VerifyContext(dt.datetime.now(dt.UTC), Sources(kerberos=backend))


def test_minted_token_is_accepted_with_the_service_keytab(
    krb_env: kdc.Realm, backend: identity.KerberosBackend
) -> None:
    item = identity.build(profile(krb_env, positive_response=True), build_ctx(backend))
    assert item.identity_type == 3 and item.positive_response_requested and item.secondary == b""
    assert 300 < len(item.primary) < 4000  # a krb5 AP-REQ wrapped as a GSS-API initial context token
    assert item.primary[0] == 0x60  # [APPLICATION 0] of RFC 2743 3.1
    principal, response = backend.accept(KerberosCheck(keytab=krb_env.service_keytab), item.primary)
    assert principal == kdc.CLIENT
    assert response  # the AP-REP (mutual authentication): what a 0x59 carries for type 3
    # injected, the token survives the codec byte for byte
    out = identity.inject(rq(), item)
    assert out.user_information is not None and out.user_information.find(UserIdentityRQSubItem) == item


def test_every_association_gets_a_fresh_token_and_replays_are_refused(
    krb_env: kdc.Realm, backend: identity.KerberosBackend
) -> None:
    context = build_ctx(backend)
    first = identity.build(profile(krb_env), context)
    second = identity.build(profile(krb_env), context)
    assert first.primary != second.primary
    check = KerberosCheck(keytab=krb_env.service_keytab, principal=kdc.SERVICE)
    assert backend.accept(check, first.primary)[0] == kdc.CLIENT
    with pytest.raises(IdentityError, match="replay") as caught:
        backend.accept(check, first.primary)
    assert caught.value.reject == (1, 2, 1)
    assert backend.accept(check, second.primary)[0] == kdc.CLIENT


def test_credentials_are_renewed_before_they_expire(krb_env: kdc.Realm) -> None:
    from proxy.identity_kerberos import GssapiBackend

    fresh = GssapiBackend()
    cached = profile(krb_env)  # renew 300 s before the end of a one-hour ticket: kept
    identity.build(cached, build_ctx(fresh))
    identity.build(cached, build_ctx(fresh))
    assert fresh.renewals == 0
    eager = profile(krb_env, renew_before=7200.0)  # more than the KDC's max_life: renewed every time
    identity.build(eager, build_ctx(fresh))
    identity.build(eager, build_ctx(fresh))
    assert fresh.renewals >= 1


def test_screen_verify_kerberos(krb_env: kdc.Realm, backend: identity.KerberosBackend) -> None:
    modality = KerberosProfile(name="ct", service=kdc.SERVICE, keytab=krb_env.modality_keytab, principal=kdc.MODALITY)
    item = identity.build(modality, build_ctx(backend))
    asked = UserIdentityRQSubItem(3, True, item.primary)
    policy = ClientIdentityPolicy(mode="verify", kerberos=KerberosCheck(keytab=krb_env.service_keytab))
    out = identity.screen(policy, rq(identity=asked), verify_ctx(backend))
    assert out.failure is None and out.facts == IdentityFacts(3, kdc.MODALITY)
    assert out.local_response  # the AP-REP the proxy owes the modality in its 0x59
    again = identity.screen(policy, rq(identity=asked), verify_ctx(backend))
    assert again.failure is not None and "replay" in again.failure


def test_garbage_and_wrong_service_tokens_are_refused(krb_env: kdc.Realm, backend: identity.KerberosBackend) -> None:
    check = KerberosCheck(keytab=krb_env.service_keytab)
    with pytest.raises(IdentityError, match="Kerberos token refused") as caught:
        backend.accept(check, b"\x60\x03\x06\x01\x00")
    assert caught.value.reject == (1, 2, 1)
    # a ticket for another service cannot be decrypted with our keytab
    other = KerberosProfile(name="o", service=kdc.MODALITY, keytab=krb_env.client_keytab, principal=kdc.CLIENT)
    token = identity.build(other, build_ctx(backend)).primary
    with pytest.raises(IdentityError, match="Kerberos token refused"):
        backend.accept(check, token)


def test_unknown_service_or_missing_keytab(
    krb_env: kdc.Realm, backend: identity.KerberosBackend, tmp_path: Path
) -> None:
    unknown = KerberosProfile(name="u", service=f"dicom/nowhere@{kdc.REALM}", keytab=krb_env.client_keytab,
                              principal=kdc.CLIENT)
    with pytest.raises(IdentityError, match="cannot get a service ticket") as caught:
        identity.build(unknown, build_ctx(backend))
    assert caught.value.reject == (2, 3, 1)
    missing = KerberosProfile(name="m", service=kdc.SERVICE, keytab=tmp_path / "none.keytab", principal=kdc.CLIENT)
    with pytest.raises(IdentityError, match="Kerberos"):
        identity.build(missing, build_ctx(backend))
