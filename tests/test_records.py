"""Records without torch: the schemas, the wire format a PartitionResult crosses boundaries in, the commands
that only read the store, and the store as DataFrames."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
from conftest import hand_record, write_store

from cai_bench.core.records import (
    PartitionResult,
    RunRecord,
    WireFormatError,
    WorkerRecord,
    decode_result,
    encode_result,
)


def a_result(n: int, seed: int = 0) -> PartitionResult:
    rng = np.random.default_rng(seed)
    record = WorkerRecord(
        "w0", 3, "part-00003.safetensors", n, n * 164_160, 2, 512, "bf16", "cpu", 1.5, 0.01, 0.2, 0.7, 2.4,
        n / 0.7, n * 164_160 / 0.7, 0.3, 0.35, None, 2**30, "alpha", 1234, [0.33, 0.37],
    )  # fmt: skip
    prediction = rng.standard_normal(n).astype(np.float32)
    prediction[:3] = [np.float32(1e-45), -0.0, np.finfo(np.float32).max]  # a subnormal, minus zero, the largest
    return PartitionResult(record, rng.integers(-(2**62), 2**62, n), prediction, rng.random(n, dtype=np.float32))


@pytest.mark.parametrize("n", [3, 1277])
def test_a_partition_result_round_trips_through_the_wire_format_bit_for_bit(n):
    result = a_result(n)
    back = decode_result(encode_result(result))
    assert back.record == result.record
    for name in ("object_id", "prediction", "redshift"):
        ours, theirs = getattr(back, name), getattr(result, name)
        assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()
    # binary, not JSON float lists: 1,277 objects of three arrays stay near their raw 20 bytes each
    assert len(encode_result(a_result(1277))) < 1277 * 20 + 4096


def test_what_is_not_a_result_is_refused_without_unpickling():
    with pytest.raises(WireFormatError):
        decode_result(b"not an npz at all")
    import io

    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(b'{"format": "something else"}', dtype=np.uint8))
    with pytest.raises(WireFormatError):
        decode_result(buffer.getvalue())
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array([object()], dtype=object))  # a pickled object array
    with pytest.raises(WireFormatError):
        decode_result(buffer.getvalue())


def test_a_stored_record_reads_back_into_the_dataclasses():
    stored = hand_record("hpc", 12.0, gb=0.01, partition_mb=1)
    stored["summary"]["added_in_a_later_minor_version"] = 1
    record = RunRecord.from_dict(stored)
    assert record.summary.wall_s == 12.0 and len(record.workers) == stored["summary"]["partitions"]
    assert isinstance(record.workers[0], WorkerRecord)
    again = asdict(record)
    del stored["summary"]["added_in_a_later_minor_version"]
    assert again == stored


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_reading_the_store_imports_no_torch(tmp_path):
    modules = _modules_after(
        "import cai_bench.analysis.report, cai_bench.render.figures.scaling, cai_bench.analysis.results, "
        "cai_bench.core.records"
    )
    assert "torch" not in modules and "cai_bench.inference.engine" not in modules
    write_store(tmp_path / "r", [hand_record("cpu", 10.0), hand_record("hpc", 6.0)])
    commands = [
        ["report", "--results", str(tmp_path / "r")],
        ["plot", "--results", str(tmp_path / "r"), "--out-dir", str(tmp_path / "f")],
        ["results", "list", "--results", str(tmp_path / "r")],
        ["results", "export", "--results", str(tmp_path / "r")],
    ]
    for args in commands:
        code = f"from cai_bench.cli import app\napp({args!r}, standalone_mode=False)"
        modules = _modules_after(code)
        assert "torch" not in modules, f"cai-bench {' '.join(args[:2])} imported torch"
    assert list((tmp_path / "f").glob("*.png"))


def test_the_store_loads_as_dataframes_of_runs_and_of_partitions(tmp_path):
    from cai_bench.analysis.results import load

    records = [hand_record("cpu", 10.0, gb=0.01, partition_mb=1), hand_record("hpc", 6.0, gb=0.01, partition_mb=1)]
    records[1]["status"] = "failed"
    write_store(tmp_path / "r", records)
    runs, partitions = load(tmp_path / "r")
    assert list(runs["run_id"]) == [r["run_id"] for r in records]
    assert list(runs["backend"]) == ["cpu", "hpc"]
    assert list(runs["summary.wall_s"]) == [10.0, 6.0]
    assert list(runs["plan.batch_size"]) == [512, 512] and "environment.cpu_model" in runs
    assert runs["machine"].str.startswith("alpha").all()
    assert len(partitions) == sum(len(r["workers"]) for r in records)
    assert set(partitions["run_id"]) == set(runs["run_id"])
    assert partitions.groupby("run_id")["samples"].sum().to_dict() == {
        r["run_id"]: r["summary"]["samples"] for r in records
    }
    finished, _ = load(tmp_path / "r", finished_only=True)
    assert list(finished["backend"]) == ["cpu"]
    empty_runs, empty_partitions = load(tmp_path / "nothing")
    assert len(empty_runs) == 0 and len(empty_partitions) == 0
