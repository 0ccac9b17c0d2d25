"""The Lambda backend's parts that need no service: REPORT lines, prices, backoff, options."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from cai_bench.backends.aws_lambda import pricing
from cai_bench.backends.aws_lambda.environments import vcpus_for
from cai_bench.backends.aws_lambda.invoke import BACKOFF_CAP_S, Invocation, backoff_s
from cai_bench.backends.aws_lambda.report_log import (
    Report,
    format_report,
    parse_report,
    parse_reports,
    report_from_tail,
)
from cai_bench.core.errors import UserError

EXCERPT = Path(__file__).parent / "data" / "lambda-log-excerpt.txt"


def test_every_report_line_of_the_real_log_excerpt_is_read():
    text = EXCERPT.read_text()
    reports = parse_reports(text)
    assert len(reports) == text.count("REPORT RequestId") == 9
    first = reports[0]
    assert first == Report("adbca9aa-fe3a-4fd6-b4e7-5e7b46ae71f1", 40243.33, 40908, 10240, 5948, 663.81)
    assert first.cold_start and not any(r.cold_start for r in reports[1:])
    assert [r.max_memory_used_mb for r in reports[1:3]] == [5948, 5998]
    assert reports[1].billed_duration_ms == 33677  # a warm invocation's: Duration rounded up to the millisecond
    assert all(r.memory_size_mb == 10240 for r in reports)


def test_what_the_emulator_writes_reads_back_the_same():
    for report in (Report("id-1", 12.5, 13, 512, 100), Report("id-2", 1000.0, 1301, 10240, 900, 300.25)):
        line = format_report(report)
        assert "\t" in line and parse_report(line) == report
        tail = base64.b64encode(f"START RequestId: x\nsome log\n{line}\n".encode()).decode()
        assert report_from_tail(tail) == report
    assert parse_report("REPORT RequestId: abc\tDuration: 1.0 ms") is None  # fields missing: not a REPORT
    assert report_from_tail(None) is None and report_from_tail("%%%not base64") is None


def test_the_paper_estimate_for_25_mb_partitions_is_16_cents():
    # 517 requests of 6.55 s at 2.8 GB (the paper's estimate for 12.6 GB in 25 MB partitions)
    estimate = pricing.estimate(517, 6.55, 2.8)
    assert round(estimate.usd, 2) == 0.16
    assert estimate.requests == 517 and estimate.billed_gb_s == pytest.approx(517 * 6.55 * 2.8)
    arm = pricing.estimate(517, 6.55, 2.8, "arm64")
    assert arm.usd < estimate.usd and arm.request_usd == estimate.request_usd


def test_cost_is_billed_milliseconds_times_memory_plus_requests():
    spent = pricing.cost([1000, 2000], 2048)  # 3 s at 2 GB = 6 GB-s
    assert spent.billed_gb_s == pytest.approx(6.0)
    assert spent.usd == pytest.approx(6.0 * 0.0000166667 + 2 * 0.2e-6)
    with pytest.raises(UserError, match="no Lambda price for architecture 'sparc'"):
        pricing.cost([1], 128, "sparc")


def test_a_price_file_replaces_the_table_and_a_bad_one_is_refused(tmp_path):
    good = tmp_path / "prices.json"
    good.write_text(json.dumps({"as_of": "2031-01", "request_usd": 0.0, "gb_second_usd": {"x86_64": 1.0}}))
    prices = pricing.load_prices(good)
    assert pricing.cost([1000], 1024, prices=prices).usd == pytest.approx(1.0)
    assert pricing.cost([1000], 1024, prices=prices).prices_as_of == "2031-01"
    bad = tmp_path / "bad.json"
    for text in ("{", json.dumps({"request_usd": -1, "gb_second_usd": {"x86_64": 1}}), json.dumps([1])):
        bad.write_text(text)
        with pytest.raises(UserError, match="price file"):
            pricing.load_prices(bad)


def test_backoff_grows_and_stays_within_its_cap():
    rng = random.Random(1)
    for attempt in range(12):
        values = [backoff_s(attempt, rng) for _ in range(50)]
        assert all(0 <= v <= min(BACKOFF_CAP_S, 0.1 * 2**attempt) for v in values)
    assert max(backoff_s(6, rng) for _ in range(50)) > max(backoff_s(0, rng) for _ in range(50))


def test_driver_overhead_is_what_the_function_did_not_spend():
    report = Report("r", 1500.0, 1800, 1024, 100, 250.0).to_dict()
    assert Invocation("r", "invoker-1", [0], 0.0, 2.0, report=report).overhead_s == pytest.approx(0.25)
    assert Invocation("r", "invoker-1", [0], 0.0, 2.0).overhead_s is None


def test_cpu_share_follows_memory_as_lambda_allots_vcpus():
    assert [vcpus_for(m) for m in (128, 1769, 1770, 3538, 3539, 10240)] == [1, 1, 2, 2, 3, 6]


def test_lambda_options_are_checked_before_anything_runs(cli):
    code, _, err = cli("run", "--backend", "lambda", "--gb", "0.002", "--timeout-s", "3")
    assert code == 2 and "--timeout-s sets the emulated function's timeout: add --emulate" in err
    code, _, err = cli("run", "--backend", "lambda", "--emulate", "--function", "bad name!")
    assert code == 2 and "not a valid Lambda function name" in err
    code, _, err = cli("run", "--backend", "lambda", "--emulate", "--bucket", "s3://UPPER/x")
    assert code == 2 and "not a valid S3 bucket name" in err
    code, _, err = cli("run", "--backend", "lambda", "--emulate", "--max-concurrency", "0")
    assert code == 2 and "--max-concurrency must be at least 1" in err
    code, _, err = cli("run", "--backend", "cpu", "--emulate")
    assert code == 2 and "--emulate: not an option of --backend cpu" in err


def test_lambda_cost_of_per_function_records_and_of_a_log(cli, tmp_path):
    records = tmp_path / "workers.json"
    records.write_text(json.dumps([{"total_cpu_time (seconds)": 1.0}, {"total_cpu_time (seconds)": 2.0005}]))
    code, out, _ = cli("lambda", "cost", "--workers", str(records), "--memory-mb", "1024")
    # 1000 ms + 2001 ms at 1 GB
    assert code == 0 and "2 invocations, 3.00 billed s at 1,024 MB = 3.0 GB-s" in out
    assert f"${3.001 * 0.0000166667 + 2 * 0.2e-6:.4f}" in out
    code, out, _ = cli("lambda", "cost", "--log", str(EXCERPT))
    assert code == 0 and "9 invocations" in out and "10,240 MB" in out
    code, _, err = cli("lambda", "cost", "--workers", str(records))
    assert code == 2 and "--memory-mb" in err
    records.write_text("[{}]")
    code, _, err = cli("lambda", "cost", "--workers", str(records), "--memory-mb", "1024")
    assert code == 2 and "total_cpu_time (seconds)" in err


def test_lambda_cost_before_a_run_from_invocations_of_so_long_each(cli):
    # The paper's 25 MB estimate: 517 invocations of 6.55 s at 2.8 GB (2,867 MB)
    code, out, _ = cli("lambda", "cost", "--invocations", "517", "--seconds-each", "6.55", "--memory-mb", "2867")
    assert code == 0 and "517 invocations, 3,386.35 billed s at 2,867 MB" in out and "= $0.1581" in out
    code, out, _ = cli("lambda", "cost", "--invocations", "4", "--seconds-each", "1", "--memory-mb", "1024",
                       "--transitions", "5")  # fmt: skip
    # 4 GB-s, 4 requests, 5 transitions at $0.025 per 1,000
    assert code == 0 and f"= ${4 * 0.0000166667 + 4 * 0.2e-6 + 5 * 0.000025:.4f}" in out
    assert "$0.000125 for 5 state transitions" in out
    code, _, err = cli("lambda", "cost", "--invocations", "4")
    assert code == 2 and "--seconds-each and --memory-mb" in err
    code, _, err = cli("lambda", "cost", "--invocations", "4", "--log", "x.log")
    assert code == 2 and "give one of" in err
