"""Rule evaluation: the fast path the relay calls, the slow path `explain` prints, and the
analysis behind the shadowed-rule warnings.

Fast path. Rule i of a kind (association or DIMSE) is bit i of a Python int. For every field that
some rule tests, the engine indexes every pattern of every rule in two MatchTables (positive and
negated items) whose payload is the mask of the rules using that pattern. Evaluating is then, per
field: read the value once, look it up once in each table, and AND the rules that passed into the
`alive` mask; fields no alive rule tests are skipped, and the loop stops when nothing is alive.
The first alive enforcing rule decides. The cost grows with the number of fields and distinct
globs or groups, not with the number of rules or set members.

Slow path. `explain` walks the rules in order with Condition.test and says, for each rule, which
condition failed first and why. A property test checks that both paths always agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from proxy.policy.groups import group_covers
from proxy.policy.model import (
    FIELDS,
    AssociationAction,
    AssociationFacts,
    Condition,
    Decision,
    DimseAction,
    DimseDecision,
    DimseFacts,
    Finite,
    Glob,
    GroupRef,
    MatchTable,
    Network,
    Pattern,
    Rule,
    RuleKind,
    RuleSet,
    SetRef,
    UidPrefix,
)

__all__ = [
    "CompiledRules",
    "Explanation",
    "RuleTrace",
    "explain",
    "format_explanation",
    "shadowed_rules",
]

ALWAYS_FORWARDED = frozenset({"C-CANCEL"})
"""Requests no DIMSE rule can refuse: C-CANCEL has no response to refuse it with."""

DEFAULT_REFUSE_STATUS = 0x0124  # Refused: Not authorized (PS3.7 C.5)
MOVE_DESTINATION_REFUSE_STATUS = 0xA801  # Refused: Move Destination unknown


# --------------------------------------------------------------------------- fast path


class _FieldIndex:
    """Every condition on one field, for one kind of rule."""

    __slots__ = ("constrained", "extract", "multi", "name", "neg", "neg_all", "negonly", "pos", "pos_all")

    def __init__(self, name: str, conditions: list[tuple[int, Condition]]) -> None:
        spec = FIELDS[name]
        self.name = name
        self.extract = spec.extract
        self.multi = spec.multi
        self.constrained = 0
        self.negonly = 0  # rules whose condition has only negated items
        positives: dict[Hashable, tuple[Pattern, int]] = {}
        negatives: dict[Hashable, tuple[Pattern, int]] = {}
        for bit, condition in conditions:
            mask = 1 << bit
            self.constrained |= mask
            if not condition.positives:
                self.negonly |= mask
            for patterns, merged in ((condition.positives, positives), (condition.negatives, negatives)):
                for pattern in patterns:
                    old = merged.get(pattern.key)
                    merged[pattern.key] = (pattern, mask | (old[1] if old else 0))
        # One add() per distinct pattern: a 10,000-member set used by 300 rules is indexed once.
        self.pos = MatchTable()
        for pattern, mask in positives.values():
            self.pos.add(pattern, mask)
        self.pos.freeze()
        self.neg = MatchTable()
        for pattern, mask in negatives.values():
            self.neg.add(pattern, mask)
        self.neg.freeze()
        self.pos_all = self.pos.all
        self.neg_all = self.neg.all

    def passing(self, value: object, relevant: int) -> int:
        """Of the `relevant` rules (alive, constraining this field), those whose condition holds."""
        if value is None:
            return 0
        if self.multi and isinstance(value, tuple):
            want_pos = relevant & self.pos_all
            want_neg = relevant & self.neg_all
            hits = kills = 0
            for element in dict.fromkeys(value):
                if want_pos & ~hits:
                    hits |= self.pos.hits(element)
                if want_neg & ~kills:
                    kills |= self.neg.hits(element)
                if not (want_pos & ~hits or want_neg & ~kills):
                    break
        else:
            hits = self.pos.hits(value) if relevant & self.pos_all else 0
            kills = self.neg.hits(value) if relevant & self.neg_all else 0
        return relevant & (hits | self.negonly) & ~kills


class _Compiled:
    """The rules of one kind, indexed."""

    __slots__ = ("all", "enforcing", "fields", "rules", "shadow")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.all = (1 << len(rules)) - 1
        self.enforcing = 0
        self.shadow = 0
        by_field: dict[str, list[tuple[int, Condition]]] = {}
        for bit, rule in enumerate(rules):
            if rule.shadow:
                self.shadow |= 1 << bit
            else:
                self.enforcing |= 1 << bit
            for condition in rule.match.conditions:
                by_field.setdefault(condition.field, []).append((bit, condition))
        order = list(FIELDS)
        names = sorted(by_field, key=lambda n: (FIELDS[n].multi, order.index(n)))
        self.fields = tuple(_FieldIndex(name, by_field[name]) for name in names)

    def matching(self, facts: AssociationFacts, dimse: DimseFacts | None) -> int:
        """The mask of the rules whose match holds (shadow rules included: they are reported)."""
        alive = self.all
        for index in self.fields:
            relevant = alive & index.constrained
            if not relevant:
                continue
            alive = (alive & ~index.constrained) | index.passing(index.extract(facts, dimse), relevant)
            if not alive:
                break
        return alive

    def outcome(self, facts: AssociationFacts, dimse: DimseFacts | None) -> tuple[Rule | None, list[Rule]]:
        alive = self.matching(facts, dimse)
        enforcing = alive & self.enforcing
        if enforcing:
            first = (enforcing & -enforcing).bit_length() - 1
            shadows = alive & self.shadow & ((1 << first) - 1)
            winner: Rule | None = self.rules[first]
        else:
            shadows = alive & self.shadow
            winner = None
        shadow_rules: list[Rule] = []
        while shadows:
            low = shadows & -shadows
            shadow_rules.append(self.rules[low.bit_length() - 1])
            shadows ^= low
        return winner, shadow_rules


class CompiledRules:
    """What RuleSet.evaluate and evaluate_dimse run; built once per RuleSet."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.association = _Compiled(ruleset.association_rules)
        self.dimse = _Compiled(ruleset.dimse_rules)
        default = ruleset.default
        self.default = Decision(
            rule="default",
            action=default.action,
            reject=default.reject,
            location=f"{default.location.path}:{default.location.line}",
        )
        self.templates = {rule.name: _template(rule) for rule in ruleset.association_rules}
        self.dimse_templates = {rule.name: _dimse_template(rule) for rule in ruleset.dimse_rules}

    def evaluate(self, facts: AssociationFacts) -> Decision:
        winner, shadows = self.association.outcome(facts, None)
        return self.decide(winner, shadows, facts)

    def decide(self, winner: Rule | None, shadows: list[Rule], facts: AssociationFacts) -> Decision:
        decision = self.default if winner is None else self.templates[winner.name]
        if winner is not None and winner.contexts is not None and winner.action == "accept":
            decision = dataclasses.replace(
                decision, allowed_abstract_syntaxes=winner.contexts.allowed(facts.abstract_syntaxes)
            )
        if shadows:
            decision = dataclasses.replace(decision, shadow_matches=tuple((r.name, r.action) for r in shadows))
        return decision

    def evaluate_dimse(self, assoc: AssociationFacts, dimse: DimseFacts) -> DimseDecision:
        if not self.dimse.rules or dimse.command in ALWAYS_FORWARDED:
            return _FORWARD
        winner, shadows = self.dimse.outcome(assoc, dimse)
        return self.decide_dimse(winner, shadows)

    def decide_dimse(self, winner: Rule | None, shadows: list[Rule]) -> DimseDecision:
        decision = _FORWARD if winner is None else self.dimse_templates[winner.name]
        if shadows:
            decision = dataclasses.replace(decision, shadow_matches=tuple((r.name, r.action) for r in shadows))
        return decision


