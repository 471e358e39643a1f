"""Rule engine benchmark: loading and evaluating a large rule set.

The target (issue #3): 1,000 rules and sets of 10,000 AE titles (literal titles mixed with globs)
must add less than 50 us per association, and loading such a file must take less than 1 s.

    .venv/bin/python bench/bench_rules.py            # full size, prints a table
    .venv/bin/python bench/bench_rules.py --check    # ... and exits 1 when a target is missed
    .venv/bin/python bench/bench_rules.py --quick    # small and fast (the test suite runs this)

The generated file has AE-title sets of literals plus globs of every kind (`PREFIX*`, `?`,
`[..]`), CIDR sets, and rules that combine calling/called AE, source, abstract syntax, time,
negations, shadow rules and DIMSE rules. Timings are the best of a few repeats of many
iterations (time.perf_counter), per call.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `proxy` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.policy.loader import load_rules
from proxy.policy.model import AssociationFacts, DimseFacts, RuleSet

EVALUATION_TARGET_US = 50.0
LOAD_TARGET_S = 1.0

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


@dataclass(frozen=True)
class Size:
    rules: int
    ae_sets: int
    ae_set_size: int
    cidr_sets: int
    cidr_set_size: int


FULL = Size(rules=1000, ae_sets=4, ae_set_size=10_000, cidr_sets=2, cidr_set_size=1000)
QUICK = Size(rules=60, ae_sets=2, ae_set_size=300, cidr_sets=1, cidr_set_size=50)


def ae_set(rng: random.Random, index: int, size: int) -> list[str]:
    """90% literal titles, 10% globs: PREFIX*, ?-patterns and [..] classes."""
    out: list[str] = []
    globs = size // 10
    for i in range(size - globs):
        out.append(f"S{index}AE{i:06d}")
    for i in range(globs):
        kind = i % 3
        if kind == 0:
            out.append(f"G{index}P{i:05d}*")
        elif kind == 1:
            out.append(f"G{index}Q{i:05d}?")
        else:
            out.append(f"G{index}R[A-F]{i:05d}")
    rng.shuffle(out)
    return out


def cidr_set(index: int, size: int) -> list[str]:
    base = int(ipaddress.IPv4Address(f"10.{100 + index}.0.0"))
    return [str(ipaddress.IPv4Network((base + i * 16, 28))) for i in range(size)]


def rule_file(size: Size, seed: int = 3) -> str:
    rng = random.Random(seed)
    lines = ["version: 1", "default: reject", "sets:"]
    for s in range(size.ae_sets):
        elements = ", ".join(f'"{e}"' for e in ae_set(rng, s, size.ae_set_size))
        lines.append(f"  ae{s}: {{type: ae_title, elements: [{elements}]}}")
    for s in range(size.cidr_sets):
        lines.append(f"  nets{s}: {{type: cidr, elements: [{', '.join(cidr_set(s, size.cidr_set_size))}]}}")
    lines.append("rules:")
    for r in range(size.rules):
        kind = r % 10
        s = r % size.ae_sets
        if kind in (0, 1, 2):
            match = f'calling_ae: "@ae{s}", called_ae: "PACS{r % 50}", source: "@nets{r % size.cidr_sets}"'
        elif kind == 3:
            match = f'calling_ae: ["@ae{s}", "!S{s}AE0000*"], abstract_syntax: storage, called_ae: "ARCH{r}"'
        elif kind == 4:
            match = f'calling_ae: "MOD{r}_*", source: "10.{r % 250}.0.0/16"'
        elif kind == 5:
            match = f'calling_ae: "W{r}?", time: {{days: mon-fri, hours: "07:00-19:00"}}'
        elif kind == 6:
            match = f'called_ae: "ARCHIVE{r}", source: "!10.0.0.0/8"'
        elif kind == 7:
            match = f'calling_ae: "[A-C]{r}X*", abstract_syntax: [query-retrieve, verification]'
        elif kind == 8:
            match = f'calling_ae: "CT{r:04d}", called_ae: "PACS"'
        else:
            match = f'source: "192.168.{r % 250}.0/24", called_ae: "@ae{s}"'
        mode = "mode: shadow, " if r % 97 == 0 else ""
        action = ("accept", "reject", "drop")[r % 3]
        extra = ", upstream: pacs" if action == "accept" else ""
        lines.append(f"  - {{name: r{r}, {mode}match: {{{match}}}, action: {action}{extra}}}")
    for r in range(max(5, size.rules // 100)):
        lines.append(f'  - {{name: d{r}, on: dimse, match: {{calling_ae: "@ae{r % size.ae_sets}", command: C-MOVE, '
                     f'move_destination: "!$calling_ae"}}, action: refuse}}')
    return "\n".join(lines) + "\n"


def best_per_call(fn: Callable[[], object], iterations: int, repeats: int = 5) -> float:
    """Seconds per call, best of `repeats` runs of `iterations` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter() - start) / iterations)
    return best


