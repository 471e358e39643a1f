"""SAML 2.0 assertions minted per association (User Identity type 4), signed with an enveloped
XML signature by `signxml`, the optional `saml` extra.

Why signxml: XML-DSig needs exclusive canonicalisation and careful reference handling; signxml is
the field-standard pure-Python implementation on top of lxml and `cryptography` (xmlsec needs the
C library and its headers). A file-based assertion (`assertion_file`, proxy.identity) needs none of
this and stays the default.

The assertion (SAML Core 2.0 section 2.3.3, elements in schema order):

    <saml:Assertion ID IssueInstant Version="2.0">
      <saml:Issuer/>  <ds:Signature/> (enveloped, exc-c14n, SHA-256)
      <saml:Subject> NameID, SubjectConfirmation bearer NotOnOrAfter </saml:Subject>
      <saml:Conditions NotBefore NotOnOrAfter> AudienceRestriction </saml:Conditions>
      <saml:AuthnStatement AuthnInstant/> <saml:AttributeStatement/> (when attributes are set)
    </saml:Assertion>

Pure apart from the XML libraries: the time and the ID's randomness come from the BuildContext.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from importlib.util import find_spec
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.identity import REJECT_UNAVAILABLE, IdentityError, SafeValueError, SamlMint, parse_pem_private_key

if TYPE_CHECKING:
    from proxy.identity import BuildContext

SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
NAMEID_UNSPECIFIED = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
AUTHN_UNSPECIFIED = "urn:oasis:names:tc:SAML:2.0:ac:classes:unspecified"
ATTRNAME_BASIC = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"

# signxml logs every string it canonicalizes at DEBUG: the whole assertion and its SignedInfo, i.e. the
# bearer credential, in the proxy's log when log_level is debug. Its loggers never go below WARNING.
logging.getLogger("signxml").setLevel(logging.WARNING)


def available() -> bool:
    return find_spec("signxml") is not None


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def assertion_xml(mint: SamlMint, context: BuildContext, assertion_id: str) -> bytes:
    """The unsigned assertion with a signature placeholder after the Issuer."""
    ET.register_namespace("saml", SAML)
    ET.register_namespace("ds", DS)
    now = context.now
    until = now + timedelta(seconds=mint.ttl)

    def el(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        node = ET.SubElement(parent, f"{{{SAML}}}{tag}", attrs)
        if text is not None:
            node.text = text
        return node

    root = ET.Element(f"{{{SAML}}}Assertion", {"ID": assertion_id, "IssueInstant": _instant(now), "Version": "2.0"})
    el(root, "Issuer", mint.issuer)
    ET.SubElement(root, f"{{{DS}}}Signature", {"Id": "placeholder"})
    subject = el(root, "Subject")
    el(subject, "NameID", mint.subject.render(context.calling_ae, context.called_ae), Format=NAMEID_UNSPECIFIED)
    confirmation = el(subject, "SubjectConfirmation", Method=BEARER)
    el(confirmation, "SubjectConfirmationData", NotOnOrAfter=_instant(until))
    conditions = el(root, "Conditions", NotBefore=_instant(now), NotOnOrAfter=_instant(until))
    restriction = el(conditions, "AudienceRestriction")
    for audience in mint.audience:
        el(restriction, "Audience", audience)
    statement = el(root, "AuthnStatement", AuthnInstant=_instant(now))
    el(el(statement, "AuthnContext"), "AuthnContextClassRef", AUTHN_UNSPECIFIED)
    if mint.attributes:
        attributes = el(root, "AttributeStatement")
        for name, values in mint.attributes.items():
            attribute = el(attributes, "Attribute", Name=name, NameFormat=ATTRNAME_BASIC)
            for value in values:
                el(attribute, "AttributeValue", value)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return xml


SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_signing_key(data: bytes) -> SigningKey:
    """The PEM signing key, parsed once per file version by the FileCache (parsing an RSA key
    checks it, which costs tens of milliseconds: too much for every association)."""
    key = parse_pem_private_key(data)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise SafeValueError("the SAML signing key must be RSA or EC")
    return key


def mint_assertion(mint: SamlMint, context: BuildContext, key: SigningKey, cert_pem: bytes) -> bytes:
    """A signed assertion for one association. IdentityError when signxml is missing or signing fails."""
    try:
        from lxml import etree
        from signxml import methods
        from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
        from signxml.exceptions import InvalidInput
        from signxml.signer import XMLSigner
    except ImportError:
        raise IdentityError("minting SAML assertions needs the optional signxml package "
                            "(pip install 'dicom-tls-proxy[saml]'), or use 'assertion_file'",
                            REJECT_UNAVAILABLE) from None
    algorithm = SignatureMethod.RSA_SHA256 if isinstance(key, rsa.RSAPrivateKey) else SignatureMethod.ECDSA_SHA256
    assertion_id = "_" + context.random(16).hex()
    unsigned = assertion_xml(mint, context, assertion_id)
    signer = XMLSigner(
        method=methods.enveloped,
        signature_algorithm=algorithm,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0,
    )
    try:
        signed = signer.sign(etree.fromstring(unsigned), key=key, cert=cert_pem.decode("ascii"), id_attribute="ID")
    except (InvalidInput, ValueError, TypeError) as exc:
        raise IdentityError(f"signing the SAML assertion failed ({type(exc).__name__})") from None
    data: bytes = etree.tostring(signed)
    return data
