#!/usr/bin/env bash
# Does a test kill a mutant? Runs the working tree's tests against one of mutmut's mutants
# (docs/testing.md), e.g. while writing the test that should kill a survivor:
#
#   tools/try_mutant.sh resnext_det.checkpoint.convert.x_convert_detector__mutmut_30 \
#       tests/test_checkpoint_convert.py -k detector
#
# Needs mutmut's copy (mutants/, made by `make mutants`); works in a private copy of it
# with the current tests/ (new tests included), so a `make mutants` running beside it is
# not disturbed. Prints KILLED (the tests failed on the mutant) or SURVIVED, and exits 0
# when killed, 1 when it survived, 2 on a usage error.
set -euo pipefail
if [ $# -lt 2 ] || [[ "$1" != *__mutmut_* ]]; then
    echo "usage: $0 MUTANT_NAME PYTEST_ARGS... (a name from \`mutmut results\`)" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -d "$root/mutants/resnext_det" ]; then
    echo "$0: no mutants/ here: run \`make mutants\` first" >&2
    exit 2
fi
mutant=$1; shift
work=$(mktemp -d "${TMPDIR:-/tmp}/try_mutant.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -r "$root/mutants/resnext_det" "$root/configs" "$root/tools" "$root/tests" "$root/setup.cfg" \
    "$root/pyproject.toml" "$work/"
ln -s "$root/datasets" "$work/datasets"
cd "$work"
rc=0
MUTANT_UNDER_TEST="$mutant" PYTHONPATH="$work" OMP_NUM_THREADS=1 \
    "$root/.venv/bin/python" -m pytest -x -q -p no:cacheprovider "$@" || rc=$?
case $rc in
    0) echo "SURVIVED $mutant"; exit 1 ;;
    1) echo "KILLED $mutant" ;;
    *) echo "$0: pytest exited with $rc (no test selected, or a usage error): nothing judged" >&2; exit 2 ;;
esac
