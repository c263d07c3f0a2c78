# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint typecheck unit install-check demo bench completions clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# Earlier versions put keyrings.alt (a plaintext keyring) in here; the tests bring their own backend now.
	@$(BIN)/python -m pip uninstall --quiet --yes keyrings.alt 2>/dev/null || true
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check outloop_cli tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit install-check

# The README's install path, from this checkout, into a throwaway venv (not .venv): the installed command
# must start and `outloop doctor` must find nothing that stops runs.
install-check:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install --quiet . && \
	"$$tmp/venv/bin/outloop" --version && \
	OUTLOOP_HOME="$$tmp/home" "$$tmp/venv/bin/outloop" doctor

demo: $(STAMP)
	$(BIN)/python examples/demo.py

bench: $(STAMP)
	@bash bench/setup.sh
	$(BIN)/python bench/run_all.py

completions: $(STAMP)
	$(BIN)/python -m outloop_cli.completion_gen completions

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache .mypy_cache .ruff_cache
