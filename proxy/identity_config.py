"""proxy.yaml `identities:` and a listener's `client_identity:` -> proxy.identity values.

Called by proxy.config's reader; every problem is recorded on the Collector with its location
(`path:line:col: error: ...`) and the function returns None. Secrets are never written in
proxy.yaml: `passcode`, `password`, `secret`, `token` and `assertion` keys are refused with a pointer
to the file/environment variant. Key, secret, token and hash files are read once here so that
`dicom-proxy check` catches a wrong file before the first association does.

```yaml
identities:
  pacs-jwt:
    type: jwt                      # username | username_passcode | jwt | saml | kerberos
    key: secrets/jwt-es256.pem     # PEM private key (RS256, ES256, EdDSA) ...
    # secret_file: secrets/hs.key  # ... or an HS256 secret (>= 32 bytes) ...
    # token_file: secrets/jwt.txt  # ... or a static token, re-read when it changes
    algorithm: ES256               # default: from the key (HS256 for secret_file)
    issuer: dicom-proxy
    audience: PACS                 # or a list
    subject: "{calling_ae}"        # template: {calling_ae} {called_ae}
    ae_map: {CT01: ct-scanner-1}   # calling AE -> user; others fall back to the template
    ttl: 300
    key_id: proxy-2025             # optional `kid`
    claims: {site: north}          # extra claims (not iss/sub/aud/iat/nbf/exp/jti)
    positive_response: true
    require_response: false
listeners:
  - name: ward
    address: 0.0.0.0:11112
    client_identity:
      mode: verify                 # pass (default) | strip | replace | verify
      jwt: {jwks: keys/idp.jwks, issuer: idp, audience: dicom-proxy, leeway: 30}
      passcodes: secrets/users.scrypt
      kerberos: {keytab: secrets/dicom.keytab, principal: dicom/proxy.example.org@EXAMPLE.ORG}
      required: true
      forward: false
```
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, TypeVar

from proxy import identity_kerberos, identity_saml
from proxy.identity import (
    CLIENT_IDENTITY_MODES,
    DEFAULT_LEEWAY,
    DEFAULT_TTL,
    JWT_ALGORITHMS,
    PROFILE_TYPES,
    RESERVED_CLAIMS,
    ClientIdentityMode,
    ClientIdentityPolicy,
    IdentityProfile,
    JsonValue,
    JwtAlgorithm,
    JwtCheck,
    JwtProfile,
    KerberosCheck,
    KerberosProfile,
    PasscodeProfile,
    SafeValueError,
    SamlMint,
    SamlProfile,
    UsernameProfile,
    UserTemplate,
    algorithm_for_key,
    assertion_from_file,
    check_template,
    load_hmac_secret,
    load_private_key,
    load_public_key,
    parse_jwks,
    parse_passcode_file,
    secret_from_file,
    split_jwt,
)
from proxy.yamlsrc import Collector, MapNode, Node, ScalarNode, SeqNode, describe

COMMON_KEYS = ("type", "positive_response", "require_response")
PROFILE_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "username": ("username", "ae_map"),
    "username_passcode": ("username", "ae_map", "passcode_file", "passcode_env"),
    "jwt": ("key", "secret_file", "token_file", "algorithm", "issuer", "audience", "subject", "ae_map", "ttl",
            "key_id", "claims"),
    "saml": ("assertion_file", "key", "cert", "issuer", "audience", "subject", "ae_map", "ttl", "attributes"),
    "kerberos": ("service", "keytab", "principal", "renew_before"),
})
CLIENT_IDENTITY_KEYS = ("mode", "identity", "required", "forward", "jwt", "passcodes", "kerberos")
JWT_CHECK_KEYS = ("public_key", "jwks", "secret_file", "algorithms", "issuer", "audience", "leeway", "username_claim")
KERBEROS_CHECK_KEYS = ("keytab", "principal")
INLINE_SECRETS: Mapping[str, str] = MappingProxyType({
    "passcode": "put it in a file named by 'passcode_file' (chmod 600) or an environment variable named by "
                "'passcode_env'",
    "password": "the passcode goes in a file named by 'passcode_file' (chmod 600) or an environment variable "
                "named by 'passcode_env'",
    "secret": "put it in a file named by 'secret_file' (chmod 600)",
    "token": "put it in a file named by 'token_file' (chmod 600)",
    "assertion": "put it in a file named by 'assertion_file'",
    "private_key": "name a PEM file with 'key'",
})
MAX_TTL = 24 * 3600
MAX_LEEWAY = 3600.0
MAX_RENEW_BEFORE = 24 * 3600.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PRINCIPAL = re.compile(r"[^\s@/]+(?:/[^\s@/]+)*@[^\s@/]+")
_T = TypeVar("_T")


class Reader(Protocol):
    """What proxy.config's _Reader offers (its helpers, so messages read the same everywhere)."""

    check: Collector
    base: Path

    def warn(self, node: Node, message: str) -> None: ...

    def file(self, node: Node, what: str) -> Path | None: ...

    def ae_title(self, node: ScalarNode) -> str | None: ...

    def boolean(self, node: Node, what: str) -> bool | None: ...

    def name(self, node: Node, kind: str) -> str | None: ...


