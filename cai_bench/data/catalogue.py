"""The redshift catalogue ``predict`` writes, and the catalogues it reads to join true redshifts by id.

One row per object: ``id`` (as the input gave it, int64 or string; a row number where it gave none), ``ra`` and
``dec`` in degrees where known, ``z_pred``, ``z_true`` where known and ``flags`` (bits, ``FLAGS``). Units and
what each column is travel with the file: Parquet carries a VOTable of its fields in its key-value metadata
(VOParquet 1.0) and the provenance as JSON under ``cai_bench``; FITS carries TUNITn and the provenance as header
keywords; CSV carries an ECSV header of ``#`` lines (units, descriptions, provenance) that astropy reads and
that ``pandas.read_csv(comment="#")`` skips.
"""

from __future__ import annotations

import csv
import json
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cai_bench.core.errors import UserError, describe, import_extra
from cai_bench.data.csv_table import TEXT_PREFIX, read_csv_table

FORMATS = {".parquet": "parquet", ".fits": "fits", ".csv": "csv", ".hats": "hats"}
DIRECTORY_FORMATS = ("hats",)  # written as a directory tree, not one file
MODEL_NAME = "pcm-AstroMAE"
METADATA_KEY = "cai_bench"  # Parquet: the provenance, JSON; CSV: the ECSV meta key


@dataclass(frozen=True)
class Column:
    unit: str | None
    ucd: str
    description: str


COLUMNS = {
    "id": Column(None, "meta.id;meta.main", "object id as the input gave it (a row number where it gave none)"),
    "ra": Column("deg", "pos.eq.ra;meta.main", "right ascension as the input gave it"),
    "dec": Column("deg", "pos.eq.dec;meta.main", "declination as the input gave it"),
    "z_pred": Column(None, "src.redshift.phot", f"redshift predicted by {MODEL_NAME} from the cutout and magnitudes"),
    "z_true": Column(None, "src.redshift", "true (spectroscopic) redshift where known; NaN where not"),
    "z_data": Column(
        None,
        "src.redshift",
        "the data set's own true redshift, kept beside a --truth catalogue's z_true; NaN where it had none",
    ),
    "flags": Column(None, "meta.code.qual", "bit flags; 0: none (see the flags in the file's provenance)"),
}
# The ranges of the training set (SDSS DR8 main galaxy sample, dereddened Petrosian ugriz; spectroscopic z)
TRAINING_MAGNITUDES = {"u": (16.0, 22.0), "g": (15.0, 20.0), "r": (13.0, 17.8), "i": (13.0, 17.5), "z": (12.5, 17.3)}
TRAINING_Z = (0.01, 0.55)
MAG_OUT_OF_RANGE, Z_OUT_OF_RANGE, NOT_FINITE, MAGS_UNCHECKED, RANDOM_WEIGHTS = 1, 2, 4, 8, 16
FLAGS = {
    MAG_OUT_OF_RANGE: "a magnitude outside the training set's range ("
    + ", ".join(f"{b} {lo:g}-{hi:g}" for b, (lo, hi) in TRAINING_MAGNITUDES.items())
    + "): an extrapolation",
    Z_OUT_OF_RANGE: f"z_pred outside the training set's redshifts {TRAINING_Z[0]:g}-{TRAINING_Z[1]:g}",
    NOT_FINITE: "z_pred is NaN or infinite",
    MAGS_UNCHECKED: "magnitudes not checked against the training range (the data set was read from S3)",
    RANDOM_WEIGHTS: "random-init weights: z_pred means nothing",
}


def object_flags(z_pred: np.ndarray, magnitudes: np.ndarray | None, random_init: bool) -> np.ndarray:
    """The ``flags`` column: the bits of ``FLAGS`` that hold for each object."""
    flags = np.zeros(len(z_pred), np.int32)
    if magnitudes is None:
        flags |= MAGS_UNCHECKED
    else:
        low = np.array([lo for lo, _ in TRAINING_MAGNITUDES.values()])
        high = np.array([hi for _, hi in TRAINING_MAGNITUDES.values()])
        flags[((magnitudes < low) | (magnitudes > high)).any(axis=1)] |= MAG_OUT_OF_RANGE
    finite = np.isfinite(z_pred)
    flags[~finite] |= NOT_FINITE
    with np.errstate(invalid="ignore"):
        flags[finite & ((z_pred < TRAINING_Z[0]) | (z_pred > TRAINING_Z[1]))] |= Z_OUT_OF_RANGE
    if random_init:
        flags |= RANDOM_WEIGHTS
    return flags


