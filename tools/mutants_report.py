#!/usr/bin/env python
"""The result of `make mutants` (docs/testing.md): mutmut's verdicts per module, the kill
rate and the mutants that were not killed.

Reads mutmut's per-file results (``mutants/**/*.py.meta``); run it from the repository root
after ``mutmut run``. Arguments: mutant-name globs to count only those (as given to
``mutmut run``), e.g. ``"resnext_det.fast.bn_fold.*"``.

``--list unchecked|not-killed`` prints names to run next (resume, rerun after new tests);
``--sample F`` prints a seeded random sample of the fraction F of each module's mutants
(stratified, so the sample's kill rate estimates that of all of them), and ``--names-from
FILE`` reports only the mutants a file names (a sample's), with a 95% interval.
"""
import argparse
import collections
import fnmatch
import json
import math
import os
import random
import sys

from mutmut.stats import status_by_exit_code

KILLED = ("killed",)  # a timeout is listed apart: a hung worker looks the same


def read_verdicts(root: str, globs=(), names=None):
    """{mutant name: mutmut's status} for the mutants the globs (all if none) and names match."""
    verdicts = {}
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py.meta"):
                continue
            with open(os.path.join(folder, name)) as f:
                meta = json.load(f)
            for mutant, code in meta["exit_code_by_key"].items():
                if globs and not any(fnmatch.fnmatch(mutant, g) for g in globs):
                    continue
                if names is not None and mutant not in names:
                    continue
                verdicts[mutant] = status_by_exit_code[code]
    return verdicts


def module_of(mutant: str) -> str:
    return mutant.split(".x", 1)[0]  # resnext_det.fast.bn_fold.x_fold__mutmut_3


def wilson(k: int, n: int, z: float = 1.96):
    """The Wilson score interval of a proportion k/n (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("globs", nargs="*", help="mutant-name globs (default: all)")
    parser.add_argument("--root", default="mutants", help="mutmut's folder (default: mutants)")
    parser.add_argument(
        "--list", choices=["unchecked", "not-killed"],
        help="print only the names of the mutants not checked yet (to resume an interrupted "
             "run) or not killed (to rerun them after adding tests), one per line",
    )
    parser.add_argument("--sample", type=float, metavar="F",
                        help="print a random sample of the fraction F (0 < F <= 1) of each module's mutants")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default: 0)")
    parser.add_argument("--names-from", metavar="FILE",
                        help="report only the mutants FILE names, one per line (e.g. a --sample)")
    args = parser.parse_args(argv)

    names = None
    if args.names_from:
        with open(args.names_from) as f:
            names = {line.strip() for line in f if line.strip()}
    verdicts = read_verdicts(args.root, args.globs, names)

    if args.sample is not None:
        if not 0 < args.sample <= 1:
            parser.error(f"--sample {args.sample}: give a fraction in (0, 1], e.g. 0.1")
        by_module = collections.defaultdict(list)
        for mutant in sorted(verdicts):
            by_module[module_of(mutant)].append(mutant)
        for module in sorted(by_module):
            # One generator per module, seeded by its name too: an edit that adds or drops
            # mutants in one module leaves the other modules' samples as they were.
            rng = random.Random(f"{args.seed}:{module}")
            pool = by_module[module]
            print("\n".join(sorted(rng.sample(pool, max(1, round(args.sample * len(pool)))))))
        return 0
    if args.list:
        for mutant, status in sorted(verdicts.items()):
            done, killed = status != "not checked", status in KILLED
            if (args.list == "unchecked" and not done) or (args.list == "not-killed" and done and not killed):
                print(mutant)
        return 0
    if not verdicts:
        print(f"No mutmut results under {args.root}/: run `make mutants` first.")
        return 1

    by_module = collections.defaultdict(collections.Counter)
    not_killed = []
    for mutant, status in sorted(verdicts.items()):
        by_module[module_of(mutant)][status] += 1
        if status not in KILLED + ("timeout", "not checked"):
            not_killed.append((status, mutant))
    total = collections.Counter()
    print(f"{'module':40s} {'mutants':>7s} {'killed':>7s} {'timeout':>7s} {'survived':>8s} {'no tests':>8s} {'other':>6s}")
    for module in sorted(by_module):
        total.update(by_module[module])
        _row(module, by_module[module])
    _row("all", total)
    checked = sum(v for k, v in total.items() if k != "not checked")
    killed = total["killed"]
    if checked:
        print(f"\nKilled {killed} of {checked} mutants checked: {100.0 * killed / checked:.1f}% "
              f"({total['not checked']} not checked)")
        if total["timeout"]:
            # mutmut counts a timeout as caught; a worker stuck after fork looks the same.
            print(f"With the {total['timeout']} timeouts counted as caught (mutmut's count): "
                  f"{100.0 * (killed + total['timeout']) / checked:.1f}%; they are listed below.")
        if names is not None:
            lo, hi = wilson(killed, checked)
            print(f"As a random sample, it puts the kill rate of all these modules' mutants at "
                  f"{100 * lo:.1f}% to {100 * hi:.1f}% (95% Wilson interval, timeouts not counted).")
    timeouts = sorted(m for m, st in verdicts.items() if st == "timeout")
    if timeouts:
        print(f"\nTimed out ({len(timeouts)}): check them with tools/try_mutant.sh:")
        for mutant in timeouts:
            print(f"  timeout    {mutant}")
    if not_killed:
        print(f"\nNot killed ({len(not_killed)}); `.venv/bin/mutmut show NAME` prints the change:")
        for status, mutant in sorted(not_killed):
            print(f"  {status:10s} {mutant}")
    return 0


def _row(module, c):
    other = sum(v for k, v in c.items() if k not in ("killed", "timeout", "survived", "no tests"))
    print(f"{module:40s} {sum(c.values()):7d} {c['killed']:7d} {c['timeout']:7d} {c['survived']:8d} "
          f"{c['no tests']:8d} {other:6d}")


if __name__ == "__main__":
    sys.exit(main())
