# resnext_det: the two commands of the README, and what they need.
#   make demo   the main job (trains and evaluates on the bundled shapes data)
#   make test   the test suite
# Both run `make setup` first: it creates .venv/ and is a no-op when done.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test test-fast demo clean mutants

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: tools/setup_env.sh requirements.txt pyproject.toml
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	touch $@

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) tools/run_demo.py $(DEMO_ARGS)

# Mutation testing (docs/testing.md); not part of `make test` or CI. mutmut is installed into
# .venv on first use (it is not a requirement). It mutates the core modules (setup.cfg
# [mutmut]), runs their fast tests on each mutant, then prints the kill rate and the
# survivors. MUTANTS narrows it to mutant-name globs, e.g.
#   make mutants MUTANTS="resnext_det.modeling.spec.* resnext_det.presets.*"
MUTMUT_VERSION ?= 3.8.1
MUTANT_JOBS ?= 2
MUTANTS ?=
mutants: setup
	@$(PY) -c "import mutmut" 2>/dev/null || $(VENV)/bin/pip install -q mutmut==$(MUTMUT_VERSION)
	-OMP_NUM_THREADS=1 DETECTRON2_DATASETS=$(CURDIR)/datasets \
	    nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTANT_JOBS) $(MUTANTS)
	$(PY) tools/mutants_report.py $(MUTANTS)

clean:
	rm -rf output
