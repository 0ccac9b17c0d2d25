"""Where cai-bench keeps what it makes (the cache), output directories that appear whole or not at all, and the
checksum files are named by."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock between processes
    fcntl = None

from cai_bench.core.errors import UserError


def loads_json(data: bytes | str, where: str):
    """JSON read from a file or a request: anything that is not JSON, a number of more digits than Python turns
    into an int (4,300), or nesting deeper than the parser's recursion allows, is one UserError naming ``where``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:  # not JSON (JSONDecodeError, UnicodeDecodeError), or an integer past the digit limit
        raise UserError(f"{where}: not valid JSON ({str(exc)[:200]})") from None


def cache_dir() -> Path:
    """Generated data sets and model exports: ``CAI_BENCH_CACHE``, else the user's cache directory."""
    if os.environ.get("CAI_BENCH_CACHE"):
        return Path(os.environ["CAI_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cai-bench"


def write_json_atomic(path: str | Path, value) -> bool:
    """``value`` as JSON at ``path``, written whole or not at all (a temporary file renamed onto it), for what the
    cache keeps; False where it could not be written, which only means it is made again next time."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(value, default=str))
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False


# Never through a link, checked by the open itself (no check-then-open race); absent where the platform lacks them
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def write_secret_file(path: str | Path, value: dict) -> None:
    """``value`` as JSON in a new file only its user may read: made with O_EXCL and O_NOFOLLOW, so nothing placed
    at ``path`` first (a link, a file someone else can read) is written through."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o600), "w") as file:
        json.dump(value, file)


def read_secret_file(path: str | Path) -> dict:
    """What ``write_secret_file`` wrote: read without following a link, and refused where others may read it."""
    fd = os.open(path, os.O_RDONLY | NO_FOLLOW)
    with open(fd) as file:
        if os.fstat(fd).st_mode & 0o077:
            raise UserError(f"{path}: a secret file that others may read; it is not the one cai-bench wrote")
        return json.load(file)


def read_small_file(path: str | Path, limit: int, what: str) -> bytes:
    """A regular file of at most ``limit`` bytes, whole: never a FIFO or a device (``/dev/zero`` reads forever, a
    FIFO waits for a writer) and never more than it says, so a file that grows while read is cut at ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    with open(fd, "rb") as file:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise UserError(f"{path}: the {what} is not a regular file (a FIFO or a device reads without end)")
        if found.st_size > limit:
            raise UserError(f"{path}: the {what} is {found.st_size:,} bytes; at most {limit:,} are read")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path}: the {what} grew past {limit:,} bytes while it was read")
    return data


def free_bytes_at(out: str | Path) -> int:
    """Bytes free on the file system where ``out`` is, or would be made (its nearest existing parent)."""
    place = Path(out).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    return shutil.disk_usage(place).free


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def exclusive(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock file ``path`` (made where missing) for the block: another process asking for it waits until
    this one is done (``on_wait`` is told first), so that two commands on one machine never make the same thing
    at once (a point of a sweep, a data set or an export in the cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def staged_directory(out: str | Path, overwrite: bool, what: str, marker: str) -> Iterator[Path]:
    """A directory to fill, under a temporary name beside ``out``, renamed onto ``out`` when the block ends
    without error: a reader never sees half of it, and a failure (or Ctrl-C) leaves nothing. ``what`` names it
    in the errors ("data set", "export"); ``marker`` is the file that makes a directory one (its manifest), and
    ``overwrite`` replaces only a directory that holds it: never a user's own directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; --out names the {what} directory to create")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: exists and is not empty; pass --force to replace it, or choose another --out")
        if not (out / marker).is_file() or (out / marker).is_symlink():
            raise UserError(f"{out}: not a cai-bench {what} (no {marker}); --force replaces only what cai-bench "
                            "made, and this directory is left as it is: choose another --out")  # fmt: skip
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the {what} there ({exc.strerror})") from None
    try:
        yield staging
        _swap_in(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{out}: cannot write the {what} ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, out: Path) -> None:
    """``staging`` renamed onto ``out``: the old ``out`` first renamed aside and removed only once the new one is
    in place, so that at every moment ``out`` is the old directory or the new one, whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.replace(staging, out)
        return
    aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(out, aside)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
