"""Nothing measured is lost and bad input is one line: records with numbers JSON cannot hold, a store linked
elsewhere, JSON with huge integers or deep nesting, bad --comm and --price-file values (refused before any
partition runs), passwords in URLs (never printed or stored), the emulator's bad lengths, the rendezvous
server's bad requests, and --endpoint-url for the data of an emulated run."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from conftest import hand_record, start_redis

from cai_bench.core.errors import UserError, redact
from cai_bench.core.records import PartitionResult, RunRecord, decode_result, encode_result
from cai_bench.store.jsonl import ResultsStore

HUGE_INT = "1" + "0" * 5000
DEEP = "[" * 100_000 + "]" * 100_000


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------------- numbers JSON cannot hold


def test_a_record_with_numbers_json_cannot_hold_is_written_with_them_as_null_and_named(measured_store, tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    shutil.copy(measured_store, store_dir / "runs.jsonl")
    store = ResultsStore(store_dir)
    (measured,) = store.read()
    record = RunRecord.from_dict(measured)
    record.run_id = "with-infinities"
    record.summary = replace(record.summary, cost_usd=math.inf)
    record.backend_info = {**record.backend_info, "export": {"max_abs_dz": math.nan}}
    # a unit whose record crossed a process boundary with an infinite rate: the wire keeps it as it was
    infinite = replace(record.workers[0], samples_per_s=math.inf)
    crossed = decode_result(encode_result(PartitionResult(infinite, np.zeros(1, np.int64), np.zeros(1), np.zeros(1))))
    assert math.isinf(crossed.record.samples_per_s)
    record.workers[0] = crossed.record
    store.append(record)
    second = RunRecord.from_dict(measured)
    second.run_id = "wall-not-finite"
    second.summary = replace(second.summary, wall_s=math.inf)
    store.append(second)

    stored = [json.loads(line) for line in (store_dir / "runs.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in stored] == [measured["run_id"], "with-infinities", "wall-not-finite"]
    kept = stored[1]
    assert kept["summary"]["cost_usd"] is None and kept["backend_info"]["export"]["max_abs_dz"] is None
    assert kept["non_finite"] == {"summary.cost_usd": "inf", "backend_info.export.max_abs_dz": "nan",
                                  "workers[0].samples_per_s": "inf"}  # fmt: skip
    assert kept["summary"]["wall_s"] == measured["summary"]["wall_s"]  # everything else as measured
    assert [r["run_id"] for r in store.read()] == [measured["run_id"], "with-infinities", "wall-not-finite"]
    # reports take the first (its figures are there); the one without a wall is kept, named, not reported
    assert [r["run_id"] for r in store.runs()] == [measured["run_id"], "with-infinities"]
    assert any("wall-not-finite" in s and "summary.wall_s was inf" in s for s in store.skipped)


# ------------------------------------------------------------------------------------------------- the store


def test_a_store_linked_to_a_file_outside_its_directory_is_refused_and_that_file_left_as_it_was(
    cli, tiny_data, tmp_path
):
    outside = tmp_path / "elsewhere" / "notes.txt"
    outside.parent.mkdir()
    outside.write_bytes(b"someone's notes\nwith a last line and no newline")
    results = tmp_path / "results"
    results.mkdir()
    (results / "runs.jsonl").symlink_to(outside)
    code, _, err = cli("run", "--data", tiny_data, "--threads", "1", "--precision", "fp32", "--results", results)
    line = _one_line_error(code, err)
    assert "runs.jsonl is a link" in line
    assert outside.read_bytes() == b"someone's notes\nwith a last line and no newline"
    with pytest.raises(Exception, match="is a link"):  # and the store itself refuses too
        ResultsStore(results).append(RunRecord.from_dict(json.loads(Path(_any_record(tmp_path)).read_text())))
    assert outside.read_bytes() == b"someone's notes\nwith a last line and no newline"


def test_a_hard_linked_store_is_refused_and_the_file_it_shares_is_neither_written_nor_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the unsaved record's copy goes
    outside = tmp_path / "notes.txt"
    outside.write_bytes(b"someone's notes\nwith a last line and no newline")  # a torn tail, to the store's eyes
    results = tmp_path / "results"
    results.mkdir()
    os.link(outside, results / "runs.jsonl")
    record = RunRecord.from_dict(json.loads(_any_record(tmp_path).read_text()))
    with pytest.raises(UserError, match="with 2 names"):
        ResultsStore(results).append(record)
    with pytest.raises(UserError, match="with 2 names"):
        ResultsStore(results).read()
    assert outside.read_bytes() == b"someone's notes\nwith a last line and no newline"
    (kept,) = tmp_path.glob(f"cai-bench-unsaved-{record.run_id}-*.jsonl")  # the record is not lost: kept apart,
    assert kept.stat().st_mode & 0o077 == 0 and json.loads(kept.read_text())["run_id"] == record.run_id  # 0600


_SWAPPER = """
import os, sys, time
results, outside, until = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
store, aside, link = (os.path.join(results, n) for n in ("runs.jsonl", "real", "link"))
while time.time() < until:
    os.symlink(outside, link)
    os.rename(store, aside)
    os.rename(link, store)  # runs.jsonl is now a link to the file outside
    os.rename(aside, store)  # and the real store again
