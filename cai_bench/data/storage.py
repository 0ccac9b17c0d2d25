"""Where partitions live: one small interface (list a data set, read its manifest, read a partition's bytes)
and its local-directory implementation. Everything that reads a data set goes through ``storage_for``, so a
store elsewhere (S3, for the Lambda backend) is one more implementation, not a second reader.

A data set is named by a location: a directory path, or ``s3://bucket/prefix`` (``data/s3.py``). A
partition is named by its file name inside the data set; a ``PartitionRef`` holds the two joined
(``location/name``), which ``split_ref`` takes apart again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cai_bench.core.errors import UserError
from cai_bench.data.s3 import S3Prefix

MANIFEST = "manifest.json"


class Storage(Protocol):
    location: str

    def check(self) -> None:
        """Refuse (UserError) a location that is not there or cannot hold a data set."""

    def names(self) -> list[str]:
        """Every object in the data set, sorted (paginated where the store pages)."""

    def where(self, name: str) -> str:
        """How to name ``name`` in messages and in PartitionRef.path."""

    def size(self, name: str) -> int | None:
        """Its size in bytes; None where it is missing."""

    def read(self, name: str) -> bytes: ...

    def read_head(self, name: str, limit: int) -> bytes:
        """At most ``limit`` bytes from its start (a partition's header, without reading the whole file)."""

    def leads_outside(self, name: str) -> bool:
        """Whether the name resolves to something outside the data set (a link)."""


@dataclass(frozen=True)
class LocalDirectory:
    """A data set in a directory of this machine (or of a filesystem the nodes share)."""

    root: Path

    @property
    def location(self) -> str:
        return str(self.root)

    def check(self) -> None:
        if not self.root.exists():
            raise UserError(f"{self.root}: no such data directory")
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory; a data set is a directory with a {MANIFEST}")

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def where(self, name: str) -> str:
        return str(self.root / name)

    def size(self, name: str) -> int | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            return path.stat().st_size
        except OSError as exc:
            raise UserError(f"{path}: cannot read partition ({exc.strerror})") from None

    def read(self, name: str) -> bytes:
        path = self.root / name
        try:
            return path.read_bytes()
        except OSError as exc:
            what = "the manifest" if name == MANIFEST else "partition"
            raise UserError(f"{path}: cannot read {what} ({exc.strerror})") from None

    def read_head(self, name: str, limit: int) -> bytes:
        path = self.root / name
        try:
            with open(path, "rb") as fh:
                return fh.read(limit)
        except OSError as exc:
            raise UserError(f"{path}: cannot read partition ({exc.strerror})") from None

    def leads_outside(self, name: str) -> bool:
        target = self.root / name
        return target.is_symlink() and target.resolve().parent != self.root.resolve()


def storage_for(location: str | os.PathLike) -> Storage:
    """The storage a data set location names."""
    text = os.fspath(location)
    # A URL, also after a Path has folded its "//" into "/" (a Windows drive, "C:/", has a one-letter scheme)
    url = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/+(.*)", text)
    if url:
        scheme, rest = url.groups()
        if scheme.lower() == "s3":
            return S3Prefix.parse(f"s3://{rest}")
        raise UserError(f"{scheme}://{rest}: cai-bench reads data sets from local directories and s3:// only")
    return LocalDirectory(Path(text))


def split_ref(path: str) -> tuple[Storage, str]:
    """A PartitionRef's path as (the storage of its data set, the partition's name in it)."""
    location, _, name = path.replace(os.sep, "/").rpartition("/")
    return storage_for(location or "."), name
