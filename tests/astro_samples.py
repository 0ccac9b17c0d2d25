"""Small FITS and HDF5 cutout files made from the synthetic generator: the shapes surveys hand out, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cai_bench.data import synthetic


def sample_galaxies(n: int, seed: int = 3, first: int = 0) -> dict[str, np.ndarray]:
    """``n`` synthetic galaxies with survey-like ids (shuffled, not contiguous), ra and dec."""
    batch = synthetic.generate(seed, first, first + n)
    rng = np.random.default_rng(seed + first)
    ids = 1237648720693755000 + 3 * (first + rng.permutation(n).astype(np.int64))
    return {
        "images": batch.images,
        "magnitudes": batch.magnitudes,
        "redshift": batch.redshift,
        "objid": ids,
        "ra": rng.uniform(0, 360, n),
        "dec": rng.uniform(-10, 70, n),
    }


def write_fits(path: Path, galaxies: dict[str, np.ndarray], *, nhwc: bool = False, string_ids: bool = False,
               z: bool = True, mags: str = "dered") -> Path:  # fmt: skip
    """An image HDU of cutouts (N, 5, 32, 32) or (N, 32, 32, 5) and a binary table of ids, ra, dec, magnitudes."""
    from astropy.io import fits
    from astropy.table import Table

    images = galaxies["images"].transpose(0, 2, 3, 1) if nhwc else galaxies["images"]
    table = Table()
    table["objid"] = [f"J{i:019d}" for i in galaxies["objid"]] if string_ids else galaxies["objid"]
    table["ra"], table["dec"] = galaxies["ra"], galaxies["dec"]
    for band, column in zip(synthetic.BANDS, galaxies["magnitudes"].T, strict=True):
        if mags in ("dered", "both"):
            table[f"dered_{band}"] = column
        if mags in ("plain", "both"):  # an SDSS PhotoObj table has both: dered_u..dered_z and u..z
            table[band] = column + (0.05 if mags == "both" else 0.0)  # model magnitudes, not dereddened
    if z:  # "z" is the z band where the magnitudes are plain u..z
        table["z" if mags == "dered" else "redshift"] = galaxies["redshift"]
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(np.ascontiguousarray(images), name="CUTOUTS"),
            fits.BinTableHDU(table, name="OBJECTS")]  # fmt: skip
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def write_hdf5(path: Path, galaxies: dict[str, np.ndarray], *, string_ids: bool = False) -> Path:
    import h5py

    with h5py.File(path, "w") as handle:
        handle["images"] = galaxies["images"]
        handle["magnitudes"] = galaxies["magnitudes"]
        handle["objid"] = [f"J{i:019d}" for i in galaxies["objid"]] if string_ids else galaxies["objid"]
        handle["ra"], handle["dec"] = galaxies["ra"], galaxies["dec"]
        handle["redshift"] = galaxies["redshift"]
    return path


def write_large_fits(path: Path, n: int, seed: int = 5, first: int = 0) -> Path:
    """``n`` cutouts (20 KB each) in one FITS file, written a block at a time so the writer never holds the set:
    512 synthetic galaxies repeated, each copy with its own ids (objects ``first`` to ``first + n - 1``)."""
    from astropy.io import fits
    from astropy.table import Table

    base = sample_galaxies(512, seed=seed)
    repeat = -(-n // 512)
    table = Table()
    table["objid"] = ((first + np.arange(n, dtype=np.int64)) * 5)[::-1] + 1237648720693755000
    for band, column in zip(synthetic.BANDS, np.tile(base["magnitudes"], (repeat, 1))[:n].T, strict=True):
        table[f"dered_{band}"] = column
    table["z"] = np.tile(base["redshift"], repeat)[:n]
    header = fits.ImageHDU(np.zeros((1, 5, 32, 32), np.float32), name="CUTOUTS").header
    header["NAXIS4"] = n
    with open(path, "wb") as fh:
        fits.PrimaryHDU().writeto(fh)
        fh.write(header.tostring().encode())
        block = base["images"].astype(">f4").tobytes()
        for start in range(0, n, 512):
            fh.write(block[: min(512, n - start) * 20480])
        fh.write(b"\0" * (-(n * 20480) % 2880))  # FITS data fill to a whole block
    objects = fits.BinTableHDU(table, name="OBJECTS")
    fits.append(path, objects.data, objects.header)
    return path
