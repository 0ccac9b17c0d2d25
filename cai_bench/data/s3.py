"""Data sets in S3 (``s3://bucket/prefix``): the storage interface over boto3, and ``data upload``.

A data set in S3 is laid out as on disk: the partitions and ``manifest.json`` side by side under one prefix.
Every listing pages through ``list_objects_v2`` (a prefix holds as many objects as it holds, not 1,000).
Upload writes the manifest last, so a prefix with a manifest is always a whole data set, as a directory is.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cai_bench import aws
from cai_bench.data.storage import MANIFEST
from cai_bench.errors import UserError

SHA256_METADATA = "sha256"  # x-amz-meta-sha256: what a rerun of upload compares to skip an identical object
MULTIPART_MB = 8  # parts of this size above this size, as the AWS CLI does


@dataclass(frozen=True)
class S3Prefix:
    """A data set (or a run's results) under ``s3://bucket/prefix``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Prefix:
        return cls(*aws.parse_s3_url(url))

    @property
    def location(self) -> str:
        return aws.s3_url(self.bucket, self.prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check(self) -> None:
        with aws.one_line_errors(f"{self.location}: cannot open the bucket"):
            aws.s3_client().head_bucket(Bucket=self.bucket)

    def names(self) -> list[str]:
        return sorted(self.objects())

    def objects(self) -> dict[str, dict]:
        """Every object directly under the prefix: name -> its listing entry (Size, ETag), all pages of it."""
        start = self.key("")
        out = {}
        with aws.one_line_errors(f"{self.location}: cannot list"):
            pages = (
                aws.s3_client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.bucket, Prefix=start, Delimiter="/")
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    out[entry["Key"][len(start) :]] = entry
        return out

    def where(self, name: str) -> str:
        return aws.s3_url(self.bucket, self.key(name))

    def head(self, name: str) -> dict | None:
        try:
            return aws.s3_client().head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as exc:
            if aws.error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            with aws.one_line_errors(f"{self.where(name)}: cannot read"):
                raise

    def size(self, name: str) -> int | None:
        found = self.head(name)
        return None if found is None else int(found["ContentLength"])

    def read(self, name: str) -> bytes:
        with aws.one_line_errors(f"{self.where(name)}: cannot read"):
            return aws.s3_client().get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()

    def read_head(self, name: str, limit: int) -> bytes:
        with aws.one_line_errors(f"{self.where(name)}: cannot read"):
            reply = aws.s3_client().get_object(Bucket=self.bucket, Key=self.key(name), Range=f"bytes=0-{limit - 1}")
            return reply["Body"].read()

    def leads_outside(self, name: str) -> bool:
        return False  # S3 has no links: a key names exactly one object

    def write(self, name: str, data: bytes) -> None:
        """One object, replaced whole where it exists (a retried unit overwrites its own result)."""
        with aws.one_line_errors(f"{self.where(name)}: cannot write"):
            aws.s3_client().put_object(Bucket=self.bucket, Key=self.key(name), Body=data)


@dataclass
class UploadReport:
    location: str
    uploaded: list[str]
    skipped: list[str]  # already there, the same bytes (a rerun resumes)
    bytes_uploaded: int
    seconds: float


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload_dataset(
    directory: str | Path,
    url: str,
    jobs: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> UploadReport:
    """Copy a local data set to ``url``: the partitions in parallel (multipart above 8 MB, each part's SHA-256
    checked by S3 as it arrives), then the manifest. An object already there with the same size and SHA-256
    (its ``x-amz-meta-sha256``) is skipped, so a rerun after an interruption sends only what is missing."""
    from boto3.s3.transfer import TransferConfig

    from cai_bench.data.partitions import load_manifest

    started = time.perf_counter()
    directory = Path(directory)
    manifest = load_manifest(directory)  # a whole, valid data set or one clear error, before any upload
    target = S3Prefix.parse(url)
    target.check()
    there = target.objects()
    files = [(e.file, e.bytes, e.sha256) for e in manifest.partitions]
    files.append((MANIFEST, (directory / MANIFEST).stat().st_size, _sha256(directory / MANIFEST)))
    config = TransferConfig(multipart_threshold=MULTIPART_MB << 20, multipart_chunksize=MULTIPART_MB << 20,
                            max_concurrency=4)  # fmt: skip
    s3 = aws.s3_client()

    def same(name: str, size: int, sha: str) -> bool:
        if name not in there or int(there[name]["Size"]) != size:
            return False
        found = target.head(name)
        return found is not None and found.get("Metadata", {}).get(SHA256_METADATA) == sha

    def send(name: str, size: int, sha: str) -> bool:
        if same(name, size, sha):
            return False
        with aws.one_line_errors(f"{target.where(name)}: upload failed"):
            extra = {"Metadata": {SHA256_METADATA: sha}, "ChecksumAlgorithm": "SHA256"}
            s3.upload_file(str(directory / name), target.bucket, target.key(name), ExtraArgs=extra, Config=config)
            landed = target.head(name)
        if landed is None or int(landed["ContentLength"]) != size:
            raise UserError(f"{target.where(name)}: upload landed with a different size; run data upload again")
        return True

    uploaded, skipped, done_bytes = [], [], 0
    total = sum(size for _, size, _ in files)
    *partitions, manifest_file = files
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="cai-upload") as pool:
        for (name, size, _), sent in zip(partitions, pool.map(lambda f: send(*f), partitions), strict=True):
            (uploaded if sent else skipped).append(name)
            done_bytes += size
            if progress:
                progress(done_bytes, total)
    (uploaded if send(*manifest_file) else skipped).append(MANIFEST)
    sent_bytes = sum(size for name, size, _ in files if name in uploaded)
    return UploadReport(target.location, uploaded, skipped, sent_bytes, time.perf_counter() - started)
