"""What the functions read, put in S3 by the driver before its clock starts: the data set (uploaded once, its
identical objects skipped), the weights or the model export (named by their content, so sent once), and the
bucket itself where an emulated run needs one."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

from cai_bench.core import aws
from cai_bench.core.errors import UserError
from cai_bench.core.plan import PartitionRef, Plan
from cai_bench.data.s3 import S3Prefix
from cai_bench.data.upload import upload_dataset
from cai_bench.model.export_format import EXPORT_META, read_export


def stage(refs: tuple[PartitionRef, ...], plan: Plan, target: str | None) -> tuple[tuple[PartitionRef, ...], str,
                                                                                   float]:  # fmt: skip
    """Partitions in S3 for the functions to read: ``refs`` themselves when they are there, else the local data
    set uploaded (once: identical objects are skipped) under ``target``/datasets/<dataset id>. Returns the refs,
    the S3 prefix that holds them, and the seconds the upload took."""
    if all(r.path.startswith("s3://") for r in refs):
        return refs, refs[0].path.rsplit("/", 1)[0], 0.0
    if target is None:
        raise UserError("local data needs --bucket s3://bucket/prefix to be staged in S3 for Lambda")
    base = S3Prefix.parse(target)
    destination = S3Prefix(base.bucket, base.key(f"datasets/{plan.data.dataset_id}"))
    started = time.perf_counter()
    upload_dataset(plan.data.path, destination.location)
    staged = tuple(replace(r, path=destination.where(r.path.replace("\\", "/").rsplit("/", 1)[-1])) for r in refs)
    return staged, destination.location, time.perf_counter() - started


def _put_once(folder: S3Prefix, name: str, data: bytes) -> str:
    """``data`` at ``name``, written unless an object of the same bytes is there: one of the same size is read
    back and compared by digest (a bucket others may write to can hold anything under a name we chose), and a
    different one is refused, naming it. The sha256, for the handler to check what it fetches."""
    digest = hashlib.sha256(data).hexdigest()
    if folder.size(name) == len(data):
        found = hashlib.sha256(folder.read(name)).hexdigest()
        if found == digest:
            return digest
        raise UserError(f"{folder.where(name)}: the object there is not what cai-bench staged (sha256 {found[:16]}..., "
                        f"expected {digest[:16]}...): someone else wrote it; delete it, or stage under another "
                        "--bucket prefix")  # fmt: skip
    folder.write(name, data)
    return digest


def stage_weights(weights: str | None, target: str) -> tuple[str | None, dict[str, str]]:
    """Weights where a function can read them: an s3:// key as given; a local file copied (once: it is named by
    its sha256) to ``target``/weights/. With {object name: sha256} of what was staged."""
    if not weights or weights.startswith("s3:/"):
        return weights, {}
    path = Path(weights)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{weights}: cannot read the weights ({exc.strerror})") from None
    base = S3Prefix.parse(target)
    folder = S3Prefix(base.bucket, base.key("weights"))
    name = f"{hashlib.sha256(data).hexdigest()[:16]}-{path.name}"
    return folder.where(name), {name: _put_once(folder, name, data)}


def stage_export(directory: str, target: str) -> tuple[str, dict[str, str]]:
    """An export where a function can read it: its files copied (once: the folder is named by the export's
    metadata, which names the weights and the check) to ``target``/weights/export-<sha>/. With {object name:
    sha256} of every file staged."""
    export = read_export(directory)
    meta = (Path(directory) / EXPORT_META).read_bytes()
    base = S3Prefix.parse(target)
    folder = S3Prefix(base.bucket, base.key(f"weights/export-{hashlib.sha256(meta).hexdigest()[:16]}"))
    digests = {name: _put_once(folder, name, (Path(directory) / name).read_bytes()) for name in export.files}
    digests[EXPORT_META] = _put_once(folder, EXPORT_META, meta)  # last: the handler reads the files it names
    return folder.location, digests


def create_bucket(url: str) -> None:
    """The bucket of ``url``, made where it is missing (an emulated run's local S3 starts empty)."""
    bucket = S3Prefix.parse(url).bucket
    with aws.one_line_errors(f"s3://{bucket}: cannot create the bucket"):
        client = aws.s3_client()
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as exc:
            if aws.error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=bucket)
