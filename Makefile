# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Each creates/updates .venv itself; torch is pinned and installed first (a local CPU wheel).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test lint bench clean
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m experiments.main

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m ruff check .
	WANDB_MODE=offline $(PY) -m pytest -q -x --durations=10

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf .venv outputs multirun wandb
