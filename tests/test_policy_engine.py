"""Rule evaluation, table-driven: facts in, (action, rule) out, for every key and value form.

Every row is checked twice: through RuleSet.evaluate / evaluate_dimse (the indexed fast path the
relay uses) and through explain() (the rule-by-rule path `dicom-proxy explain` prints). A
hypothesis test checks that the two paths agree on random rule files too.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
import textwrap
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.policy.engine import explain, format_explanation, shadowed_rules, why_not
from proxy.policy.groups import GROUPS
from proxy.policy.loader import load_rules_text
from proxy.policy.model import (
    AssociationFacts,
    CertFacts,
    Decision,
    DimseDecision,
    DimseFacts,
    IdentityFacts,
    Rule,
    RuleSet,
)

REPO = Path(__file__).resolve().parent.parent
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
WORKLIST = "1.2.840.10008.5.1.4.31"
INVENTORY_FIND = "1.2.840.10008.5.1.4.1.1.201.2"  # under the storage prefix, but not storage
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
FINGERPRINT = "ab" * 32

RULES = """\
version: 1
default: reject
sets:
  ward:         {type: ae_title, elements: [CT01, MR01, "US_*", "XA[0-9]?"]}
  nets:         {type: cidr,     elements: [10.20.0.0/16, "2001:db8:20::/48"]}
  imaging_uids: {type: uid,      elements: [storage, 1.2.840.10008.1.1]}
  retrieve_cmds: {type: command, elements: [C-GET, C-MOVE]}
rules:
  - name: blocked-host
    match: {source: 192.0.2.66}
    action: drop
  - name: v6-lab
    match: {source: "2001:db8:99::/48"}
    action: accept
    upstream: lab
  - name: night-shift
    match: {calling_ae: "NIGHT*", time: {days: mon-fri, hours: "22:00-06:00"}}
    action: accept
    upstream: [pacs, pacs-dr]
  - name: ward-store
    match: {calling_ae: "@ward", source: "@nets", called_ae: PACS}
    action: accept
    upstream: pacs
    contexts: {allow: ["@imaging_uids"]}
  - name: ward-wrong-called
    match: {calling_ae: "@ward", called_ae: "!PACS"}
    action: reject
  - name: unknown-called
    match: {called_ae: "!PACS*"}
    action: reject
  - name: shadow-trial
    mode: shadow
    match: {calling_ae: "TRIAL*"}
    action: reject
  - name: tls-partner
    match: {client_cert: {cn: "*.partner.example", issuer: "CN=Partner CA*"}}
    action: accept
    identity: partner-jwt
  - name: fingerprint-pinned
    match:
      client_cert:
        fingerprint: "AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB"
    action: accept
  - name: san-match
    match: {client_cert: {san: ["dns:*.lab.example", "!dns:evil.lab.example"]}}
    action: accept
  - name: no-cert-on-tls
    match: {listener: tls, client_cert: absent}
    action: reject
    reject: {result: 2, source: 3, reason: 1}
  - name: jwt-users
    match: {user_identity: {type: jwt}}
    action: accept
    rewrite: {calling_ae: JWTPROXY, called_ae: PACS}
  - name: named-user
    match: {user_identity: {type: [username, 2], username: "dr.*"}}
    action: accept
  - name: worklist-only
    match: {abstract_syntax: worklist, calling_ae: "!@ward"}
    action: accept
    contexts: {deny: [storage]}
    context_rejection: abstract-syntax-not-supported
  - name: jpeg-ts
    match: {transfer_syntax: 1.2.840.10008.1.2.4.50, calling_ae: "JPEG*"}
    action: reject
  - name: any-echo
    match: {abstract_syntax: verification, listener: [modalities, tls]}
    action: accept
    contexts: {allow: [verification]}
  - name: allow-archive-move
    on: dimse
    match: {command: C-MOVE, move_destination: ARCHIVE2}
    action: forward
  - name: move-to-self-only
    on: dimse
    match: {command: C-MOVE, move_destination: "!$calling_ae"}
    action: refuse
  - name: no-urgent-find-from-ward
    on: dimse
    match: {command: C-FIND, priority: high, calling_ae: "@ward"}
    action: refuse
    status: 0xA700
  - name: no-ct-store
    on: dimse
    match: {command: C-STORE, affected_sop_class: 1.2.840.10008.5.1.4.1.1.2, source: "@nets"}
    action: refuse
  - name: shadow-get
    on: dimse
    mode: shadow
    match: {command: "@retrieve_cmds", affected_sop_class: query-retrieve-get}
    action: refuse
  - name: no-commitment-actions
    on: dimse
    match: {command: normalized, affected_sop_class: storage-commitment}
    action: refuse