_FORWARD = DimseDecision(rule="default", action="forward")


def _template(rule: Rule) -> Decision:
    action: AssociationAction
    if rule.action == "accept":
        action = "accept"
    elif rule.action == "drop":
        action = "drop"
    else:
        assert rule.action == "reject"  # the loader admits nothing else for association rules
        action = "reject"
    return Decision(
        rule=rule.name,
        action=action,
        reject=rule.reject if action == "reject" else None,
        upstreams=rule.upstreams,
        identity=rule.identity,
        rewrite_called_ae=rule.rewrite_called_ae,
        rewrite_calling_ae=rule.rewrite_calling_ae,
        context_rejection=rule.context_rejection,
        location=rule.where,
    )


def _dimse_template(rule: Rule) -> DimseDecision:
    assert rule.action in ("forward", "refuse")  # the loader admits nothing else for DIMSE rules
    action: DimseAction = "refuse" if rule.action == "refuse" else "forward"
    return DimseDecision(rule=rule.name, action=action, status=rule.status, location=rule.where)


# --------------------------------------------------------------------------- slow path: explain


@dataclass(frozen=True)
class RuleTrace:
    """One rule as `explain` saw it."""

    rule: Rule
    matched: bool
    reason: str | None  # the first condition that failed, in words; None when the rule matched

    @property
    def enforced(self) -> bool:
        """The rule matched and decided (shadow-mode rules never do)."""
        return self.matched and not self.rule.shadow


