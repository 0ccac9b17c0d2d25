"""SIGTERM (SLURM's time limit, ``timeout``) stops a run as Ctrl-C does: what finished is recorded, exit 143."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_bench.data.partitions import synthesize
from cai_bench.store.jsonl import ResultsStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def twelve_partitions(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "twelve"
    synthesize(out, 0.006, 0.52, seed=1)  # 313 samples in 12 partitions
    return out


def _records(path: Path) -> list[dict]:
    """The store's whole records: a line the run is writing at that moment is not one yet (the store's reader
    skips a torn last line, as this does)."""
    return ResultsStore(path.parent).read()


def _wait_for_records(path: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> float:
    """When (time.monotonic) the store first held ``count`` records; fails if the run ends or times out first."""
    deadline = time.monotonic() + timeout
    while len(_records(path)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {count} records in {path} after {timeout} s"
        time.sleep(0.02)
    return time.monotonic()


def _terminated_run(data: Path, results: Path, backend: list[str], to_group: bool, fraction: float):
    """A run of 4 repeats given SIGTERM ``fraction`` of the way into its third: the second repeat's wall clock,
    timed as the records land, says how long the third will take (the first's holds the process's cold start).
    Returns the exit code, stderr and the records."""
    args = ["run", "--data", data, "--batch-size", "8", "--repeats", "4", "--precision", "fp32", "-q"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cai_bench", *map(str, args), *backend, "--results", str(results)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    landed = [_wait_for_records(results / "runs.jsonl", count, process) for count in (1, 2)]
    time.sleep(fraction * (landed[1] - landed[0]))
    if to_group:  # as SLURM does at a time limit
        os.killpg(process.pid, signal.SIGTERM)
    else:  # as timeout(1) and kill(1) do
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    return process.returncode, err, _records(results / "runs.jsonl")


CPU = ["--backend", "cpu", "--threads", "1"]
HPC = ["--backend", "hpc", "--workers", "2", "--threads", "2"]


@pytest.mark.parametrize(
    "backend, to_group",
    [
        pytest.param(CPU, False, id="to-the-driver-cpu"),
        pytest.param(HPC, True, id="to-every-process-hpc"),
        # the other two ways: the same code, another mix; 20 s more on 2 cores, so make test-full runs them
        pytest.param(CPU, True, id="to-every-process-cpu", marks=pytest.mark.full),
        pytest.param(HPC, False, id="to-the-driver-hpc", marks=pytest.mark.full),
    ],
)
def test_sigterm_records_what_finished_and_exits_143(twelve_partitions, tmp_path, backend, to_group):
    """Each try checks what a SIGTERM must leave, wherever it lands; a try whose signal came before any partition
    of the repeat had finished, or after the repeat, leaves nothing partial to check, so it is tried again nearer
    the middle (the load from the suite's other tests can change a repeat's pace in between)."""
    for attempt, fraction in enumerate((0.5, 0.35, 0.65)):
        code, err, records = _terminated_run(twelve_partitions, tmp_path / str(attempt), backend, to_group, fraction)
        assert code == 143, err
        assert "Traceback" not in err
        assert "interrupted" in err
        *finished, last = [(r["status"], len(r["workers"])) for r in records]
        assert len(finished) >= 1 and set(finished) == {("ok", 12)}
        if last[0] == "interrupted":
            assert 0 < last[1] < 12
            return
        assert last == ("ok", 12)
    pytest.fail("no SIGTERM landed while a repeat had some but not all of its partitions done")
