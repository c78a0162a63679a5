# ultramem-dist — developer entry points. Every target creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARTIFACTS ?= artifacts

.PHONY: help venv demo test lint proto crd-sync chart bench bench-quick clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "==> installing ultramem-dist and its dependencies into $(VENV) (first run: ~2 min)"
	@$(BIN)/pip install -q --disable-pip-version-check -U pip 2>/dev/null
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,bench,operator]' \
		> $(VENV)/install.log 2>&1 || (tail -40 $(VENV)/install.log; exit 1)
	@$(BIN)/python -c "import ultramem_dist, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the package (editable) with all extras

demo: $(STAMP) ## train (or reuse) a tiny UltraMem model, serve its tables and generate text
	$(BIN)/ultramem-dist demo --workdir $(ARTIFACTS)

test: $(STAMP) ## run the whole test suite (unit + integration, no slow benchmarks)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

proto: $(STAMP) ## regenerate the gRPC stubs from proto/ (never edit them by hand)
	$(BIN)/python scripts/gen_proto.py

chart: $(STAMP) ## lint + render + validate the Helm chart offline (VALUES="-f my.yaml --set k=v")
	$(BIN)/python scripts/chart.py $(VALUES)

crd-sync: ## copy the ValueStore CRD (single source: operators/crds) into the chart
	cp operators/crds/valuestore.yaml helm/ultramem/crds/valuestore.yaml

BENCHMARKS := gather kernel_limit service_compare shard_scaling router_hop overlap decode_scaling \
	loadtest chaos fuzz quality

bench: $(STAMP) ## run every benchmark (about an hour on 2 cores); JSON + PNG in benchmarks/results/
	@set -e; for b in $(BENCHMARKS); do echo "==> benchmarks/$$b.py"; \
		$(BIN)/python benchmarks/$$b.py; done

bench-quick: $(STAMP) ## smoke-run every benchmark with --quick (a few minutes)
	@set -e; for b in $(BENCHMARKS); do echo "==> benchmarks/$$b.py --quick"; \
		$(BIN)/python benchmarks/$$b.py --quick; done

clean: ## remove the venv and generated artifacts
	rm -rf $(VENV) $(ARTIFACTS)
