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
    deadline = time.monotonic() + 300
    while not _records(store) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    # Into the second repeat, far enough for some of its partitions to finish, however loaded the machine is:
    # half the first repeat's wall clock (start-up and the partitions)
    time.sleep(max(1.5, 0.5 * _records(store)[0]["summary"]["wall_s"]))
    if to_group:  # as SLURM does at a time limit
        os.killpg(process.pid, signal.SIGTERM)
    else:  # as timeout(1) and kill(1) do
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert "interrupted" in err
    records = _records(store)
    assert records[0]["status"] == "ok" and len(records[0]["workers"]) == 12
    assert [r["status"] for r in records[1:]] == ["interrupted"]
    assert 0 < len(records[1]["workers"]) < 12
