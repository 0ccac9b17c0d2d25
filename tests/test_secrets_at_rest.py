"""No secret of a run at rest: after an hpc --slurm run and an emulated Step Functions run with --comm over a
Redis with a password, none of the run's secrets (the comm key, the Redis password, the secret that seals the
Lambda run's objects) is in any file the run leaves, any pickle, any execution's input or history, any log, or
any process's argv; and what the run leaves that holds anything sealed is its user's alone."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
from conftest import start_redis

pytest.importorskip("submitit")

PASSWORD = "Pa55-w0rd@redis"


class Secrets:
    """Known values for the run's random secrets (the tests replace the generators), and every process's argv
    seen while the run went on."""

    def __init__(self, monkeypatch):
        self.values = [f"SECRET-{n}-{os.urandom(8).hex()}" for n in range(8)]
        self.issued: list[str] = []
        names = iter(self.values)

        def issue() -> str:
            self.issued.append(next(names))
            return self.issued[-1]

        monkeypatch.setattr("cai_bench.inference.gathering.comm.new_key", issue)
        monkeypatch.setattr("cai_bench.backends.aws_lambda.driver.new_secret", issue, raising=False)
        self.argv: list[str] = []
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    self.argv.append(" ".join(child.cmdline()))
            self._stop.wait(0.1)

    def __enter__(self):
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._watcher.join()

    def secrets(self) -> list[str]:
        """The run's key (the comm run id is made of the first issue's start, so that one is public) and the
        password, in the forms a file or a log could hold them."""
        return [*self.issued[1:], PASSWORD, quote(PASSWORD, safe="")]

    def found_in(self, text: str) -> list[str]:
        return [s for s in self.secrets() if s in text]


def _left_behind(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def _others_can_reach(path: Path, root: Path) -> bool:
    """Whether a user other than the owner can read ``path``: it is readable by them, and so is every folder
    above it up to ``root`` (searchable)."""
    if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH) == 0:
        return False
    return all(p.stat().st_mode & (stat.S_IXGRP | stat.S_IXOTH) for p in path.parents if root in p.parents)


def test_an_hpc_slurm_run_with_comm_leaves_no_secret_and_nothing_sealed_for_others(cli, tiny_data, tmp_path,
                                                                                   monkeypatch, redis_url):  # fmt: skip
    server, port = start_redis("--requirepass", PASSWORD)
    try:
        with Secrets(monkeypatch) as watched:
            code, out, err = cli("run", "--backend", "hpc", "--slurm", "--slurm-executor", "local", "--tasks", "2",
                                 "--array-parallelism", "2", "--precision", "fp32", "--threads", "1", "--comm",
                                 f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0", "--comm-timeout-s", "30",
                                 "--data", tiny_data, "--results", tmp_path)  # fmt: skip
    finally:
        server.kill()
        server.wait()
    assert code == 0, err
    assert "collectives over redis, 2 rank(s): done" in out + err  # the key and the password were used
    files = _left_behind(tmp_path)
    assert any(p.suffix == ".pkl" for p in files) and any(p.parent.name == "jobs" for p in files)  # searched
    leaks = {str(p): watched.found_in(data.decode("latin-1")) for p, data in files.items()}
    assert not {p: found for p, found in leaks.items() if found}
    assert not watched.found_in("\n".join(watched.argv)) and watched.argv
    assert not watched.found_in(out + err)
    job_dirs = [p for p in (tmp_path / "hpc-jobs").iterdir() if p.is_dir()]
    assert job_dirs and all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in job_dirs)
    assert not list(tmp_path.rglob("comm.secret"))  # removed at the job's end
    assert not [p for p in files if "hpc-jobs" in p.parts and _others_can_reach(p, tmp_path)]


def test_an_emulated_step_functions_run_with_comm_leaves_no_secret_in_inputs_histories_or_objects(
    cli, tiny_data, tmp_path, monkeypatch, redis_url
):
    """The execution's input and history (what DescribeExecution and GetExecutionHistory give anyone who may read
    the state machine, kept 90 days on AWS), every object in the run's buckets, the record, the output and every
    process's argv: none holds the run's sealing secret, its comm key or the Redis password. The run's secret in
    Secrets Manager is gone when the run ends."""
    from cai_bench.backends.aws_lambda import run_secret, stepfunctions
    from cai_bench.core import aws

    seen: list[str] = []
    history = stepfunctions.history_events

    def and_everything_else(client, arn):  # read while the run's own moto server is up
        events = history(client, arn)
        seen.append(json.dumps(events, default=str) + client.describe_execution(executionArn=arn)["input"])
        s3 = aws.s3_client()
        for bucket in s3.list_buckets()["Buckets"]:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
                for item in page.get("Contents", []):
                    body = s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
                    seen.append(body.decode("latin-1"))
        return events

    gone = []
    delete = run_secret.delete

    def deleted(ref: str) -> bool:
        done = delete(ref)
        with contextlib.suppress(Exception):
            run_secret.read(ref)
            done = False
        gone.append(done)
        return done

    from cai_bench.backends.aws_lambda.emulator import Emulator

    stop = Emulator.stop

    logs: list[Path] = []

    def with_its_logs_read(self, *args, **kwargs):  # every environment's stdout and stderr, before they go
        logs.extend(Path(self.log_dir).glob("*.log"))
        seen.extend(p.read_text(errors="replace") for p in logs)
        return stop(self, *args, **kwargs)

    monkeypatch.setattr(Emulator, "stop", with_its_logs_read)
    monkeypatch.setattr(stepfunctions, "history_events", and_everything_else)
    monkeypatch.setattr(run_secret, "delete", deleted)
    server, port = start_redis("--requirepass", PASSWORD)
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    try:
        with Secrets(monkeypatch) as watched:
            code, out, err = cli("run", "--backend", "lambda", "--emulate", "--orchestrator", "stepfunctions",
                                 "--max-concurrency", "2", "--partitions-per-invocation", "2", "--memory-mb", "3008",
                                 "--precision", "fp32", "--comm", url, "--comm-timeout-s", "60", "--data", tiny_data,
                                 "--results", tmp_path)  # fmt: skip
    finally:
        server.kill()
        server.wait()
    assert code == 0, err
    (record,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["backend_info"]["comm"]["collectives"] == "ok"  # all were used
    assert len(watched.issued) == 3  # the comm run's name, its key, the sealing secret
    assert any("items-1.json" in text for text in seen) and logs  # inputs, histories, objects and logs searched
    assert not watched.found_in("\n".join(seen))
    assert not watched.found_in("\n".join(watched.argv)) and watched.argv
    assert not watched.found_in(out + err + json.dumps(record))
    assert gone == [True]
