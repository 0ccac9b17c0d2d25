"""predict --out NAME.hats: a HATS catalogue, checked with the reader astronomers use (lsdb), from the cpu backend
and from the dask backend, whose cluster writes it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from astro_samples import sample_galaxies, write_fits

lsdb = pytest.importorskip("lsdb")

N = 240


@pytest.fixture(scope="module")
def sky(tmp_path_factory) -> dict:
    """240 galaxies with survey-like ids, ra over the whole circle and dec from -10 to 70 degrees, in 3
    partitions."""
    from cai_bench.data.astro import import_catalogue

    galaxies = sample_galaxies(N, seed=11)
    root = tmp_path_factory.mktemp("sky")
    source = write_fits(root / "galaxies.fits", galaxies)
    import_catalogue([source], root / "set", 7.0)
    return {"galaxies": galaxies, "data": root / "set"}


def _predict(cli, data, out, *extra):
    code, _, err = cli("predict", "--data", str(data), "--out", str(out), "--precision", "fp32", "--runtime", "torch",
                       "--quiet", *extra)  # fmt: skip
    assert code == 0, err
    return err


def _separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance (haversine), in degrees, computed here from the input's own ra and dec."""
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(h)))


def test_a_hats_catalogue_holds_every_id_once_and_a_cone_finds_exactly_what_is_inside(cli, sky, tmp_path):
    out = tmp_path / "photoz.hats"
    _predict(cli, sky["data"], out, "--backend", "cpu")
    catalog = lsdb.read_hats(out)
    frame = catalog.compute()
    galaxies = sky["galaxies"]
    assert len(frame) == N and sorted(frame["id"]) == sorted(galaxies["objid"])  # every id, exactly once
    assert {"id", "ra", "dec", "z_pred", "z_true", "flags"} <= set(frame.columns)
    by_id = dict(zip(galaxies["objid"], galaxies["redshift"], strict=True))
    np.testing.assert_allclose(frame["z_true"], [by_id[i] for i in frame["id"]], rtol=1e-6)
    properties = catalog.hc_structure.catalog_info.model_extra
    columns = json.loads(properties["cai_bench_columns"])
    assert columns["ra"]["unit"] == "deg" and columns["z_pred"]["ucd"] == "src.redshift.phot"
    provenance = json.loads(properties["cai_bench_provenance"])
    assert provenance["model"] == "pcm-AstroMAE" and provenance["random_init"] is True
    assert (frame["flags"] & 16).all()  # random-init weights: every redshift flagged as meaning nothing

    ra, dec = galaxies["ra"], galaxies["dec"]
    for centre, radius in ((0, 25.0), (100, 12.0), (200, 40.0)):
        inside = _separation_deg(ra[centre], dec[centre], ra, dec) < radius
        edge = np.abs(_separation_deg(ra[centre], dec[centre], ra, dec) - radius)
        assert edge.min() > 1e-6  # no object sits on the circle, where rounding could put it either side
        found = catalog.cone_search(ra=float(ra[centre]), dec=float(dec[centre]), radius_arcsec=radius * 3600)
        assert sorted(found.compute()["id"]) == sorted(galaxies["objid"][inside]), (centre, radius)
        assert 0 < inside.sum() < N  # the cone separates something


def test_the_dask_cluster_writes_the_catalogue_and_predicts_what_cpu_predicts(cli, sky, external_cluster, tmp_path):
    from distributed import Client

    _predict(cli, sky["data"], tmp_path / "cpu.parquet", "--backend", "cpu")
    _predict(cli, sky["data"], tmp_path / "dask.hats", "--backend", "dask", "--scheduler", external_cluster["address"])
    with Client(external_cluster["address"]) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "perform_write" in prefixes  # lsdb's writing tasks went to the cluster's workers
    from cai_bench.data.catalogue import read_catalogue

    cpu, _ = read_catalogue(tmp_path / "cpu.parquet")
    dask, about = read_catalogue(tmp_path / "dask.hats")  # predict's own reader opens it too
    order, theirs = np.argsort(dask["id"]), np.argsort(cpu["id"])
    assert np.array_equal(dask["id"][order], cpu["id"][theirs])
    np.testing.assert_allclose(dask["z_pred"][order], cpu["z_pred"][theirs], atol=1e-5)
    assert about["runtimes"] == ["torch"]


def test_hats_is_refused_before_predicting_without_positions_and_force_replaces_only_a_catalogue(cli, tiny_data, sky,
                                                                                                 tmp_path):  # fmt: skip
    code, _, err = cli("predict", "--data", str(tiny_data), "--out", str(tmp_path / "x.hats"))
    assert code == 2 and "has no ra and dec" in err and "Nothing was predicted" in err
    assert not (tmp_path / "x.hats.parts").exists()

    other = tmp_path / "mine.hats"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli("predict", "--data", str(sky["data"]), "--out", str(other), "--force")
    assert code == 2 and "is not a HATS catalogue; it is left as it is" in err
    assert (other / "notes.txt").read_text() == "mine"

    out = tmp_path / "again.hats"
    _predict(cli, sky["data"], out, "--backend", "cpu")
    code, _, err = cli("predict", "--data", str(sky["data"]), "--out", str(out))
    assert code == 2 and "exists; pass --force" in err
    shutil.rmtree(out / "again" / "dataset")  # a damaged catalogue: --force writes a whole new one
    _predict(cli, sky["data"], out, "--backend", "cpu", "--force")
    assert len(lsdb.read_hats(out).compute()) == N
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
