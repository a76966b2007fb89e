#!/usr/bin/env bash
# `make mutants`, `make mutants-again` and `make mutants-sample` (docs/testing.md): mutmut on the core modules
# (setup.cfg [mutmut]), then tools/mutants_report.py's summary.
#
#   tools/run_mutants.sh             every mutant without a verdict: all of them on the first
#                                    run; the rest after an interrupted one; those of the
#                                    functions changed since (mutmut forgets their verdicts)
#   tools/run_mutants.sh GLOB...     the mutants those names match, checked again
#                                    (e.g. "resnext_det.checkpoint.*")
#   tools/run_mutants.sh --again [GLOB...]
#                                    the mutants not killed last time, e.g. after adding tests
#   tools/run_mutants.sh --sample F [GLOB...]
#                                    a seeded random sample of the fraction F of each module's
#                                    mutants (MUTANT_SEED, default 0), checked again: an
#                                    estimate of the kill rate, with its 95% interval, in a
#                                    fraction of the time (docs/testing.md)
#
# Results accumulate in mutants/ (ignored by git); delete it to start over (mutmut rechecks
# everything anyway after a change of setup.cfg's [mutmut] test selection).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${VENV:-.venv}
# mutmut is not a requirement: installed into the venv on first use.
"$venv/bin/python" -c "import mutmut" 2>/dev/null || "$venv/bin/pip" install -q "mutmut==${MUTMUT_VERSION:-3.8.1}"

mutmut_run() {  # MUTANT_JOBS workers (2), one torch thread each, below every other job
    OMP_NUM_THREADS=1 DETECTRON2_DATASETS="$root/datasets" \
        nice -n 19 "$venv/bin/mutmut" run --max-children "${MUTANT_JOBS:-2}" "$@"
}

names=("$@")
if [ "${1:-}" = --sample ]; then
    fraction=${2:?"usage: $0 --sample FRACTION [GLOB...]"}; shift 2
    if ! find mutants -name '*.py.meta' -print -quit 2>/dev/null | grep -q .; then
        # No mutants yet: mutmut makes them (and maps the tests) on a run of one cheap mutant.
        mutmut_run "resnext_det.presets.x_standard_depth__mutmut_1"
    fi
    "$venv/bin/python" tools/mutants_report.py --sample "$fraction" --seed "${MUTANT_SEED:-0}" "$@" \
        > mutants/sample.txt || exit 2
    mapfile -t names < mutants/sample.txt
    echo "Sample: ${#names[@]} mutants (mutants/sample.txt)"
    mutmut_run "${names[@]}"
    exec "$venv/bin/python" tools/mutants_report.py --names-from mutants/sample.txt "$@"
fi
if [ "${1:-}" = --again ]; then
    shift
    if [ ! -d mutants ]; then echo "$0: no results yet: run \`make mutants\` first" >&2; exit 2; fi
    mapfile -t names < <("$venv/bin/python" tools/mutants_report.py --list not-killed "$@")
    if [ ${#names[@]} -eq 0 ]; then
        echo "Every mutant${*:+ among $*} checked so far was killed."
        exec "$venv/bin/python" tools/mutants_report.py "$@"
    fi
fi
mutmut_run "${names[@]}"
"$venv/bin/python" tools/mutants_report.py "$@"
