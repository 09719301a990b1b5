# Two commands for users: `make demo` and `make test`. Everything else here serves them or CI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: demo test test-slow install sysdeps vllm ray deploy clean

demo: $(STAMP)
	$(BIN)/kaizen demo

test: $(STAMP)
	$(BIN)/pytest -q

# Tiny-model training, servers and end-to-end flows: minutes, not seconds. CI runs these too.
test-slow: $(STAMP) vllm $(RAY_STAMP)
	$(BIN)/pytest -q -m slow

# prefect-ray and Ray, for recipes whose execution.task_runner is `ray` (and the Ray test).
ray: $(RAY_STAMP)

$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,ray]'
	touch $@

# Register the deployments of deployments/prefect.yaml with the server at PREFECT_API_URL:
# the GPU work pool, a concurrency limit of one on GPU stages, then every deployment. The pool and
# the limit are created only when missing: deploying again keeps a pool's edited job template and a
# limit raised for more GPUs.
deploy: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/prefect work-pool inspect kaizen-gpu >/dev/null 2>&1 || \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/prefect work-pool create kaizen-gpu --type process
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/prefect concurrency-limit inspect kaizen-gpu >/dev/null 2>&1 || \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/prefect concurrency-limit create kaizen-gpu 1
	PATH="$(CURDIR)/$(BIN):$$PATH" PWD="$(CURDIR)" $(BIN)/prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --all

# vLLM lives in its own environment (.venv-vllm): its pins conflict with Prefect's (DESIGN section 3).
vllm: $(STAMP)
	$(BIN)/kaizen vllm install

install: $(STAMP)

# The code sandbox needs bubblewrap (user/pid/net/mount namespaces). Installed from Debian when
# missing and we are root; otherwise say exactly what to run.
sysdeps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
	  else echo "kaizen needs bubblewrap for its code sandbox: sudo apt-get install bubblewrap" >&2; exit 1; fi; }

$(STAMP): pyproject.toml | sysdeps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
