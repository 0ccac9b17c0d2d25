"""The options several backends take, declared once: one flag, one help text, one meaning wherever they apply.
Each backend's own options stay in its module, their help beginning with the backend's name."""

from __future__ import annotations

from cai_bench.backends.base import BackendOption
from cai_bench.backends.dispatch import DEFAULT_RETRIES
from cai_bench.choices import RUNTIMES

RETRIES = BackendOption(
    "retries", int, "Times a partition whose worker was lost or that failed is tried again, on another worker "
    "where there is one (hpc --slurm: in a smaller array; lambda: in a fresh invocation).",
    DEFAULT_RETRIES, minimum=0, identity=False,
)  # fmt: skip
RUNTIME = BackendOption(
    "runtime", str, "What runs the model: torch, or an export on onnxruntime or openvino.", "torch", choices=RUNTIMES
)
LANES = BackendOption(
    "lanes", int, "Partitions split between this many threads (torch: sharing the model; onnxruntime: a session "
    "each; openvino: a stream each).", "threads, at most 4",
    minimum=1,
)  # fmt: skip
