# grok-pacs: `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: setup system test lint demo benchmark bench clean

# System peers (DCMTK, dicom3tools, Redis, Orthanc + DICOMweb, chromium, npm) via Debian packages when
# missing; the OHIF viewer build (npm @ohif/app) under .cache/ohif/ for the browser test.
system:
	@scripts/install-system-deps.sh
	@scripts/fetch-ohif.sh

# The virtual environment (installed by uv, with pip's indexes), rebuilt when pyproject.toml changes.
# training/, export/, devtools/ and bench/ are installed too, editable, by dev/pyproject.toml (the wheel ships
# grok_pacs only): importable from anywhere in the venv.
$(STAMP): pyproject.toml dev/pyproject.toml requirements-nodeps.txt scripts/install-python-deps.sh
	scripts/install-python-deps.sh $(VENV) $(PYTHON)
	@touch $(STAMP)

setup: system $(STAMP)

test: setup lint
	$(PY) -m pytest -q --durations=15  # the slowest tests, so CI time can be watched

# ruff (settings in pyproject.toml): lint rules and the format check; part of `make test`.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The demo needs only the venv and DCMTK (its PACS): not the test peers, chromium or the OHIF build.
demo: $(STAMP)
	@scripts/install-system-deps.sh demo
	$(PY) -m devtools.demo

benchmark: setup
	$(PY) -m bench.phantom

bench: setup
	$(PY) -m bench.ingest
	$(PY) -m bench.ingest_profile
	$(PY) -m bench.encoders
	$(PY) -m bench.generate
	$(PY) -m bench.e2e

clean:
	rm -rf $(VENV) build *.egg-info dev/*.egg-info .pytest_cache
