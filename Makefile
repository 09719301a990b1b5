# Two commands for users: `make demo` and `make test`. Everything else here serves them or CI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install sysdeps vllm clean

demo: $(STAMP)
	$(BIN)/kaizen demo

test: $(STAMP)
	$(BIN)/pytest -q

# Tiny-model training, servers and end-to-end flows: minutes, not seconds. CI runs these too.
test-slow: $(STAMP) vllm
	$(BIN)/pytest -q -m slow

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
