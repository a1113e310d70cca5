# cb-lab: `make demo` runs the main job, `make test` runs everything CI checks.
# Both create (or refresh, when requirements.txt changes) the virtualenv in .venv first.
# The tests check the exercises' reference solutions (tests/exercises/solutions), not a learner's answers.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
DEMOS := $(sort $(basename $(notdir $(wildcard demos/demo_*.py))))

.PHONY: venv demo demos test cov typecheck lint bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m cb_lab

demos: venv
	@for d in $(DEMOS); do echo "== python -m demos.$$d --quick"; $(PY) -m demos.$$d --quick || exit 1; done
	$(PY) -m cb_lab --quick
	$(PY) -m cb_lab.bench --quick

cov: venv
	CB_LAB_EXERCISES=solutions $(PY) -m pytest --cov=cb_lab --cov-report=term-missing --cov-fail-under=90 tests

typecheck: venv
	$(PY) -m mypy --strict cb_lab

lint: venv
	$(PY) -m ruff check cb_lab tests demos

test: cov typecheck lint demos

bench: venv
	$(PY) -m cb_lab.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage htmlcov attention_viz
