"""User identity benchmark: what building and injecting the 0x58 sub-item adds to one association.

The target (issue #5): minting and injecting an ES256 JWT adds under 1 ms per association (p99),
and so does a Kerberos token from cached credentials. This measures exactly the work the relay
does per association (`identity.build` then `identity.inject` into a parsed A-ASSOCIATE-RQ with
three presentation contexts), for every profile type, in this process:

    .venv/bin/python bench/bench_identity.py            # 3,000 associations per profile
    .venv/bin/python bench/bench_identity.py --check    # ... exit 1 when a target is missed
    .venv/bin/python bench/bench_identity.py --quick    # 200 per profile (the test suite runs it)

Kerberos runs against a throwaway MIT KDC on 127.0.0.1 (tests/kdc.py; Debian krb5-kdc
krb5-admin-server); without the KDC tools or python-gssapi that row says why it is missing.
Each figure is a percentile of single-association wall times (time.perf_counter_ns), after a
warm-up that fills the key and credential caches as a running proxy's would be.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `proxy` and `tests` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy import identity
from proxy.dul.pdus import AAssociateRQ, parse_pdu
from tests.peers import associate_rq_bytes

TARGET_MS = 1.0
TARGETED = ("jwt-es256", "kerberos-cached")


@dataclass(frozen=True)
class Row:
    name: str
    p50_us: float
    p99_us: float
    max_us: float
    note: str = ""

    @property
    def meets(self) -> bool:
        return self.p99_us < TARGET_MS * 1000


def _rq() -> AAssociateRQ:
    rq = parse_pdu(associate_rq_bytes(called="PACS", calling="CT01"))
    assert isinstance(rq, AAssociateRQ)
    return rq


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _profiles(folder: Path) -> dict[str, identity.IdentityProfile]:
    sub = identity.UserTemplate("{calling_ae}")
    es = _write(folder / "es256.pem", _pem(ec.generate_private_key(ec.SECP256R1())))
    rs = _write(folder / "rs256.pem", _pem(rsa.generate_private_key(65537, 2048)))
    ed = _write(folder / "ed25519.pem", _pem(ed25519.Ed25519PrivateKey.generate()))
    hs = _write(folder / "hs256.secret", os.urandom(32).hex().encode())
    passcode = _write(folder / "ct.pass", b"correct horse battery staple\n")

    def jwt(name: str, algorithm: identity.JwtAlgorithm, **key: Path) -> identity.JwtProfile:
        return identity.JwtProfile(name=name, algorithm=algorithm, issuer="dicom-proxy", audience=("PACS",),
                                   subject=sub, ttl=300, positive_response=True, **key)

    profiles: dict[str, identity.IdentityProfile] = {
        "username": identity.UsernameProfile(name="username", user=sub),
        "username-passcode": identity.PasscodeProfile(name="username-passcode", user=sub, passcode_file=passcode),
        "jwt-es256": jwt("jwt-es256", "ES256", key=es),
        "jwt-rs256": jwt("jwt-rs256", "RS256", key=rs),
        "jwt-eddsa": jwt("jwt-eddsa", "EdDSA", key=ed),
        "jwt-hs256": jwt("jwt-hs256", "HS256", secret_file=hs),
    }
    from proxy import identity_saml

    if identity_saml.available():  # the optional `saml` extra (signxml)
        from tests.identity_keys import self_signed

        signer = rsa.generate_private_key(65537, 2048)
        mint = identity.SamlMint(key=_write(folder / "saml.key", _pem(signer)),
                                 cert=_write(folder / "saml.pem", self_signed(signer)),
                                 issuer="dicom-proxy", audience=("PACS",), subject=sub)
        profiles["saml-minted"] = identity.SamlProfile(name="saml-minted", mint=mint)
    return profiles


def measure(name: str, profile: identity.IdentityProfile, sources: identity.Sources, runs: int) -> Row:
    rq = _rq()
    warm = max(20, runs // 20)
    times: list[int] = []
    for i in range(warm + runs):
        started = time.perf_counter_ns()
        context = identity.BuildContext("CT01", "PACS", datetime.now(UTC), os.urandom, sources)
        injected = identity.inject(rq, identity.build(profile, context))
        elapsed = time.perf_counter_ns() - started
        if i >= warm:
            times.append(elapsed)
    assert injected.user_information is not None
    times.sort()
    return Row(name, statistics.median(times) / 1000, times[int(len(times) * 0.99) - 1] / 1000, times[-1] / 1000)


@contextmanager
def _kdc(folder: Path) -> Iterator[tuple[identity.KerberosProfile, identity.Sources] | str]:
    """A throwaway realm and a Kerberos profile for its service; or why there is none."""
    if not all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in ("krb5kdc", "kdb5_util", "kadmin.local")):
        yield "no MIT KDC tools (apt-get install krb5-kdc krb5-admin-server)"
        return
    from proxy import identity_kerberos

    if not identity_kerberos.available():
        yield "python-gssapi is not installed (pip install 'dicom-tls-proxy[kerberos]')"
        return
    from tests import kdc

    with kdc.realm(folder / "realm", dict(os.environ)) as realm:
        saved = {k: os.environ.get(k) for k in realm.env}
        os.environ.update(realm.env)  # before gssapi reads krb5.conf for the first time
        try:
            profile = identity.KerberosProfile(name="kerberos", service=kdc.SERVICE, keytab=realm.client_keytab,
                                               principal=kdc.CLIENT)
            yield profile, identity.Sources(kerberos=identity_kerberos.GssapiBackend())
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run(runs: int) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        folder = Path(tmp)
        sources = identity.Sources()
        for name, profile in _profiles(folder).items():
            rows.append(measure(name, profile, sources, runs))
        with _kdc(folder) as got:
            if isinstance(got, str):
                rows.append(Row("kerberos-cached", float("nan"), float("nan"), float("nan"), got))
            else:
                profile, krb_sources = got
                rows.append(measure("kerberos-cached", profile, krb_sources, runs))
    return rows


def render(rows: list[Row], runs: int) -> str:
    lines = [f"identity build + inject per association ({runs} associations each; target p99 < {TARGET_MS:.0f} ms "
             f"for {', '.join(TARGETED)})",
             f"{'profile':<20}{'p50 us':>10}{'p99 us':>10}{'max us':>10}  note"]
    for row in rows:
        mark = ("meets target" if row.meets else "MISSES target") if row.name in TARGETED and not row.note else ""
        lines.append(f"{row.name:<20}{row.p50_us:>10.1f}{row.p99_us:>10.1f}{row.max_us:>10.1f}  {row.note or mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 associations per profile")
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--check", action="store_true", help="exit 1 when a targeted profile misses")
    args = parser.parse_args(argv)
    runs = 200 if args.quick else args.runs
    rows = run(runs)
    print(render(rows, runs))
    failed = [r.name for r in rows if r.name in TARGETED and (r.note or not r.meets)]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
