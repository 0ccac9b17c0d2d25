"""SIGTERM (SLURM's time limit, ``timeout``) stops a run as Ctrl-C does: what finished is recorded, exit 143."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_bench.data.partitions import synthesize

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def twelve_partitions(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "twelve"
    synthesize(out, 0.006, 0.52, seed=1)  # 313 samples in 12 partitions
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_records(path: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> float:
    """When (time.monotonic) the store first held ``count`` records; fails if the run ends or times out first."""
    deadline = time.monotonic() + timeout
    while len(_records(path)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {count} records in {path} after {timeout} s"
        time.sleep(0.02)
    return time.monotonic()


@pytest.mark.parametrize(
    "backend",
    [["--backend", "cpu", "--threads", "1"], ["--backend", "hpc", "--workers", "2", "--threads", "2"]],
    ids=["cpu", "hpc"],
)
@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-driver", "to-every-process"])
def test_sigterm_records_what_finished_and_exits_143(twelve_partitions, tmp_path, backend, to_group):
    store = tmp_path / "runs.jsonl"
    args = ["run", "--data", twelve_partitions, "--batch-size", "8", "--repeats", "4", "--precision", "fp32", "-q"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cai_bench", *map(str, args), *backend, "--results", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    # Into the third repeat, far enough for some of its partitions to finish: half the second repeat's wall
    # clock, timed as the records land. The first repeat's clock is no guide: it holds the process's cold start,
    # and the load from the suite's other tests may have changed since.
    landed = [_wait_for_records(store, count, process) for count in (1, 2)]
    time.sleep(0.5 * (landed[1] - landed[0]))
    if to_group:  # as SLURM does at a time limit
        os.killpg(process.pid, signal.SIGTERM)
    else:  # as timeout(1) and kill(1) do
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert "interrupted" in err
    records = _records(store)
    assert [(r["status"], len(r["workers"])) for r in records[:2]] == [("ok", 12), ("ok", 12)]
    assert [r["status"] for r in records[2:]] == ["interrupted"]
    assert 0 < len(records[2]["workers"]) < 12