def identity_names(node: Node | None) -> set[str]:
    """The profile names declared under `identities:`, even by a broken profile (so references from
    rules and listeners are checked against what the admin meant)."""
    if not isinstance(node, MapNode):
        return set()
    return {key.value for key, _ in node if isinstance(key.value, str)}


# --------------------------------------------------------------------------- helpers


def _secret_file(r: Reader, m: MapNode, key: str, what: str, parse: Callable[[bytes], _T] | None = None) -> Path | None:
    """A file key: readable, warned about when others may read it, and parsed when `parse` is given
    (its _SafeValueError message is shown; the file's content never is)."""
    node = m.get(key)
    if node is None:
        return None
    path = r.file(node, f"'{key}' in {what}")
    if path is None:
        return None
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        r.check.add(node, f"'{key}' in {what}: cannot read {path}: {exc.strerror or exc}")
        return None
    if mode & 0o077 and key not in ("cert", "public_key", "jwks"):
        r.warn(node, f"{path} is readable by other users; chmod 600 it")
    if parse is not None:
        try:
            parse(data)
        except (ValueError, TypeError) as exc:
            r.check.add(node, f"'{key}' in {what}: {path}: {_safe_words(exc)}")
            return None
    return path


def _safe_words(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SafeValueError) else f"unusable ({type(exc).__name__})"


def _strings(r: Reader, node: Node, what: str) -> tuple[str, ...] | None:
    """One string or a non-empty list of distinct strings."""
    items: tuple[Node, ...] = (node,) if isinstance(node, ScalarNode) else ()
    if not items:
        seq = r.check.sequence(node, what)
        if seq is None:
            return None
        items = seq.items
    out: list[str] = []
    for item in items:
        text = r.check.string(item, what)
        if text is None:
            return None
        if text not in out:
            out.append(text)
    return tuple(out)


def _template(r: Reader, m: MapNode, key: str, what: str) -> UserTemplate | bool | None:
    """`key` (a template) and `ae_map` -> UserTemplate; None when neither is given; False on error."""
    template: str | None = None
    ok = True
    node = m.get(key)
    if node is not None:
        text = r.check.string(node, f"'{key}' in {what}")
        if text is None:
            ok = False
        else:
            try:
                template = check_template(text)
            except ValueError as exc:
                r.check.add(node, f"'{key}' in {what}: {exc}")
                ok = False
    ae_map: dict[str, str] = {}
    map_node = m.get("ae_map")
    if map_node is not None:
        table = _ae_map(r, map_node, f"'ae_map' in {what}")
        if table is None:
            ok = False
        else:
            ae_map = table
    if not ok:
        return False
    if template is None and not ae_map:
        return None
    return UserTemplate(template, MappingProxyType(ae_map))


def _ae_map(r: Reader, node: Node, what: str) -> dict[str, str] | None:
    m = r.check.mapping(node, what)
    if m is None:
        return None
    if not m.entries:
        r.check.add(m, f"{what} must not be empty")
        return None
    out: dict[str, str] = {}
    ok = True
    for key, value in m:
        title = r.ae_title(key)
        user = r.check.string(value, f"the user name of {key.text!r} in {what}")
        if title is None or user is None:
            ok = False
            continue
        if title in out:
            r.check.add(key, f"AE title {title!r} is listed twice in {what} (padding spaces do not count)")
            ok = False
            continue
        out[title] = user
    return out if ok else None


