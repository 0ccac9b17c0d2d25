"""The checks every measuring command (run, predict, bench, sweep) makes before any data is generated or anything
runs, in one place: what the chosen backend takes (its options, precisions, runtimes), sizes, threads against
the CPUs this process may use, a results directory that can take a record, and weights that every worker would
load. Anything refused is one line (a UserError, exit code 2), and nothing has been made or measured yet.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cai_bench.backends.base import Backend, Detachable
from cai_bench.backends.registry import check_options, check_precision, get_backend, requested_runtime
from cai_bench.core import aws
from cai_bench.core.errors import UserError
from cai_bench.core.machine import allowed_cpus
from cai_bench.core.plan import check_settings, check_size
from cai_bench.model.export_format import is_export, read_export
from cai_bench.store.jsonl import ResultsStore


@dataclass(frozen=True)
class Ready:
    """What the checks let through: the backend, each point's options as checked, the batch size (the one asked
    for, else the backend's default), the weights as plans name them, and the store."""

    backend: Backend
    options: tuple[dict, ...]
    batch_size: int
    weights: str | None
    store: ResultsStore


def check_run(
    backend: str,
    points: Sequence[tuple[dict, str]],
    *,
    results: str | Path,
    threads: int | None = None,
    oversubscribe: bool = False,
    weights: str | Path | None = None,
    batch_size: int | None = None,
    sizes: dict[str, float | None] | None = None,
    engine: str = "fast",
    compile: bool = False,
    repeats: int = 1,
    warmup: int = 0,
    detach: tuple[int, int] | None = None,
) -> Ready:
    """Refuse, before anything runs, what ``backend`` cannot run. ``points`` are (backend options, precision)
    pairs: one for a run, every point of a sweep; ``sizes`` the size options given (``gb=``, ...); ``detach``
    (repeats, warmup) where the work is to be submitted and left running (``--no-wait``). What a plan is made of
    is checked here (``plan.check_settings``), before any data is generated, not after."""
    chosen = get_backend(backend)
    batch_size = chosen.default_batch_size if batch_size is None else batch_size  # 0 is checked, not defaulted
    checked = []
    for options, precision in points:
        options = check_options(chosen, dict(options))
        check_precision(chosen, precision)
        if requested_runtime(chosen, options) == "auto":
            options["runtime"] = "auto"  # the backend's default, written out: the plan holds what is to resolve
        check_settings(
            batch_size=batch_size, precision=precision, threads=threads, repeats=repeats,
            warmup=warmup, engine=engine, compile=compile, backend_options=options,
            cycle_to_gb=(sizes or {}).get("cycle_to_gb"),
        )  # fmt: skip
        checked.append(options)
    if detach is not None:
        check_detach(chosen, checked[0], *detach)
    check_sizes(**(sizes or {}))
    for options in checked:
        check_threads(threads, options, oversubscribe)
    store = ResultsStore(results)
    store.check_writable()
    named = check_weights(weights, backend) if weights else None  # here, not by every worker once the run started
    return Ready(chosen, tuple(checked), batch_size, named, store)


def check_sizes(**options: float | None) -> None:
    """Refuse size options (``gb=``, ``partition_mb=``, ``cycle_to_gb=``) that are not positive finite numbers,
    before anything is generated."""
    for name, value in options.items():
        if value is not None:
            check_size(value, "--" + name.replace("_", "-"))


def check_threads(threads: int | None, backend_options: dict, oversubscribe: bool) -> None:
    """Refuse more threads than this process may use, unless ``oversubscribe``: they would take turns on the
    same cores, and the figures would measure the taking turns. A SLURM array's threads are on its nodes."""
    if backend_options.get("slurm"):
        return
    asked = {
        "--threads": threads or 0,
        "--workers": backend_options.get("workers") or 0,
        "--lanes": backend_options.get("lanes") or 0,
    }
    option, wanted = max(asked.items(), key=lambda item: item[1])
    allowed = allowed_cpus()
    if wanted > allowed and not oversubscribe:
        raise UserError(
            f"{option} {wanted}: this process may use {allowed} CPU(s), so {wanted} threads would share them and "
            "the figures would measure the sharing; use fewer, or pass --oversubscribe (the point is then marked)"
        )


def check_detach(backend: Backend, options: dict, repeats: int, warmup: int) -> None:
    """Refuse ``--no-wait`` where the backend cannot leave its work running."""
    if not isinstance(backend, Detachable):
        raise UserError(f"--no-wait: --backend {backend.name} runs while the command waits; it cannot detach")
    if repeats > 1 or warmup:
        raise UserError("--no-wait submits one run: leave out --repeats and --warmup")
    backend.check_detach(options)


def check_weights(path: str | Path, backend: str = "cpu") -> str:
    """The weights as the plan names them, checked: a local file, an export (for --runtime onnxruntime or
    openvino; the plan checks which), or (for Lambda functions, which fetch them) an s3:// object, also when a
    Path has folded its "//"."""
    text = str(path)
    if re.match(r"[sS]3:/", text):
        if backend != "lambda":
            raise UserError(f"{text}: s3:// weights are fetched by Lambda functions only; copy them here first")
        bucket, key = aws.parse_s3_url(text)
        if not key:
            raise UserError(f"{text}: name the weights object, s3://bucket/key")
        return aws.s3_url(bucket, key)
    if is_export(text):
        read_export(text)
        return text
    from cai_bench.model.checkpoint import check_weights_file  # torch: builds the model to check the weights fit

    check_weights_file(path)
    return text