# Each column's type, as VOTable, FITS (TFORM) and ECSV name it
TYPES = {"int64": ("long", "K", "int64"), "int32": ("int", "J", "int32"), "float32": ("float", "E", "float32"),
         "float64": ("double", "D", "float64"), "string": ("char", "A", "string")}  # fmt: skip


def _type(values: np.ndarray) -> str:
    return "string" if values.dtype.kind in "OUS" else str(values.dtype)


def check_catalogue_path(path: Path) -> None:
    if path.suffix not in FORMATS:
        raise UserError(f"{path}: --out must end in {', '.join(FORMATS)}")
    if FORMATS[path.suffix] == "fits":
        import_extra("astropy.io.fits", "astro", "writing a FITS catalogue")
    if FORMATS[path.suffix] == "hats":
        import_extra("lsdb", "dask", "writing a HATS catalogue")


# ---------------------------------------------------------------------------------------------- writing


def _votable(columns: dict[str, np.ndarray], provenance: dict) -> bytes:
    """The VOTable that VOParquet keeps beside the data: each field's type, unit, UCD and description."""
    ns = "http://www.ivoa.net/xml/VOTable/v1.3"
    ET.register_namespace("", ns)
    root = ET.Element(f"{{{ns}}}VOTABLE", version="1.4")
    resource = ET.SubElement(root, f"{{{ns}}}RESOURCE", type="results")
    for key in ("model", "weights", "weights_sha256", "runtimes", "precisions", "run_ids", "cai_bench", "created_utc"):
        ET.SubElement(resource, f"{{{ns}}}INFO", name=key, value=json.dumps(provenance.get(key)))
    table = ET.SubElement(resource, f"{{{ns}}}TABLE", name="redshifts")
    ET.SubElement(table, f"{{{ns}}}DESCRIPTION").text = f"Redshifts predicted by {MODEL_NAME} (cai-bench predict)"
    for name, values in columns.items():
        column = COLUMNS[name]
        attributes = {"name": name, "ucd": column.ucd, "datatype": TYPES[_type(values)][0]}
        if _type(values) == "string":
            attributes["arraysize"] = "*"
        if column.unit:
            attributes["unit"] = column.unit
        field = ET.SubElement(table, f"{{{ns}}}FIELD", **attributes)
        ET.SubElement(field, f"{{{ns}}}DESCRIPTION").text = column.description
    ET.SubElement(table, f"{{{ns}}}PARQUET", type="Parquet-local-XML")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _write_parquet(path: Path, columns: dict[str, np.ndarray], provenance: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = []
    for name, values in columns.items():
        about = {"ucd": COLUMNS[name].ucd, "description": COLUMNS[name].description}
        if COLUMNS[name].unit:
            about["unit"] = COLUMNS[name].unit
        kind = pa.string() if values.dtype.kind in "OUS" else pa.from_numpy_dtype(values.dtype)
        fields.append(pa.field(name, kind, metadata=about))
    metadata = {
        "IVOA.VOTable-Parquet.version": "1.0",
        "IVOA.VOTable-Parquet.content": _votable(columns, provenance),
        METADATA_KEY: json.dumps(provenance),
    }
    schema = pa.schema(fields, metadata=metadata)
    pq.write_table(pa.table({f.name: columns[f.name] for f in fields}, schema=schema), path)


FITS_KEYS = {"model": "MODEL", "weights": "WEIGHTS", "weights_sha256": "WEIGHTSH", "random_init": "RANDINIT",
             "cai_bench": "CAIVERS", "git_commit": "CAICOMMT", "dataset_id": "DATASET", "created_utc": "DATE",
             "z_true": "ZTRUE"}  # fmt: skip
PROVENANCE_KEY = "CAIPROV"  # FITS: the whole provenance as JSON, a long string (CONTINUE cards), never cut short


def _fits_text(value) -> str:
    """A header value in the ASCII a FITS header allows: anything else is escaped, not refused."""
    return str(value).encode("ascii", "backslashreplace").decode("ascii")


def _write_fits(path: Path, columns: dict[str, np.ndarray], provenance: dict) -> None:
    fits = import_extra("astropy.io.fits", "astro", "writing a FITS catalogue")
    fits_columns = []
    for name, values in columns.items():
        code = TYPES[_type(values)][1]
        if code == "A":
            values = values.astype(str)
            code = f"{max((len(v.encode()) for v in values), default=1)}A"
        fits_columns.append(fits.Column(name=name, format=code, unit=COLUMNS[name].unit, array=values))
    hdu = fits.BinTableHDU.from_columns(fits_columns, name="REDSHIFTS")
    header = hdu.header
    for key, keyword in FITS_KEYS.items():
        value = provenance.get(key)
        if value is not None:
            header[keyword] = value if isinstance(value, (bool, int, float)) else _fits_text(value)
    numbered = {"RUNID": provenance.get("run_ids", []), "RUNTIME": provenance.get("runtimes", []),
                "PRECISN": provenance.get("precisions", []),
                "INFILE": [s["name"] for s in provenance.get("inputs", [])],
                "INSHA": [s.get("sha256") or "unknown" for s in provenance.get("inputs", [])]}  # fmt: skip
    for prefix, values in numbered.items():
        for number, value in enumerate(values, 1):
            if len(f"{prefix}{number}") <= 8:  # the rest (and these) are in PROVENANCE_KEY: a keyword is 8 at most
                header[f"{prefix}{number}"] = _fits_text(value)
    header[PROVENANCE_KEY] = json.dumps(provenance, ensure_ascii=True, default=str)
    for bit, meaning in FLAGS.items():
        header.add_comment(f"flags bit {bit}: {meaning}")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", TEXT_PREFIX)


def _spreadsheet_safe(values: np.ndarray) -> np.ndarray:
    """Text cells that a spreadsheet would run as a formula, prefixed with ``TEXT_PREFIX`` (OWASP's advice for CSV
    injection); a cell that already starts with it is prefixed too, so the reader takes exactly one off."""
    if values.dtype.kind not in "OSU":
        return values
    text = values.astype(str)
    risky = np.zeros(len(text), bool)
    for start in FORMULA_STARTS:
        risky |= np.char.startswith(text, start)
    return np.where(risky, np.char.add(TEXT_PREFIX, text), text) if risky.any() else text


def _write_csv(path: Path, columns: dict[str, np.ndarray], provenance: dict) -> None:
    """CSV under an ECSV 1.0 header: every header line starts with ``#``; its YAML is written as JSON flow."""
    provenance = {**provenance, "csv_text_prefix": CSV_PREFIX_NOTE}
    lines = ["# %ECSV 1.0", "# ---", "# datatype:"]
    for name, values in columns.items():
        entry = {"name": name, "datatype": TYPES[_type(values)][2]}
        if COLUMNS[name].unit:
            entry["unit"] = COLUMNS[name].unit
        entry["description"] = COLUMNS[name].description
        lines.append(f"# - {json.dumps(entry)}")
    lines += ["# delimiter: ','", f"# meta: {json.dumps({METADATA_KEY: provenance})}", "# schema: astropy-2.0"]
    with open(path, "w", newline="") as fh:
        fh.write("\n".join(lines) + "\n")
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        safe = [_spreadsheet_safe(v).tolist() for v in columns.values()]
        writer.writerows(zip(*safe, strict=True))


CSV_PREFIX_NOTE = (f"text cells that begin with = + - @, a tab, a carriage return or {TEXT_PREFIX} are written with "
                   f"{TEXT_PREFIX} before them, so that a spreadsheet shows them as text and runs no formula; "
                   "cai-bench's reader takes it off")  # fmt: skip


def _properties_text(value: object) -> str:
    """``value`` as JSON on one line of a HATS properties file, whose reader takes a backslash as an escape."""
    return json.dumps(value).replace("\\", "\\\\")


def _write_hats(path: Path, columns: dict[str, np.ndarray], provenance: dict, name: str, computing=None) -> None:
    """A HATS catalogue (HEALPix-partitioned Parquet, its properties and partition info, and a margin cache for
    cross-matching) written by lsdb. The columns' units, UCDs and descriptions and the provenance go into the
    catalogue's properties as JSON. ``computing``: a context under which Dask computes the writing (a
    distributed client's ``as_current()``: the cluster's workers write the partitions); by default threads of
    this process."""
    import dask
    import pandas as pd

    lsdb = import_extra("lsdb", "dask", "writing a HATS catalogue")
    described = {name: {"unit": COLUMNS[name].unit, "ucd": COLUMNS[name].ucd,
                        "description": COLUMNS[name].description} for name in columns}  # fmt: skip
    properties = {
        "obs_title": f"Redshifts predicted by {MODEL_NAME} (cai-bench predict)",
        "cai_bench_columns": _properties_text(described),
        f"{METADATA_KEY}_provenance": _properties_text(provenance),
    }
    frame = pd.DataFrame({name: values.astype(object) if _type(values) == "string" else values
                          for name, values in columns.items()})  # fmt: skip
    try:
        with computing if computing is not None else dask.config.set(scheduler="threads"):
            catalog = lsdb.from_dataframe(frame, ra_column="ra", dec_column="dec", catalog_name=name)
            catalog.write_catalog(path, catalog_name=name, addl_hats_properties=properties, progress_bar=False)
    except OSError:
        raise
    except Exception as exc:  # lsdb's, hats' or a Dask worker's own failure: the caller's one line, parts kept
        raise ValueError(f"lsdb: {describe(exc)}") from None


def write_catalogue(
    path: Path, fmt: str, columns: dict[str, np.ndarray], provenance: dict, *, name: str | None = None,
    computing=None,
) -> None:  # fmt: skip
    """``columns`` (any of ``COLUMNS``, in that order) written in ``fmt`` (a value of ``FORMATS``) with
    ``provenance``; a HATS catalogue is called ``name`` (``path``'s stem by default), written where
    ``computing`` says (``_write_hats``)."""
    ordered = {key: columns[key] for key in COLUMNS if key in columns}
    if fmt == "hats":
        _write_hats(path, ordered, provenance, name or path.stem, computing)
        return
    {"parquet": _write_parquet, "fits": _write_fits, "csv": _write_csv}[fmt](path, ordered, provenance)


# ---------------------------------------------------------------------------------------------- reading

# What predict wrote before its catalogue had these names
OLD_NAMES = {"object_id": "id", "predicted_redshift": "z_pred", "true_redshift": "z_true"}


def _read_fits(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    fits = import_extra("astropy.io.fits", "astro", "reading a FITS catalogue")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="astropy")  # a header's slips are not the user's concern here
        hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    with hdul:
        table = next((hdu for hdu in hdul if isinstance(hdu, fits.BinTableHDU)), None)
        if table is None:
            raise ValueError("no binary table HDU")
        columns = {}
        for name in table.columns.names:
            values = np.array(table.data[name])
            columns[name] = np.char.strip(values.astype(str)) if values.dtype.kind in "SU" else values
        about = {key.lower(): table.header[keyword] for key, keyword in FITS_KEYS.items() if keyword in table.header}
        if PROVENANCE_KEY in table.header:  # cai-bench's own: the whole provenance, as it was
            whole = json.loads(str(table.header[PROVENANCE_KEY]))
            about = whole if isinstance(whole, dict) else about
    return columns, about


def read_catalogue(
    path: str | Path, what: str = "catalogue", extra: tuple[str, ...] = ()
) -> tuple[dict[str, np.ndarray], dict]:
    """A catalogue's columns (Parquet, FITS, CSV, and the ``extra`` suffixes of CSV: ".ecsv") and what it says of
    itself; predict's older column names read as today's."""
    path = Path(path)
    if path.suffix not in FORMATS and path.suffix not in extra:
        raise UserError(f"{path}: expected a {what} in {', '.join((*FORMATS, *extra))}")
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".hats":
        return _read_hats(path, what)
    if not path.is_file():
        raise UserError(f"{path}: not a regular file; a {what} is a file")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            columns = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
            about = json.loads((table.schema.metadata or {}).get(METADATA_KEY.encode(), b"{}"))
        elif path.suffix == ".fits":
            columns, about = _read_fits(path)
        else:
            columns, about = read_csv_table(path, METADATA_KEY)
    except UserError:
        raise
    except Exception as exc:  # pyarrow, astropy and csv fail in many ways; each means the file is not readable
        raise UserError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
    return {OLD_NAMES.get(name, name): values for name, values in columns.items()}, about


def _read_hats(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict]:
    """A HATS catalogue's columns, read by lsdb, and the provenance its properties keep."""
    lsdb = import_extra("lsdb", "dask", f"reading a HATS {what}")
    try:
        catalog = lsdb.read_hats(path)
        frame = catalog.compute()
        kept = (catalog.hc_structure.catalog_info.model_extra or {}).get(f"{METADATA_KEY}_provenance", "{}")
        about = json.loads(kept)
    except Exception as exc:  # hats and lsdb fail in many ways on a directory that is not a catalogue
        raise UserError(f"{path}: not a readable HATS {what} ({type(exc).__name__}: {str(exc)[:200]})") from None
    columns = {name: frame[name].to_numpy() for name in frame.columns}
    return columns, about if isinstance(about, dict) else {}


def flag_meanings() -> dict[str, str]:
    return {str(bit): meaning for bit, meaning in FLAGS.items()}


def flag_counts(flags: np.ndarray) -> dict[str, int]:
    """How many objects carry each flag: what predict prints."""
    return {str(bit): int(((flags & bit) != 0).sum()) for bit in FLAGS}