def _json_value(r: Reader, node: Node, what: str) -> tuple[bool, JsonValue]:
    if isinstance(node, ScalarNode):
        scalar = node.value
        if scalar is None or isinstance(scalar, str | bool | int | float):
            return True, scalar
        r.check.add(node, f"{what}: {describe(node)} cannot be a JWT claim (quote it to make it a string)")
        return False, None
    if isinstance(node, SeqNode):
        items: list[JsonValue] = []
        for item in node:
            good, element = _json_value(r, item, what)
            if not good:
                return False, None
            items.append(element)
        return True, items
    assert isinstance(node, MapNode)
    obj: dict[str, JsonValue] = {}
    for key, item in node:
        if not isinstance(key.value, str):
            r.check.add(key, f"{what}: claim names must be strings")
            return False, None
        good, member = _json_value(r, item, what)
        if not good:
            return False, None
        obj[key.value] = member
    return True, obj


def _flag(r: Reader, m: MapNode, key: str, what: str, default: bool) -> bool | None:
    node = m.get(key)
    return default if node is None else r.boolean(node, f"'{key}' in {what}")


def _refuse_inline_secrets(r: Reader, m: MapNode, what: str) -> bool:
    ok = True
    for key, _value in m:
        if isinstance(key.value, str) and key.value in INLINE_SECRETS:
            r.check.add(key, f"'{key.value}' must not be written in proxy.yaml ({what}): {INLINE_SECRETS[key.value]}")
            ok = False
    return ok


def _exactly_one(r: Reader, m: MapNode, keys: tuple[str, ...], what: str) -> str | None:
    present = [k for k in keys if k in m]
    if len(present) == 1:
        return present[0]
    names = ", ".join(repr(k) for k in keys)
    if not present:
        r.check.add(m, f"{what} needs one of {names}")
    else:
        node = m.key_node(present[1]) or m
        r.check.add(node, f"{what} has both {present[0]!r} and {present[1]!r}: use only one of {names}")
    return None


# --------------------------------------------------------------------------- identities:


def read_identities(r: Reader, node: Node) -> dict[str, IdentityProfile] | None:
    m = r.check.mapping(node, "'identities'")
    if m is None:
        return None
    if not m.entries:
        r.check.add(m, "'identities' must not be empty (remove the key when no rule injects an identity)")
        return None
    out: dict[str, IdentityProfile] = {}
    ok = True
    for key, value in m:
        name = r.name(key, "identity profile")
        profile = read_profile(r, name, value) if name is not None else None
        if name is None or profile is None:
            ok = False
            continue
        out[name] = profile
    return out if ok else None


def read_profile(r: Reader, name: str, node: Node) -> IdentityProfile | None:
    c = r.check
    what = f"identity profile {name!r}"
    m = c.mapping(node, what)
    if m is None:
        return None
    type_node = m.get("type")
    if type_node is None:
        c.add(m, f"missing required key 'type' in {what} (one of: {', '.join(PROFILE_TYPES)})")
        return None
    kind = c.string(type_node, f"'type' of {what}")
    if kind is None:
        return None
    if kind not in PROFILE_KEYS:
        c.add(type_node, f"unknown identity type {kind!r} in {what} (expected one of: {', '.join(PROFILE_KEYS)})")
        return None
    if not _refuse_inline_secrets(r, m, what):
        return None  # one clear error; the missing *_file key would only repeat it
    ok = c.keys(m, f"{what} (type {kind})", optional=(*COMMON_KEYS, *PROFILE_KEYS[kind]))
    positive = _flag(r, m, "positive_response", what, False)
    require = _flag(r, m, "require_response", what, False)
    if positive is None or require is None:
        return None
    if require and "positive_response" in m and not positive:
        c.add(m.key_node("require_response") or m,
              f"{what}: 'require_response: true' needs 'positive_response: true' (an acceptor only answers when asked)")
        return None
    positive = positive or require
    readers = {"username": _username, "username_passcode": _passcode, "jwt": _jwt, "saml": _saml,
               "kerberos": _kerberos}
    profile = readers[kind](r, m, name, what, positive, require)
    return profile if ok else None


def _username(r: Reader, m: MapNode, name: str, what: str, positive: bool, require: bool) -> IdentityProfile | None:
    user = _template(r, m, "username", what)
    if user is None:
        r.check.add(m, f"{what} needs 'username' (a template such as \"{{calling_ae}}\") or 'ae_map'")
        return None
    if user is False:
        return None
    assert isinstance(user, UserTemplate)
    return UsernameProfile(name=name, user=user, positive_response=positive, require_response=require)


