# resnext_det: the two commands of the README, and what they need.
#   make demo   the main job (trains and evaluates on the bundled shapes data)
#   make test   the test suite
# Both run `make setup` first: it creates .venv/ and is a no-op when done.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: tools/setup_env.sh requirements.txt pyproject.toml
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	touch $@

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) tools/run_demo.py $(DEMO_ARGS)

clean:
	rm -rf output
