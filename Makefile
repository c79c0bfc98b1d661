# Two entry points a new user needs: `make demo` and `make test`. Both create .venv and install.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false

.PHONY: install demo test bench ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision come from this machine's local wheel store (see README); pip, not uv.
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/erasure demo

# Two workers on any machine: the multi-process service tests (one xdist group, one after the
# other) wait on servers while the other worker's tests compute; each worker computes on one thread.
test: install
	$(PY) -m pytest -n 2 --dist loadgroup

bench: install
	$(VENV)/bin/erasure bench --out docs/bench

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.erasure/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .erasure .pytest_cache
