# make demo : create .venv if missing, install groupopt + demo extras, run the main example
# make test : create/update .venv, install groupopt + test extras (torch==2.13.0 CPU), run pytest
# make docs : install the docs extra into .venv, build the site (API reference from the docstrings) into site/, offline, --strict
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_TEST := $(VENV)/.stamp-test
STAMP_DEMO := $(VENV)/.stamp-demo
STAMP_DOCS := $(VENV)/.stamp-docs

.PHONY: demo test bench docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(STAMP_DEMO): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[demo]"
	touch $@

$(STAMP_DOCS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

test: $(STAMP_TEST)
	$(BIN)/python -m pytest tests -n auto --dist loadfile

demo: $(STAMP_DEMO)
	$(BIN)/python examples/digits_groups.py

docs: $(STAMP_DOCS)
	$(BIN)/python -m mkdocs build --strict --site-dir site

bench: $(STAMP_TEST) $(STAMP_DEMO)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache outputs site