def _passcode(r: Reader, m: MapNode, name: str, what: str, positive: bool, require: bool) -> IdentityProfile | None:
    profile = _username(r, m, name, what, positive, require)
    which = _exactly_one(r, m, ("passcode_file", "passcode_env"), what)
    if profile is None or which is None:
        return None
    assert isinstance(profile, UsernameProfile)
    if which == "passcode_file":
        path = _secret_file(r, m, "passcode_file", what, _nonempty)
        if path is None:
            return None
        return PasscodeProfile(name=name, user=profile.user, passcode_file=path, positive_response=positive,
                               require_response=require)
    node = m.get("passcode_env")
    assert node is not None
    variable = r.check.string(node, f"'passcode_env' in {what}")
    if variable is None:
        return None
    if not _ENV_NAME.fullmatch(variable):
        r.check.add(node, f"'passcode_env' in {what} must be an environment variable name, e.g. CT_PASSCODE")
        return None
    if not os.environ.get(variable):
        r.warn(node, f"environment variable {variable} is not set here: {what} will fail until it is")
    return PasscodeProfile(name=name, user=profile.user, passcode_env=variable, positive_response=positive,
                           require_response=require)


def _nonempty(data: bytes) -> None:
    secret_from_file(data)


def _ttl(r: Reader, m: MapNode, what: str) -> int | None:
    node = m.get("ttl")
    if node is None:
        return DEFAULT_TTL
    return r.check.integer(node, f"'ttl' in {what} (seconds)", low=1, high=MAX_TTL)


def _jwt(r: Reader, m: MapNode, name: str, what: str, positive: bool, require: bool) -> IdentityProfile | None:
    c = r.check
    source = _exactly_one(r, m, ("key", "secret_file", "token_file"), what)
    if source is None:
        return None
    if source == "token_file":
        extra = [k for k in ("algorithm", "issuer", "audience", "subject", "ae_map", "ttl", "key_id", "claims")
                 if k in m]
        if extra:
            c.add(m.key_node(extra[0]) or m, f"{what}: {extra[0]!r} has no effect with 'token_file' (the static "
                                             "token is sent as it is)")
            return None
        path = _secret_file(r, m, "token_file", what, lambda data: split_jwt(data.strip()))
        if path is None:
            return None
        return JwtProfile(name=name, token_file=path, positive_response=positive, require_response=require)
    ok = True
    algorithm: JwtAlgorithm | None = None
    alg_node = m.get("algorithm")
    if alg_node is not None:
        text = c.string(alg_node, f"'algorithm' in {what}")
        algorithm = next((a for a in JWT_ALGORITHMS if a == text), None)
        if text is not None and algorithm is None:
            c.add(alg_node, f"unknown JWT algorithm {text!r} in {what} (expected one of: {', '.join(JWT_ALGORITHMS)})")
        ok = algorithm is not None
    key: Path | None = None
    secret: Path | None = None
    if source == "key":
        key = _secret_file(r, m, "key", what, load_private_key)
        if key is not None:
            fits = algorithm_for_key(load_private_key(key.read_bytes()))
            if algorithm is not None and algorithm != fits:
                c.add(alg_node or m, f"{what}: the key in {key} signs {fits}, not {algorithm}")
                ok = False
            algorithm = fits
        ok = ok and key is not None
    else:
        secret = _secret_file(r, m, "secret_file", what, load_hmac_secret)
        if algorithm not in (None, "HS256"):
            c.add(alg_node or m, f"{what}: 'secret_file' is for HS256; use 'key' (a PEM private key) for {algorithm}")
            ok = False
        algorithm = "HS256"
        ok = ok and secret is not None
    for required in ("issuer", "audience", "subject"):
        if required not in m and not (required == "subject" and "ae_map" in m):
            c.add(m, f"missing required key {required!r} in {what} (a minted token needs iss, aud and sub)")
            ok = False
    issuer_node, audience_node = m.get("issuer"), m.get("audience")
    issuer = c.string(issuer_node, f"'issuer' in {what}") if issuer_node is not None else None
    audience = _strings(r, audience_node, f"'audience' in {what}") if audience_node is not None else ()
    subject = _template(r, m, "subject", what)
    ttl = _ttl(r, m, what)
    key_id: str | None = None
    kid_node = m.get("key_id")
    if kid_node is not None:
        key_id = c.string(kid_node, f"'key_id' in {what}")
        ok = ok and key_id is not None
    claims: dict[str, JsonValue] = {}
    claims_node = m.get("claims")
    if claims_node is not None:
        cm = c.mapping(claims_node, f"'claims' in {what}")
        ok = ok and cm is not None
        for claim_key, claim_value in cm or ():
            if claim_key.value in RESERVED_CLAIMS:
                c.add(claim_key, f"claim {claim_key.text!r} in {what} is set by the proxy; use the profile's own keys "
                                 "(issuer, subject, audience, ttl)")
                ok = False
                continue
            good, value = _json_value(r, claim_value, f"claim {claim_key.text!r} in {what}")
            if not good or not isinstance(claim_key.value, str):
                ok = False
                continue
            claims[claim_key.value] = value
    if not ok or issuer is None or audience is None or subject is False or ttl is None:
        return None
    assert subject is None or isinstance(subject, UserTemplate)
    return JwtProfile(name=name, algorithm=algorithm, key=key, secret_file=secret, issuer=issuer,
                      audience=audience, subject=subject, ttl=ttl, key_id=key_id, claims=MappingProxyType(claims),
                      positive_response=positive, require_response=require)


