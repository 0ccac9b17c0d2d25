"""The options several backends take, declared once: one flag, one help text, one meaning wherever they apply.
Each backend's own options stay in its module, their help beginning with the backend's name."""

from __future__ import annotations

from cai_bench.backends.base import BackendOption
from cai_bench.backends.dispatch import DEFAULT_RETRIES
from cai_bench.comm.policy import HINTS
from cai_bench.core.choices import RUNTIMES

WORKERS = BackendOption(
    "workers", int, "Worker processes, --threads split between them: hpc, on this node (1 by default); dask, of "
    "the embedded cluster (one per core by default) or the jobs --dask-jobqueue submits.", "1 (hpc); cores (dask)",
    minimum=1,
)  # fmt: skip
RETRIES = BackendOption(
    "retries", int, "Times a partition whose worker was lost or that failed is tried again, on another worker "
    "where there is one (hpc --slurm: in a smaller array; lambda: in a fresh invocation).",
    DEFAULT_RETRIES, minimum=0, identity=False,
)  # fmt: skip
RUNTIME = BackendOption(
    "runtime", str, "What runs the model: torch, or an export on onnxruntime or openvino; auto (cpu, hpc on one "
    "node): the fastest of those installed, at its precision, by a start-up probe on the worker's threads.",
    "auto (cpu, hpc); torch (lambda)", choices=("auto", *RUNTIMES), absent_as="torch",
)  # fmt: skip
LANES = BackendOption(
    "lanes", int, "Partitions split between this many threads (torch: sharing the model; onnxruntime: a session "
    "each; openvino: a stream each).", "threads, at most 4",
    minimum=1,
)  # fmt: skip
COMM = BackendOption(
    "comm", str, "Channels for the workers' closing collectives, comma-separated (direct://HOST:PORT of a "
    "`cai-bench comm rendezvous`, redis://HOST:PORT/DB, s3://BUCKET/PREFIX): each worker gets a rank, and rank 0 "
    "gathers the results and the accuracy sums into one aggregate the driver reads (docs/comm.md).", None,
    sweepable=False,
)  # fmt: skip
COMM_HINT = BackendOption(
    "comm_hint", str, "With several --comm channels, which each operation takes: the fastest or the cheapest by "
    "the channel models (comm bench's figures for this machine where it measured them).", "fast",
    choices=HINTS, identity=False,
)  # fmt: skip
COMM_TIMEOUT = BackendOption(
    "comm_timeout_s", float, "Seconds a worker waits in any one collective before it names the rank missing.", 60.0,
    minimum=0.1, identity=False, sweepable=False,
)  # fmt: skip
COMM_BIND = BackendOption(
    "comm_bind", str, "The address a direct:// channel's ranks listen on; by default the one each reaches the "
    "rendezvous server from (loopback when the server is on loopback). Another only where peers arrive on another "
    "network than the server's (docs/comm.md).", None,
    identity=False, sweepable=False,
)  # fmt: skip
COMM_OPTIONS = (COMM, COMM_HINT, COMM_TIMEOUT, COMM_BIND)