"""


def test_swapping_the_store_for_a_link_while_records_are_appended_puts_no_line_outside(tmp_path, monkeypatch):
    """The name is checked by the open itself (O_NOFOLLOW) and the descriptor by fstat, so no swap between a
    check and an open can send a line elsewhere. CAI_BENCH_RACE_S sets how long it races (the issue's minute)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not the store's\n")
    results = tmp_path / "results"
    results.mkdir()
    store = ResultsStore(results)
    record = RunRecord.from_dict(json.loads(_any_record(tmp_path).read_text()))
    store.append(record)
    seconds = float(os.environ.get("CAI_BENCH_RACE_S", "2"))
    swapper = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(results), str(outside), str(seconds)])
    appended = refused = 0
    try:
        while swapper.poll() is None:
            try:
                store.append(record)
                appended += 1
            except UserError:
                refused += 1
    finally:
        swapper.kill()
        swapper.wait()
    assert outside.read_bytes() == b"not the store's\n"
    assert appended > 0 and refused > 0, (appended, refused)  # both happened: the race was run
    # Not every appended line is in the store at the end: in the swapper's gap (no runs.jsonl) an append creates a
    # new store, which its next rename replaces; what is there is whole records
    lines = (results / "runs.jsonl").read_text().splitlines()
    assert 1 < len(lines) <= 1 + appended and {json.loads(line)["run_id"] for line in lines} == {record.run_id}


def test_a_fifo_named_like_the_store_is_one_line_not_a_hang(tmp_path, tiny_data):
    """run, report, results list and plot, each in a process of its own (a hang would be a timeout, not a stuck
    suite), all at once."""
    results = tmp_path / "results"
    results.mkdir()
    os.mkfifo(results / "runs.jsonl")
    commands = [["run", "--threads", "1", "--data", tiny_data], ["report"], ["results", "list"], ["plot"]]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    started = [subprocess.Popen([sys.executable, "-m", "cai_bench", *map(str, [*c, "--results", results])], **pipes)
               for c in commands]  # fmt: skip
    try:
        for command, process in zip(commands, started, strict=True):
            _, err = process.communicate(timeout=120)
            line = _one_line_error(process.returncode, err)
            assert "runs.jsonl is not a regular file" in line, (command, line)
    finally:
        for process in started:
            process.kill()


def _any_record(tmp_path: Path) -> Path:
    path = tmp_path / "record.json"
    path.write_text(json.dumps(hand_record("cpu", 1.0)))
    return path


# ------------------------------------------------------------------------- huge integers and deep nesting


@pytest.mark.parametrize("poison", [HUGE_INT, DEEP], ids=["5000-digit integer", "100000 nested brackets"])
def test_json_with_huge_integers_or_deep_nesting_is_one_line_and_exit_2_wherever_it_is_read(
    cli, poison, measured_store, tiny_data, tmp_path
):
    # A store whose first line holds it (a later line is a good record)
    store = tmp_path / "store"
    store.mkdir()
    (store / "runs.jsonl").write_text('{"a": ' + poison + "}\n" + measured_store.read_text())
    assert "runs.jsonl:1" in _one_line_error(*cli("report", "--results", store)[::2])
    # A data set's manifest
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "manifest.json").write_text('{"schema_version": ' + poison + "}")
    line = _one_line_error(*cli("run", "--data", data, "--threads", "1", "--results", tmp_path / "r")[::2])
    assert "manifest.json" in line
    # An export's export.json
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text('{"kind": ' + poison + "}")
    line = _one_line_error(*cli("run", "--data", tiny_data, "--runtime", "onnxruntime", "--weights", export,
                                "--threads", "1", "--results", tmp_path / "r")[::2])  # fmt: skip
    assert "export.json" in line
    # A price file
    prices = tmp_path / "prices.json"
    prices.write_text('{"request_usd": ' + poison + "}")
    line = _one_line_error(*cli("lambda", "cost", "--invocations", "3", "--seconds-each", "1", "--memory-mb",
                                "1024", "--price-file", prices)[::2])  # fmt: skip
    assert "prices.json" in line
    assert not (tmp_path / "r" / "runs.jsonl").exists()


