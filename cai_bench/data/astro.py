"""Import survey cutouts from FITS and HDF5 files: images, magnitudes, ids, ra/dec and true redshifts.

FITS: an image HDU of shape (N, 5, 32, 32) in ugriz order, or (N, 32, 32, 5), and a binary table HDU with the
id column and the magnitudes (``dered_u..dered_z`` or ``u..z`` unless named), optionally ``ra``, ``dec`` and a
true redshift. HDF5: datasets ``images``, ``magnitudes`` (N, 5), ``objid``, optionally ``ra``, ``dec`` and
``redshift``. The first pass checks every file and reads the small columns (ids, magnitudes, positions,
redshifts: about 70 bytes an object) and nothing is written unless all pass; the second reads the images a
slice at a time (FITS without memory mapping, so only the slice is ever resident) into partitions, and writes
each object's id, ra and dec into the data set's objects table. Cutouts of another size are refused: no
resampling is done behind the user's back. astropy (FITS) and h5py (HDF5) come with the ``astro`` extra.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cai_bench.core.errors import UserError, import_extra
from cai_bench.core.files import file_sha256, free_bytes_at, staged_directory
from cai_bench.core.plan import BITS_PER_SAMPLE, partition_sizes
from cai_bench.core.text import shown
from cai_bench.data import synthetic
from cai_bench.data.manifest import Manifest
from cai_bench.data.objects import OBJECTS, objects_entry, objects_writer
from cai_bench.data.partitions import Progress, finish_manifest, rebatch, write_partitions
from cai_bench.data.storage import MANIFEST
from cai_bench.data.truth import usable_redshifts

FITS_SUFFIXES = (".fits", ".fit", ".fts")
HDF5_SUFFIXES = (".h5", ".hdf5", ".he5")
SIZE = synthetic.IMAGE_SIZE
BANDS = synthetic.BANDS
SLICE = 1024  # cutouts read at a time: 20 MB of float32 images
CHUNK_MAX = 64 * 2**20  # bytes of one HDF5 chunk of cutouts, at most: a chunk is decompressed whole for any slice
CHUNK_CACHE = 2 * CHUNK_MAX  # the reader's chunk cache: the chunk a slice lies in is decompressed once, not per slice
FITS_MAGS = (tuple(f"dered_{b}" for b in BANDS), BANDS)
HDF5_MAGS = (("magnitudes",),)
Z_NAMES = ("redshift", "z")


@dataclass
class Columns:
    """What the input calls each thing; None: the defaults, the first that exists."""

    id: str = "objid"
    magnitudes: tuple[str, ...] | None = None  # one name of an (N, 5) column, or five of one band each
    z: str | None = None
    ra: str = "ra"
    dec: str = "dec"
    images: str | None = None  # FITS: HDU name or number; HDF5: dataset name (default images)


@dataclass
class SourceFile:
    """One input file, checked, with its small columns read."""

    path: Path
    kind: str  # "fits" or "hdf5"
    rows: int
    layout: str  # "NCHW" or "NHWC"
    images_key: int | str  # the HDU's number or the dataset's name
    images_at: str  # the HDU or dataset, as errors name it
    table_at: str
    table: dict[str, np.ndarray] = field(repr=False)  # id, magnitudes [, redshift] [, ra, dec]
    sha256: str = ""

    @property
    def id_type(self) -> str:
        return "string" if self.table["id"].dtype.kind in "US" else "int64"


def file_kind(paths: list[Path]) -> str:
    """What ``data import`` was given, the same kind for every file: "pt", "fits" or "hdf5"."""
    kinds_of = {".pt": "pt", **dict.fromkeys(FITS_SUFFIXES, "fits"), **dict.fromkeys(HDF5_SUFFIXES, "hdf5")}
    kinds = set()
    for path in paths:
        kind = kinds_of.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"{path}: not a file data import reads (.pt, {', '.join(FITS_SUFFIXES + HDF5_SUFFIXES)})")
        kinds.add(kind)
    if len(kinds) > 1:
        raise UserError(f"the files are of several kinds ({', '.join(sorted(kinds))}); import each kind separately")
    return kinds.pop()


def _layout(shape: tuple[int, ...], where: str) -> str:
    if len(shape) == 4 and shape[1:] == (5, SIZE, SIZE):
        return "NCHW"
    if len(shape) == 4 and shape[1:] == (SIZE, SIZE, 5):
        return "NHWC"
    sizes = [s for s in shape[1:] if s != 5]
    if len(shape) == 4 and 5 in shape[1:] and len(set(sizes)) == 1:
        raise UserError(f"{where}: cutouts are {sizes[0]}x{sizes[0]} pixels; the model needs {SIZE}x{SIZE} "
                        f"(cut them to the central {SIZE}x{SIZE}; nothing is resampled here)")  # fmt: skip
    raise UserError(f"{where}: images have shape {list(shape)}; expected (N, 5, {SIZE}, {SIZE}) in ugriz order "
                    f"or (N, {SIZE}, {SIZE}, 5)")  # fmt: skip


def _column(names: tuple[str, ...], read, where: str) -> np.ndarray:
    """Magnitudes as float64 (N, 5): from one (N, 5) column or from five, one band each."""
    arrays = [np.asarray(read(n)) for n in names]
    if len(arrays) == 1:
        mags = arrays[0]
        if mags.ndim != 2 or mags.shape[1] != 5:
            raise UserError(f"{where}: magnitudes {names[0]} have shape {list(mags.shape)}; expected (N, 5), ugriz")
    elif len({a.size for a in arrays}) > 1:
        raise UserError(f"{where}: magnitude columns {', '.join(names)} differ in length")
    else:
        mags = np.stack([a.reshape(-1) for a in arrays], axis=1)
    if mags.dtype.kind not in "fiu":
        raise UserError(f"{where}: magnitudes are {mags.dtype}; expected numbers")
    return mags.astype(np.float64)


def _ids(values: np.ndarray, where: str, name: str) -> np.ndarray:
    if values.ndim != 1:
        raise UserError(f"{where}: id column {name} has shape {list(values.shape)}; expected one id per row")
    if values.dtype.kind in "iu":
        if values.dtype.kind == "u" and values.size and int(values.max()) > np.iinfo(np.int64).max:
            raise UserError(f"{where}: id column {name} holds ids beyond int64")
        return values.astype(np.int64)
    if values.dtype.kind in "SUO":
        try:  # HDF5 and FITS hand text over as bytes: UTF-8, of which ASCII is a part
            text = np.char.strip(np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values.astype(str))
            if values.dtype.kind == "O":
                text = np.char.strip(np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], str))
        except UnicodeDecodeError:
            raise UserError(f"{where}: id column {name} holds bytes that are not UTF-8 text") from None
        if (text == "").any():
            raise UserError(f"{where}: id column {name} has an empty id (row {int(np.argmax(text == ''))})")
        return text
    raise UserError(f"{where}: id column {name} is {values.dtype}; ids must be integers or strings")


def _pick(available: set[str], wanted: tuple[tuple[str, ...], ...], given: tuple[str, ...] | None) -> tuple | None:
    if given is not None:
        return given if all(n in available for n in given) else None
    return next((names for names in wanted if all(n in available for n in names)), None)


def _small_columns(names: set[str], read, columns: Columns, where: str, defaults: tuple) -> dict[str, np.ndarray]:
    """The id, magnitudes, redshift and position columns of one file, checked, by ``read(name)``."""
    if columns.id not in names:
        found = ", ".join(sorted(names))
        raise UserError(f"{where}: no id column {columns.id!r} (--id-column names it; found {found})")
    mags = _pick(names, defaults, columns.magnitudes)
    if mags is None:
        asked = ", ".join(columns.magnitudes) if columns.magnitudes else " or ".join(", ".join(d) for d in defaults)
        raise UserError(f"{where}: no magnitude column(s) {asked} (--mag-columns names them)")
    table = {"id": _ids(np.asarray(read(columns.id)), where, columns.id), "magnitudes": _column(mags, read, where)}
    # never the z band's magnitude as a redshift: SDSS tables have u, g, r, i, z magnitudes beside dered_*
    band = "z" in mags or all(b in names for b in BANDS[:4])
    defaults = [n for n in Z_NAMES if n in names and not (n == "z" and band)]
    z_name = columns.z if columns.z is not None else next(iter(defaults), None)
    if z_name is not None:
        if z_name not in names:
            raise UserError(f"{where}: no redshift column {z_name!r} (--z-column)")
        # -9999, NaN, ...: no redshift, as the truth catalogues of predict --truth read them; kept as NaN, not used
        table["redshift"] = usable_redshifts(np.asarray(read(z_name), dtype=np.float64).reshape(-1))[0]
    if (columns.ra in names) != (columns.dec in names):
        raise UserError(f"{where}: has {columns.ra if columns.ra in names else columns.dec} but not the other of "
                        f"{columns.ra}, {columns.dec}")  # fmt: skip
    if columns.ra in names:
        table["ra"] = np.asarray(read(columns.ra), dtype=np.float64).reshape(-1)
        table["dec"] = np.asarray(read(columns.dec), dtype=np.float64).reshape(-1)
    return table


def _check_table(table: dict[str, np.ndarray], rows: int, where: str) -> None:
    for name, values in table.items():
        if len(values) != rows:
            raise UserError(f"{where}: {name} has {len(values)} rows, the images {rows}")
        if name not in ("id", "redshift") and not np.isfinite(values).all():
            bad = int(np.argmin(np.isfinite(values.reshape(rows, -1)).all(axis=1)))
            raise UserError(f"{where}: {name} holds NaN or inf (row {bad})")
    if "ra" in table and ((np.abs(table["dec"]) > 90).any() or (table["ra"] < 0).any() or (table["ra"] >= 360).any()):
        raise UserError(f"{where}: ra/dec out of range (ra in [0, 360), dec in [-90, 90] degrees)")


def _folded(columns: Columns) -> Columns:
    """``columns`` with every name in lower case, for FITS tables."""
    lower = {k: (v.lower() if isinstance(v, str) else v) for k, v in vars(columns).items() if k != "magnitudes"}
    magnitudes = tuple(n.lower() for n in columns.magnitudes) if columns.magnitudes else None
    return Columns(**{**lower, "magnitudes": magnitudes})


def _fits_image_index(hdul, columns: Columns, path: Path) -> int:
    if columns.images is not None:
        missing = UserError(f"{path}: no HDU {columns.images!r} (--images names the image HDU, by name or number)")
        if columns.images.isdigit():
            if int(columns.images) >= len(hdul):
                raise missing
            return int(columns.images)
        try:
            return hdul.index_of(columns.images)
        except KeyError:
            raise missing from None
    for index, hdu in enumerate(hdul):
        if hdu.is_image and hdu.header.get("NAXIS", 0) == 4:
            return index
    raise UserError(f"{path}: no 4-dimensional image HDU (N, 5, {SIZE}, {SIZE}) of cutouts")


def _inspect_fits(path: Path, columns: Columns, free_bytes: int | None) -> SourceFile:
    fits = import_extra("astropy.io.fits", "astro", "reading FITS files")
    try:
        hdul = fits.open(path, memmap=True, lazy_load_hdus=False)
        hdul.verify("silentfix+exception")  # the fixable slips of survey headers pass; the rest is refused
    except Exception as exc:  # astropy reports a damaged file in many ways (OSError, VerifyError, ValueError)
        raise UserError(f"{path}: not a readable FITS file ({type(exc).__name__}: {exc})") from None
    with hdul:
        index = _fits_image_index(hdul, columns, path)
        if index >= len(hdul) or not hdul[index].is_image:
            raise UserError(f"{path}: HDU {columns.images} is not an image HDU")
        name = hdul[index].name
        images_at = f"{path} HDU {index}" + (f" ({name})" if name and name != "PRIMARY" else "")
        layout = _layout(tuple(hdul[index].shape), images_at)
        _room_for(int(hdul[index].shape[0]), images_at, free_bytes)
        tables = [i for i, hdu in enumerate(hdul) if isinstance(hdu, fits.BinTableHDU)]
        if not tables:
            raise UserError(f"{path}: no binary table HDU with the ids and magnitudes")
        table_hdu = hdul[tables[0]]
        table_at = f"{path} HDU {tables[0]}" + (f" ({table_hdu.name})" if table_hdu.name else "")
        # FITS column names are case-blind (astropy finds OBJID as objid): SDSS tables write them in capitals
        names = {name.lower() for name in table_hdu.columns.names}
        table = _small_columns(names, lambda n: np.array(table_hdu.data[n]), _folded(columns), table_at, FITS_MAGS)
        rows = int(hdul[index].shape[0])
    _check_table(table, rows, table_at)
    return SourceFile(path, "fits", rows, layout, index, images_at, table_at, table, file_sha256(path))


def _room_for(rows: int, where: str, free_bytes: int | None) -> None:
    """What a file claims to hold must fit where its partitions go: a sparse file can claim any number of cutouts
    it has no bytes for, and would have them written out as zeros until the disk filled."""
    need = rows * (BITS_PER_SAMPLE // 8)
    if free_bytes is not None and need > free_bytes:
        raise UserError(f"{where}: {rows:,} cutouts would take {need / 1e9:,.1f} GB of partitions, and "
                        f"{free_bytes / 1e9:,.1f} GB are free where they go")  # fmt: skip


def _hdf5_datasets(handle, h5py, path: Path) -> set[str]:
    """The root group's datasets. Anything that would have HDF5 read another file is refused before it is opened
    (its bytes would be imported, or echoed in an error, with no digest of that file in the manifest): a soft or
    external link, a virtual dataset, raw data stored outside the file."""
    names = set()
    for name in handle:
        link = handle.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise UserError(f"{path}: {shown(name, 60)!r} is a link ({type(link).__name__}); cai-bench reads only "
                            "the data inside the files it is given: copy the data in (h5copy)")  # fmt: skip
        item = handle[name]
        if isinstance(item, h5py.Dataset) and (item.is_virtual or item.external):
            kind = "a virtual dataset" if item.is_virtual else "stored in another file (external storage)"
            raise UserError(f"{path} dataset {shown(name, 60)!r} is {kind}; cai-bench reads only the data inside "
                            "the files it is given: copy the data in (h5repack)")  # fmt: skip
        if isinstance(item, h5py.Dataset):
            names.add(name)
    return names


def _check_chunks(dataset, images_at: str) -> None:
    """HDF5 decompresses a whole chunk to read any slice of it: a chunk far larger than a slice would be
    decompressed once per slice (a 1 GiB gzip chunk, again and again), so it is refused over CHUNK_MAX."""
    if dataset.chunks is None:
        return
    chunk_bytes = math.prod(dataset.chunks) * dataset.dtype.itemsize
    if chunk_bytes > CHUNK_MAX:
        raise UserError(f"{images_at}: chunks of {chunk_bytes / 2**20:,.1f} MiB (over {CHUNK_MAX / 2**20:g} MiB); "
                        f"rechunk it: h5repack -l {dataset.name.lstrip('/')}:CHUNK={SLICE}x"
                        f"{'x'.join(str(n) for n in dataset.shape[1:])} IN OUT")  # fmt: skip


def _inspect_hdf5(path: Path, columns: Columns, free_bytes: int | None) -> SourceFile:
    h5py = import_extra("h5py", "astro", "reading HDF5 files")
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable HDF5 file ({exc})") from None
    with handle:
        names = _hdf5_datasets(handle, h5py, path)
        image_name = columns.images or "images"
        if image_name not in names:
            raise UserError(f"{path}: no dataset {image_name!r} of cutouts (--images names it)")
        images_at = f"{path} dataset {image_name}"
        dataset = handle[image_name]
        layout = _layout(tuple(dataset.shape), images_at)
        if dataset.dtype.kind not in "fiu":
            raise UserError(f"{images_at}: images are {dataset.dtype}; expected numbers")
        _room_for(int(dataset.shape[0]), images_at, free_bytes)
        _check_chunks(dataset, images_at)

        def read(name: str) -> np.ndarray:
            item = handle[name]
            if item.shape[:1] != dataset.shape[:1]:  # checked before a byte is read: it may claim any size
                raise UserError(f"{path} dataset {name}: {item.shape[0] if item.shape else 0:,} rows, and "
                                f"{dataset.shape[0]:,} cutouts")  # fmt: skip
            # UTF-8, of which ASCII is a part: what h5py writes for str, and what a file declared ASCII holds
            return item.asstr("utf-8")[()] if h5py.check_string_dtype(item.dtype) else item[()]

        table = _small_columns(names - {image_name}, read, columns, str(path), HDF5_MAGS)
        rows = int(dataset.shape[0])
    _check_table(table, rows, str(path))
    return SourceFile(path, "hdf5", rows, layout, image_name, images_at, str(path), table, file_sha256(path))


@contextmanager
def _image_reader(source: SourceFile) -> Iterator:
    """``read(start, stop)``: cutouts [start, stop) of one file, read from disk for that slice alone."""
    if source.kind == "fits":
        fits = import_extra("astropy.io.fits", "astro", "reading FITS files")
        with _astropy_strict():
            hdul = fits.open(source.path, memmap=False, lazy_load_hdus=False)  # sections read bytes, not a mapping
        with hdul:
            hdu = hdul[source.images_key]
            yield lambda start, stop: hdu.section[start:stop]
    else:
        h5py = import_extra("h5py", "astro", "reading HDF5 files")
        with h5py.File(source.path, "r", rdcc_nbytes=CHUNK_CACHE) as handle:
            dataset = handle[source.images_key]
            yield lambda start, stop: dataset[start:stop]


def _images(read, source: SourceFile, start: int, stop: int) -> np.ndarray:
    try:
        with _astropy_strict():
            images = np.asarray(read(start, stop), dtype=np.float32)
    except Exception as exc:  # damaged data past a sound header: astropy's and HDF5's own errors
        raise UserError(f"{source.images_at}: cutouts {start}-{stop - 1} are unreadable ({type(exc).__name__}: "
                        f"{exc})") from None  # fmt: skip
    if source.layout == "NHWC":
        images = images.transpose(0, 3, 1, 2)
    images = np.ascontiguousarray(images)
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if not finite.all():
        raise UserError(f"{source.images_at}: cutout {start + int(np.argmin(finite))} holds NaN or inf pixels")
    return images


@contextmanager
def _astropy_strict() -> Iterator[None]:
    """astropy's warnings kept off the user's screen, except that a truncated file is an error, not a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="astropy")
        warnings.filterwarnings("error", message="File may have been truncated")
        yield


def _inspect(path: Path, kind: str, columns: Columns, free_bytes: int | None) -> SourceFile:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with _astropy_strict():
            return (_inspect_fits if kind == "fits" else _inspect_hdf5)(path, columns, free_bytes)
    except UserError:
        raise
    except Exception as exc:  # a damaged file fails in astropy's and HDF5's own many ways, found by fuzzing
        raise UserError(f"{path}: not a readable {kind.upper()} file ({type(exc).__name__}: {exc})") from None


def inspect_sources(paths: list[Path], kind: str, columns: Columns, free_bytes: int | None = None) -> list[SourceFile]:
    """Every file checked and its small columns read; the files must agree, their ids be unique, and their
    partitions fit in ``free_bytes`` (None: not checked)."""
    files = [_inspect(path, kind, columns, free_bytes) for path in paths]
    _room_for(sum(f.rows for f in files), f"{len(files)} file(s)", free_bytes)
    agree = {"string and integer ids": lambda f: f.id_type, "true redshifts": lambda f: "redshift" in f.table,
             "ra and dec": lambda f: "ra" in f.table}  # fmt: skip
    for what, of in agree.items():
        if len({of(f) for f in files}) > 1:
            raise UserError(f"some files have {what} and some do not; import them separately")
    ids = np.concatenate([f.table["id"] for f in files])
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        twice = unique[counts > 1][0]
        starts = np.cumsum([0] + [f.rows for f in files])
        rows = [(files[k].path, int(p - starts[k])) for p in np.nonzero(ids == twice)[0][:2]
                for k in [int(np.searchsorted(starts, p, side="right")) - 1]]  # fmt: skip
        where = " and ".join(f"{path} row {row}" for path, row in rows)
        raise UserError(f"id {twice} appears {int(counts.max())} times or more: {where} (ids must be unique)")
    return files


