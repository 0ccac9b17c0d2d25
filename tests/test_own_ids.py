"""Every object keeps its own id and redshift: truth catalogues in every format joined exactly (SDSS ids above
2^53 that differ by less than 256, ids that are not whole numbers), "no redshift" values kept out of the
metrics, and catalogues written so that neither a spreadsheet nor a FITS reader is hurt by what they hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astro_samples import sample_galaxies, write_fits
from astropy.table import Table

from cai_bench.data.catalogue import read_catalogue, write_catalogue

N = 40
SENTINELS = (-9999.0, -99.0, -1.0, np.nan)


@pytest.fixture(scope="module")
def sdss(tmp_path_factory) -> dict:
    """A FITS data set of 40 galaxies whose ids are SDSS-like, past 2^53, neighbours 1 apart."""
    from cai_bench.data.astro import import_catalogue

    galaxies = sample_galaxies(N, seed=7)
    galaxies["objid"] = 1237648720693755918 + np.random.default_rng(1).permutation(N).astype(np.int64)
    root = tmp_path_factory.mktemp("sdss")
    source = write_fits(root / "galaxies.fits", galaxies)
    import_catalogue([source], root / "set", 1.0)
    return {"galaxies": galaxies, "data": root / "set", "root": root}


def _truth_table(galaxies: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids in another order, each with a redshift of its own, four of them the surveys' "no redshift"."""
    order = np.random.default_rng(2).permutation(N)
    ids = galaxies["objid"][order]
    z = np.round(0.05 + 0.01 * order, 6)  # no two alike: a wrong join shows
    z[:4] = SENTINELS
    return ids, z, order


def _write_truth(path, ids, z) -> None:
    if path.suffix == ".csv":
        lines = ["objid,zspec"] + [f"{i},{'' if np.isnan(v) else repr(float(v))}" for i, v in zip(ids, z, strict=True)]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".parquet":
        pq.write_table(pa.table({"objid": ids, "zspec": z}), path)
    else:  # .ecsv and .fits, as astropy writes them
        Table({"objid": ids, "zspec": z}).write(path)


@pytest.mark.parametrize("suffix", [".csv", ".ecsv", ".fits", ".parquet"])
def test_sdss_ids_join_their_own_redshifts_from_every_format(cli, sdss, tmp_path, suffix):
    ids, z, _ = _truth_table(sdss["galaxies"])
    truth = tmp_path / f"truth{suffix}"
    _write_truth(truth, ids, z)
    out = tmp_path / "c.parquet"
    code, stdout, err = cli("predict", "--data", sdss["data"], "--precision", "fp32", "--threads", "1", "--out", out,
                            "--truth", truth, "--results", tmp_path, "--json", "-q")  # fmt: skip
    assert code == 0, err
    columns = read_catalogue(out)[0]
    expected = dict(zip(ids.tolist(), z.tolist(), strict=True))
    for object_id, joined in zip(columns["id"].tolist(), columns["z_true"].tolist(), strict=True):
        want = expected[object_id]
        assert (np.isnan(joined) and (np.isnan(want) or want <= -1)) or joined == want, (object_id, joined, want)
    note = json.loads(stdout)["provenance"]["z_true"]
    assert (note["matched"], note["used"], note["missing"], note["out_of_range"]) == (N, N - 4, 4, 0)
    assert json.loads(stdout)["accuracy"]["photoz"]["objects"] == N - 4


def test_ids_past_2_to_the_53_differ_by_one_and_stay_apart(tmp_path):
    from cai_bench.data.truth import join_truth, load_truth

    ids = np.int64(2**60) + np.arange(6, dtype=np.int64)
    (tmp_path / "t.csv").write_text("objid,z\n" + "".join(f"{i},0.{k + 1}\n" for k, i in enumerate(ids[::-1])))
    truth = load_truth(tmp_path / "t.csv", "objid")
    assert truth.ids.dtype == np.int64 and truth.ids.tolist() == ids[::-1].tolist()
    z, note = join_truth(ids, truth)
    assert z.tolist() == [0.6, 0.5, 0.4, 0.3, 0.2, 0.1] and note["matched"] == 6


