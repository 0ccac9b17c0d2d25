# Every target creates .venv on first use; later runs reuse it until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cai-bench run --backend cpu

test: $(STAMP)
	$(BIN)/python -m pytest

# The reference loop against the fast path on 0.2 GB, alternating, 3 pairs after a warm-up of each (~4 min on 2 cores)
bench: $(STAMP)
	$(BIN)/cai-bench bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
