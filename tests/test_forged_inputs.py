"""What a Lambda run's functions are given is what its driver sent: staged weights replaced in the bucket and a
Step Functions items file rewritten as it appeared each stop the run with one line naming the object, and no
record of the run says ok."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_lambda import lambda_plan

from cai_bench.backends.aws_lambda import staging
from cai_bench.backends.aws_lambda.driver import run_lambda
from cai_bench.core.errors import UserError
from cai_bench.data.s3 import S3Prefix


def _records(results) -> list[dict]:
    path = results / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _lambda_run(tiny_data, bucket: str, local_s3: str, weights, results) -> list[str]:
    return ["run", "--backend", "lambda", "--emulate", "--endpoint-url", local_s3, "--bucket", f"s3://{bucket}",
            "--max-concurrency", "2", "--memory-mb", "3008", "--precision", "fp32", "--weights", weights, "--data",
            tiny_data, "--results", results]  # fmt: skip


def test_weights_planted_under_the_staged_name_before_the_run_are_refused_naming_the_object(
    cli, tiny_data, s3, local_s3, weights_file, tmp_path
):
    """The staged object is named by the weights' digest; one of the same size there is no longer taken as ours."""
    data = weights_file.read_bytes()
    name = f"{hashlib.sha256(data).hexdigest()[:16]}-{weights_file.name}"
    S3Prefix(s3, "weights").write(name, bytes(len(data)))  # the attacker's, of the same size
    code, _, err = cli(*_lambda_run(tiny_data, s3, local_s3, weights_file, tmp_path))
    assert code == 2 and len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
    assert f"s3://{s3}/weights/{name}: the object there is not what cai-bench staged" in err
    assert not [r for r in _records(tmp_path) if r["status"] == "ok"]


def test_weights_replaced_after_staging_are_refused_by_the_function_that_fetches_them(
    cli, tiny_data, s3, local_s3, weights_file, tmp_path, monkeypatch
):
    """Replaced between the driver's staging and the functions' cold starts: each function checks what it fetched
    against the digest in its sealed event, and the run stops at the first refusal (a retry would fetch the same)."""
    put_once = staging._put_once

    def then_replaced(folder, name, data):
        digest = put_once(folder, name, data)
        folder.write(name, bytes(len(data)))
        return digest

    monkeypatch.setattr(staging, "_put_once", then_replaced)
    code, _, err = cli(*_lambda_run(tiny_data, s3, local_s3, weights_file, tmp_path))
    assert code == 2 and len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
    assert f"s3://{s3}/weights/" in err and "the object was replaced in the bucket; nothing was run with it" in err
    assert not [r for r in _records(tmp_path) if r["status"] == "ok"]  # (nothing was measured: no record)


def test_a_rewritten_items_file_stops_the_run_naming_it(tiny_data, s3, local_s3, monkeypatch):
    """The attack: items-1.json rewritten as it appeared, every item's units pointed at partition 0 (their seals
    kept). Each item's seal covers its units, so the handler refuses it; the driver stops, naming the file."""
    write = S3Prefix.write

    def rewritten(self, name, data, metadata=None):
        write(self, name, data, metadata)
        if name.startswith("items-"):
            items = json.loads(data)
            groups = [item["units"] if isinstance(item, dict) else item for item in items]  # (before seals: lists)
            first = groups[0][0]["ref"]
            for units in groups:
                for unit in units:
                    unit["ref"] = first
            write(self, name, json.dumps(items).encode(), metadata)

    monkeypatch.setattr(S3Prefix, "write", rewritten)
    plan = lambda_plan(tiny_data, s3, local_s3, orchestrator="stepfunctions", max_concurrency=4)
    plan.backend_options.pop("endpoint_url")  # Step Functions emulated: its own local S3
    emitted = []
    with pytest.raises(UserError, match=r"s3://\S+/items-1\.json: the item of units \[\d+\] fails its seal"):
        run_lambda(plan, emitted.append, mode="no-model")
    assert all(r.record.partition == 0 for r in emitted)  # the one item left as it was, if any