def test_an_integer_id_past_int64_is_one_line(cli, tmp_path, tiny_data):
    (tmp_path / "t.csv").write_text("objid,z\n99999999999999999999,0.1\n5,0.2\n")
    code, _, err = cli("predict", "--data", tiny_data, "--out", tmp_path / "c.csv", "--truth", tmp_path / "t.csv",
                       "--results", tmp_path, "-q")  # fmt: skip
    assert code == 2 and "id 99999999999999999999 in column objid does not fit a 64-bit integer" in err, err
    assert not (tmp_path / "c.csv").exists()


@pytest.mark.parametrize("suffix", [".csv", ".fits", ".parquet"])
def test_ids_that_are_not_whole_numbers_match_none(tmp_path, suffix):
    from cai_bench.data.truth import join_truth, load_truth

    theirs = np.array([5000.7, 5001.7, 5002.0, 5003.5])
    _write_truth(tmp_path / f"t{suffix}", theirs, np.array([0.1, 0.2, 0.3, 0.4]))
    z, note = join_truth(np.arange(5000, 5004, dtype=np.int64), load_truth(tmp_path / f"t{suffix}", "objid"))
    assert np.isnan(z[[0, 1, 3]]).all() and z[2] == 0.3  # 5002.0 is 5002; 5000.7 is not 5000
    assert (note["matched"], note["not_whole"]) == (1, 3)


def test_not_whole_ids_through_predict_say_nothing_was_compared(cli, tiny_data, tmp_path):
    samples = 104
    pq.write_table(pa.table({"objid": np.arange(samples) + 0.7, "z": np.full(samples, 0.1)}), tmp_path / "t.parquet")
    code, _, err = cli("predict", "--data", tiny_data, "--out", tmp_path / "c.csv", "--truth", tmp_path / "t.parquet",
                       "--precision", "fp32", "--results", tmp_path, "-q")  # fmt: skip
    assert code == 2 and "none of the 104 ids is in its column objid" in err, err


CSV_CASES = {
    "bom.csv": (b"\xef\xbb\xbfobjid,z\n1,0.1\n2,0.2\n", None),
    "empty-z.csv": (b"objid,z\n1,0.1\n2,\n", None),
    "ragged.csv": (b"objid,z\n1,0.1\n2\n3,0.3\n", "line 3 has 1 cells, the header 2"),
    "long.csv": (b"objid,z\n1,0.1,9\n", "line 2 has 3 cells, the header 2"),
    "text-z.csv": (b"objid,z\n1,0.1\n2,abc\n", "redshift column z holds text, not numbers (row 2: abc)"),
    "no-id.csv": (b"objid,z\n1,0.1\n,0.2\n", "row 2 has no id in column objid"),
    "empty.csv": (b"objid,z\n", "holds no rows"),
}


def test_csv_truth_files_as_spreadsheets_write_them(tmp_path):
    from cai_bench.core.errors import UserError
    from cai_bench.data.truth import load_truth

    for name, (data, message) in CSV_CASES.items():
        (tmp_path / name).write_bytes(data)
        if message is None:
            truth = load_truth(tmp_path / name, "objid")
            assert truth.ids.tolist() == [1, 2] and truth.z[0] == 0.1, name
            assert (truth.status[1] == 1) == (name == "empty-z.csv"), name  # an empty cell: missing
        else:
            with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
                load_truth(tmp_path / name, "objid")


def test_sentinels_and_impossible_redshifts_are_counted_and_not_used(tmp_path):
    from cai_bench.data.truth import join_truth, load_truth, parse_missing

    z = [0.1, -9999, -99, -1, np.nan, 1e308, np.inf, -1.5, 0.3]
    pq.write_table(pa.table({"objid": np.arange(9), "z": z}), tmp_path / "t.parquet")
    joined, note = join_truth(np.arange(9), load_truth(tmp_path / "t.parquet", "objid"))
    assert np.flatnonzero(np.isfinite(joined)).tolist() == [0, 8]
    assert (note["used"], note["missing"], note["out_of_range"]) == (2, 4, 3)
    # with no "no redshift" values, -9999 and -99 are impossible redshifts; -1 (1 + z = 0) too
    _, note = join_truth(np.arange(9), load_truth(tmp_path / "t.parquet", "objid", missing=parse_missing("none")))
    assert (note["used"], note["missing"], note["out_of_range"]) == (2, 0, 7)


