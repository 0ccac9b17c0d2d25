"""Output directories that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cai_bench.errors import UserError


@contextmanager
def staged_directory(out: str | Path, overwrite: bool, what: str) -> Iterator[Path]:
    """A directory to fill, under a temporary name beside ``out``, renamed onto ``out`` when the block ends
    without error: a reader never sees half of it, and a failure (or Ctrl-C) leaves nothing. ``what`` names it
    in the errors ("data set", "export")."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; --out names the {what} directory to create")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; pass --force to replace it, or choose another --out")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the {what} there ({exc.strerror})") from None
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{out}: cannot write the {what} ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