def test_an_exports_check_that_is_not_a_finite_number_is_refused_before_the_run(cli, tiny_data, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"not read: refused before")
    meta = {"kind": "cai-bench-export", "version": 1, "format": "onnx", "files": ["model.onnx"],
            "check": {"batch": 8, "max_abs_dz": float("inf"), "tolerance": 2e-3}}  # fmt: skip
    from cai_bench.model import export_format

    meta["kind"], meta["version"] = export_format.EXPORT_KIND, export_format.EXPORT_VERSION
    (export / "export.json").write_text(json.dumps(meta))
    code, _, err = cli("run", "--data", tiny_data, "--runtime", "onnxruntime", "--weights", export, "--threads", "1",
                       "--results", tmp_path / "r")  # fmt: skip
    assert "max_abs_dz is inf" in _one_line_error(code, err)
    assert not (tmp_path / "r" / "runs.jsonl").exists()


# -------------------------------------------------------------------------- options checked before the run


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("s3://", "not a valid S3 bucket name"),
        ("s3://Bad..Bucket/x", "not a valid S3 bucket name"),
        ("redis://host/abc", "must be a whole number"),
        ("redis://:pw@host:99999/0", "port"),
        ("direct://[::1]", "direct://[IPV6]:PORT"),
        ("direct://host:0", "port must be a number from 1 to 65535"),
        pytest.param("direct://host:" + "9" * 5000, "port must be a number from 1 to 65535", id="5000-digit port"),
        pytest.param("redis://host:6379/" + "1" * 5000, "must be a whole number", id="5000-digit database"),
        ("tcp://host:1", "a channel is direct://HOST:PORT"),
    ],
)
def test_a_bad_comm_url_is_one_line_before_any_partition_runs(cli, tiny_data, tmp_path, value, says):
    code, out, err = cli("run", "--backend", "hpc", "--workers", "2", "--comm", value, "--data", tiny_data,
                         "--results", tmp_path)  # fmt: skip
    line = _one_line_error(code, err)
    assert says in line, line
    assert "pw" not in line
    assert not (tmp_path / "runs.jsonl").exists() and out == ""


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"request_usd": 2e-7, "gb_second_usd": {"x86_64": 1e308}}, "gb_second_usd.x86_64 is 1e+308"),
        (
            {"request_usd": 2e-7, "gb_second_usd": {"x86_64": 1.6e-5}, "state_transition_usd": "abc"},
            'state_transition_usd is "abc"',
        ),
        ({"request_usd": True, "gb_second_usd": {"x86_64": 1.6e-5}}, "request_usd is true"),
        ({"request_usd": 2e-7, "gb_second_usd": {"x86_64": 1.6e-5}, "as_of": 2024}, "as_of is 2024"),
        (
            {"request_usd": 2e-7, "gb_second_usd": {"x86_64": 1.6e-5}, "as_of": "\x1b]0;pwned\x072024"},
            'as_of is "\\u001b]0;pwned\\u00072024"',
        ),
    ],
)
def test_a_bad_price_file_is_one_line_before_any_partition_runs(cli, tiny_data, tmp_path, table, says, s3, local_s3):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(table))
    code, out, err = cli("run", "--backend", "lambda", "--emulate", "--endpoint-url", local_s3, "--bucket",
                         f"s3://{s3}", "--price-file", prices, "--data", tiny_data, "--results", tmp_path)  # fmt: skip
    assert says in _one_line_error(code, err)
    assert not (tmp_path / "runs.jsonl").exists() and out == ""


# ---------------------------------------------------------------------------------------- secrets in URLs