def _stream(files: list[SourceFile], add_objects) -> Iterator[synthetic.GalaxyBatch]:
    """The galaxies in order, a slice at a time, their ids and positions appended to the objects table as read."""
    position = 0
    for index, source in enumerate(files):
        table = source.table
        with _image_reader(source) as read:
            for start in range(0, source.rows, SLICE):
                stop = min(start + SLICE, source.rows)
                n = stop - start
                objects = {"id": table["id"][start:stop], "file": np.full(n, index, np.int32),
                           "row": np.arange(start, stop, dtype=np.int64)}  # fmt: skip
                if "ra" in table:
                    objects.update(ra=table["ra"][start:stop], dec=table["dec"][start:stop])
                z = table["redshift"][start:stop] if "redshift" in table else np.zeros(n)
                batch = synthetic.GalaxyBatch(
                    _images(read, source, start, stop), table["magnitudes"][start:stop],
                    z.astype(np.float32), np.arange(position, position + n, dtype=np.int64),
                )  # fmt: skip
                add_objects(objects)
                position += n
                yield batch


def import_catalogue(
    sources: list[str | Path],
    out: str | Path,
    partition_mb: float,
    columns: Columns | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """FITS or HDF5 files, in the order given, into partitions, a manifest and the objects table."""
    columns = columns or Columns()
    paths = [Path(s) for s in sources]
    if not paths:
        raise UserError("give at least one FITS or HDF5 file")
    kind = file_kind(paths)
    if kind == "pt":
        raise UserError("PyTorch .pt files are imported by import_upstream")
    files = inspect_sources(paths, kind, columns, free_bytes_at(out))
    first = files[0]
    has_position = "ra" in first.table
    described = [
        {"name": f.path.name, "samples": f.rows, "image_layout": f.layout, "sha256": f.sha256,
         "images": f.images_at.removeprefix(f"{f.path} "), "table": f.table_at.removeprefix(f"{f.path}").strip()}
        for f in files
    ]  # fmt: skip
    source = {"kind": kind, "ids": f"{first.id_type} ids from {columns.id}", "files": described}
    if "redshift" in first.table:
        source["redshifts_not_used"] = sum(int(np.isnan(f.table["redshift"]).sum()) for f in files)
    total = sum(f.rows for f in files)
    with staged_directory(out, overwrite, "data set", MANIFEST) as staging:
        with objects_writer(staging / OBJECTS, first.id_type, has_position) as add_objects, ExitStack() as stack:
            stream = _stream(files, add_objects)
            stack.callback(stream.close)  # closes the last file even when the partitions end before the stream
            entries = write_partitions(staging, partition_sizes(total, partition_mb), rebatch(stream), progress)
        objects = objects_entry(staging / OBJECTS, first.id_type, columns.id, has_position)
        return finish_manifest(staging, entries, source=source, partition_mb=partition_mb,
                               has_labels="redshift" in first.table, objects=objects)  # fmt: skip


OPTIONS = {"--id-column": "id", "--z-column": "z", "--ra-column": "ra", "--dec-column": "dec", "--images": "images"}


def catalogue_columns(options: dict[str, str | None]) -> Columns:
    """Columns from ``data import``'s options (None: the default); --mag-columns a comma list of one or five."""
    given = {OPTIONS[k]: v for k, v in options.items() if v is not None and k in OPTIONS}
    magnitudes = options.get("--mag-columns")
    if magnitudes is not None:
        names = tuple(n.strip() for n in magnitudes.split(","))
        if len(names) not in (1, 5) or not all(names):
            raise UserError(f"--mag-columns {magnitudes!r}: give five names (u,g,r,i,z) or one of shape (N, 5)")
        given["magnitudes"] = names
    return Columns(**given)


def refuse_columns(options: dict[str, str | None]) -> None:
    """Column options mean nothing to an upstream .pt file (a TensorDataset has no names): say so."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)}: only FITS and HDF5 files have named columns; a .pt file has none")