@dataclass(frozen=True)
class Explanation:
    """What `dicom-proxy explain` prints: every rule evaluated, in order, then the decision."""

    facts: AssociationFacts
    steps: tuple[RuleTrace, ...]
    decision: Decision
    not_evaluated: int  # association rules after the deciding one
    dimse: DimseFacts | None = None
    dimse_steps: tuple[RuleTrace, ...] = ()
    dimse_decision: DimseDecision | None = None
    dimse_not_evaluated: int = 0


def why_not(condition: Condition, facts: AssociationFacts, dimse: DimseFacts | None) -> str | None:
    """None if the condition holds, else why not, e.g. "calling_ae 'CT01' does not match @ward"."""
    spec = condition.spec
    value = spec.extract(facts, dimse)
    name = spec.key
    if value is None:
        return f"{name}: {spec.absent or 'no value'}"
    multi = spec.multi and isinstance(value, tuple)
    values: tuple[object, ...] = value if multi and isinstance(value, tuple) else (value,)
    if condition.positives and not any(p.matches(v) for v in values for p in condition.positives):
        wanted = _describe(condition.positives)
        if not multi:
            return f"{name} {spec.show(value)} does not match {wanted}"
        if not values:
            return f"{name}: none given, so nothing matches {wanted}"
        shown = ", ".join(spec.show(v) for v in values[:3])
        if len(values) > 3:
            shown += f" and {len(values) - 3} more"
        return f"{name}: none of {shown} matches {wanted}"
    for negative in condition.negatives:
        for v in values:
            if negative.matches(v):
                return f"{name} {spec.show(v)} matches the excluded '!{negative.text}'"
    return None


def _describe(patterns: tuple[Pattern, ...]) -> str:
    def one(p: Pattern) -> str:
        return p.text if isinstance(p, SetRef | GroupRef) else repr(p.text)

    if len(patterns) == 1:
        return one(patterns[0])
    return "any of " + ", ".join(one(p) for p in patterns)


def _trace(
    rules: tuple[Rule, ...], facts: AssociationFacts, dimse: DimseFacts | None
) -> tuple[list[RuleTrace], Rule | None, list[Rule], int]:
    steps: list[RuleTrace] = []
    shadows: list[Rule] = []
    for position, rule in enumerate(rules):
        reason = next((r for c in rule.match.conditions if (r := why_not(c, facts, dimse)) is not None), None)
        steps.append(RuleTrace(rule, reason is None, reason))
        if reason is None:
            if not rule.shadow:
                return steps, rule, shadows, len(rules) - position - 1
            shadows.append(rule)
    return steps, None, shadows, 0


def explain(ruleset: RuleSet, facts: AssociationFacts, dimse_facts: DimseFacts | None = None) -> Explanation:
    """Evaluate rule by rule, saying why each one did or did not match (the relay's fast path
    reaches the same decisions). With `dimse_facts`, the DIMSE rules are explained too."""
    compiled = ruleset._compiled
    steps, winner, shadows, rest = _trace(ruleset.association_rules, facts, None)
    decision = compiled.decide(winner, shadows, facts)
    if dimse_facts is None:
        return Explanation(facts, tuple(steps), decision, rest)
    if dimse_facts.command in ALWAYS_FORWARDED:
        return Explanation(facts, tuple(steps), decision, rest, dimse_facts, (), _FORWARD, len(ruleset.dimse_rules))
    dsteps, dwinner, dshadows, drest = _trace(ruleset.dimse_rules, facts, dimse_facts)
    return Explanation(
        facts, tuple(steps), decision, rest, dimse_facts, tuple(dsteps), compiled.decide_dimse(dwinner, dshadows), drest
    )


_REJECT_WORDS = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}


def _reject_text(codes: tuple[int, int, int] | None) -> str:
    if codes is None:
        return ""
    result, source, reason = codes
    words = "permanent" if result == 1 else "transient"
    return f" with A-ASSOCIATE-RJ {result}/{source}/{reason} ({words}, {_REJECT_WORDS.get((source, reason), '?')})"


def _steps_text(steps: Iterable[RuleTrace], not_evaluated: int) -> list[str]:
    lines: list[str] = []
    for step in steps:
        rule = step.rule
        label = f"{rule.name} (shadow)" if rule.shadow else rule.name
        if not step.matched:
            verdict = f"no: {step.reason}"
        elif rule.shadow:
            verdict = f"matched: would {rule.action} (shadow mode, not enforced)"
        else:
            verdict = f"MATCH: {rule.action}"
        lines.append(f"  {rule.where}  {label}: {verdict}")
    if not_evaluated:
        lines.append(f"  ({not_evaluated} later rule(s) not evaluated)")
    return lines


