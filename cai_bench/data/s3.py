"""Data sets in S3 (``s3://bucket/prefix``): the storage interface over boto3 (``data/upload.py`` copies a data
set there).

A data set in S3 is laid out as on disk: the partitions and ``manifest.json`` side by side under one prefix.
Every listing pages through ``list_objects_v2`` (a prefix holds as many objects as it holds, not 1,000).
"""

from __future__ import annotations

from dataclasses import dataclass

from cai_bench.core import aws


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
        return self.read_with_metadata(name)[0]

    def read_with_metadata(self, name: str) -> tuple[bytes, dict[str, str]]:
        """An object's bytes and its user metadata (``x-amz-meta-*``, names without that prefix)."""
        with aws.one_line_errors(f"{self.where(name)}: cannot read"):
            reply = aws.s3_client().get_object(Bucket=self.bucket, Key=self.key(name))
            return reply["Body"].read(), dict(reply.get("Metadata") or {})

    def read_head(self, name: str, limit: int) -> bytes:
        with aws.one_line_errors(f"{self.where(name)}: cannot read"):
            reply = aws.s3_client().get_object(Bucket=self.bucket, Key=self.key(name), Range=f"bytes=0-{limit - 1}")
            return reply["Body"].read()

    def leads_outside(self, name: str) -> bool:
        return False  # S3 has no links: a key names exactly one object

    def write(self, name: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        """One object, replaced whole where it exists (a retried unit overwrites its own result); ``metadata``:
        its user metadata."""
        with aws.one_line_errors(f"{self.where(name)}: cannot write"):
            aws.s3_client().put_object(Bucket=self.bucket, Key=self.key(name), Body=data, Metadata=metadata or {})