def test_truth_missing_is_checked_and_an_empty_truth_is_refused_before_predicting(cli, tiny_data, tmp_path):
    empty = pa.table({"objid": pa.array([], pa.int64()), "z": pa.array([], pa.float64())})
    pq.write_table(empty, tmp_path / "e.parquet")
    base = ["predict", "--data", tiny_data, "--out", tmp_path / "c.csv", "--results", tmp_path, "-q"]
    code, _, err = cli(*base, "--truth", tmp_path / "e.parquet")
    assert code == 2 and "holds no rows" in err and not (tmp_path / "c.csv.parts").exists(), err
    code, _, err = cli(*base, "--truth", tmp_path / "e.parquet", "--truth-missing", "-9999,none?")
    assert code == 2 and "--truth-missing: none? is not a number" in err, err


# ---------------------------------------------------------------------------------------------- catalogues out


def test_csv_cells_a_spreadsheet_would_run_are_prefixed_and_read_back_as_they_were(tmp_path):
    ids = np.array(["=cmd|' /C calc'!A0", "+1+1", "-2", "@SUM(A1)", "'quoted", "plain", "\tx"])
    columns = {"id": ids, "z_pred": np.linspace(0.1, 0.7, len(ids)).astype(np.float32)}
    write_catalogue(tmp_path / "c.csv", "csv", columns, {"model": "m"})
    rows = [line.split(",")[0] for line in (tmp_path / "c.csv").read_text().splitlines() if not line.startswith("#")]
    assert all(not cell.lstrip('"').startswith(("=", "+", "-", "@", "\t")) for cell in rows[1:]), rows
    back, about = read_catalogue(tmp_path / "c.csv")
    assert back["id"].tolist() == ids.tolist()
    assert "spreadsheet" in about["csv_text_prefix"]
    assert Table.read(tmp_path / "c.csv", format="ascii.ecsv")["id"][0] == "'=cmd|' /C calc'!A0"


def test_fits_provenance_keeps_every_input_by_its_own_name(tmp_path):
    inputs = [{"name": f"tile-{n}.fits", "sha256": f"{n:064x}"} for n in range(1, 121)]
    write_catalogue(tmp_path / "c.fits", "fits", {"z_pred": np.zeros(3, np.float32)}, {"inputs": inputs})
    about = read_catalogue(tmp_path / "c.fits")[1]
    assert [i["name"] for i in about["inputs"]] == [i["name"] for i in inputs]
    from astropy.io import fits

    header = fits.getheader(tmp_path / "c.fits", 1)
    assert header["INFILE10"] == "tile-10.fits"  # never INFILE100's name cut to 8 characters


def test_a_non_ascii_id_is_refused_before_a_fits_catalogue_is_predicted(cli, tmp_path):
    import h5py

    from cai_bench.data.astro import import_catalogue

    galaxies = sample_galaxies(8, seed=4)
    with h5py.File(tmp_path / "g.h5", "w") as handle:
        for name in ("images", "magnitudes", "ra", "dec", "redshift"):
            handle[name] = galaxies[name]
        handle["objid"] = [f"M31-étoile-{n}".encode() for n in range(8)]
    import_catalogue([tmp_path / "g.h5"], tmp_path / "set", 1.0)
    code, _, err = cli("predict", "--data", tmp_path / "set", "--out", tmp_path / "c.fits", "--results", tmp_path, "-q")
    assert code == 2 and "is not ASCII" in err and "Nothing was predicted" in err, err
    assert not (tmp_path / "c.fits.parts").exists() and not (tmp_path / "runs.jsonl").exists()


