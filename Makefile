# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv (Python 3.11), installs the pinned dependencies, and runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==26.3
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lamb-sharded demo

test: $(STAMP)
	$(PY) -m pytest -n 2

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_lamb.py --size 25m

# Re-pin every transitive dependency from a clean install of pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet '.[dev,demo]'
	.lock-venv/bin/pip freeze --exclude lamb-sharded > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache runs