def format_explanation(explanation: Explanation) -> str:
    """Readable text of an Explanation, one line per rule."""
    f = explanation.facts
    head = f"association {f.calling_ae!r} -> {f.called_ae!r} from {f.source} on listener {f.listener!r}"
    extras = [f"{len(f.abstract_syntaxes)} abstract syntax(es) proposed"]
    if f.client_cert is not None:
        extras.append(f"client certificate CN {f.client_cert.subject_cn!r}")
    if f.user_identity is not None:
        extras.append(f"user identity type {f.user_identity.type}")
    extras.append(f"at {f.now:%a %Y-%m-%d %H:%M}" if f.now is not None else "no clock (time conditions fail)")
    lines = [f"{head} ({'; '.join(extras)})"]
    if not explanation.steps:
        lines.append("  (no association rules)")
    lines += _steps_text(explanation.steps, explanation.not_evaluated)
    lines.append("decision: " + _decision_text(explanation.decision))
    if explanation.dimse is not None and explanation.dimse_decision is not None:
        d = explanation.dimse
        parts = [d.command]
        if d.affected_sop_class:
            parts.append(f"SOP class {d.affected_sop_class}")
        if d.move_destination is not None:
            parts.append(f"move destination {d.move_destination!r}")
        if d.priority is not None:
            parts.append(f"priority {FIELDS['priority'].show(d.priority)}")
        lines.append("")
        lines.append("request " + ", ".join(parts))
        if explanation.decision.action != "accept":
            lines.append("  (the association itself would not be accepted; DIMSE rules shown for completeness)")
        if d.command in ALWAYS_FORWARDED:
            lines.append(f"  {d.command} is always forwarded")
        elif not explanation.dimse_steps:
            lines.append("  (no DIMSE rules)")
        lines += _steps_text(explanation.dimse_steps, explanation.dimse_not_evaluated)
        dd = explanation.dimse_decision
        if dd.action == "refuse":
            text = f"refuse by rule {dd.rule!r} ({dd.location}) with status 0x{dd.status:04X}"
        elif dd.rule == "default":
            text = "forward (no DIMSE rule matched)"
        else:
            text = f"forward by rule {dd.rule!r} ({dd.location})"
        lines.append("decision: " + text + _shadow_text(dd.shadow_matches))
    return "\n".join(lines)


def _shadow_text(shadows: tuple[tuple[str, str], ...]) -> str:
    if not shadows:
        return ""
    return "; shadow rule(s) matched: " + ", ".join(f"{name} (would {action})" for name, action in shadows)


def _decision_text(d: Decision) -> str:
    by = "by default" if d.rule == "default" else f"by rule {d.rule!r}"
    text = f"{d.action} {by} ({d.location})"
    if d.action == "reject":
        text += _reject_text(d.reject)
    elif d.action == "drop":
        text += ": close the connection without a PDU"
    elif d.action == "accept":
        text += "; upstream " + (" then ".join(d.upstreams) if d.upstreams else "by called AE title / default")
        if d.identity:
            text += f"; identity profile {d.identity!r}"
        if d.rewrite_called_ae:
            text += f"; called AE rewritten to {d.rewrite_called_ae!r}"
        if d.rewrite_calling_ae:
            text += f"; calling AE rewritten to {d.rewrite_calling_ae!r}"
        if d.allowed_abstract_syntaxes is not None:
            allowed = sorted(d.allowed_abstract_syntaxes)
            word = "user-rejection" if d.context_rejection == 1 else "abstract-syntax-not-supported"
            text += (f"; contexts allowed: {', '.join(allowed) or 'none'} "
                     f"(others refused, result {d.context_rejection} {word})")
    return text + _shadow_text(d.shadow_matches)


# --------------------------------------------------------------------------- shadowed rules


_FINITE_LIMIT = 20_000
"""Largest value list enumerated exactly when comparing two conditions."""
_BUDGET = 3_000_000
"""Work units the analysis may spend before it stops looking (no warning is better than a slow load)."""


