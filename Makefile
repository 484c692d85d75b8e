# gpuserve developer commands. `make serve` and `make test` need only python3 (>= 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install prometheus serve lint-imports test test-unit test-integration bench clean

# Re-install when the dependency lists change.
$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(STAMP)

# The alerting-rule tests run promtool and the scrape test a real Prometheus server: Debian's package.
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

serve: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/gpuserve run examples/quickstart.yaml

# Multi-node tests start their own Ray cluster, so they run in a second pytest process.
MULTINODE := tests/integration/multinode

# With GPUSERVE_REQUIRE_PROMETHEUS the Prometheus tests fail instead of skipping when it is missing.
# The KubeRay validation tests read the CRDs beside the clone (../shared) unless GPUSERVE_CRD_DIR says
# otherwise; with CI set, their absence fails those tests (tests/conftest.py).
GPUSERVE_CRD_DIR ?= $(abspath $(wildcard ../shared/kuberay-crds))
export GPUSERVE_CRD_DIR
TEST_ENV := HF_HUB_OFFLINE=1 GPUSERVE_REQUIRE_PROMETHEUS=1

# The package layering (docs/architecture.md), as import-linter contracts in pyproject.toml.
lint-imports: install
	$(VENV)/bin/lint-imports --no-cache

test: install prometheus lint-imports
	$(TEST_ENV) $(PY) -m pytest tests --ignore=$(MULTINODE)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(MULTINODE)

test-unit: install prometheus
	$(TEST_ENV) $(PY) -m pytest tests/unit

test-integration: install prometheus
	$(TEST_ENV) $(PY) -m pytest tests/integration --ignore=$(MULTINODE)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(MULTINODE)

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/serving_overhead.py
	HF_HUB_OFFLINE=1 $(PY) bench/autoscaling_sim.py --quick
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(PY) bench/overload.py --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