@pytest.mark.parametrize("password", ["hunter2-s3cret", "Sup3r@S3cretPW"])
def test_a_redis_password_is_used_but_never_printed_nor_stored(cli, tiny_data, tmp_path, redis_url, password):
    """A password that holds "@" is given percent-encoded (as the error for a raw one says), used decoded, and
    hidden whole: no piece of it before or after the "@" is stored or printed."""
    server, port = start_redis("--requirepass", password)
    try:
        url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"
        code, out, err = cli("run", "--backend", "hpc", "--workers", "2", "--threads", "2", "--precision", "fp32",
                             "--comm", url, "--comm-timeout-s", "20", "--data", tiny_data,
                             "--results", tmp_path)  # fmt: skip
        assert code == 0, err
        stored = (tmp_path / "runs.jsonl").read_text()
        (record,) = [json.loads(line) for line in stored.splitlines()]
        assert record["backend_info"]["comm"]["collectives"] == "ok"  # the password was used: Redis let it in
        assert "collectives over redis, 2 rank(s): done" in out + err
        assert [c["url"] for c in record["backend_info"]["comm"]["channels"]] == [f"redis://***@127.0.0.1:{port}/0"]
        assert record["plan"]["backend_options"]["comm"] == f"redis://***@127.0.0.1:{port}/0"
        code, exported, _ = cli("results", "export", "--results", tmp_path, "--json")
        assert code == 0
        # A wrong one: the error says so, without the password it was given
        code, out2, err2 = cli("run", "--backend", "hpc", "--workers", "2", "--threads", "2", "--precision", "fp32",
                               "--comm", f"redis://:wrong-pass@127.0.0.1:{port}/0", "--comm-timeout-s", "5", "--data",
                               tiny_data, "--results", tmp_path)  # fmt: skip
        assert code == 0, err2  # the units were measured: the run stands on their own results
        failed = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])["backend_info"]["comm"]
        assert failed["collectives"] == "failed"
        assert "WRONGPASS" in json.dumps(failed) or "AuthenticationError" in json.dumps(failed), failed
        everything = stored + out + err + exported + out2 + err2 + (tmp_path / "runs.jsonl").read_text()
        pieces = [password, quote(password, safe=""), *password.split("@"), "wrong-pass"]
        assert not [piece for piece in pieces if piece in everything]
        assert "Traceback" not in err + err2
    finally:
        server.kill()
        server.wait()


def test_a_raw_at_in_a_redis_password_is_one_line_that_shows_no_piece_of_it(cli, tiny_data, tmp_path):
    code, out, err = cli("run", "--backend", "hpc", "--comm", "redis://:Sup3r@S3cretPW@127.0.0.1:6593/0", "--data",
                         tiny_data, "--results", tmp_path)  # fmt: skip
    line = _one_line_error(code, err)
    assert "percent-encode it (@ as %40" in line and "redis://***@127.0.0.1:6593/0" in line, line
    assert "Sup3r" not in out + err and "S3cretPW" not in out + err


def test_redact_hides_the_whole_user_and_password_of_every_url_in_a_text():
    assert redact("redis://:Sup3r@S3cretPW@127.0.0.1:6593/0") == "redis://***@127.0.0.1:6593/0"
    assert redact("--comm 'redis://:pa/ss@h:1/0': x") == "--comm 'redis://***@h:1/0': x"  # "/" in it, not encoded
    assert (
        redact("a redis://u:p@h/0 and s3://bucket/key, direct://h:1")
        == "a redis://***@h/0 and s3://bucket/key, direct://h:1"
    )


