# msknode — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= config/msknode.toml
PYTEST_ARGS ?=

.PHONY: run test install install-test debian-tools viewer stress bench demo clean help

help:
	@echo "make run    - install into .venv and run the node on config/msknode.toml"
	@echo "make test   - install with the test extra, Debian tools (as root), run the whole suite"
	@echo "make demo   - the whole loop locally: throw-away PACS, node, phantom studies, results"
	@echo "make bench  - run the benchmarks in benchmarks/"
	@echo "make stress - long reliability runs: 50+ role kills (crash consistency), fuzzing; see docs/reliability.md"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Re-install only when the package metadata changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .
	touch $@

# timm is a test-only reference for checkpoint parity. It is installed without its dependencies because
# its torchvision requirement would pull a CUDA torch; the parity test supplies a stand-in torchvision.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps "timm>=1.0,<2"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/msknode serve --config $(CONFIG)

debian-tools:
	@bash tests/setup/install_debian_tools.sh

# The pinned OHIF v3 viewer and dcmjs (npm ci in tests/viewer) for the viewer tests.
viewer: debian-tools
	@bash tests/setup/install_viewer.sh

test: install-test debian-tools viewer
	@bash tests/setup/run_pytest.sh $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/msknode demo

bench: install-test debian-tools
	$(PY) benchmarks/receive.py

# Long reliability runs (minutes; figures in docs/reliability.md). Each command fails the target on a violation.
STRESS_ARGS ?=
stress: install-test debian-tools
	nice -n 10 $(PY) benchmarks/stress.py $(STRESS_ARGS)
# -- fuzzing (H5): the fuzz run's command goes on the next recipe line --
	nice -n 10 $(PY) benchmarks/fuzz.py --cases 10000

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