def scenarios(size: Size) -> dict[str, tuple[AssociationFacts, DimseFacts | None]]:
    now = datetime(2024, 5, 8, 10, 30)
    proposed = (CT_IMAGE, MR_IMAGE, VERIFICATION, STUDY_FIND, STUDY_MOVE) * 4  # 20 contexts, as modalities do

    def facts(calling: str, called: str, source: str) -> AssociationFacts:
        return AssociationFacts(ipaddress.ip_address(source), "modalities", calling, called, proposed,
                                ("1.2.840.10008.1.2",), now=now)

    last_ct = max(r for r in range(size.rules) if r % 10 == 8)
    return {
        "no rule matches (default)": (facts("UNKNOWN", "NOWHERE", "172.16.1.1"), None),
        "literal in a 10k set": (facts("S1AE000123", "PACS1", "10.101.0.5"), None),
        "glob in a 10k set": (facts("G0P00003XYZ", "PACS0", "10.100.0.5"), None),
        "?-glob in a set, no rule": (facts("G0Q00004Z", "NOPE", "10.100.0.5"), None),
        "matches a late rule": (facts(f"CT{last_ct:04d}", "PACS", "172.16.1.1"), None),
        "DIMSE C-MOVE to another AE": (facts("S1AE000123", "PACS1", "10.101.0.5"),
                                       DimseFacts("C-MOVE", STUDY_MOVE, "ELSEWHERE", 0)),
    }


def run(size: Size, iterations: int, repeats: int) -> dict[str, float]:
    text = rule_file(size)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.yaml"
        path.write_text(text)
        load_times = []
        ruleset: RuleSet | None = None
        for _ in range(3):
            start = time.perf_counter()
            ruleset, _warnings = load_rules([path], base_dir=Path(tmp))
            load_times.append(time.perf_counter() - start)
        assert ruleset is not None
    results["load (s)"] = min(load_times)
    rs = ruleset
    for name, (facts, dimse) in scenarios(size).items():
        if dimse is None:
            per_call = best_per_call(lambda f=facts: rs.evaluate(f), iterations, repeats)  # type: ignore[misc]
        else:
            per_call = best_per_call(lambda f=facts, d=dimse: rs.evaluate_dimse(f, d), iterations, repeats)  # type: ignore[misc]
        results[f"{name} (us)"] = per_call * 1e6
    results["rules"] = len(rs.rules)
    results["set elements"] = sum(len(s) for s in rs.sets.values())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small rule set and few iterations (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    iterations = args.iterations or (200 if args.quick else 5000)
    results = run(size, iterations, repeats=2 if args.quick else 5)

    print(f"rule engine: {results['rules']:.0f} rules, {results['set elements']:.0f} set elements")
    print(f"  {'load (s)':<36} {results['load (s)']:10.3f}   target < {LOAD_TARGET_S:g} s")
    worst = 0.0
    for key, value in results.items():
        if key.endswith("(us)"):
            worst = max(worst, value)
            print(f"  {key:<36} {value:10.1f}   target < {EVALUATION_TARGET_US:g} us")
    ok = results["load (s)"] < LOAD_TARGET_S and worst < EVALUATION_TARGET_US
    print("result: " + ("all targets met" if ok else "TARGET MISSED"))
    if args.check and not ok and not args.quick:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