def test_a_killed_redis_fails_the_collectives_in_the_record_and_nothing_else(tiny_data, tmp_path, redis_url):
    """The units are measured, the record says which ranks could not finish their collectives and why, and no
    stream of the command or its worker processes (one process tree, its own stdout and stderr) carries a
    traceback."""
    server, port = start_redis()
    server.kill()
    server.wait()
    done = subprocess.run([sys.executable, "-m", "cai_bench", "run", "--backend", "hpc", "--workers", "2", "--threads",
                           "2", "--precision", "fp32", "--comm", f"redis://127.0.0.1:{port}/0", "--comm-timeout-s",
                           "3", "--data", str(tiny_data), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["summary"]["partitions"] == 4  # every unit measured and kept
    comm_record = record["backend_info"]["comm"]
    assert comm_record["collectives"] == "failed" and [f["rank"] for f in comm_record["failed_ranks"]] == [0, 1]
    assert all("cannot reach Redis" in f["error"] and "ConnectionError" in f["error"]
               for f in comm_record["failed_ranks"])  # fmt: skip
    assert "collectives over redis, 2 rank(s): FAILED (rank 0:" in done.stderr + done.stdout
    assert "Traceback" not in done.stdout + done.stderr


# ----------------------------------------------------------------------------------- the emulator's requests


def _raw_request(port: int, head: str, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_the_emulator_answers_bad_or_huge_lengths_with_an_error_and_goes_on_serving(capfd):
    from cai_bench.backends.aws_lambda.emulator import Emulator
    from cai_bench.backends.aws_lambda.environments import FunctionConfig

    emulator = Emulator(FunctionConfig(name="f", memory_mb=512, timeout_s=5), concurrency=1)
    port = int(emulator.serve().rsplit(":", 1)[1])
    try:
        path = "/2015-03-31/functions/f/invocations"
        huge = _raw_request(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n", b"{}")
        assert huge.startswith(b"HTTP/1.0 413") or huge.startswith(b"HTTP/1.1 413"), huge[:80]
        negative = _raw_request(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", b"{}")
        assert b" 400 " in negative.split(b"\r\n")[0], negative[:80]
        digits = _raw_request(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {HUGE_INT}\r\n\r\n")
        assert b" 400 " in digits.split(b"\r\n")[0], digits[:80]
        deep = DEEP.encode()
        nested = _raw_request(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(deep)}\r\n\r\n", deep)
        assert b" 400 " in nested.split(b"\r\n")[0] and b"Could not parse" in nested, nested[:200]
    finally:
        emulator.stop()
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------------- the rendezvous server


def test_the_rendezvous_server_answers_bad_requests_with_an_error_and_never_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "cai_bench", "comm", "rendezvous", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        requests = [
            {"op": "register", "run": "r", "key": "k", "rank": 0, "world": [2]},
            {"op": "register", "run": "r", "key": "k", "rank": [0], "world": 2},
            {"op": "register", "run": "r", "key": "k", "rank": "0", "world": 2},
            {"op": "register", "run": ["r"], "key": "k", "rank": 0, "world": 2},
            {"op": "register", "run": "r", "key": {"k": 1}, "rank": 0, "world": 2},
            {"op": "register", "run": "r", "key": "k", "rank": 0, "world": 10**30},
            {"op": "peers", "run": "r", "key": "k", "timeout": "forever"},
            {"op": "peers", "run": "r", "key": "k", "timeout": -1},
            [1, 2, 3],
            "register",
        ]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            for request in requests:
                sock.sendall(json.dumps(request).encode() + b"\n")
                answer = json.loads(reader.readline())
                assert set(answer) == {"error"}, (request, answer)
            # A client-chosen wait is capped, and a real request still works on the same connection
            sock.sendall(
                json.dumps({"op": "register", "run": "r2", "key": "k", "rank": 0, "world": 1}).encode() + b"\n"
            )
            assert "address" in json.loads(reader.readline())
            started = time.monotonic()
            sock.sendall(json.dumps({"op": "peers", "run": "r2", "key": "k", "timeout": 1e9}).encode() + b"\n")
            assert "peers" in json.loads(reader.readline()) and time.monotonic() - started < 5
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err, err


def test_the_rendezvous_server_caps_what_a_client_waits_for():
    from cai_bench.comm import rendezvous

    assert rendezvous._wait_s({"timeout": 1e12}) == rendezvous.MAX_WAIT_S
    assert rendezvous._wait_s({"timeout": float("nan")}) is None
    assert rendezvous._wait_s({"timeout": True}) is None


# --------------------------------------------------------------------------------------- --endpoint-url


def test_endpoint_url_carries_the_data_requests_of_an_emulated_run_too(cli, tiny_data, tmp_path, s3, local_s3,
                                                                        no_credentials):  # fmt: skip
    """No AWS configuration at all: every S3 request (the manifest and partitions included) must go to the
    loopback endpoint, or the run fails for want of credentials or region."""
    from cai_bench.core import aws
    from cai_bench.data.upload import upload_dataset

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(aws.S3_ENDPOINT_ENV, local_s3)
        patch.setenv(aws.EMULATED_ENV, "1")
        aws.client.cache_clear()
        upload_dataset(tiny_data, f"s3://{s3}/data")
    aws.client.cache_clear()
    code, out, err = cli("run", "--backend", "lambda", "--emulate", "--endpoint-url", local_s3, "--bucket",
                         f"s3://{s3}", "--data", f"s3://{s3}/data", "--max-concurrency", "1", "--memory-mb", "3008",
                         "--precision", "fp32", "--results", tmp_path)  # fmt: skip
    assert code == 0, err
    assert "4 partition" in out or "record(s) appended" in out
    (record,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert record["plan"]["data"]["partitions"] == 4 and record["summary"]["partitions"] == 4
