# Set-up is idempotent: the venv is (re)built only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/product-studio
STAMP := $(VENV)/.installed

.PHONY: setup test run demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The test command (README, CI): one pytest process over tests/, tiny models only, offline.
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The main job with the default (real) models: fetch them, check they load, then watch inbox/
# and process every image into outbox/ with conf/rules.yaml (Ctrl-C stops cleanly).
run: setup
	$(CLI) models pull
	$(CLI) models verify
	$(CLI) watch

# Offline demo on a tiny random-weight model set (noise, not quality).
demo: setup
	HF_HUB_OFFLINE=1 $(CLI) demo

# Benchmarks: full-size random-weight models on this machine; ratios measured side by side.
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache
