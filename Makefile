# Every target creates .venv on first use; later runs reuse it until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-probes lint bench bench-hpc clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,hpc]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cai-bench run --backend cpu

test: $(STAMP)
	$(BIN)/python -m pytest

# The suite twice, with the precision probe's answer forced each way: what `make test` does on a machine whose
# probe picks fp32 (no AMX, like the dev VM) and on one whose probe picks bf16 (AMX, native bf16)
test-probes: $(STAMP)
	CAI_BENCH_FORCE_PROBE=fp32 $(BIN)/python -m pytest
	CAI_BENCH_FORCE_PROBE=bf16 $(BIN)/python -m pytest

# The reference loop against the fast path on 0.2 GB, alternating, 3 pairs after a warm-up of each (~4 min on 2 cores)
bench: $(STAMP)
	$(BIN)/cai-bench bench

# One node three ways, interleaved, 3 rounds on 0.2 GB in 10 MB partitions (~5 min on 2 cores): hpc with one
# single-threaded worker, hpc with one single-threaded worker per core, cpu with all cores in one process
HPC_BENCH := --gb 0.2 --partition-mb 10 --precision fp32 --results results/hpc-node --quiet
CORES := $(shell $(BIN)/python -c "from cai_bench.backends.cpu import default_threads; print(default_threads())" 2>/dev/null)
bench-hpc: $(STAMP)
	for round in 1 2 3; do \
	  $(BIN)/cai-bench run --backend hpc --workers 1 --threads 1 $(HPC_BENCH) > /dev/null && \
	  $(BIN)/cai-bench run --backend hpc --workers $(CORES) --threads $(CORES) $(HPC_BENCH) > /dev/null && \
	  $(BIN)/cai-bench run --backend cpu --threads $(CORES) $(HPC_BENCH) > /dev/null || exit 1; \
	done
	$(BIN)/cai-bench report --results results/hpc-node --baseline cpu

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
