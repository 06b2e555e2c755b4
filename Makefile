# Two entry points: `make demo` (the main job) and `make test` (everything CI runs).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU wheel of this torch lies on the project's machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
SERVER_BINS := prometheus promtool prometheus-alertmanager amtool prometheus-pushgateway docker-compose
SERVER_PKGS := prometheus prometheus-alertmanager prometheus-pushgateway docker-compose

.PHONY: demo test venv servers rules dashboards check-alertmanager clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Prometheus, Alertmanager and Pushgateway come from the OS packages; docker-compose validates the compose file
# offline (no container engine is needed).
servers:
	@missing=""; for b in $(SERVER_BINS); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing from the OS packages"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SERVER_PKGS); \
	  else \
	    echo "missing:$$missing; install the packages: sudo apt-get install $(SERVER_PKGS)" >&2; exit 1; \
	  fi; \
	fi

demo: venv servers
	$(PY) -m exporter stack

test: venv servers
	$(PY) -m pytest -q

rules: venv
	$(PY) -m exporter rules --thresholds deploy/prometheus/thresholds.yaml --out deploy/prometheus/rules \
	  --prometheusrule deploy/kubernetes/prometheusrule.yaml

dashboards: venv
	$(PY) -m exporter dashboards --thresholds deploy/prometheus/thresholds.yaml --out grafana/dashboards

# Before (re)starting Alertmanager: routing as the thresholds say and every secret file present (the compose stack
# mounts deploy/alertmanager at /etc/alertmanager).
check-alertmanager: venv
	$(PY) -m exporter check-alertmanager --config deploy/alertmanager/alertmanager.yml \
	  --thresholds deploy/prometheus/thresholds.yaml --mount /etc/alertmanager=deploy/alertmanager

clean:
	rm -rf $(VENV) .demo
