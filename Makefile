# difforge developer commands. `make test` and `make demo` work on a fresh machine:
# they create .venv, install torch (pinned CPU build), the core, the SDK and every plugin
# in editable mode with test extras, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGIN_DIRS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
SDK_DIR := $(if $(wildcard sdk/pyproject.toml),sdk,)
# example third-party plugins (sdk/examples/*): installed like plugins, their tests run with the suite
EXAMPLE_DIRS := $(sort $(dir $(wildcard sdk/examples/*/pyproject.toml)))
EXAMPLE_TESTS := $(wildcard sdk/examples/*/tests)
STAMP := $(VENV)/.installed
DEMO_OUT ?= out

.PHONY: install test test-fast demo lint clean plugins

install: $(STAMP)

$(STAMP): pyproject.toml requirements-torch.txt $(wildcard plugins/*/pyproject.toml) $(wildcard sdk/pyproject.toml) $(wildcard sdk/examples/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-torch.txt
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,video]' $(foreach d,$(SDK_DIR) $(PLUGIN_DIRS) $(EXAMPLE_DIRS),-e ./$(d))
	touch $(STAMP)

# The Triton kernel tests run in their own process: Triton fixes its interpreter mode
# (TRITON_INTERPRET=1, how kernels run on a CPU) at first import, for the whole process.
TRITON_TESTS := tests/plugins/triton_attention

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests $(EXAMPLE_TESTS) --ignore=$(TRITON_TESTS)
	$(PY) -m pytest -q -p no:cacheprovider $(TRITON_TESTS)

demo: $(STAMP)
	$(VENV)/bin/difforge plugins
	$(PY) -m difforge_sdk.demo --out $(DEMO_OUT)

plugins: $(STAMP)
	$(VENV)/bin/difforge plugins

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis $(DEMO_OUT)