def _saml(r: Reader, m: MapNode, name: str, what: str, positive: bool, require: bool) -> IdentityProfile | None:
    c = r.check
    source = _exactly_one(r, m, ("assertion_file", "key"), what)
    if source is None:
        return None
    if source == "assertion_file":
        extra = [k for k in PROFILE_KEYS["saml"] if k != "assertion_file" and k in m]
        if extra:
            c.add(m.key_node(extra[0]) or m, f"{what}: {extra[0]!r} has no effect with 'assertion_file'")
            return None
        path = _secret_file(r, m, "assertion_file", what, _xml_like)
        if path is None:
            return None
        return SamlProfile(name=name, assertion_file=path, positive_response=positive, require_response=require)
    ok = True
    if not identity_saml.available():
        c.add(m.key_node("key") or m, f"{what}: minting SAML assertions needs the optional signxml package "
                                      "(pip install 'dicom-tls-proxy[saml]'); or use 'assertion_file'")
        ok = False
    for required in ("cert", "issuer", "audience", "subject"):
        if required not in m and not (required == "subject" and "ae_map" in m):
            c.add(m, f"missing required key {required!r} in {what} (a minted assertion needs it)")
            ok = False
    key = _secret_file(r, m, "key", what, _saml_key)
    cert = _secret_file(r, m, "cert", what, _pem_certificate) if "cert" in m else None
    issuer_node, audience_node = m.get("issuer"), m.get("audience")
    issuer = c.string(issuer_node, f"'issuer' in {what}") if issuer_node is not None else None
    audience = _strings(r, audience_node, f"'audience' in {what}") if audience_node is not None else None
    subject = _template(r, m, "subject", what)
    ttl = _ttl(r, m, what)
    attributes: dict[str, tuple[str, ...]] = {}
    attr_node = m.get("attributes")
    if attr_node is not None:
        am = c.mapping(attr_node, f"'attributes' in {what}")
        ok = ok and am is not None
        for attr_key, attr_value in am or ():
            values = _strings(r, attr_value, f"attribute {attr_key.text!r} in {what}")
            if values is None or not isinstance(attr_key.value, str):
                ok = False
                continue
            attributes[attr_key.value] = values
    if (not ok or key is None or cert is None or issuer is None or audience is None
            or not isinstance(subject, UserTemplate) or ttl is None):
        return None
    mint = SamlMint(key=key, cert=cert, issuer=issuer, audience=audience, subject=subject, ttl=ttl,
                    attributes=MappingProxyType(attributes))
    return SamlProfile(name=name, mint=mint, positive_response=positive, require_response=require)


def _saml_key(data: bytes) -> None:
    if algorithm_for_key(load_private_key(data)) not in ("RS256", "ES256"):
        raise SafeValueError("XML signatures need an RSA or EC P-256 key")


def _pem_certificate(data: bytes) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(data)
    except ValueError:
        raise SafeValueError("not a PEM certificate") from None


def _xml_like(data: bytes) -> None:
    assertion_from_file(data)


def _principal(r: Reader, node: Node, what: str) -> str | None:
    text = r.check.string(node, what)
    if text is None:
        return None
    if not _PRINCIPAL.fullmatch(text):
        r.check.add(node, f"{what} must be a Kerberos principal such as dicom/pacs.example.org@EXAMPLE.ORG")
        return None
    return text


def _gssapi_needed(r: Reader, node: Node, what: str) -> bool:
    if identity_kerberos.available():
        return True
    r.check.add(node, f"{what} needs the optional python-gssapi package (pip install 'dicom-tls-proxy[kerberos]'; "
                      "it builds against libkrb5-dev)")
    return False


def _kerberos(r: Reader, m: MapNode, name: str, what: str, positive: bool, require: bool) -> IdentityProfile | None:
    c = r.check
    ok = True
    for required in ("service", "keytab"):
        if required not in m:
            c.add(m, f"missing required key {required!r} in {what}")
            ok = False
    ok = _gssapi_needed(r, m.get("type") or m, what) and ok
    service_node, principal_node = m.get("service"), m.get("principal")
    service = _principal(r, service_node, f"'service' in {what}") if service_node is not None else None
    principal = _principal(r, principal_node, f"'principal' in {what}") if principal_node is not None else None
    keytab = _secret_file(r, m, "keytab", what)
    renew = 300.0
    renew_node = m.get("renew_before")
    if renew_node is not None:
        value = c.number(renew_node, f"'renew_before' in {what} (seconds)", positive=True, high=MAX_RENEW_BEFORE)
        ok = ok and value is not None
        renew = value if value is not None else renew
    if not ok or service is None or keytab is None or (principal_node is not None and principal is None):
        return None
    return KerberosProfile(name=name, service=service, keytab=keytab, principal=principal, renew_before=renew,
                           positive_response=positive, require_response=require)


# --------------------------------------------------------------------------- listener client_identity:


def read_client_identity(r: Reader, node: Node, owner: str, identities: set[str]) -> ClientIdentityPolicy | None:
    c = r.check
    what = f"'client_identity' of {owner}"
    m = c.mapping(node, what)
    if m is None:
        return None
    if not _refuse_inline_secrets(r, m, what):
        return None
    ok = c.keys(m, what, optional=CLIENT_IDENTITY_KEYS)
    mode: ClientIdentityMode = "pass"
    mode_node = m.get("mode")
    if mode_node is not None:
        text = c.string(mode_node, f"'mode' in {what}")
        found = next((x for x in CLIENT_IDENTITY_MODES if x == text), None)
        if text is not None and found is None:
            c.add(mode_node, f"unknown mode {text!r} in {what} (expected one of: {', '.join(CLIENT_IDENTITY_MODES)})")
        if found is None:
            return None
        mode = found
    only = {"identity": "replace", "required": "verify", "forward": "verify", "jwt": "verify", "passcodes": "verify",
            "kerberos": "verify"}
    for key, needed in only.items():
        key_node = m.key_node(key)
        if key_node is not None and mode != needed:
            c.add(key_node, f"{key!r} in {what} is only used with 'mode: {needed}' (mode is {mode!r})")
            ok = False
    profile: str | None = None
    if mode == "replace":
        id_node = m.get("identity")
        if id_node is None:
            c.add(m, f"{what}: 'mode: replace' needs 'identity', the profile to send instead")
            return None
        profile = c.string(id_node, f"'identity' in {what}")
        if profile is not None and profile not in identities:
            names = ", ".join(repr(n) for n in sorted(identities)) or "none"
            c.add(id_node, f"unknown identity profile {profile!r} in {what} (defined identity profiles: {names})")
            profile = None
        ok = ok and profile is not None
    required = _flag(r, m, "required", what, True)
    forward = _flag(r, m, "forward", what, False)
    jwt: JwtCheck | None = None
    passcodes: Path | None = None
    kerberos: KerberosCheck | None = None
    if mode == "verify":
        if not any(k in m for k in ("jwt", "passcodes", "kerberos")):
            c.add(m, f"{what}: 'mode: verify' needs at least one of 'jwt', 'passcodes', 'kerberos' (identity types "
                     "without a check are refused)")
            ok = False
        jwt_node = m.get("jwt")
        if jwt_node is not None:
            jwt = _jwt_check(r, jwt_node, f"'jwt' in {what}")
            ok = ok and jwt is not None
        if "passcodes" in m:
            passcodes = _secret_file(r, m, "passcodes", what, parse_passcode_file)
            ok = ok and passcodes is not None
        krb_node = m.get("kerberos")
        if krb_node is not None:
            kerberos = _kerberos_check(r, krb_node, f"'kerberos' in {what}")
            ok = ok and kerberos is not None
    if not ok or required is None or forward is None:
        return None
    return ClientIdentityPolicy(mode=mode, identity=profile, required=required, forward=forward, jwt=jwt,
                                passcodes=passcodes, kerberos=kerberos)


