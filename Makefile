# Two entry points do all set-up on a fresh machine (Python 3.11):
#   make demo   - the whole loop on the embedded default
#   make test   - the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup kubectl servers browser cluster compile bench clean

# One line on screen while it installs; pip's own errors (and warnings from the machine's pip
# configuration) still show.
$(BIN)/.installed: pyproject.toml
	@echo "setting up $(VENV): driftloop and its dependencies (once; a few minutes)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

setup: $(BIN)/.installed

demo: setup
	@$(BIN)/driftloop demo

# The manifest tests build infra/ with a real kustomize (kubectl's built-in one).
kubectl:
	@command -v kubectl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; \
	  else echo "kubectl is needed for the manifest tests: install it (Debian: kubernetes-client) or set KUBECTL" >&2; exit 1; fi; }

# The alerting tests run a real Prometheus (with promtool) and Alertmanager (Debian packages).
servers:
	@missing=""; for b in prometheus promtool amtool; do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 || missing="$$missing alertmanager"; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null; \
	  else echo "missing:$$missing - the alerting tests need Prometheus and Alertmanager: install them (Debian: apt-get install prometheus prometheus-alertmanager)" >&2; exit 1; fi; }

# The Evidently UI test opens the dashboard in Debian's headless Chromium (playwright drives it;
# its own browser download is never used).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "the browser test needs Chromium: install it (Debian: apt-get install chromium chromium-driver)" >&2; exit 1; fi; }

# The cluster tests run a real etcd + kube-apiserver 1.20.2 on loopback, built once from Debian's
# packages and source (no binary package ships kube-apiserver) and cached outside the clone:
# ${XDG_CACHE_HOME:-~/.cache}/driftloop/kube-apiserver-1.20.2-<recipe>/. The first build takes ~8 min
# of one core (it says so while it builds); later runs find it.
cluster: setup
	@bash infra/cluster/build.sh >/dev/null

test: setup kubectl servers browser cluster
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

compile: setup
	$(BIN)/driftloop compile -c examples/demo.yaml -o compiled

clean:
	rm -rf .driftloop compiled
