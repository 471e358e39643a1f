"""Kerberos (User Identity type 3) through python-gssapi, the optional `kerberos` extra.

`GssapiBackend` is proxy.identity's KerberosBackend:

* initiate(profile): a GSS-API (krb5 mechanism) initial context token for the profile's service
  principal, from credentials got with the proxy's client keytab (MIT's gss_acquire_cred_from
  `client_keytab`, kept in a private MEMORY ccache per profile). A fresh token for every association
  (acceptors keep a replay cache); the credentials are cached and renewed when fewer than
  `renew_before` seconds of their lifetime are left (gssapi reports the remaining lifetime, so no
  clock is read here).
* accept(check, token): the modality's token accepted with the proxy's service keytab. gssapi does
  not always raise for a bad or replayed token, so the context must be complete before the
  initiator name is trusted (see shared/spec/peers.md).

Both may block (the KDC is asked for tickets; the replay cache is a file): the relay runs them in a
worker thread. gssapi is imported on first use, so the proxy runs without it unless a Kerberos
profile or check is configured (the config loader refuses those when gssapi is missing).
Error messages carry gssapi's status words, never a token.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from typing import Any

from proxy.identity import REJECT_IDENTITY, REJECT_UNAVAILABLE, IdentityError, KerberosCheck, KerberosProfile

log = logging.getLogger(__name__)


def available() -> bool:
    """True when python-gssapi can be imported."""
    return importlib.util.find_spec("gssapi") is not None


def _gssapi() -> Any:
    try:
        return importlib.import_module("gssapi")
    except ImportError:
        raise IdentityError("Kerberos needs the optional python-gssapi package "
                            "(pip install 'dicom-tls-proxy[kerberos]')") from None


def _words(exc: BaseException) -> str:
    """gssapi's status text, bounded (it names principals and causes, never key material)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


class GssapiBackend:
    """Cached initiator credentials per profile, renewed before they expire. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._creds: dict[str, Any] = {}
        self._caches = 0
        self.renewals = 0  # credential acquisitions after the first, per backend (tests, metrics)

    def __repr__(self) -> str:
        return f"GssapiBackend(profiles={sorted(self._creds)})"

    # ---- initiator ---------------------------------------------------------------------
    def _credentials(self, gssapi: Any, profile: KerberosProfile) -> Any:
        key = f"{profile.name}\x00{profile.keytab}\x00{profile.principal or ''}"
        with self._lock:
            creds = self._creds.get(key)
            if creds is not None:
                try:
                    left = creds.lifetime
                except gssapi.exceptions.GSSError:
                    left = 0
                if left is not None and left > profile.renew_before:
                    return creds
            self._caches += 1  # a new, empty ccache: fresh credentials, never another profile's
            store = {"client_keytab": str(profile.keytab), "ccache": f"MEMORY:dicomproxy-{id(self)}-{self._caches}"}
            name = (gssapi.Name(profile.principal, gssapi.NameType.kerberos_principal)
                    if profile.principal else None)
            try:
                fresh = gssapi.Credentials(name=name, usage="initiate", store=store)
                lifetime = fresh.lifetime
            except gssapi.exceptions.GSSError as exc:
                raise IdentityError(f"Kerberos: cannot get credentials from keytab {profile.keytab} "
                                    f"for {profile.principal or 'its first principal'}: {_words(exc)}",
                                    REJECT_UNAVAILABLE) from None
            if creds is not None:
                self.renewals += 1
            self._creds[key] = fresh
            log.debug("Kerberos credentials for identity %r %s: %s, lifetime %s s", profile.name,
                      "renewed" if creds is not None else "acquired", fresh.name, lifetime)
            return fresh

    def initiate(self, profile: KerberosProfile) -> bytes:
        gssapi = _gssapi()
        creds = self._credentials(gssapi, profile)
        try:
            service = gssapi.Name(profile.service, gssapi.NameType.kerberos_principal)
            context = gssapi.SecurityContext(name=service, creds=creds, usage="initiate",
                                             mech=gssapi.MechType.kerberos)
            token = context.step()
        except gssapi.exceptions.GSSError as exc:
            raise IdentityError(f"Kerberos: cannot get a service ticket for {profile.service}: {_words(exc)}",
                                REJECT_UNAVAILABLE) from None
        if not token:
            raise IdentityError(f"Kerberos: gssapi produced no token for {profile.service}", REJECT_UNAVAILABLE)
        return bytes(token)

    # ---- acceptor ----------------------------------------------------------------------
    def accept(self, check: KerberosCheck, token: bytes) -> tuple[str, bytes]:
        gssapi = _gssapi()
        try:
            name = gssapi.Name(check.principal, gssapi.NameType.kerberos_principal) if check.principal else None
            creds = gssapi.Credentials(name=name, usage="accept", store={"keytab": str(check.keytab)})
        except gssapi.exceptions.GSSError as exc:
            raise IdentityError(f"Kerberos: cannot use service keytab {check.keytab}: {_words(exc)}",
                                REJECT_UNAVAILABLE) from None
        context = gssapi.SecurityContext(creds=creds, usage="accept")
        try:
            # For a bad or replayed token gssapi may return an error token instead of raising, and
            # raise the stored error only when the context is asked about: so ask inside the try.
            response = context.step(token)
            complete = bool(context.complete)
            principal = str(context.initiator_name) if complete else ""
        except gssapi.exceptions.GSSError as exc:
            raise IdentityError(f"Kerberos token refused: {_words(exc)}", REJECT_IDENTITY) from None
        if not complete:
            raise IdentityError("Kerberos token refused: the security context is not complete (it would need "
                                "more round trips than an A-ASSOCIATE exchange has)", REJECT_IDENTITY)
        if not principal:
            raise IdentityError("Kerberos token refused: empty initiator name", REJECT_IDENTITY)
        return principal, bytes(response or b"")

