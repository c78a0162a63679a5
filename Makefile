# ultramem-dist — developer entry points. Every target creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARTIFACTS ?= artifacts

.PHONY: help venv demo test test-fast lint proto bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "==> installing ultramem-dist and its dependencies into $(VENV) (first run: ~2 min)"
	@$(BIN)/pip install -q --disable-pip-version-check -U pip 2>/dev/null
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,bench,operator]' 2>&1 | grep -v -e "is ignored: it is neither" -e "^WARNING: Location" || true
	@$(BIN)/python -c "import ultramem_dist, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the package (editable) with all extras

demo: $(STAMP) ## train (or reuse) a tiny UltraMem model, serve its tables and generate text
	$(BIN)/ultramem-dist demo --workdir $(ARTIFACTS)

test: $(STAMP) ## run the whole test suite (unit + integration, no slow benchmarks)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

bench: $(STAMP) ## run every benchmark (minutes each); results in benchmarks/results/
	$(BIN)/python benchmarks/quality.py

clean: ## remove the venv and generated artifacts
	rm -rf $(VENV) $(ARTIFACTS)
