# Every target creates .venv on first use; later runs reuse it until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-full test-probes lint bench bench-hpc bench-dask bench-gpu bench-gpu-dry bench-lambda bench-coldstart bench-estimate clean

# Bytecode for the packages and cai_bench, compiled over all the cores: pip compiles one file at a time (40 of the
# install's 115 s on 2 cores; about 20 s this way). Not left to first imports, which may never save it (with
# PYTHONDONTWRITEBYTECODE set, every process would compile torch again). The few files kept for other Python
# versions fail quietly, as under pip.
BYTECODE := import compileall, sysconfig; \
	[compileall.compile_dir(d, quiet=2, workers=0) for d in (sysconfig.get_paths()['purelib'], 'cai_bench')]
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev,hpc,aws,onnx,openvino,astro,dask,dask-jobqueue]'
	$(BIN)/python -c "$(BYTECODE)"
	touch $(STAMP)

# 0.3 GB: 15,694 galaxies, 15.3 s on a 2-vCPU AMD EPYC: a VALID measurement (10 s and 10,000 galaxies at least)
demo: $(STAMP)
	$(BIN)/cai-bench run --backend cpu --gb 0.3

# The suite over the cores (pytest-xdist; a worker that runs out of tests takes some of another's queue instead
# of idling while the other finishes), the long tests first, the model exports shared by the workers. The tests
# that depend on what the precision probe answers run under fp32, its answer on a CPU without native bf16;
# test-probes runs them under bf16, its answer on one with it (AMX, avx512_bf16). Plain pytest runs each test of
# those under both (tests/conftest.py).
XDIST := -n auto --dist worksteal
test: $(STAMP)
	CAI_BENCH_FORCE_PROBE=fp32 $(BIN)/python -m pytest $(XDIST) -m "not full"

# What make test leaves out: the tests marked full (each says why); .ci/run runs both
test-full: $(STAMP)
	CAI_BENCH_FORCE_PROBE=fp32 $(BIN)/python -m pytest $(XDIST) -m full

test-probes: $(STAMP)
	CAI_BENCH_FORCE_PROBE=bf16 $(BIN)/python -m pytest $(XDIST) -m probe

# The reference loop against every runtime (torch's fast engine, ONNX Runtime, OpenVINO) on 0.2 GB in fp32,
# alternating, 3 rounds after a warm-up of each (~6 min on 2 cores); `cai-bench bench` alone runs precision auto
bench: $(STAMP)
	$(BIN)/cai-bench bench --precision fp32

# One node two ways on 0.2 GB in 10 MB partitions, 3 repeats each (~5 min on 2 cores): the hpc-node preset with
# one worker process and with one per core, then the cpu backend on the same data as the baseline
HPC_BENCH := --results results/hpc-node --quiet
CORES := $(shell $(BIN)/python -c "from cai_bench.core.machine import default_threads; print(default_threads())" 2>/dev/null)
bench-hpc: $(STAMP)
	$(BIN)/cai-bench sweep --config hpc-node --workers 1,$(CORES) $(HPC_BENCH) > /dev/null
	$(BIN)/cai-bench run --backend cpu --gb 0.2 --partition-mb 10 --precision fp32 --repeats 3 $(HPC_BENCH) > /dev/null
	$(BIN)/cai-bench report --results results/hpc-node --baseline cpu

# The dask backend against the hpc node backend (~4 min on 2 cores): 0.2 GB in 10 MB partitions, one worker per
# core each, torch fp32, 5 repeats alternating after a warm-up of each; throughput, start-up, peak memory of the
# process tree and the overhead per partition, as JSON (docs/dask.md)
bench-dask: $(STAMP)
	$(BIN)/python -m cai_bench.benches.dask_vs_hpc --out results/dask-vs-hpc/bench.json

# The paper's 12.6 GB on one GPU (a 1 GB synthetic set cycled to 12.6 GB): correctness of the chosen precision,
# then the wall with data in host memory and with disk reads; JSON on stdout and in $$OUT/bench-gpu.json. It runs
# the venv as it is and installs nothing, not even where pyproject.toml is newer than the venv: a GPU machine
# lent for minutes may have no network, and a reinstall there would end the benchmark before it started.
bench-gpu:
	@test -x $(BIN)/python || { echo "bench-gpu: no $(VENV) here; make it first (make test) where there is a network"; exit 2; }
	$(BIN)/python -m cai_bench.benches.gpu

# The same script on tiny data, on the CPU where there is no GPU: checks the script, measures nothing
bench-gpu-dry: $(STAMP)
	$(BIN)/python -m cai_bench.benches.gpu --shrink

# The Lambda fan-out machinery without the model: 1,000 invocations of the handler's no-model mode (read and verify
# a partition, return its record) at concurrency 64 through the emulator and a local S3 (~1 min on 2 cores);
# every unit exactly once, the wall and the driver's overhead per invocation, as JSON
bench-lambda: $(STAMP)
	$(BIN)/python -m cai_bench.benches.lambda_fanout --invocations 1000 --concurrency 64 --out results/lambda-fanout/bench.json

# A torch-free Lambda worker's cold start, emulated (~4 min on 2 cores): 8 fresh environments for each of ONNX
# Runtime and OpenVINO, with the export fetched from S3 at the cold start and read from the image
# (--export-in-image), one 5 MB partition each in fp32 at 3,538 MB (2 vCPUs); medians of the first invocation's
# Duration and Max Memory Used, as JSON
bench-coldstart: $(STAMP)
	$(BIN)/python -m cai_bench.benches.coldstart --cold-starts 8 --out results/lambda-coldstart/bench.json

# The estimator's own speed: 10,000 partitions of 25 MB (244.14 GB) through Lambda's default quota of 1,000, 200
# simulated runs, from the paper's profile; the last line says how long the simulation took
bench-estimate: $(STAMP)
	$(BIN)/cai-bench estimate --profile paper --gb 244.140625 --partition-mb 25 --trials 200

# ruff, and the layers contract (pyproject.toml, [tool.importlinter]): a module imports only from the layers below
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