def test_a_killed_writers_temporary_is_removed_by_the_next_success(cli, tiny_data, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".c.csv.tmp-{dead.pid}"
    stale.write_text("half a catalogue")
    alive = tmp_path / f".c.csv.tmp-{os.getpid()}x"  # not a pid: not ours to judge
    alive.write_text("someone's")
    code, _, err = cli("predict", "--data", tiny_data, "--out", tmp_path / "c.csv", "--precision", "fp32",
                       "--results", tmp_path, "-q")  # fmt: skip
    assert code == 0, err
    assert not stale.exists() and alive.exists()


# ---------------------------------------------------------------------------------------------- --force


def test_force_never_replaces_a_directory_that_is_not_a_data_set(cli, sdss, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("four years")
    source = sdss["root"] / "galaxies.fits"
    commands = {
        "import": ("data", "import", source, "--out", precious, "--partition-mb", "1", "--force"),
        "synth": ("data", "synth", "--gb", "0.001", "--out", precious, "--force"),
        "split": ("data", "split", sdss["data"], "--partition-mb", "0.5", "--out", precious, "--force"),
        "export": ("model", "export", "--format", "onnx", "--out", precious, "--force"),
    }
    for name, args in commands.items():
        code, _, err = cli(*args)
        what = "export (no export.json)" if name == "export" else "data set (no manifest.json)"
        assert code == 2 and f"not a cai-bench {what}" in err, (name, err)
        assert [p.name for p in precious.iterdir()] == ["thesis.txt"], name
        assert (precious / "thesis.txt").read_text() == "four years"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".precious")]


def test_force_replaces_a_data_set_whole(cli, sdss, tmp_path):
    out = tmp_path / "set"
    assert cli("data", "synth", "--gb", "0.001", "--out", out)[0] == 0
    first = json.loads((out / "manifest.json").read_text())["dataset_id"]
    code, _, err = cli("data", "import", sdss["root"] / "galaxies.fits", "--out", out, "--partition-mb", "1", "--force")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["dataset_id"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # nothing left aside


def test_predict_removes_a_parts_directory_only_with_force_and_only_its_own(cli, tiny_data, tmp_path):
    base = ["predict", "--data", tiny_data, "--out", tmp_path / "c.csv", "--precision", "fp32", "--results", tmp_path]
    parts = tmp_path / "c.csv.parts"
    parts.mkdir()
    (parts / "part-000000.npz").write_bytes(b"an old part")
    code, _, err = cli(*base, "-q")
    assert code == 2 and "pass --force to remove them" in err and (parts / "part-000000.npz").exists(), err
    (parts / "notes.md").write_text("mine")
    code, _, err = cli(*base, "-q", "--force")
    assert code == 2 and "is not a parts directory of predict; it is left as it is" in err, err
    assert (parts / "notes.md").read_text() == "mine"
    (parts / "notes.md").unlink()
    code, _, err = cli(*base, "-q", "--force")
    assert code == 0 and not parts.exists(), err


def test_data_import_reads_no_redshift_as_the_truth_reader_does(cli, tmp_path):
    galaxies = sample_galaxies(30, seed=9)
    galaxies["redshift"][[2, 5, 7, 11]] = [np.nan, -9999.0, -99.0, np.inf]
    write_fits(tmp_path / "g.fits", galaxies, mags="plain")
    code, _, err = cli("data", "import", tmp_path / "g.fits", "--out", tmp_path / "set", "--partition-mb", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "set" / "manifest.json").read_text())["source"]["redshifts_not_used"] == 4
    out = tmp_path / "c.parquet"
    code, stdout, err = cli("predict", "--data", tmp_path / "set", "--out", out, "--precision", "fp32",
                            "--results", tmp_path, "--json", "-q")  # fmt: skip
    assert code == 0, err
    assert np.flatnonzero(np.isnan(read_catalogue(out)[0]["z_true"])).tolist() == [2, 5, 7, 11]
    assert json.loads(stdout)["accuracy"]["photoz"]["objects"] == 26