"""

WED_NOON = datetime(2024, 5, 8, 12, 0)  # a Wednesday


def line_of(rule: str) -> int:
    """The line where a rule of RULES starts."""
    return next(i for i, line in enumerate(RULES.splitlines(), 1) if line.endswith(f"- name: {rule}"))


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    rs, warnings = load_rules_text([("rules/test.yaml", RULES)])
    assert warnings == []
    return rs


def facts(**kw: Any) -> AssociationFacts:
    values: dict[str, Any] = {
        "source": "10.20.1.5",
        "listener": "modalities",
        "calling_ae": "CT01",
        "called_ae": "PACS",
        "abstract_syntaxes": (CT_IMAGE, VERIFICATION),
        "transfer_syntaxes": (IMPLICIT_LE,),
        "now": WED_NOON,
    }
    values.update(kw)
    values["source"] = ipaddress.ip_address(values["source"])
    return AssociationFacts(**values)


def cert(cn: str | None = "ris.partner.example", issuer: str = "CN=Partner CA 2,O=Partner",
         sans: tuple[str, ...] = (), fingerprint: str = "00" * 32) -> CertFacts:
    return CertFacts(cn, sans, issuer, fingerprint)


@dataclass(frozen=True)
class Row:
    facts: AssociationFacts
    action: str
    rule: str
    dimse: DimseFacts | None = None
    check: dict[str, Any] = field(default_factory=dict)  # extra Decision/DimseDecision attributes


OUTSIDE = "10.21.0.1"  # not in @nets
NO_VERIFICATION = (CT_IMAGE,)

ASSOCIATION_ROWS = {
    # AE title sets: literal, glob, bracket glob; case-sensitive
    "set-literal": Row(facts(), "accept", "ward-store",
                       check={"upstreams": ("pacs",), "allowed_abstract_syntaxes": {CT_IMAGE, VERIFICATION}}),
    "set-glob": Row(facts(calling_ae="US_12"), "accept", "ward-store"),
    "set-bracket-glob": Row(facts(calling_ae="XA1B"), "accept", "ward-store"),
    "bracket-glob-too-short": Row(facts(calling_ae="XA1", abstract_syntaxes=NO_VERIFICATION), "reject", "default",
                                  check={"reject": (1, 1, 1)}),
    "ae-case-sensitive": Row(facts(calling_ae="ct01", abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    # CIDR v4, v6, IPv4-mapped
    "cidr-v6-in-set": Row(facts(source="2001:db8:20::5"), "accept", "ward-store"),
    "cidr-v4-mapped": Row(facts(source="::ffff:10.20.1.5"), "accept", "ward-store"),
    "cidr-outside-falls-through": Row(facts(source=OUTSIDE), "accept", "any-echo",
                                      check={"allowed_abstract_syntaxes": {VERIFICATION}}),
    "single-address-drop-first": Row(facts(source="192.0.2.66"), "drop", "blocked-host"),
    "cidr-v6-network": Row(facts(source="2001:db8:99::1", calling_ae="LAB"), "accept", "v6-lab",
                           check={"upstreams": ("lab",)}),
    # time: weekdays, hour ranges across midnight, end exclusive, no clock
    "time-before-midnight": Row(facts(calling_ae="NIGHT1", now=datetime(2024, 5, 8, 23, 30)), "accept",
                                "night-shift", check={"upstreams": ("pacs", "pacs-dr")}),
    "time-after-midnight": Row(facts(calling_ae="NIGHT1", now=datetime(2024, 5, 9, 5, 59)), "accept", "night-shift"),
    "time-end-exclusive": Row(facts(calling_ae="NIGHT1", now=datetime(2024, 5, 8, 6, 0),
                                    abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    "time-weekend": Row(facts(calling_ae="NIGHT1", now=datetime(2024, 5, 11, 23, 0),
                              abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    "time-no-clock": Row(facts(calling_ae="NIGHT1", now=None, abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    # negation and default reject codes
    "negated-called-ae-1-1-3": Row(facts(called_ae="ARCHIVE"), "reject", "ward-wrong-called",
                                   check={"reject": (1, 1, 3)}),
    "negated-glob-1-1-7": Row(facts(calling_ae="ZZ", called_ae="OTHER"), "reject", "unknown-called",
                              check={"reject": (1, 1, 7)}),
    # shadow mode: reported, not enforced
    "shadow-then-default": Row(facts(calling_ae="TRIAL1", abstract_syntaxes=NO_VERIFICATION), "reject", "default",
                               check={"shadow_matches": (("shadow-trial", "reject"),)}),
    "shadow-then-enforcing": Row(facts(calling_ae="TRIAL1"), "accept", "any-echo",
                                 check={"shadow_matches": (("shadow-trial", "reject"),)}),
    "enforcing-first-no-shadow": Row(facts(calling_ae="CT01"), "accept", "ward-store", check={"shadow_matches": ()}),
    # client certificates
    "cert-cn-and-issuer": Row(facts(calling_ae="RIS", listener="tls", client_cert=cert()), "accept", "tls-partner",
                              check={"identity": "partner-jwt"}),
    "cert-wrong-issuer": Row(facts(calling_ae="RIS", listener="tls", client_cert=cert(issuer="CN=Other"),
                                   abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    "cert-without-cn": Row(facts(calling_ae="RIS", listener="tls", client_cert=cert(cn=None),
                                 abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    "cert-required-but-absent": Row(facts(calling_ae="RIS", listener="modalities", abstract_syntaxes=NO_VERIFICATION),
                                    "reject", "default"),
    "cert-fingerprint": Row(facts(calling_ae="RIS", listener="tls", client_cert=cert(cn="x", fingerprint=FINGERPRINT)),
                            "accept", "fingerprint-pinned"),
    "cert-san-glob": Row(facts(calling_ae="RIS", listener="tls",
                               client_cert=cert(cn="x", sans=("dns:ws1.lab.example", "ip:10.0.0.1"))),
                         "accept", "san-match"),
    "cert-san-negated": Row(facts(calling_ae="RIS", listener="tls", abstract_syntaxes=NO_VERIFICATION,
                                  client_cert=cert(cn="x", sans=("dns:evil.lab.example",))), "reject", "default"),
    "client-cert-absent-explicit-codes": Row(facts(calling_ae="RIS", listener="tls"), "reject", "no-cert-on-tls",
                                             check={"reject": (2, 3, 1)}),
    # user identity
    "identity-jwt-rewrite": Row(facts(calling_ae="APP", user_identity=IdentityFacts(5, None)), "accept", "jwt-users",
                                check={"rewrite_calling_ae": "JWTPROXY", "rewrite_called_ae": "PACS"}),
    "identity-username-glob": Row(facts(calling_ae="APP", user_identity=IdentityFacts(2, "dr.house")), "accept",
                                  "named-user"),
    "identity-username-miss": Row(facts(calling_ae="APP", user_identity=IdentityFacts(1, "nurse"),
                                        abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    "identity-type-miss": Row(facts(calling_ae="APP", user_identity=IdentityFacts(3, None),
                                    abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    # abstract syntax groups, negated sets, deny filter, transfer syntax
    "group-with-deny-filter": Row(facts(calling_ae="RIS1", abstract_syntaxes=(WORKLIST, CT_IMAGE, VERIFICATION)),
                                  "accept", "worklist-only",
                                  check={"allowed_abstract_syntaxes": {WORKLIST, VERIFICATION},
                                         "context_rejection": 3}),
    "negated-set-excludes": Row(facts(source=OUTSIDE, abstract_syntaxes=(WORKLIST,)), "reject", "default"),
    "transfer-syntax": Row(facts(calling_ae="JPEG1", transfer_syntaxes=(IMPLICIT_LE, JPEG_BASELINE)), "reject",
                           "jpeg-ts", check={"reject": (1, 1, 3)}),
    "transfer-syntax-miss": Row(facts(calling_ae="JPEG1", abstract_syntaxes=NO_VERIFICATION), "reject", "default"),
    "storage-group-excludes-inventory-find": Row(facts(abstract_syntaxes=(CT_IMAGE, INVENTORY_FIND)), "accept",
                                                 "ward-store", check={"allowed_abstract_syntaxes": {CT_IMAGE}}),
    "filter-subset-of-proposed": Row(facts(abstract_syntaxes=(MR_IMAGE, STUDY_FIND, VERIFICATION)), "accept",
                                     "ward-store", check={"allowed_abstract_syntaxes": {MR_IMAGE, VERIFICATION}}),
    "listener-list-miss": Row(facts(source=OUTSIDE, listener="other"), "reject", "default"),
}

DIMSE_ROWS = {
    "dimse-explicit-forward": Row(facts(), "forward", "allow-archive-move",
                                  dimse=DimseFacts("C-MOVE", STUDY_MOVE, "ARCHIVE2", 0)),
    "dimse-move-to-self": Row(facts(), "forward", "default", dimse=DimseFacts("C-MOVE", STUDY_MOVE, "CT01", 0)),
    "dimse-move-elsewhere-a801": Row(facts(), "refuse", "move-to-self-only",
                                     dimse=DimseFacts("C-MOVE", STUDY_MOVE, "WS9", 0), check={"status": 0xA801}),
    "dimse-priority-explicit-status": Row(facts(), "refuse", "no-urgent-find-from-ward",
                                          dimse=DimseFacts("C-FIND", STUDY_FIND, None, 1), check={"status": 0xA700}),
    "dimse-priority-medium": Row(facts(), "forward", "default", dimse=DimseFacts("C-FIND", STUDY_FIND, None, 0)),
    "dimse-assoc-key-in-dimse-rule": Row(facts(), "refuse", "no-ct-store",
                                         dimse=DimseFacts("C-STORE", CT_IMAGE, None, 0), check={"status": 0x0124}),
    "dimse-assoc-key-miss": Row(facts(source=OUTSIDE), "forward", "default",
                                dimse=DimseFacts("C-STORE", CT_IMAGE, None, 0)),
    "dimse-other-sop-class": Row(facts(), "forward", "default", dimse=DimseFacts("C-STORE", MR_IMAGE, None, 0)),
    "dimse-shadow": Row(facts(), "forward", "default", dimse=DimseFacts("C-GET", STUDY_GET, None, 0),
                        check={"shadow_matches": (("shadow-get", "refuse"),)}),
    "dimse-command-group": Row(facts(), "refuse", "no-commitment-actions",
                               dimse=DimseFacts("N-ACTION", STORAGE_COMMITMENT)),
    "dimse-cancel-always-forwarded": Row(facts(), "forward", "default", dimse=DimseFacts("C-CANCEL")),
    "dimse-echo": Row(facts(), "forward", "default", dimse=DimseFacts("C-ECHO", VERIFICATION)),
}

ROWS = {**ASSOCIATION_ROWS, **DIMSE_ROWS}


def _check(decision: Decision | DimseDecision, row: Row) -> None:
    assert (decision.action, decision.rule) == (row.action, row.rule)
    for name, want in row.check.items():
        got = getattr(decision, name)
        if isinstance(want, set):
            assert got == frozenset(want), name
        else:
            assert got == want, name


def test_the_table_is_big_enough() -> None:
    assert len(ROWS) >= 40


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_fast_path(ruleset: RuleSet, row: Row) -> None:
    if row.dimse is None:
        _check(ruleset.evaluate(row.facts), row)
    else:
        _check(ruleset.evaluate_dimse(row.facts, row.dimse), row)


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_explain_reaches_the_same_decision(ruleset: RuleSet, row: Row) -> None:
    explanation = explain(ruleset, row.facts, row.dimse)
    assert explanation.decision == ruleset.evaluate(row.facts)
    if row.dimse is not None:
        assert explanation.dimse_decision is not None
        _check(explanation.dimse_decision, row)
    else:
        _check(explanation.decision, row)
    assert format_explanation(explanation)  # renders for every row


# --------------------------------------------------------------------------- details


def test_decision_carries_the_rule_location(ruleset: RuleSet) -> None:
    decision = ruleset.evaluate(facts())
    assert decision.location == f"rules/test.yaml:{line_of('ward-store')}"
    assert ruleset.evaluate(facts(calling_ae="nobody", abstract_syntaxes=())).location == "rules/test.yaml:2"
    assert decision.context_allowed(CT_IMAGE) and not decision.context_allowed(STUDY_FIND)


def test_rule_names_and_dimse_flag(ruleset: RuleSet) -> None:
    assert ruleset.rule_names[0] == "blocked-host"
    assert ruleset.rule_names[-1] == "default"
    assert len(ruleset.rule_names) == len(ruleset.rules) + 1
    assert ruleset.has_dimse_rules


def test_first_match_wins_in_file_order() -> None:
    text = """\
    version: 1
    default: accept
    rules:
      - {name: first, match: {calling_ae: "CT*"}, action: reject}
      - {name: second, match: {calling_ae: CT01}, action: accept}
    """
    rs, warnings = load_rules_text([("r.yaml", textwrap.dedent(text))])
    assert rs.evaluate(facts()).rule == "first"
    assert [w.message for w in warnings] == [
        "rule 'second' can never match: rule 'first' (line 4) already decides every one of the associations it matches"
    ]
    assert rs.evaluate(facts(calling_ae="MR01")) == Decision("default", "accept", location="r.yaml:2")
    assert not rs.has_dimse_rules
    assert rs.evaluate_dimse(facts(), DimseFacts("C-STORE", CT_IMAGE)) == DimseDecision("default", "forward")


def test_negation_only_list_and_mixed_list() -> None:
    text = """\
    version: 1
    default: reject
    rules:
      - {name: mixed, match: {calling_ae: ["CT*", "MR*", "!CT9*", "!MR_TEST"]}, action: accept}
    """
    rs, _ = load_rules_text([("r.yaml", textwrap.dedent(text))])
    got = {ae: rs.evaluate(facts(calling_ae=ae)).action for ae in ("CT01", "MR01", "CT99", "MR_TEST", "US01")}
    assert got == {"CT01": "accept", "MR01": "accept", "CT99": "reject", "MR_TEST": "reject", "US01": "reject"}


def test_default_drop_and_explicit_default_codes() -> None:
    rs, _ = load_rules_text([("r.yaml", "version: 1\ndefault: drop\n")])
    assert rs.evaluate(facts()).action == "drop"
    rs, _ = load_rules_text(
        [("r.yaml", "version: 1\ndefault: {action: reject, reject: {result: 1, source: 1, reason: 3}}\n")]
    )
    assert rs.evaluate(facts()).reject == (1, 1, 3)


def test_dimse_time_uses_the_request_clock_when_given() -> None:
    text = """\
    version: 1
    default: accept
    rules:
      - {name: no-night-moves, on: dimse, match: {command: C-MOVE, time: {hours: "20:00-06:00"}}, action: refuse}
    """
    rs, _ = load_rules_text([("r.yaml", textwrap.dedent(text))])
    move = DimseFacts("C-MOVE", STUDY_MOVE, "WS1", 0)
    assert rs.evaluate_dimse(facts(), move).action == "forward"  # association clock: noon
    late = DimseFacts("C-MOVE", STUDY_MOVE, "WS1", 0, now=datetime(2024, 5, 8, 21, 0))
    assert rs.evaluate_dimse(facts(), late).action == "refuse"


def test_multi_valued_negation_means_none_proposed() -> None:
    text = """\
    version: 1
    default: reject
    rules:
      - {name: no-storage, match: {abstract_syntax: "!storage"}, action: accept}
    """
    rs, _ = load_rules_text([("r.yaml", textwrap.dedent(text))])
    assert rs.evaluate(facts(abstract_syntaxes=(VERIFICATION, STUDY_FIND))).rule == "no-storage"
    assert rs.evaluate(facts(abstract_syntaxes=(VERIFICATION, CT_IMAGE))).rule == "default"
    assert rs.evaluate(facts(abstract_syntaxes=())).rule == "no-storage"


def test_uid_prefix_and_storage_outside_prefix() -> None:
    text = """\
    version: 1
    default: reject
    rules:
      - {name: vendor, match: {abstract_syntax: "1.2.826.0.1.3680043.*"}, action: accept}
      - {name: storage, match: {abstract_syntax: storage}, action: accept}
    """
    rs, _ = load_rules_text([("r.yaml", textwrap.dedent(text))])
    assert rs.evaluate(facts(abstract_syntaxes=("1.2.826.0.1.3680043.9.1",))).rule == "vendor"
    assert rs.evaluate(facts(abstract_syntaxes=("1.2.826.0.1.36800439",))).rule == "default"
    assert rs.evaluate(facts(abstract_syntaxes=("1.2.840.10008.5.1.4.38.1",))).rule == "storage"  # hanging protocol
    assert rs.evaluate(facts(abstract_syntaxes=("1.2.840.10008.5.1.4.1.1.201.6",))).rule == "default"


def test_groups_agree_with_pynetdicom() -> None:
    sop_class = pytest.importorskip("pynetdicom.sop_class")
    storage = GROUPS["storage"]
    for uid in sop_class._STORAGE_CLASSES.values():
        assert storage.matches(uid), uid
    for uid in sop_class._NON_PATIENT_OBJECT_CLASSES.values():
        assert storage.matches(uid), uid
    qr = GROUPS["query-retrieve"]
    for uid in [*sop_class._QR_CLASSES.values(), *sop_class._INVENTORY_CLASSES.values()]:
        assert qr.matches(uid) and not storage.matches(uid), uid
    assert {*sop_class._UNIFIED_PROCEDURE_STEP_CLASSES.values()} <= GROUPS["ups"].uids
    assert {*sop_class._BASIC_WORKLIST_CLASSES.values()} <= GROUPS["worklist"].uids


# --------------------------------------------------------------------------- explain


def test_explain_says_why_not(ruleset: RuleSet) -> None:
    explanation = explain(ruleset, facts(calling_ae="CT02", source=OUTSIDE, abstract_syntaxes=(CT_IMAGE,)))
    reasons = {step.rule.name: step.reason for step in explanation.steps}
    assert reasons["blocked-host"] == "source 10.21.0.1 does not match '192.0.2.66'"
    assert reasons["ward-store"] == "calling_ae 'CT02' does not match @ward"
    assert reasons["night-shift"] == "calling_ae 'CT02' does not match 'NIGHT*'"
    assert reasons["unknown-called"] == "called_ae 'PACS' matches the excluded '!PACS*'"
    assert reasons["tls-partner"] == "client_cert.cn: no verified client certificate, or one without a CN"
    assert reasons["jwt-users"] == "user_identity.type: the association carries no user identity"
    assert reasons["any-echo"] == (
        f"abstract_syntax: none of {CT_IMAGE} matches verification"
    )
    assert explanation.decision.rule == "default"
    text = format_explanation(explanation)
    assert f"rules/test.yaml:{line_of('ward-store')}  ward-store: no: calling_ae 'CT02' does not match @ward" in text
    assert text.splitlines()[-1] == (
        "decision: reject by default (rules/test.yaml:2) with A-ASSOCIATE-RJ 1/1/1 (permanent, no-reason-given)"
    )


def test_explain_stops_at_the_deciding_rule_and_counts_the_rest(ruleset: RuleSet) -> None:
    explanation = explain(ruleset, facts(calling_ae="TRIAL1"))
    names = [(s.rule.name, s.matched, s.enforced) for s in explanation.steps]
    assert ("shadow-trial", True, False) in names
    assert names[-1] == ("any-echo", True, True)
    assert explanation.not_evaluated == 0  # any-echo is the last association rule
    text = format_explanation(explanation)
    assert "shadow-trial (shadow): matched: would reject (shadow mode, not enforced)" in text
    assert "shadow rule(s) matched: shadow-trial (would reject)" in text


def test_explain_dimse(ruleset: RuleSet) -> None:
    explanation = explain(ruleset, facts(), DimseFacts("C-MOVE", STUDY_MOVE, "WS9", 0))
    assert [s.reason for s in explanation.dimse_steps] == [
        "move_destination 'WS9' does not match 'ARCHIVE2'",
        None,
    ]
    text = format_explanation(explanation)
    assert "request C-MOVE, SOP class 1.2.840.10008.5.1.4.1.2.2.2, move destination 'WS9', priority medium" in text
    where = f"rules/test.yaml:{line_of('move-to-self-only')}"
    assert f"decision: refuse by rule 'move-to-self-only' ({where}) with status 0xA801" in text
    find = explain(ruleset, facts(), DimseFacts("C-FIND", STUDY_FIND, None, 0))
    assert find.dimse_steps[1].reason == "command 'C-FIND' does not match 'C-MOVE'"
    text = "version: 1\ndefault: accept\nrules:\n  - {name: m, on: dimse, match: {move_destination: X}, action: refuse}"
    rs, _ = load_rules_text([("r.yaml", text)])
    absent = explain(rs, facts(), DimseFacts("C-FIND", STUDY_FIND, None, 0))
    assert absent.dimse_steps[0].reason == "move_destination: the request has no move destination (only C-MOVE has one)"
    assert format_explanation(absent).endswith("decision: forward (no DIMSE rule matched)")


def test_explain_time_reasons(ruleset: RuleSet) -> None:
    late = explain(ruleset, facts(calling_ae="NIGHT1", now=datetime(2024, 5, 11, 23, 0)))
    assert late.steps[2].reason == "time.days sat does not match 'mon-fri'"
    noon = explain(ruleset, facts(calling_ae="NIGHT1"))
    assert noon.steps[2].reason == "time.hours 12:00 does not match '22:00-06:00'"
    clockless = explain(ruleset, facts(calling_ae="NIGHT1", now=None))
    assert clockless.steps[2].reason == "time.days: no clock was given"


# --------------------------------------------------------------------------- fast path == slow path


AE_VALUES = ["CT01", "CT*", "!CT9*", "@aes", "!@aes", "MR?1", "US_[0-9]*"]
NET_VALUES = ["10.0.0.0/8", "10.1.0.0/16", "!10.1.2.0/24", "@nets", "!@nets", "2001:db8::/32"]
AS_VALUES = ["storage", "verification", "!storage", WORKLIST, "@uids", "!@uids", "1.2.840.10008.5.1.4.1.2.*"]
DAY_VALUES = ["mon-fri", "sat", "!sun", "fri-mon"]
HOUR_VALUES = ["07:00-19:00", "22:00-06:00", "!12:00-13:00"]
KEYS = {
    "calling_ae": AE_VALUES,
    "called_ae": AE_VALUES,
    "source": NET_VALUES,
    "abstract_syntax": AS_VALUES,
    "listener": ["modalities", "tls", "!tls"],
}
PROPERTY_SETS = """\
sets:
  aes: {type: ae_title, elements: [CT01, "MR*", "XA??"]}
  nets: {type: cidr, elements: [10.1.0.0/16, "2001:db8:5::/48"]}
  uids: {type: uid, elements: [verification, 1.2.840.10008.5.1.4.1.1.4]}
  cmds: {type: command, elements: [C-ECHO, C-GET]}
