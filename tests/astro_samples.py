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
        table[f"dered_{band}" if mags == "dered" else band] = column
    if z:
        table["z"] = galaxies["redshift"]
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
