# resnext_det: the two commands of the README, and what they need.
#   make demo   the main job (trains and evaluates on the bundled shapes data)
#   make test   the test suite
# Both run `make setup` first: it creates .venv/ and is a no-op when done.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test test-fast demo clean mutants mutants-again mutants-sample

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: tools/setup_env.sh requirements.txt pyproject.toml
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	touch $@

test: setup
	@PATH="$$PATH:/usr/sbin:/sbin" sh -c 'for c in slurmctld slurmd munged sbatch srun scontrol; do command -v $$c >/dev/null || exit 1; done' \
	  || echo "SLURM is not installed: the cluster tests (tests/test_cluster.py, tests/test_slurm_cluster.py) will be skipped; apt-get install slurmctld slurmd slurm-client munge brings them"
	$(PY) -m pytest tests

demo: setup
	$(PY) tools/run_demo.py $(DEMO_ARGS)

# Mutation testing (docs/testing.md); not part of `make test` or CI. mutmut is installed into
# .venv on first use (it is not a requirement). It mutates the core modules (setup.cfg
# [mutmut]), runs their fast tests on each mutant, then prints the kill rate and the
# survivors. `make mutants` checks every mutant without a verdict (all on the first run, the
# rest after an interruption, the changed functions' after an edit); MUTANTS checks the
# mutants those name globs match again; `make mutants-again` reruns the ones not killed
# (after adding tests), e.g.
#   make mutants MUTANTS="resnext_det.modeling.spec.* resnext_det.presets.*"
#   make mutants-again MUTANTS="resnext_det.checkpoint.*"
MUTMUT_VERSION ?= 3.8.1
MUTANT_JOBS ?= 2
MUTANTS ?=
export MUTANT_JOBS MUTMUT_VERSION VENV
mutants: setup
	bash tools/run_mutants.sh $(MUTANTS)

mutants-again: setup
	bash tools/run_mutants.sh --again $(MUTANTS)

# A seeded random sample of each module's mutants (MUTANT_SAMPLE, a fraction): the kill rate
# with its 95% interval, in about 15 minutes on the 2-core machine at 0.1.
MUTANT_SAMPLE ?= 0.1
mutants-sample: setup
	bash tools/run_mutants.sh --sample $(MUTANT_SAMPLE) $(MUTANTS)

clean:
	rm -rf output