"""


def _value(draw: st.DrawFn, values: list[str]) -> str:
    chosen = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))
    return "[" + ", ".join(f'"{v}"' for v in chosen) + "]"


DIMSE_KEYS = {
    "command": ["C-MOVE", "C-FIND", "retrieve", "!C-STORE", "@cmds"],
    "priority": ["low", "high", "!medium"],
    "affected_sop_class": ["query-retrieve-move", STUDY_FIND, "!storage", "@uids"],
}
MOVE_DESTINATIONS = ['"WS*"', '"!WS1"', '"$calling_ae"', '"!$calling_ae"', '["@aes", "!MR1*"]']


@st.composite
def rule_files(draw: st.DrawFn) -> str:
    lines = ["version: 1", f"default: {draw(st.sampled_from(['accept', 'reject']))}", PROPERTY_SETS.rstrip(), "rules:"]
    for i in range(draw(st.integers(1, 8))):
        dimse = draw(st.booleans())
        choices = [*KEYS, "time", "client_cert", "user_identity"]
        if dimse:
            choices += [*DIMSE_KEYS, "move_destination"] * 2
        keys = draw(st.lists(st.sampled_from(choices), max_size=3, unique=True))
        parts = []
        for key in keys:
            if key == "time":
                parts.append(f"time: {{days: {_value(draw, DAY_VALUES)}, hours: {_value(draw, HOUR_VALUES)}}}")
            elif key == "client_cert":
                parts.append(draw(st.sampled_from(["client_cert: present", "client_cert: absent",
                                                   'client_cert: {cn: ["*.example", "!bad*"]}'])))
            elif key == "user_identity":
                parts.append(draw(st.sampled_from(["user_identity: {type: jwt}", 'user_identity: {username: "dr*"}'])))
            elif key == "move_destination":
                parts.append(f"move_destination: {draw(st.sampled_from(MOVE_DESTINATIONS))}")
            elif key in DIMSE_KEYS:
                parts.append(f"{key}: {_value(draw, DIMSE_KEYS[key])}")
            else:
                parts.append(f"{key}: {_value(draw, KEYS[key])}")
        match = f"match: {{{', '.join(parts)}}}, " if parts else ""
        mode = draw(st.sampled_from(["", "mode: shadow, "]))
        if dimse:
            action = "on: dimse, action: " + draw(st.sampled_from(["forward", "refuse"]))
        else:
            action = "action: " + draw(st.sampled_from(["accept", "reject", "drop"]))
        lines.append(f"  - {{name: r{i}, {mode}{match}{action}}}")
    return "\n".join(lines) + "\n"


@st.composite
def any_facts(draw: st.DrawFn) -> AssociationFacts:
    ae = st.sampled_from(["CT01", "CT99", "MR01", "MRX1", "XA12", "US_7", "ZZ"])
    return facts(
        calling_ae=draw(ae),
        called_ae=draw(ae),
        source=draw(st.sampled_from(["10.1.2.3", "10.1.9.9", "10.9.9.9", "192.0.2.1", "2001:db8:5::1", "2001:db9::1"])),
        listener=draw(st.sampled_from(["modalities", "tls"])),
        abstract_syntaxes=tuple(draw(st.lists(st.sampled_from(
            [CT_IMAGE, MR_IMAGE, VERIFICATION, WORKLIST, STUDY_FIND, INVENTORY_FIND]), max_size=4))),
        now=draw(st.one_of(st.none(), st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2024, 12, 31)))),
        client_cert=draw(st.sampled_from([None, cert(cn="a.example"), cert(cn="bad.example"), cert(cn=None)])),
        user_identity=draw(st.sampled_from([None, IdentityFacts(5, None), IdentityFacts(1, "dr.x")])),
    )


any_dimse = st.builds(
    DimseFacts,
    command=st.sampled_from(["C-MOVE", "C-FIND", "C-GET", "C-STORE", "C-ECHO", "C-CANCEL", "N-ACTION"]),
    affected_sop_class=st.sampled_from([None, STUDY_FIND, STUDY_MOVE, CT_IMAGE, MR_IMAGE, VERIFICATION]),
    move_destination=st.sampled_from([None, "WS1", "WS2", "CT01", "MR11", "ZZ"]),
    priority=st.sampled_from([None, 0, 1, 2]),
)


def _holds(rule: Rule, f: AssociationFacts, d: DimseFacts | None) -> bool:
    return all(why_not(c, f, d) is None for c in rule.match.conditions)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_files(), st.lists(st.tuples(any_facts(), any_dimse), min_size=1, max_size=5))
def test_fast_path_agrees_with_explain(text: str, many: list[tuple[AssociationFacts, DimseFacts]]) -> None:
    rs, _warnings = load_rules_text([("p.yaml", text)])
    pairs = shadowed_rules(rs)
    for f, d in many:
        slow = explain(rs, f, d)
        assert rs.evaluate(f) == slow.decision
        assert rs.evaluate_dimse(f, d) == slow.dimse_decision
        # a shadowed-rule warning is sound: whatever the later rule matches, the earlier one does
        for later, earlier in pairs:
            dimse = d if later.kind == "dimse" else None
            assert not _holds(later, f, dimse) or _holds(earlier, f, dimse), (later.name, earlier.name)


def test_the_benchmark_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Not timed: the bench script still works against the current engine."""
    spec = importlib.util.spec_from_file_location("bench_rules", REPO / "bench" / "bench_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_rules", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "load (s)" in out and "no rule matches (default) (us)" in out and out.rstrip().splitlines()[-1].startswith(
        "result: "
    )


def test_explain_dimse_of_a_rejected_association_and_without_dimse_rules() -> None:
    rs, _ = load_rules_text([("r.yaml", "version: 1\ndefault: reject\n")])
    text = format_explanation(explain(rs, facts(), DimseFacts("C-ECHO", VERIFICATION)))
    assert "  (no association rules)" in text
    assert "  (the association itself would not be accepted; DIMSE rules shown for completeness)" in text
    assert "  (no DIMSE rules)" in text
    cancel = format_explanation(explain(rs, facts(), DimseFacts("C-CANCEL")))
    assert "  C-CANCEL is always forwarded" in cancel
