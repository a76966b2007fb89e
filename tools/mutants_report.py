#!/usr/bin/env python
"""The result of `make mutants` (docs/testing.md): mutmut's verdicts per module, the kill
rate and the mutants that were not killed.

Reads mutmut's per-file results (``mutants/**/*.py.meta``); run it from the repository root
after ``mutmut run``. Arguments: mutant-name globs to count only those (as given to
``mutmut run``), e.g. ``"resnext_det.fast.bn_fold.*"``.
"""
import argparse
import collections
import fnmatch
import json
import os
import sys

from mutmut.stats import status_by_exit_code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("globs", nargs="*", help="mutant-name globs (default: all)")
    parser.add_argument("--root", default="mutants", help="mutmut's folder (default: mutants)")
    parser.add_argument(
        "--list", choices=["unchecked", "not-killed"],
        help="print only the names of the mutants not checked yet (to resume an interrupted "
             "run) or not killed (to rerun them after adding tests), one per line",
    )
    args = parser.parse_args(argv)

    by_module = collections.defaultdict(collections.Counter)
    not_killed = []
    for folder, _, files in os.walk(args.root):
        for name in sorted(files):
            if not name.endswith(".py.meta"):
                continue
            with open(os.path.join(folder, name)) as f:
                meta = json.load(f)
            for mutant, code in sorted(meta["exit_code_by_key"].items()):
                if args.globs and not any(fnmatch.fnmatch(mutant, g) for g in args.globs):
                    continue
                status = status_by_exit_code[code]
                if args.list:
                    done = status != "not checked"
                    killed = status in ("killed", "timeout")
                    if (args.list == "unchecked" and not done) or (args.list == "not-killed" and done and not killed):
                        print(mutant)
                    continue
                module = mutant.split(".x", 1)[0]  # resnext_det.fast.bn_fold.x_fold__mutmut_3
                by_module[module][status] += 1
                if status not in ("killed", "timeout", "not checked"):
                    not_killed.append((status, mutant))
    if args.list:
        return 0
    if not by_module:
        print(f"No mutmut results under {args.root}/: run `make mutants` first.")
        return 1

    total = collections.Counter()
    print(f"{'module':40s} {'mutants':>7s} {'killed':>7s} {'timeout':>7s} {'survived':>8s} {'no tests':>8s} {'other':>6s}")
    for module in sorted(by_module):
        c = by_module[module]
        total.update(c)
        _row(module, c)
    _row("all", total)
    checked = sum(v for k, v in total.items() if k != "not checked")
    killed = total["killed"] + total["timeout"]
    if checked:
        print(f"\nKilled {killed} of {checked} mutants checked: {100.0 * killed / checked:.1f}% "
              f"({total['not checked']} not checked)")
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
