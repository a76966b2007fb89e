#!/usr/bin/env bash
# `make mutants` and `make mutants-again` (docs/testing.md): mutmut on the core modules
# (setup.cfg [mutmut]), then tools/mutants_report.py's summary.
#
#   tools/run_mutants.sh             every mutant without a verdict: all of them on the first
#                                    run; the rest after an interrupted one; those of the
#                                    functions changed since (mutmut forgets their verdicts)
#   tools/run_mutants.sh GLOB...     the mutants those names match, checked again
#                                    (e.g. "resnext_det.checkpoint.*")
#   tools/run_mutants.sh --again [GLOB...]
#                                    the mutants not killed last time, e.g. after adding tests
#
# Results accumulate in mutants/ (ignored by git); delete it to start over (mutmut rechecks
# everything anyway after a change of setup.cfg's [mutmut] test selection).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${VENV:-.venv}
names=("$@")
if [ "${1:-}" = --again ]; then
    shift
    if [ ! -d mutants ]; then echo "$0: no results yet: run \`make mutants\` first" >&2; exit 2; fi
    mapfile -t names < <("$venv/bin/python" tools/mutants_report.py --list not-killed "$@")
    if [ ${#names[@]} -eq 0 ]; then
        echo "Every mutant${*:+ among $*} checked so far was killed."
        exec "$venv/bin/python" tools/mutants_report.py "$@"
    fi
fi
OMP_NUM_THREADS=1 DETECTRON2_DATASETS="$root/datasets" \
    nice -n 19 "$venv/bin/mutmut" run --max-children "${MUTANT_JOBS:-2}" "${names[@]}"
"$venv/bin/python" tools/mutants_report.py "$@"
