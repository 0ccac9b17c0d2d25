"""S3 storage and ``data upload`` against a real S3 HTTP endpoint: moto's server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai_bench.core import aws
from cai_bench.core.errors import UserError
from cai_bench.data.partitions import open_dataset, read_partition, synthesize, verify_dataset
from cai_bench.data.s3 import S3Prefix
from cai_bench.data.storage import split_ref, storage_for
from cai_bench.data.upload import upload_dataset


def test_a_data_set_uploaded_reads_back_the_same_through_the_storage_interface(s3, tiny_data):
    done = upload_dataset(tiny_data, f"s3://{s3}/sets/tiny")
    local_files = sorted(p.name for p in tiny_data.iterdir())
    assert sorted(done.uploaded) == local_files and done.skipped == []
    assert done.uploaded[-1] == "manifest.json"  # last: a prefix with a manifest holds a whole data set

    storage = storage_for(f"s3://{s3}/sets/tiny")
    assert storage.location == f"s3://{s3}/sets/tiny" and storage.names() == local_files
    _, summary, refs = open_dataset(f"s3:/{s3}/sets/tiny")  # as a Path folds the URL
    assert summary.path == f"s3://{s3}/sets/tiny"
    _, _, local_refs = open_dataset(tiny_data)
    for ref, local in zip(refs, local_refs, strict=True):
        assert ref.path == f"s3://{s3}/sets/tiny/{Path(local.path).name}" and ref.sha256 == local.sha256
        located, name = split_ref(ref.path)
        assert located.read(name) == Path(local.path).read_bytes()
        assert located.read_head(name, 8) == Path(local.path).read_bytes()[:8]
        assert bool((read_partition(ref).images == read_partition(local).images).all())
    assert verify_dataset(f"s3://{s3}/sets/tiny")[1] == []
    assert storage.size("no-such-object") is None


def test_a_rerun_sends_only_what_is_missing_or_changed(s3, tiny_data):
    target = f"s3://{s3}/resume"
    upload_dataset(tiny_data, target)
    prefix = S3Prefix.parse(target)
    first, second = sorted(p.name for p in tiny_data.glob("*.safetensors"))[:2]
    aws.s3_client().delete_object(Bucket=s3, Key=prefix.key(first))
    prefix.write(second, b"same size? no: replaced by something else")
    again = upload_dataset(tiny_data, target)
    assert sorted(again.uploaded) == sorted([first, second])
    assert len(again.skipped) == len(list(tiny_data.iterdir())) - 2
    assert verify_dataset(target)[1] == []


def test_large_partitions_go_up_in_parts_and_arrive_whole(s3, tmp_path):
    data = tmp_path / "big"
    synthesize(data, 0.019, 10.0, seed=1)  # 2 partitions of 9.7 MB: above the 8 MB multipart threshold
    upload_dataset(data, f"s3://{s3}/big", jobs=2)
    prefix = S3Prefix.parse(f"s3://{s3}/big")
    _, _, refs = open_dataset(f"s3://{s3}/big")
    head = prefix.head(Path(refs[0].path).name)
    assert "-" in head["ETag"]  # a multipart object's ETag is "<md5 of the parts' md5s>-<parts>"
    assert verify_dataset(f"s3://{s3}/big")[1] == []


def test_listing_pages_past_a_thousand_objects(s3):
    prefix = S3Prefix(s3, "many")
    client = aws.s3_client()
    for n in range(1005):
        client.put_object(Bucket=s3, Key=prefix.key(f"object-{n:04d}"), Body=b"x")
    client.put_object(Bucket=s3, Key=prefix.key("deeper/not-a-child"), Body=b"x")
    names = prefix.names()
    assert len(names) == 1005 and names[0] == "object-0000" and names[-1] == "object-1004"


def test_s3_mistakes_are_one_line_each(s3, tiny_data, cli):
    with pytest.raises(UserError, match="not a valid S3 bucket name"):
        storage_for("s3://Not_A_Bucket/x")
    with pytest.raises(UserError, match=r"not a usable S3 key prefix"):
        storage_for(f"s3://{s3}/a/../b")
    code, _, err = cli("data", "info", f"s3://{s3}/nothing-here")
    assert code == 2 and err.startswith("error: s3://") and "manifest not found" in err and err.count("\n") == 1
    code, _, err = cli("data", "info", "s3://no-such-bucket-here/x")
    assert code == 2 and "cannot open the bucket" in err and err.count("\n") == 1
    code, _, err = cli("data", "upload", str(tiny_data), "not-s3/x")
    assert code == 2 and "not an S3 location" in err


def test_data_upload_on_the_command_line(s3, tiny_data, cli, monkeypatch, local_s3):
    monkeypatch.delenv(aws.S3_ENDPOINT_ENV)
    code, out, err = cli("data", "upload", str(tiny_data), f"s3://{s3}/cli", "--endpoint-url", local_s3, "-q")
    assert code == 0, err
    assert f"s3://{s3}/cli: {len(list(tiny_data.iterdir()))} object(s) uploaded" in out
    code, out, _ = cli("data", "upload", str(tiny_data), f"s3://{s3}/cli", "--endpoint-url", local_s3, "-q")
    assert code == 0 and "0 object(s) uploaded" in out
    code, out, _ = cli("data", "info", f"s3://{s3}/cli")
    assert code == 0 and "dataset id" in out


def test_no_credentials_is_one_line_and_exit_2(no_credentials, tiny_data, cli):
    code, _, err = cli("data", "upload", str(tiny_data), "s3://some-bucket/x")
    assert code == 2 and err.startswith("error: no AWS credentials found") and err.count("\n") == 1
    code, _, err = cli("run", "--backend", "lambda", "--data", "s3://some-bucket/x", "--region", "eu-west-1")
    assert code == 2 and err.startswith("error: no AWS credentials found")


def test_no_region_for_lambda_is_one_line(no_credentials, monkeypatch, cli, tiny_data):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE12")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIEXAMPLESECRETKEY0000000000")
    code, _, err = cli("run", "--backend", "lambda", "--data", str(tiny_data), "--bucket", "s3://b-u-c/x")
    assert code == 2 and err.startswith("error: no AWS region set for lambda")
    assert "wJalrXUtnFEMI" not in err and "AKIAEXAMPLE" not in err
