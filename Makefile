# grok-pacs: `make demo` and `make test` set themselves up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
# training/, export/ and devtools/ are not installed (the wheel ships grok_pacs only): run from the checkout.
RUN := PYTHONPATH=$(CURDIR) $(PY)

.PHONY: setup system test lint demo benchmark bench clean

# System peers (DCMTK, dicom3tools, Redis, Orthanc + DICOMweb, chromium, npm) via Debian packages when
# missing; the OHIF viewer build (npm @ohif/app) under .cache/ohif/ for the browser test.
system:
	@scripts/install-system-deps.sh
	@scripts/fetch-ohif.sh

# The virtual environment (installed by uv, with pip's indexes), rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml requirements-nodeps.txt scripts/install-python-deps.sh
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
	$(RUN) -m devtools.demo

benchmark: setup
	$(RUN) bench/phantom.py

bench: setup
	$(RUN) bench/ingest.py
	$(RUN) bench/ingest_profile.py
	$(RUN) bench/encoders.py
	$(RUN) bench/generate.py
	$(RUN) bench/e2e.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