class _Analysis:
    """Conservative containment between conditions: `covers(a, b)` is True only when every value
    that satisfies b also satisfies a. Unknown cases answer False, so warnings are never false."""

    def __init__(self) -> None:
        self.budget = _BUDGET
        self.memo: dict[tuple[Hashable, Hashable], bool] = {}

    def spend(self, units: int) -> bool:
        self.budget -= units
        return self.budget >= 0

    def rule_covers(self, a: Rule, b: Rule) -> bool:
        """Every facts tuple b matches, a matches too (a earlier, enforcing: b is never reached)."""
        if not a.match.fields <= b.match.fields:
            return False
        for ca in a.match.conditions:
            cb = b.match.get(ca.field)
            assert cb is not None
            if not self.condition_covers(ca, cb):
                return False
        return True

    def condition_covers(self, a: Condition, b: Condition) -> bool:
        multi = FIELDS[a.field].multi
        if not multi:
            values = self.finite_values(b)
            if values is not None:
                if not self.spend(len(values) * (len(a.positives) + len(a.negatives) + 1)):
                    return False
                return all(a.test(v) for v in values if b.test(v))
        if a.positives:
            if not b.positives:
                return False
            for pb in b.positives:
                if not any(self.pattern_covers(pa, pb) for pa in a.positives):
                    return False
        for na in a.negatives:
            if any(self.pattern_covers(nb, na) for nb in b.negatives):
                continue
            if not multi and b.positives and all(self.disjoint(na, pb) for pb in b.positives):
                continue
            return False
        return True

    def finite_values(self, b: Condition) -> frozenset[Hashable] | None:
        """Every value b's positive patterns can match, when that is a known short list."""
        if not b.positives:
            return None
        out: set[Hashable] = set()
        for p in b.positives:
            if isinstance(p, Finite):
                out |= p.values
            elif isinstance(p, SetRef) and all(isinstance(m, Finite) for m in p.set.members):
                out |= p.set.literal_values
            else:
                return None
            if len(out) > _FINITE_LIMIT:
                return None
        return frozenset(out)

    def pattern_covers(self, a: Pattern, b: Pattern) -> bool:
        """Every value b matches, a matches."""
        if a.key == b.key:
            return True
        memo_key = (a.key, b.key)
        known = self.memo.get(memo_key)
        if known is None:
            known = self._pattern_covers(a, b)
            self.memo[memo_key] = known
        return known

    def _pattern_covers(self, a: Pattern, b: Pattern) -> bool:
        if isinstance(b, Finite):
            return self.spend(len(b.values)) and all(a.matches(v) for v in b.values)
        if isinstance(b, SetRef):
            members = b.set.members
            return self.spend(len(members)) and all(self.pattern_covers(a, m) for m in members)
        if isinstance(a, Glob):
            if a.matches_everything:
                return True
            return isinstance(b, Glob) and a.prefix_only and b.prefix.startswith(a.prefix)
        if isinstance(a, Network):
            return (
                isinstance(b, Network)
                and a.network.version == b.network.version
                and b.network.subnet_of(a.network)  # type: ignore[arg-type]  # same version checked
            )
        if isinstance(a, UidPrefix):
            if isinstance(b, UidPrefix):
                return b.prefix.startswith(a.prefix)
            if isinstance(b, GroupRef):
                g = b.group
                return all(u.startswith(a.prefix) for u in g.uids) and (
                    g.prefix is None or g.prefix.startswith(a.prefix)
                )
            return False
        if isinstance(a, GroupRef):
            return isinstance(b, GroupRef) and group_covers(a.group.name, b.group.name)
        if isinstance(a, SetRef):
            others = [m for m in a.set.members if not isinstance(m, Finite)]  # a literal covers no pattern
            return self.spend(len(others)) and any(self.pattern_covers(m, b) for m in others)
        return False

    def disjoint(self, a: Pattern, b: Pattern) -> bool:
        """No value matches both (only the cases that are easy to be sure of)."""
        if isinstance(b, Finite):
            return self.spend(len(b.values)) and not any(a.matches(v) for v in b.values)
        if isinstance(a, Finite):
            return self.spend(len(a.values)) and not any(b.matches(v) for v in a.values)
        if isinstance(a, Network) and isinstance(b, Network):
            return a.network.version != b.network.version or not a.network.overlaps(b.network)
        return False


def shadowed_rules(ruleset: RuleSet) -> list[tuple[Rule, Rule]]:
    """(rule, earlier enforcing rule that decides everything it matches) pairs, conservatively."""
    found: list[tuple[Rule, Rule]] = []
    analysis = _Analysis()
    kinds: tuple[RuleKind, ...] = ("association", "dimse")
    for kind in kinds:
        earlier: list[Rule] = []
        for rule in ruleset.rules:
            if rule.kind != kind:
                continue
            fields = rule.match.fields
            for previous in earlier:
                if analysis.budget < 0:
                    return found
                if previous.match.fields <= fields and analysis.rule_covers(previous, rule):
                    found.append((rule, previous))
                    break
            if not rule.shadow:
                earlier.append(rule)
    return found
