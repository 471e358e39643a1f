"""Rule files: every mistake is reported where it is, as text an admin reads; warnings for rules
that can never match and sets nobody uses; the shipped rules/site.yaml loads clean."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from proxy import config, yamlsrc
from proxy.errors import ConfigErrors
from proxy.policy.engine import shadowed_rules
from proxy.policy.loader import _parse, compile_glob, expand_rule_path, load_rules, load_rules_text
from proxy.policy.model import FIELDS, AssociationFacts, DimseFacts, Finite, Glob, RuleSet

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "rules" / "site.yaml"
PATH = "rules/site.yaml"


def errors_of(text: str, *more: tuple[str, str]) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_rules_text([(PATH, textwrap.dedent(text)), *more])
    return [e.render() for e in info.value.errors]


def one_error(text: str, *more: tuple[str, str]) -> str:
    errors = errors_of(text, *more)
    assert len(errors) == 1, errors
    return errors[0]


def load(text: str, *more: tuple[str, str]) -> tuple[RuleSet, list[str]]:
    rs, warnings = load_rules_text([(PATH, textwrap.dedent(text)), *more])
    return rs, [str(w) for w in warnings]


HEAD = "version: 1\ndefault: reject\n"

MISTAKES = {
    "unknown-match-key": (
        HEAD + "rules:\n  - {name: a, match: {calling_aet: CT01}, action: accept}\n",
        "rules/site.yaml:4:23: error: unknown key 'calling_aet' in match (expected one of: 'source', 'listener', "
        "'calling_ae', 'called_ae', 'client_cert', 'abstract_syntax', 'transfer_syntax', 'user_identity', 'time')",
    ),
    "unknown-rule-key": (
        HEAD + "rules:\n  - {name: a, action: accept, upstreams: pacs}\n",
        "rules/site.yaml:4:31: error: unknown key 'upstreams' in a rule (expected one of: 'name', 'action', "
        "'description', 'on', 'mode', 'match', 'upstream', 'identity', 'rewrite', 'contexts', 'context_rejection', "
        "'reject', 'status')",
    ),
    "duplicate-key": (
        HEAD + "rules:\n  - name: a\n    match: {calling_ae: CT01, calling_ae: MR01}\n    action: accept\n",
        "rules/site.yaml:5:31: error: duplicate key 'calling_ae' (first defined at line 5, column 13)",
    ),
    "empty-list": (
        HEAD + "rules:\n  - {name: a, match: {calling_ae: []}, action: accept}\n",
        "rules/site.yaml:4:35: error: 'calling_ae' must not be an empty list (an empty list would match nothing)",
    ),
    "empty-rules": (
        HEAD + "rules: []\n",
        "rules/site.yaml:3:8: error: 'rules' must not be an empty list",
    ),
    "empty-match": (
        HEAD + "rules:\n  - {name: a, match: {}, action: accept}\n",
        "rules/site.yaml:4:22: error: 'match' must not be empty (omit it to match everything)",
    ),
    "undefined-set": (
        HEAD + "sets:\n  ward: {type: ae_title, elements: [CT01]}\n"
        "rules:\n  - {name: a, match: {calling_ae: \"@wrad\"}, action: accept}\n",
        "rules/site.yaml:6:35: error: undefined set '@wrad' (defined sets: @ward)",
    ),
    "set-of-wrong-type": (
        HEAD + "sets:\n  nets: {type: cidr, elements: [10.0.0.0/8]}\n"
        "rules:\n  - {name: a, match: {calling_ae: \"!@nets\"}, action: accept}\n",
        "rules/site.yaml:6:35: error: set @nets has type cidr, but 'calling_ae' needs a set of type ae_title",
    ),
    "cidr-host-bits": (
        HEAD + "rules:\n  - {name: a, match: {source: 10.20.0.1/16}, action: accept}\n",
        "rules/site.yaml:4:31: error: '10.20.0.1/16' has host bits set: did you mean 10.20.0.0/16?",
    ),
    "bad-ip": (
        HEAD + "sets:\n  nets: {type: cidr, elements: [10.0.0.0/8, 10.300.0.1]}\n",
        "rules/site.yaml:4:45: error: '10.300.0.1' is not an IP address or CIDR network "
        "(e.g. 10.20.0.0/16, 192.0.2.7, 2001:db8::/32)",
    ),
    "uid-leading-zero": (
        HEAD + "rules:\n  - {name: a, match: {abstract_syntax: 1.2.840.010008.1.1}, action: accept}\n",
        "rules/site.yaml:4:40: error: UID '1.2.840.010008.1.1' has a component with a leading zero ('010008')",
    ),
    "uid-too-long": (
        HEAD + "rules:\n  - {name: a, match: {transfer_syntax: " + "1." * 32 + "1}, action: accept}\n",
        f"rules/site.yaml:4:40: error: UID '{'1.' * 32}1' is longer than 64 characters",
    ),
    "uid-not-digits": (
        HEAD + "rules:\n  - {name: a, match: {affected_sop_class: 1.2.840.x}, on: dimse, action: refuse}\n",
        "rules/site.yaml:4:43: error: '1.2.840.x' is not a UID (digits and dots, e.g. 1.2.840.10008.1.1)",
    ),
    "unknown-group": (
        HEAD + "rules:\n  - {name: a, match: {abstract_syntax: storge}, action: accept}\n",
        "rules/site.yaml:4:40: error: unknown abstract syntax group 'storge' (groups: verification, storage, "
        "query-retrieve, query-retrieve-find, query-retrieve-move, query-retrieve-get, worklist, storage-commitment, "
        "mpps, ups, instance-availability; or write a UID)",
    ),
    "ae-too-long": (
        HEAD + "rules:\n  - {name: a, match: {called_ae: THIS_IS_SEVENTEEN}, action: accept}\n",
        "rules/site.yaml:4:34: error: AE title 'THIS_IS_SEVENTEEN' is longer than 16 characters",
    ),
    "ae-glob-can-never-match": (
        HEAD + "rules:\n  - {name: a, match: {called_ae: \"ABCDEFGHIJKLMNOPQ*\"}, action: accept}\n",
        "rules/site.yaml:4:34: error: AE title pattern 'ABCDEFGHIJKLMNOPQ*' can never match: it needs at least "
        "17 characters and AE titles have at most 16",
    ),
    "ae-backslash": (
        HEAD + "rules:\n  - {name: a, match: {calling_ae: 'CT\\01'}, action: accept}\n",
        "rules/site.yaml:4:35: error: AE title 'CT\\\\01' must not contain a backslash",
    ),
    "ae-control-character": (
        HEAD + "rules:\n  - {name: a, match: {calling_ae: \"CT\\t01\"}, action: accept}\n",
        "rules/site.yaml:4:35: error: AE title 'CT\\t01' must not contain control characters",
    ),
    "ae-unclosed-bracket": (
        HEAD + "rules:\n  - {name: a, match: {calling_ae: \"CT[12\"}, action: accept}\n",
        "rules/site.yaml:4:35: error: unclosed '[' in pattern 'CT[12' (write '[[]' for a literal '[')",
    ),
    "ae-number-needs-quotes": (
        HEAD + "rules:\n  - {name: a, match: {calling_ae: 104}, action: accept}\n",
        "rules/site.yaml:4:35: error: 'calling_ae': '104' must be a string; quote it: \"104\"",
    ),
    "bad-hour-range": (
        HEAD + "rules:\n  - {name: a, match: {time: {hours: \"7:00-19:00\"}}, action: accept}\n",
        "rules/site.yaml:4:37: error: '7:00-19:00' is not an hour range: write HH:MM-HH:MM, e.g. 07:00-19:00 "
        "(a range may cross midnight: 22:00-06:00)",
    ),
    "empty-hour-range": (
        HEAD + "rules:\n  - {name: a, match: {time: {hours: \"08:00-08:00\"}}, action: accept}\n",
        "rules/site.yaml:4:37: error: '08:00-08:00' is empty or ambiguous: write 00:00-24:00 for the whole day",
    ),
    "hour-out-of-range": (
        HEAD + "rules:\n  - {name: a, match: {time: {hours: \"18:00-25:00\"}}, action: accept}\n",
        "rules/site.yaml:4:37: error: '18:00-25:00': times run from 00:00 to 23:59 (24:00 is allowed as the end)",
    ),
    "bad-weekday": (
        HEAD + "rules:\n  - {name: a, match: {time: {days: [mon-fri, saturday]}}, action: accept}\n",
        "rules/site.yaml:4:46: error: unknown weekday 'saturday' in 'saturday' (expected mon, tue, wed, thu, fri, "
        "sat, sun, or a range such as mon-fri)",
    ),
    "unknown-action": (
        HEAD + "rules:\n  - {name: a, action: allow}\n",
        "rules/site.yaml:4:23: error: unknown action 'allow' in rule 'a' (expected one of: 'accept', 'reject', 'drop')",
    ),
    "dimse-action-in-association-rule": (
        HEAD + "rules:\n  - {name: a, action: refuse}\n",
        "rules/site.yaml:4:23: error: action 'refuse' is for DIMSE rules: add 'on: dimse' to rule 'a'",
    ),
    "association-action-in-dimse-rule": (
        HEAD + "rules:\n  - {name: a, on: dimse, action: accept}\n",
        "rules/site.yaml:4:34: error: action 'accept' is for association rules; a DIMSE rule can only "
        "'forward' or 'refuse'",
    ),
    "reject-reason-not-in-table": (
        HEAD + "rules:\n  - name: a\n    action: reject\n    reject: {result: 1, source: 1, reason: 5}\n",
        "rules/site.yaml:6:44: error: reject reason 5 is not defined for source 1 (service-user): expected "
        "1 no-reason-given, 2 application-context-name-not-supported, 3 calling-AE-title-not-recognized, "
        "7 called-AE-title-not-recognized",
    ),
    "reject-result-out-of-range": (
        HEAD + "rules:\n  - name: a\n    action: reject\n    reject: {result: 3, source: 3, reason: 1}\n",
        "rules/site.yaml:6:22: error: the reject result must be between 1 and 2, got 3",
    ),
    "reject-on-accept-rule": (
        HEAD + "rules:\n  - name: a\n    action: accept\n    reject: {result: 1, source: 1, reason: 1}\n",
        "rules/site.yaml:6:5: error: 'reject' only applies to action 'reject', not 'accept'",
    ),
    "upstream-on-reject-rule": (
        HEAD + "rules:\n  - {name: a, action: reject, upstream: pacs}\n",
        "rules/site.yaml:4:31: error: 'upstream' only applies to action 'accept', not 'reject'",
    ),
    "dimse-key-in-association-rule": (
        HEAD + "rules:\n  - {name: a, match: {command: C-MOVE}, action: accept}\n",
        "rules/site.yaml:4:23: error: 'command' is a DIMSE key: add 'on: dimse' to rule 'a' to test requests",
    ),
    "association-option-in-dimse-rule": (
        HEAD + "rules:\n  - {name: a, on: dimse, action: refuse, contexts: {allow: [storage]}}\n",
        "rules/site.yaml:4:42: error: 'contexts' only applies to association rules (this rule has 'on: dimse')",
    ),
    "status-not-a-failure": (
        HEAD + "rules:\n  - {name: a, on: dimse, action: refuse, status: 0xFF00}\n",
        "rules/site.yaml:4:50: error: status 0xFF00 is not a failure status: refuse with 0x0124 (not authorized), "
        "0xA801 (move destination unknown), 0x0122 (SOP class not supported), or another 0xAxxx, 0xCxxx, 0x01xx "
        "or 0x02xx failure (PS3.7 Annex C)",
    ),
    "cancel-cannot-be-matched": (
        HEAD + "rules:\n  - {name: a, on: dimse, match: {command: C-CANCEL}, action: refuse}\n",
        "rules/site.yaml:4:43: error: C-CANCEL cannot be matched: it is always forwarded "
        "(it has no response to refuse it with)",
    ),
    "lower-case-command": (
        HEAD + "rules:\n  - {name: a, on: dimse, match: {command: c-store}, action: refuse}\n",
        "rules/site.yaml:4:43: error: unknown command 'c-store': command names are upper case, e.g. 'C-STORE'",
    ),
    "calling-ae-token-alone": (
        HEAD + "rules:\n  - {name: a, on: dimse, match: {move_destination: [\"!$calling_ae\", WS1]}, action: refuse}\n",
        "rules/site.yaml:4:52: error: '$calling_ae' must be the only value of 'move_destination' "
        "(write a second rule for other destinations)",
    ),
    "context-rejection-without-contexts": (
        HEAD + "rules:\n  - {name: a, action: accept, context_rejection: user-rejection}\n",
        "rules/site.yaml:4:31: error: 'context_rejection' has no effect without 'contexts'",
    ),
    "negation-inside-a-set": (
        HEAD + "sets:\n  ward: {type: ae_title, elements: [CT01, \"!MR01\"]}\n",
        "rules/site.yaml:4:43: error: '!' is not allowed inside a set; negate the reference instead: '!@ward'",
    ),
    "missing-default": (
        "version: 1\nrules:\n  - {name: a, action: accept}\n",
        "rules/site.yaml:1:1: error: missing required key 'default' in the first rule file "
        "(what happens when no rule matches: accept, reject or drop)",
    ),
    "bad-default": (
        "version: 1\ndefault: allow\n",
        "rules/site.yaml:2:10: error: 'default' must be one of 'accept', 'reject', 'drop', got 'allow'",
    ),
    "bad-version": (
        "version: 2\ndefault: reject\n",
        "rules/site.yaml:1:10: error: unsupported rule file version 2 (this proxy reads version 1)",
    ),
    "missing-version": (
        "default: reject\n",
        "rules/site.yaml:1:1: error: missing required key 'version' in a rule file",
    ),
    "duplicate-rule-name": (
        HEAD + "rules:\n  - {name: a, action: accept}\n  - {name: a, action: reject}\n",
        "rules/site.yaml:5:12: error: duplicate rule name 'a' (first used in rules/site.yaml at line 4)",
    ),
    "reserved-rule-name": (
        HEAD + "rules:\n  - {name: default, action: accept}\n",
        "rules/site.yaml:4:12: error: the rule name 'default' is reserved for the default decision",
    ),
    "mode-typo": (
        HEAD + "rules:\n  - {name: a, mode: shdow, action: accept}\n",
        "rules/site.yaml:4:21: error: 'mode' of rule 'a' must be one of 'enforce', 'shadow', got 'shdow'",
    ),
    "client-cert-bad-fingerprint": (
        HEAD + "rules:\n  - {name: a, match: {client_cert: {fingerprint: abc}}, action: accept}\n",
        "rules/site.yaml:4:50: error: 'abc' is not a SHA-256 fingerprint (64 hexadecimal digits, colons allowed)",
    ),
    "user-identity-bad-type": (
        HEAD + "rules:\n  - {name: a, match: {user_identity: {type: oauth}}, action: accept}\n",
        "rules/site.yaml:4:45: error: unknown user identity type 'oauth' (expected username, username_passcode, "
        "kerberos, saml, jwt or 1-5)",
    ),
    "rewrite-pattern": (
        HEAD + "rules:\n  - {name: a, action: accept, rewrite: {called_ae: \"PACS*\"}}\n",
        "rules/site.yaml:4:52: error: a rewrite needs a plain AE title, not the pattern 'PACS*'",
    ),
    "syntax-error": (
        HEAD + "rules:\n  - {name: a, action: accept\n",
        "rules/site.yaml:5:1: error: invalid YAML: while parsing a flow mapping; expected ',' or '}', "
        "but got '<stream end>'",
    ),
}


@pytest.mark.parametrize(("text", "expected"), MISTAKES.values(), ids=MISTAKES.keys())
def test_each_mistake_is_reported_where_it_is(text: str, expected: str) -> None:
    assert one_error(text) == expected


def test_there_are_many_kinds_of_mistakes() -> None:
    assert len(MISTAKES) >= 12


# More mistakes, one error each, checked as text too.
MORE_MISTAKES = {
    "bad-range": (
        HEAD + 'rules:\n  - {name: a, match: {calling_ae: "CT[9-0]"}, action: accept}\n',
        "rules/site.yaml:4:35: error: bad range '9-0' in pattern 'CT[9-0]' (write it low to high)",
    ),
    "ae-all-spaces": (
        HEAD + 'rules:\n  - {name: a, match: {calling_ae: "  "}, action: accept}\n',
        "rules/site.yaml:4:35: error: 'calling_ae' must not be empty",
    ),
    "empty-cn": (
        HEAD + 'rules:\n  - {name: a, match: {client_cert: {cn: " "}}, action: accept}\n',
        "rules/site.yaml:4:41: error: 'client_cert.cn' must not be empty",
    ),
    "mapped-v6": (
        HEAD + 'rules:\n  - {name: a, match: {source: "::ffff:10.0.0.0/104"}, action: accept}\n',
        "rules/site.yaml:4:31: error: '::ffff:10.0.0.0/104' is an IPv4-mapped IPv6 network: write it as IPv4 "
        '(clients on dual-stack listeners are matched by their IPv4 address)',
    ),
    "uid-empty-component": (
        HEAD + 'rules:\n  - {name: a, match: {abstract_syntax: "1..2"}, action: accept}\n',
        "rules/site.yaml:4:40: error: UID '1..2' has an empty component",
    ),
    "uid-star-inside": (
        HEAD + 'rules:\n  - {name: a, match: {abstract_syntax: "1.2.*.3"}, action: accept}\n',
        "rules/site.yaml:4:40: error: '1.2.*.3': only a whole-component prefix such as '1.2.826.0.1.3680043.*' "
        "may use '*'",
    ),
    "ts-group": (
        HEAD + 'rules:\n  - {name: a, match: {transfer_syntax: storage}, action: accept}\n',
        "rules/site.yaml:4:40: error: 'storage' is not a transfer syntax UID (digits and dots, e.g. "
        '1.2.840.10008.1.2.1)',
    ),
    "unknown-command": (
        HEAD + 'rules:\n  - {name: a, on: dimse, match: {command: C-PUSH}, action: refuse}\n',
        "rules/site.yaml:4:43: error: unknown command 'C-PUSH' (expected one of: C-STORE, C-FIND, C-GET, "
        'C-MOVE, C-ECHO, N-EVENT-REPORT, N-GET, N-SET, N-ACTION, N-CREATE, N-DELETE, query-retrieve, retrieve, '
        'composite, normalized)',
    ),
    "bad-listener": (
        HEAD + 'rules:\n  - {name: a, match: {listener: "my listener"}, action: accept}\n',
        "rules/site.yaml:4:33: error: listener name 'my listener' must be 1-64 letters, digits, '_', '.' or '-'",
    ),
    "bad-priority": (
        HEAD + 'rules:\n  - {name: a, on: dimse, match: {priority: urgent}, action: refuse}\n',
        "rules/site.yaml:4:44: error: unknown priority 'urgent' (expected low, medium or high)",
    ),
    "default-mapping-codes-on-accept": (
        'version: 1\ndefault: {action: accept, reject: {result: 1, source: 1, reason: 1}}\n',
        "rules/site.yaml:2:27: error: 'reject' codes only apply when the default action is 'reject'",
    ),
    "empty-sets": (
        HEAD + 'sets: {}\n',
        "rules/site.yaml:3:7: error: 'sets' must not be empty (remove the key)",
    ),
    "set-bad-name": (
        HEAD + "sets:\n  'my set': {type: uid, elements: [1.2]}\n",
        "rules/site.yaml:4:3: error: set name 'my set' must be 1-64 letters, digits, '_', '.' or '-', starting "
        'with a letter or digit',
    ),
    "set-not-mapping": (
        HEAD + 'sets:\n  s: [1.2]\n',
        "rules/site.yaml:4:6: error: set 's' must be a mapping, got a list",
    ),
    "set-bad-type": (
        HEAD + 'sets:\n  s: {type: ip, elements: [1.2]}\n',
        "rules/site.yaml:4:13: error: the type of set 's' must be one of 'ae_title', 'cidr', 'uid', 'command', "
        "got 'ip'",
    ),
    "set-in-set": (
        HEAD + "sets:\n  s: {type: uid, elements: ['@t']}\n",
        'rules/site.yaml:4:29: error: a set cannot contain another set; list the elements',
    ),
    "rule-not-mapping": (
        HEAD + 'rules:\n  - just-a-name\n',
        'rules/site.yaml:4:5: error: a rule must be a mapping, got a string',
    ),
    "bad-on": (
        HEAD + 'rules:\n  - {name: a, on: request, action: refuse}\n',
        "rules/site.yaml:4:19: error: 'on' of rule 'a' must be one of 'association', 'dimse', got 'request'",
    ),
    "reject-in-dimse": (
        HEAD + 'rules:\n  - {name: a, on: dimse, action: refuse, reject: {result: 1, source: 1, reason: 1}}\n',
        "rules/site.yaml:4:42: error: 'reject' only applies to association rules; a DIMSE rule refuses with "
        "'status'",
    ),
    "status-in-association": (
        HEAD + 'rules:\n  - {name: a, action: reject, status: 0x0124}\n',
        "rules/site.yaml:4:31: error: 'status' only applies to DIMSE rules ('on: dimse', action 'refuse')",
    ),
    "action-not-string": (
        HEAD + 'rules:\n  - {name: a, action: [accept]}\n',
        "rules/site.yaml:4:23: error: the action of rule 'a' must be a string, got a list",
    ),
    "upstream-twice": (
        HEAD + 'rules:\n  - {name: a, action: accept, upstream: [pacs, pacs]}\n',
        "rules/site.yaml:4:48: error: upstream 'pacs' is listed twice",
    ),
    "upstream-bad-name": (
        HEAD + "rules:\n  - {name: a, action: accept, upstream: 'pacs main'}\n",
        "rules/site.yaml:4:41: error: upstream name 'pacs main' must be 1-64 letters, digits, '_', '.' or '-'",
    ),
    "rewrite-empty": (
        HEAD + 'rules:\n  - {name: a, action: accept, rewrite: {}}\n',
        "rules/site.yaml:4:40: error: 'rewrite' of rule 'a' must not be empty",
    ),
    "rewrite-bad-ae": (
        HEAD + 'rules:\n  - {name: a, action: accept, rewrite: {calling_ae: THIS_IS_SEVENTEEN}}\n',
        "rules/site.yaml:4:53: error: AE title 'THIS_IS_SEVENTEEN' is longer than 16 characters",
    ),
    "contexts-empty": (
        HEAD + 'rules:\n  - {name: a, action: accept, contexts: {}}\n',
        "rules/site.yaml:4:41: error: 'contexts' of rule 'a' needs 'allow' or 'deny'",
    ),
    "contexts-negated": (
        HEAD + "rules:\n  - {name: a, action: accept, contexts: {allow: ['!storage']}}\n",
        "rules/site.yaml:4:50: error: '!' is not allowed in 'contexts': list what to refuse under 'deny'",
    ),
    "contexts-bad-uid": (
        HEAD + 'rules:\n  - {name: a, action: accept, contexts: {deny: [1.02]}}\n',
        "rules/site.yaml:4:49: error: 'contexts: deny' of rule 'a': '1.02' must be a string; quote it: "
        '"1.02"',
    ),
    "status-text": (
        HEAD + 'rules:\n  - {name: a, on: dimse, action: refuse, status: refused}\n',
        "rules/site.yaml:4:50: error: the status of rule 'a' must be a number such as 0x0124, got a string",
    ),
    "status-hex-string": (
        HEAD + "rules:\n  - {name: a, on: dimse, action: refuse, status: '0x10000'}\n",
        'rules/site.yaml:4:50: error: status 0x10000 is out of range (0x0000-0xFFFF)',
    ),
    "client-cert-bad-scalar": (
        HEAD + 'rules:\n  - {name: a, match: {client_cert: yes}, action: accept}\n',
        "rules/site.yaml:4:36: error: 'client_cert' must be 'present', 'absent' or a mapping with 'cn', 'san', "
        "'issuer', 'fingerprint'",
    ),
    "time-empty": (
        HEAD + 'rules:\n  - {name: a, match: {time: {}}, action: accept}\n',
        "rules/site.yaml:4:29: error: 'time' must not be empty",
    ),
    "time-unknown-key": (
        HEAD + 'rules:\n  - {name: a, match: {time: {weekdays: mon}}, action: accept}\n',
        "rules/site.yaml:4:30: error: unknown key 'weekdays' in 'time' (expected one of: 'days', 'hours')",
    ),
    "bang-alone": (
        HEAD + "rules:\n  - {name: a, match: {calling_ae: '!'}, action: accept}\n",
        "rules/site.yaml:4:35: error: '!' must be followed by a value",
    ),
    "set-for-listener": (
        HEAD + "rules:\n  - {name: a, match: {listener: '@l'}, action: accept}\n",
        "rules/site.yaml:4:33: error: 'listener' takes values, not sets",
    ),
    "ts-set-with-groups": (
        HEAD + 'sets:\n  u: {type: uid, elements: [storage]}\nrules:\n  - {name: a, match: {transfer_syntax: '
               "'@u'}, action: accept}\n",
        "rules/site.yaml:6:40: error: set @u contains abstract syntax groups, which 'transfer_syntax' cannot "
        'use',
    ),
    "value-is-mapping": (
        HEAD + 'rules:\n  - {name: a, match: {calling_ae: {x: 1}}, action: accept}\n',
        "rules/site.yaml:4:35: error: 'calling_ae' must be a value or a list of values, got a mapping",
    ),
    "ae-boolean": (
        HEAD + 'rules:\n  - {name: a, match: {called_ae: no}, action: accept}\n',
        'rules/site.yaml:4:34: error: \'called_ae\': \'no\' is read as a boolean; quote it: "no"',
    ),
    "rules-not-list": (
        HEAD + 'rules: {a: 1}\n',
        "rules/site.yaml:3:8: error: 'rules' must be a list, got a mapping",
    ),
    "top-not-mapping": (
        '- 1\n',
        'rules/site.yaml:1:1: error: a rule file must be a mapping, got a list',
    ),
}


@pytest.mark.parametrize(("text", "expected"), MORE_MISTAKES.values(), ids=MORE_MISTAKES.keys())
def test_more_mistakes(text: str, expected: str) -> None:
    assert one_error(text) == expected



def test_all_errors_of_a_file_come_in_one_pass_with_a_caret() -> None:
    text = """\
    version: 1
    default: reject
    rules:
      - name: a
        match: {calling_ae: "@nope", source: 10.0.0.1/8}
        action: acept
    """
    with pytest.raises(ConfigErrors) as info:
        load_rules_text([(PATH, textwrap.dedent(text))])
    rendered = [e.render(with_caret=True) for e in info.value.errors]
    assert [r.splitlines()[0] for r in rendered] == [
        "rules/site.yaml:5:25: error: undefined set '@nope' (defined sets: none)",
        "rules/site.yaml:5:42: error: '10.0.0.1/8' has host bits set: did you mean 10.0.0.0/8?",
        "rules/site.yaml:6:13: error: unknown action 'acept' in rule 'a' (expected one of: 'accept', 'reject', 'drop')",
    ]
    assert rendered[0].splitlines()[1:] == [
        '        match: {calling_ae: "@nope", source: 10.0.0.1/8}',
        "                            ^",
    ]


# --------------------------------------------------------------------------- several files


def test_several_files_share_sets_and_names() -> None:
    first = HEAD + "sets:\n  ward: {type: ae_title, elements: [CT01]}\nrules:\n  - {name: a, action: drop, " \
                   "match: {calling_ae: ZZ}}\n"
    second = "version: 1\nrules:\n  - {name: b, match: {calling_ae: \"@ward\"}, action: accept}\n"
    rs, warnings = load(first, ("rules/site.d/10-ward.yaml", second))
    assert [r.name for r in rs.rules] == ["a", "b"]
    assert rs.files == ("rules/site.yaml", "rules/site.d/10-ward.yaml")
    assert warnings == []
    assert rs.rules[1].where == "rules/site.d/10-ward.yaml:3"


def test_a_later_default_must_agree() -> None:
    later = "version: 1\ndefault: accept\n"
    assert one_error(HEAD, ("rules/site.d/x.yaml", later)) == (
        "rules/site.d/x.yaml:2:10: error: 'default' differs from the one in rules/site.yaml at line 2: "
        "only the first rule file sets the default (remove this one or make it the same)"
    )
    rs, _ = load(HEAD, ("rules/site.d/x.yaml", HEAD))  # repeating the same default is fine
    assert rs.default.action == "reject"


def test_duplicate_names_across_files() -> None:
    first = HEAD + "sets:\n  ward: {type: ae_title, elements: [CT01]}\nrules:\n  - {name: a, action: accept, " \
                   "match: {calling_ae: \"@ward\"}}\n"
    second = "version: 1\nsets:\n  ward: {type: ae_title, elements: [MR01]}\nrules:\n  - {name: a, action: drop}\n"
    assert errors_of(first, ("rules/site.d/x.yaml", second)) == [
        "rules/site.d/x.yaml:3:3: error: set 'ward' is already defined in rules/site.yaml at line 4",
        "rules/site.d/x.yaml:5:12: error: duplicate rule name 'a' (first used in rules/site.yaml at line 6)",
    ]


def test_empty_file() -> None:
    assert one_error("") == "rules/site.yaml:1:1: error: the rule file is empty"


# --------------------------------------------------------------------------- warnings


def test_warning_for_a_rule_after_a_catch_all() -> None:
    text = HEAD + "rules:\n  - {name: everyone, action: accept}\n  - {name: ct, match: {calling_ae: X}, action: drop}"
    _, warnings = load(text)
    assert warnings == [
        "rules/site.yaml:5:5: warning: rule 'ct' can never match: rule 'everyone' (line 4) already decides every "
        "one of the associations it matches"
    ]


def test_warning_for_superset_conditions() -> None:
    text = """\
    version: 1
    default: reject
    sets:
      ward: {type: ae_title, elements: [CT01, "MR*"]}
    rules:
      - name: broad
        match: {calling_ae: ["@ward", "US*"], source: 10.0.0.0/8, abstract_syntax: query-retrieve}
        action: accept
      - name: narrow
        mode: shadow
        match: {calling_ae: [MR_3T, US_1], source: [10.1.0.0/16, 10.2.3.4], abstract_syntax: query-retrieve-find,
                time: {days: mon-fri}}
        action: reject
      - name: dimse-broad
        on: dimse
        match: {command: retrieve}
        action: refuse
      - name: dimse-narrow
        on: dimse
        match: {command: C-MOVE, move_destination: "!WS*"}
        action: refuse
    """
    _, warnings = load(text)
    assert warnings == [
        "rules/site.yaml:9:5: warning: shadow rule 'narrow' is never evaluated: rule 'broad' (line 6) decides every "
        "one of the associations it matches",
        "rules/site.yaml:18:5: warning: rule 'dimse-narrow' can never match: rule 'dimse-broad' (line 14) already "
        "decides every one of the requests it matches",
    ]


NOT_SHADOWED = {
    # the earlier rule is itself in shadow mode: it never decides
    "earlier-is-shadow": "  - {name: a, mode: shadow, action: accept}\n  - {name: b, action: drop}\n",
    # the earlier rule tests a key the later one does not
    "extra-key": "  - {name: a, match: {calling_ae: CT01, called_ae: PACS}, action: accept}\n"
                 "  - {name: b, match: {calling_ae: CT01}, action: drop}\n",
    # overlapping but not containing
    "overlap": "  - {name: a, match: {calling_ae: \"CT*\"}, action: accept}\n"
               "  - {name: b, match: {calling_ae: [CT01, MR01]}, action: drop}\n",
    "cidr-overlap": "  - {name: a, match: {source: 10.1.0.0/16}, action: accept}\n"
                    "  - {name: b, match: {source: 10.0.0.0/8}, action: drop}\n",
    # a negation in the earlier rule that the later one does not exclude
    "negation": "  - {name: a, match: {calling_ae: \"!CT01\"}, action: accept}\n"
                "  - {name: b, match: {calling_ae: \"C*\"}, action: drop}\n",
    # any-element semantics: "!storage" in the later rule does not make "verification" certain
    "multi-valued": "  - {name: a, match: {abstract_syntax: verification}, action: accept}\n"
                    "  - {name: b, match: {abstract_syntax: \"!storage\"}, action: drop}\n",
    # different kinds never shadow each other
    "kinds": "  - {name: a, action: accept}\n  - {name: b, on: dimse, action: refuse}\n",
    # hour ranges: the later one sticks out past midnight
    "hours": "  - {name: a, match: {time: {hours: \"20:00-24:00\"}}, action: accept}\n"
             "  - {name: b, match: {time: {hours: \"22:00-02:00\"}}, action: drop}\n",
}


@pytest.mark.parametrize("rules", NOT_SHADOWED.values(), ids=NOT_SHADOWED.keys())
def test_no_false_shadow_warning(rules: str) -> None:
    _, warnings = load(HEAD + "rules:\n" + rules)
    assert warnings == []


def test_shadow_warnings_for_exact_finite_cases() -> None:
    rules = (
        "  - {name: a, match: {calling_ae: \"!CT01\"}, action: accept}\n"
        "  - {name: b, match: {calling_ae: [MR01, US01]}, action: drop}\n"  # never CT01: covered
        "  - {name: c, match: {time: {hours: \"20:00-24:00\"}}, action: accept}\n"
        "  - {name: d, match: {time: {hours: \"21:00-23:59\"}}, action: drop}\n"
    )
    _, warnings = load(HEAD + "rules:\n" + rules)
    assert [w.split(": warning: ")[1].split(":")[0] for w in warnings] == [
        "rule 'b' can never match",
        "rule 'd' can never match",
    ]


def test_warning_for_an_unused_set() -> None:
    text = HEAD + "sets:\n  spare: {type: uid, elements: [1.2.3]}\n"
    _, warnings = load(text)
    assert warnings == ["rules/site.yaml:4:3: warning: set 'spare' is not used by any rule"]


def test_warnings_render_with_a_caret() -> None:
    rs, warnings = load_rules_text([(PATH, HEAD + "sets:\n  spare: {type: uid, elements: [1.2.3]}\n")])
    assert warnings[0].render(with_caret=True).splitlines()[1:] == [
        "      spare: {type: uid, elements: [1.2.3]}",
        "      ^",
    ]
    assert rs.sets["spare"].matches("1.2.3")


# --------------------------------------------------------------------------- proxy.yaml and rules/site.yaml


PROXY_YAML = """\
listeners:
  - name: modalities
    address: 127.0.0.1:11112
