"""``cai-bench data upload``: a local data set copied to ``s3://bucket/prefix``, parallel, multipart and checked.

The manifest is written last, so a prefix with a manifest is always a whole data set, as a directory is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cai_bench.core import aws
from cai_bench.core.errors import UserError
from cai_bench.core.files import file_sha256
from cai_bench.data.manifest import load_manifest
from cai_bench.data.s3 import S3Prefix
from cai_bench.data.storage import MANIFEST

SHA256_METADATA = "sha256"  # x-amz-meta-sha256: what a rerun of upload compares to skip an identical object
MULTIPART_MB = 8  # parts of this size above this size, as the AWS CLI does


@dataclass
class UploadReport:
    location: str
    uploaded: list[str]
    skipped: list[str]  # already there, the same bytes (a rerun resumes)
    bytes_uploaded: int
    seconds: float


def upload_dataset(
    directory: str | Path,
    url: str,
    jobs: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> UploadReport:
    """Copy a local data set to ``url``: the partitions in parallel (multipart above 8 MB, each part's SHA-256
    checked by S3 as it arrives), then the manifest. An object already there with the same size and SHA-256
    (its ``x-amz-meta-sha256``) is skipped, so a rerun after an interruption sends only what is missing."""
    from boto3.s3.transfer import TransferConfig  # boto3 only where S3 is used: the [aws] extra

    started = time.perf_counter()
    directory = Path(directory)
    manifest = load_manifest(directory)  # a whole, valid data set or one clear error, before any upload
    target = S3Prefix.parse(url)
    target.check()
    there = target.objects()
    files = [(e.file, e.bytes, e.sha256) for e in manifest.partitions]
    if manifest.objects:  # the ids, ra and dec a catalogue joins back by position
        files.append((manifest.objects.file, manifest.objects.bytes, manifest.objects.sha256))
    files.append((MANIFEST, (directory / MANIFEST).stat().st_size, file_sha256(directory / MANIFEST)))
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


def upload(directory: str | Path, destination: str, endpoint_url: str | None = None, jobs: int = 8,
           progress: Callable[[int, int], None] | None = None) -> UploadReport:  # fmt: skip
    """``cai-bench data upload``: ``destination`` checked, this process pointed at ``endpoint_url`` (an
    S3-compatible store) where one is given, then ``upload_dataset``."""
    aws.parse_s3_url(destination)
    aws.use_endpoints(endpoint_url, emulated=False)
    return upload_dataset(directory, destination, jobs=jobs, progress=progress)
