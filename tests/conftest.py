from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cai_bench import aws
from cai_bench.data.partitions import synthesize

# A copy of shared/spec/upstream-state-dict.tsv, so that the tests run in any clone.
UPSTREAM_KEYS = Path(__file__).resolve().parent / "data" / "upstream-state-dict.tsv"
TINY_GB = 0.002  # 104 samples
TINY_MB = 0.52  # 4 partitions of 26 samples


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's cache."""
    monkeypatch.setenv("CAI_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic data set; tests that change files copy it first (see ``data_copy``)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    synthesize(out, TINY_GB, TINY_MB, seed=3)
    return out


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``cai-bench ARGS`` in this process through the real entry point; returns (exit code, stdout, stderr)."""
    from cai_bench import cli as cli_module

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["cai-bench", *map(str, args)])
        code = 0
        try:
            cli_module.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def upstream_spec() -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of every entry of the upstream state dict, from shared/spec."""
    rows = []
    for line in UPSTREAM_KEYS.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        dims = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        rows.append((key, dims, dtype))
    return rows


def hand_record(
    backend: str,
    wall_s: float,
    *,
    host: str = "alpha",
    cpu: str = "Xeon A",
    gpus: tuple[str, ...] = (),
    gb: float = 1.0,
    partition_mb: float = 25.0,
    batch_size: int = 512,
    precision: str = "fp32",
    threads: int | None = 2,
    phases: list[tuple[float, float, float, float]] | None = None,
    status: str = "ok",
    created: str = "2026-11-27T00:00:00Z",
    peak_rss: int = 2**30,
    cost_usd: float | None = None,
) -> dict:
    """A run record as the store holds it, built from the real dataclasses with chosen figures.

    ``phases`` is (startup_s, wait_s, load_s, compute_s) per partition, all on one worker.
    """
    from dataclasses import asdict

    from cai_bench.plan import (
        BITS_PER_SAMPLE,
        DataSummary,
        PartitionRef,
        data_gb,
        make_plan,
        partition_sizes,
        samples_for_gb,
    )
    from cai_bench.records import RunRecord, WorkerRecord, new_run_id, summarize_run

    samples = samples_for_gb(gb)
    sizes = partition_sizes(samples, partition_mb)
    each = wall_s / len(sizes)
    default = (0.1, 0.0, 0.2, each - 0.3) if each > 0.4 else (0.1 * each, 0.0, 0.2 * each, 0.7 * each)
    phases = phases or [default] * len(sizes)
    refs = tuple(PartitionRef(f"/d/part-{i}", i, n, n * 20524, "0" * 64) for i, n in enumerate(sizes))
    source = {"kind": "synthetic", "seed": 0, "generator_version": 1, "gb": gb}
    summary = DataSummary("/d", "abc", source, samples, data_gb(samples), partition_mb, len(sizes))
    plan = make_plan(backend, summary, refs, batch_size=batch_size, precision=precision, threads=threads, repeats=3)
    workers = []
    for (startup, wait, load, compute), ref in zip(phases, refs, strict=True):
        workers.append(
            WorkerRecord(
                "w0", ref.index, ref.path, ref.samples, ref.samples * BITS_PER_SAMPLE, 1, batch_size, precision,
                "cpu", startup, wait, load, compute, startup + wait + load + compute, ref.samples / compute,
                ref.samples * BITS_PER_SAMPLE / compute, 0.1, 0.1, 0.1, peak_rss, host, 1,
            )
        )  # fmt: skip
    run_summary = summarize_run(workers, wall_s)
    run_summary.cost_usd = cost_usd
    environment = {"host": host, "cpu_model": cpu, "gpus": list(gpus), "cpu_physical_cores": 2}
    record = RunRecord(
        run_id=new_run_id(), created_utc=created, status=status, backend=backend, repeat=1, repeats=3,
        plan=plan.to_record(), weights={"weights": "random-init", "seed": 0}, environment=environment,
        summary=run_summary, workers=workers, backend_info={"threads": threads},
    )  # fmt: skip
    return asdict(record)


def write_store(directory: Path, records: list[dict]) -> Path:
    import json

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------- S3 on loopback


@pytest.fixture(scope="session")
def local_s3():
    """moto's S3 server, in a process of its own on a loopback port: the real S3 HTTP API, for the session."""
    from cai_bench.backends.aws_lambda.emulator import start_local_s3

    server = start_local_s3()
    yield server.url
    server.stop()


@pytest.fixture
def s3(local_s3, monkeypatch, request):
    """This process pointed at the loopback S3, with throwaway credentials, and a fresh bucket: its name."""
    import re

    from cai_bench import aws

    monkeypatch.setenv(aws.S3_ENDPOINT_ENV, local_s3)
    monkeypatch.setenv(aws.EMULATED_ENV, "1")
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{id(request) % 10**6}"
    aws.s3_client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """A machine with no AWS configuration at all."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", aws.EMULATED_ENV,
                 aws.S3_ENDPOINT_ENV, "AWS_REGION", "AWS_DEFAULT_REGION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find either
    aws.client.cache_clear()
    yield
    aws.client.cache_clear()


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: a shell's background job (a CI script run with
    ``&``) starts with SIGINT ignored, and a Python started so never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