upstreams:
  pacs:
    address: 127.0.0.1:2762
routes:
  PACS: pacs
default_upstream: pacs
"""


def site_dir(tmp_path: Path, rules: str) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    shutil.copy(SITE, tmp_path / "rules" / "site.yaml")
    path = tmp_path / "proxy.yaml"
    path.write_text(PROXY_YAML + rules)
    return path


def test_shipped_site_rules_load_clean_through_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site_dir(tmp_path, 'rules: [rules/site.yaml, "rules/site.d/*.yaml"]\n')
    monkeypatch.chdir(tmp_path)
    cfg = config.load("proxy.yaml")
    assert cfg.rules is not None
    assert cfg.warnings == ()
    assert cfg.rules.files == ("rules/site.yaml",)
    assert cfg.rules.default.action == "reject"
    assert cfg.rules.has_dimse_rules
    assert {u for r in cfg.rules.rules for u in r.upstreams} == {"pacs"}
    assert any(r.shadow for r in cfg.rules.rules)


def test_shipped_site_rules_behave(tmp_path: Path) -> None:
    import ipaddress
    from datetime import datetime

    cfg = config.load(site_dir(tmp_path, "rules: [rules/site.yaml]\n"))
    rs = cfg.rules
    assert rs is not None

    def assoc(calling: str, source: str, called: str = "PACS", *syntaxes: str) -> AssociationFacts:
        return AssociationFacts(ipaddress.ip_address(source), "modalities", calling, called, syntaxes,
                                now=datetime(2024, 5, 11, 23, 0))

    ct = rs.evaluate(assoc("CT_RAD3", "10.20.4.4", "PACS_ARCHIVE", "1.2.840.10008.5.1.4.1.1.2",
                           "1.2.840.10008.5.1.4.1.2.2.1"))
    assert (ct.action, ct.rule, ct.rewrite_called_ae) == ("accept", "modalities-store", "PACS")
    assert ct.allowed_abstract_syntaxes == {"1.2.840.10008.5.1.4.1.1.2"}
    assert rs.evaluate(assoc("CT_OLD", "10.20.4.4")).reject == (1, 1, 3)
    assert rs.evaluate(assoc("CT_RAD3", "10.99.0.7")).action == "drop"
    ws = assoc("RAD_WS7", "10.30.12.7", "PACS", "1.2.840.10008.5.1.4.1.2.2.2")
    decision = rs.evaluate(ws)
    assert (decision.rule, decision.shadow_matches) == (
        "reading-rooms-query-retrieve", (("trial-weekend-night-reading", "reject"),)
    )
    move = "1.2.840.10008.5.1.4.1.2.2.2"
    assert rs.evaluate_dimse(ws, DimseFacts("C-MOVE", move, "RAD_WS7", 0)).action == "forward"
    assert rs.evaluate_dimse(ws, DimseFacts("C-MOVE", move, "LAB_3D", 0)).rule == "reading-rooms-move-to-3d-lab"
    refused = rs.evaluate_dimse(ws, DimseFacts("C-MOVE", move, "RAD_WS8", 0))
    assert (refused.action, refused.status) == ("refuse", 0xA801)
    assert rs.evaluate_dimse(ws, DimseFacts("C-STORE", "1.2.840.10008.5.1.4.1.1.2")).status == 0x0124
    assert rs.evaluate(assoc("NOBODY", "192.0.2.1")).rule == "default"


def test_unknown_upstream_and_listener_are_errors_in_the_rule_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "site.yaml").write_text(
        HEAD + "rules:\n  - {name: a, match: {listener: [modalities, tls]}, action: accept, upstream: [pacs, pacz]}\n"
             "  - {name: b, action: accept, identity: svc}\n"
    )
    (tmp_path / "proxy.yaml").write_text(PROXY_YAML + "rules: [rules/site.yaml]\n")
    with pytest.raises(ConfigErrors) as info:
        config.load("proxy.yaml")
    assert [e.render() for e in info.value.errors] == [
        "rules/site.yaml:4:46: error: unknown listener 'tls' in rule 'a' (defined listeners in proxy.yaml: "
        "'modalities')",
        "rules/site.yaml:4:86: error: unknown upstream 'pacz' in rule 'a' (defined upstreams in proxy.yaml: 'pacs')",
        "rules/site.yaml:5:41: error: unknown identity profile 'svc' in rule 'b' (defined identity profiles in "
        "proxy.yaml: none)",
    ]


def test_missing_rule_file_is_an_error_but_an_empty_glob_is_not(tmp_path: Path) -> None:
    path = site_dir(tmp_path, "rules: [rules/site.yaml, rules/extra.yaml]\n")
    with pytest.raises(ConfigErrors) as info:
        config.load(path)
    [error] = info.value.errors
    assert error.render().startswith(f"{path}:10:26: error: rule file 'rules/extra.yaml' not found (")
    path = site_dir(tmp_path, 'rules: ["rules/none.d/*.yaml"]\n')
    with pytest.raises(ConfigErrors) as info:
        config.load(path)
    assert [e.render() for e in info.value.errors] == [
        f"{path}:10:8: error: 'rules' names no rule file (every pattern matched nothing); the first file must "
        "exist and set 'default'"
    ]


def test_rule_file_errors_surface_through_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf" / "rules").mkdir(parents=True)
    (tmp_path / "conf" / "rules" / "site.yaml").write_text(HEAD + "rules:\n  - {name: a, action: acept}\n")
    (tmp_path / "conf" / "proxy.yaml").write_text(PROXY_YAML + "rules: rules/site.yaml\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigErrors) as info:
        config.load("conf/proxy.yaml")  # rule files are named as the admin can open them from here
    assert [e.render() for e in info.value.errors] == [
        "conf/rules/site.yaml:4:23: error: unknown action 'acept' in rule 'a' (expected one of: 'accept', 'reject', "
        "'drop')"
    ]


def test_no_rules_key_means_no_rules(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(PROXY_YAML)
    assert config.load(path).rules is None


def test_globs_are_sorted_and_files_read_once(tmp_path: Path) -> None:
    d = tmp_path / "rules" / "site.d"
    d.mkdir(parents=True)
    (tmp_path / "rules" / "site.yaml").write_text(HEAD)
    (d / "20-b.yaml").write_text("version: 1\nrules:\n  - {name: b, action: accept}\n")
    (d / "10-a.yaml").write_text("version: 1\nrules:\n  - {name: a, match: {calling_ae: CT01}, action: accept}\n")
    (d / "notes.txt").write_text("not yaml")
    paths = expand_rule_path("rules/site.d/*.yaml", base_dir=tmp_path)
    assert [p.name for p in paths] == ["10-a.yaml", "20-b.yaml"]
    rs, warnings = load_rules(
        [tmp_path / "rules" / "site.yaml", *paths, d / "10-a.yaml"], base_dir=tmp_path
    )
    assert [r.name for r in rs.rules] == ["a", "b"]
    assert rs.files == ("rules/site.yaml", "rules/site.d/10-a.yaml", "rules/site.d/20-b.yaml")
    assert warnings == []
    with pytest.raises(ValueError, match="is a folder"):
        expand_rule_path("rules/site.d", base_dir=tmp_path)


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("CT*", ["CT", "CT01"], ["ct01", "XCT"]),
        ("CT?1", ["CT01", "CTX1"], ["CT1", "CT001"]),
        ("US_[0-9][!A]", ["US_1B"], ["US_1A", "US_X1"]),
        ("[]x]Y", ["]Y", "xY"], ["Y"]),
        ("A.B+", ["A.B+"], ["AxB+", "A.BB"]),
        ("*", ["", "anything"], []),
    ],
)
def test_globs(pattern: str, yes: list[str], no: list[str]) -> None:
    glob = compile_glob(pattern)
    assert all(glob.matches(v) for v in yes)
    assert not any(glob.matches(v) for v in no)


def test_literal_patterns_are_finite_and_prefix_globs_skip_regexes() -> None:
    assert isinstance(compile_glob("CT01"), Finite)
    prefix = compile_glob("CT*")
    assert isinstance(prefix, Glob) and prefix.prefix_only and prefix.prefix == "CT"
    other = compile_glob("CT*1")
    assert isinstance(other, Glob) and not other.prefix_only


def test_fast_yaml_parse_builds_the_same_tree_as_yamlsrc() -> None:
    text = SITE.read_text() + "\nextra: {a: 'x', b: \"y\", d: &k [1, 2.5, true, null, 0x1F], e: *k}\nblock: |\n  text\n"
    errors: list = []
    fast = _parse(text, "t.yaml", errors)
    slow = yamlsrc.parse(text, "t.yaml", [])

    def flat(node: yamlsrc.Node | None) -> object:
        if isinstance(node, yamlsrc.MapNode):
            return ("map", node.loc, [(flat(k), flat(v)) for k, v in node])
        if isinstance(node, yamlsrc.SeqNode):
            return ("seq", node.loc, [flat(i) for i in node])
        assert isinstance(node, yamlsrc.ScalarNode)
        return (node.loc, node.value, node.tag, node.text, node.quoted)

    assert errors == []
    assert flat(fast) == flat(slow)


def test_every_field_has_a_loader_kind() -> None:
    from proxy.policy.loader import _ITEM_KIND

    assert set(FIELDS) - set(_ITEM_KIND) == {
        "client_cert", "user_identity", "abstract_syntax", "transfer_syntax", "move_destination.calling_ae",
    } - set(_ITEM_KIND)


def test_shadowed_rules_is_empty_for_the_site_file() -> None:
    rs, warnings = load_rules_text([(PATH, SITE.read_text())])
    assert shadowed_rules(rs) == [] and warnings == []


COVERS = {
    "uid-prefix-covers-group": ('{abstract_syntax: "1.2.840.10008.5.1.4.1.*"}', "{abstract_syntax: query-retrieve}",
                                True),
    "uid-prefix-not-storage": ('{abstract_syntax: "1.2.840.10008.5.1.4.1.*"}', "{abstract_syntax: storage}", False),
    "uid-prefix-covers-prefix": ('{abstract_syntax: "1.2.*"}', '{abstract_syntax: "1.2.3.*"}', True),
    "star-covers-glob": ('{calling_ae: "*"}', '{calling_ae: "CT*"}', True),
    "prefix-glob-covers-prefix-glob": ('{calling_ae: "CT*"}', '{calling_ae: "CT_ER*"}', True),
    "prefix-glob-not-other-glob": ('{calling_ae: "CT*"}', '{calling_ae: "?T*"}', False),
    "disjoint-networks": ('{source: "!10.1.0.0/16"}', "{source: 10.2.0.0/16}", True),
    "overlapping-networks": ('{source: "!10.1.0.0/16"}', "{source: 10.0.0.0/8}", False),
    "same-negation": ('{calling_ae: "!CT*"}', '{calling_ae: ["MR*", "!CT*"]}', True),
    "set-covers-its-glob": ('{calling_ae: "@ward"}', '{calling_ae: "US_*"}', True),
    "set-covers-set": ('{calling_ae: "@ward"}', '{calling_ae: "@ward"}', True),
    "set-not-other-set": ('{calling_ae: "@ward"}', '{calling_ae: "@other"}', False),
    "identity-type": ("{user_identity: {type: [jwt, saml]}}", "{user_identity: {type: jwt}}", True),
}


@pytest.mark.parametrize(("earlier", "later", "warn"), COVERS.values(), ids=COVERS.keys())
def test_shadow_analysis_cases(earlier: str, later: str, warn: bool) -> None:
    text = (HEAD + "sets:\n  ward: {type: ae_title, elements: [CT01, \"US_*\"]}\n"
            "  other: {type: ae_title, elements: [CT01, \"MR*\"]}\n"
            f"rules:\n  - {{name: a, match: {earlier}, action: accept}}\n"
            f"  - {{name: b, match: {later}, action: drop}}\n"
            "  - {name: c, match: {calling_ae: [\"@ward\", \"@other\"]}, action: drop}\n")  # uses both sets
    rs, _ = load_rules_text([(PATH, text)])
    found = [(b.name, a.name) for b, a in shadowed_rules(rs) if b.name == "b"]
    assert found == ([("b", "a")] if warn else [])