def _jwt_check(r: Reader, node: Node, what: str) -> JwtCheck | None:
    c = r.check
    m = c.mapping(node, what)
    if m is None:
        return None
    if not _refuse_inline_secrets(r, m, what):
        return None
    ok = c.keys(m, what, optional=JWT_CHECK_KEYS)
    source = _exactly_one(r, m, ("public_key", "jwks", "secret_file"), what)
    if source is None:
        return None
    parsers: dict[str, Callable[[bytes], object]] = {"public_key": load_public_key, "jwks": parse_jwks,
                                                     "secret_file": load_hmac_secret}
    path = _secret_file(r, m, source, what, parsers[source])
    algorithms: tuple[JwtAlgorithm, ...] = ()
    alg_node = m.get("algorithms")
    if alg_node is not None:
        names = _strings(r, alg_node, f"'algorithms' in {what}")
        found: list[JwtAlgorithm] = []
        for text in names or ():
            algorithm = next((a for a in JWT_ALGORITHMS if a == text), None)
            if algorithm is None:
                c.add(alg_node, f"unknown JWT algorithm {text!r} in {what} (expected: {', '.join(JWT_ALGORITHMS)})")
                ok = False
            else:
                found.append(algorithm)
        hmac_mix = ("HS256" in found) != (source == "secret_file")
        if found and hmac_mix:
            c.add(alg_node, f"{what}: HS256 goes with 'secret_file' only, and 'secret_file' with HS256 only "
                            "(mixing them would let a public key be used as an HMAC secret)")
            ok = False
        algorithms = tuple(found)
        ok = ok and names is not None
    if ok and path is not None and source == "public_key" and algorithms:
        fits = algorithm_for_key(load_public_key(path.read_bytes()))
        if fits not in algorithms:
            c.add(alg_node or m, f"{what}: the key in {path} verifies {fits}, which 'algorithms' does not list")
            ok = False
    issuer: tuple[str, ...] | None = ()
    audience: tuple[str, ...] | None = ()
    if (n := m.get("issuer")) is not None:
        issuer = _strings(r, n, f"'issuer' in {what}")
    if (n := m.get("audience")) is not None:
        audience = _strings(r, n, f"'audience' in {what}")
    leeway: float | None = DEFAULT_LEEWAY
    if (n := m.get("leeway")) is not None:
        leeway = c.number(n, f"'leeway' in {what} (seconds)", high=MAX_LEEWAY)
        if leeway is not None and leeway < 0:
            c.add(n, f"'leeway' in {what} must not be negative")
            leeway = None
    claim: str | None = "sub"
    if (n := m.get("username_claim")) is not None:
        claim = c.string(n, f"'username_claim' in {what}")
    if not ok or path is None or issuer is None or audience is None or leeway is None or claim is None:
        return None
    return JwtCheck(
        public_key=path if source == "public_key" else None,
        jwks=path if source == "jwks" else None,
        secret_file=path if source == "secret_file" else None,
        algorithms=algorithms, issuer=issuer, audience=audience, leeway=leeway, username_claim=claim,
    )


def _kerberos_check(r: Reader, node: Node, what: str) -> KerberosCheck | None:
    c = r.check
    m = c.mapping(node, what)
    if m is None:
        return None
    ok = c.keys(m, what, required=("keytab",), optional=KERBEROS_CHECK_KEYS[1:])
    ok = _gssapi_needed(r, m, what) and ok
    keytab = _secret_file(r, m, "keytab", what)
    principal: str | None = None
    if (n := m.get("principal")) is not None:
        principal = _principal(r, n, f"'principal' in {what}")
        ok = ok and principal is not None
    if not ok or keytab is None:
        return None
    return KerberosCheck(keytab=keytab, principal=principal)
