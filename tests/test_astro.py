"""Astronomers' data in and catalogues out: FITS and HDF5 cutouts, object ids kept end to end, a redshift
catalogue with units and provenance, and true redshifts joined from a catalogue by id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from astro_samples import sample_galaxies, write_fits, write_hdf5
from astropy.io import fits
from astropy.table import Table
from torch.utils.data import TensorDataset

from cai_bench.commands import predict
from cai_bench.core.files import file_sha256
from cai_bench.core.plan import make_plan
from cai_bench.data.catalogue import FLAGS, MAG_OUT_OF_RANGE, RANDOM_WEIGHTS, Z_OUT_OF_RANGE, read_catalogue
from cai_bench.data.manifest import load_manifest
from cai_bench.data.partitions import open_dataset, read_partition
from cai_bench.measure.photoz import point_metrics

N = 90  # two FITS files of 50 and 40; partitions of 0.5 MB (26 objects) cut across them
MB = "0.5"


@pytest.fixture(scope="module")
def galaxies() -> dict[str, np.ndarray]:
    return sample_galaxies(N, seed=3)


def _part(galaxies: dict, rows: slice) -> dict:
    return {name: values[rows] for name, values in galaxies.items()}


@pytest.fixture(scope="module")
def imports(galaxies, tmp_path_factory) -> dict[str, Path]:
    """The same galaxies imported from .pt, from two FITS files (one NHWC) and from HDF5 with string ids."""
    from cai_bench.data.astro import import_catalogue
    from cai_bench.data.upstream import import_upstream

    root = tmp_path_factory.mktemp("astro")
    pt = root / "galaxies.pt"
    tensors = (torch.from_numpy(galaxies[k]) for k in ("images", "magnitudes", "redshift"))
    torch.save(TensorDataset(*tensors), pt)
    first = write_fits(root / "first.fits", _part(galaxies, slice(0, 50)))
    second = write_fits(root / "second.fits", _part(galaxies, slice(50, N)), nhwc=True, mags="plain")
    h5 = write_hdf5(root / "galaxies.h5", galaxies, string_ids=True)
    sets = {"pt": root / "from-pt", "fits": root / "from-fits", "hdf5": root / "from-hdf5"}
    import_upstream([pt], sets["pt"], float(MB))
    import_catalogue([first, second], sets["fits"], float(MB))
    import_catalogue([h5], sets["hdf5"], float(MB))
    return {**sets, "first": first, "second": second, "h5": h5, "root": root}


def _plan(directory: Path, weights: Path):
    _, summary, refs = open_dataset(directory)
    return make_plan("cpu", summary, refs, batch_size=16, threads=1, weights=str(weights), precision="fp32")


def test_fits_and_hdf5_import_the_same_partitions_as_pt_with_the_ids_beside(imports, galaxies):
    hashes = {kind: [e.sha256 for e in load_manifest(imports[kind]).partitions] for kind in ("pt", "fits", "hdf5")}
    assert len(hashes["pt"]) == 4 and hashes["fits"] == hashes["pt"] == hashes["hdf5"]  # byte for byte
    fits_set = load_manifest(imports["fits"])
    assert fits_set.objects.id_type == "int64" and fits_set.objects.has_position
    assert [f["image_layout"] for f in fits_set.source["files"]] == ["NCHW", "NHWC"]
    assert [f["sha256"] for f in fits_set.source["files"]] == [file_sha256(imports[k]) for k in ("first", "second")]
    table = pq.read_table(imports["fits"] / "objects.parquet")
    assert table.column("id").to_pylist() == galaxies["objid"].tolist()  # shuffled, not contiguous
    assert table.column("file").to_pylist() == [0] * 50 + [1] * 40 and table.column("row").to_pylist()[49:51] == [49, 0]
    np.testing.assert_array_equal(table.column("ra").to_numpy(), galaxies["ra"])
    assert load_manifest(imports["hdf5"]).objects.id_type == "string"
    positions = torch.cat([read_partition(ref).object_id for ref in open_dataset(imports["fits"])[2]])
    assert positions.tolist() == list(range(N))


def test_the_upstream_import_says_its_ids_are_row_numbers(imports):
    manifest = load_manifest(imports["pt"])
    assert manifest.objects is None and "row numbers" in manifest.source["ids"]


def test_predictions_are_equal_and_the_ids_reach_every_catalogue(imports, galaxies, weights_file, tmp_path):
    """The acceptance's round trip: same weights, same predictions from .pt, FITS and HDF5; the ids, ra and dec
    carried into Parquet, FITS and CSV; astropy reads the units; the provenance is present and true."""
    from_pt = predict.predict(_plan(imports["pt"], weights_file), tmp_path / "pt.parquet", None)
    outcomes = {fmt: predict.predict(_plan(imports["fits"], weights_file), tmp_path / f"c.{fmt}", None)
                for fmt in ("parquet", "fits", "csv")}  # fmt: skip
    want = read_catalogue(tmp_path / "pt.parquet")[0]
    assert want["id"].tolist() == list(range(N))  # no ids in a .pt file: row numbers
    for fmt in ("parquet", "fits", "csv"):
        got = read_catalogue(tmp_path / f"c.{fmt}")[0]
        np.testing.assert_array_equal(got["z_pred"], want["z_pred"].astype(got["z_pred"].dtype))
        assert got["id"].tolist() == galaxies["objid"].tolist()
        np.testing.assert_allclose(got["ra"], galaxies["ra"])
        np.testing.assert_allclose(got["dec"], galaxies["dec"])
        np.testing.assert_allclose(got["z_true"], galaxies["redshift"], rtol=1e-6)
    h5 = predict.predict(_plan(imports["hdf5"], weights_file), tmp_path / "h5.parquet", None)
    got = read_catalogue(tmp_path / "h5.parquet")[0]
    np.testing.assert_array_equal(got["z_pred"], want["z_pred"])
    assert got["id"].tolist() == [f"J{i:019d}" for i in galaxies["objid"]]
    assert h5.objects == from_pt.objects == N

    table = Table.read(tmp_path / "c.fits")  # TUNITn, as astropy reads them
    assert str(table["ra"].unit) == str(table["dec"].unit) == "deg" and table["id"].dtype.kind == "i"
    voparquet = Table.read(tmp_path / "c.parquet", format="parquet.votable")
    assert str(voparquet["ra"].unit) == "deg" and "predicted" in voparquet["z_pred"].description
    ecsv = Table.read(tmp_path / "c.csv", format="ascii.ecsv")
    assert str(ecsv["dec"].unit) == "deg" and ecsv.meta["cai_bench"]["model"] == "pcm-AstroMAE"
    _check_provenance(outcomes["parquet"], read_catalogue(tmp_path / "c.parquet")[1], imports, weights_file)
    header = table.meta
    assert header["WEIGHTSH"] == file_sha256(weights_file) and header["RUNID1"] == outcomes["fits"].records[0].run_id
    assert header["INSHA2"] == file_sha256(imports["second"]) and header["RUNTIME1"] == "torch"


def _check_provenance(outcome, about: dict, imports: dict, weights: Path) -> None:
    record = outcome.records[0]
    assert about["model"] == "pcm-AstroMAE" and about["random_init"] is False
    assert about["weights"] == weights.name and about["weights_sha256"] == file_sha256(weights)
    assert about["run_ids"] == [record.run_id] and about["runtimes"] == ["torch"] and about["precisions"] == ["fp32"]
    assert about["dataset_id"] == load_manifest(imports["fits"]).dataset_id
    assert about["inputs"] == [{"name": n, "sha256": file_sha256(imports[k])} for n, k in
                               (("first.fits", "first"), ("second.fits", "second"))]  # fmt: skip
    assert about["cai_bench"] == "0.1.0" and about["created_utc"][:4].isdigit()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if commit.returncode == 0:  # a checkout: the commit is the one that ran
        assert about["git_commit"] == commit.stdout.strip()
    assert set(about["flags"]) == {str(bit) for bit in FLAGS}


def test_a_resumed_prediction_names_both_runs(imports, tmp_path, monkeypatch):
    out = tmp_path / "c.parquet"
    real_write = predict._write_part

    def two_then_stop(parts, result, ran):
        if len(list(parts.glob("part-*.npz"))) == 2:
            raise KeyboardInterrupt
        real_write(parts, result, ran)

    monkeypatch.setattr(predict, "_write_part", two_then_stop)
    _, summary, refs = open_dataset(imports["fits"])
    plan = make_plan("cpu", summary, refs, batch_size=16, threads=1, precision="fp32")
    with pytest.raises(KeyboardInterrupt):
        predict.predict(plan, out, None)
    monkeypatch.setattr(predict, "_write_part", real_write)
    outcome = predict.predict(plan, out, None)
    about = read_catalogue(out)[1]
    assert len(about["run_ids"]) == 2 and outcome.records[0].run_id in about["run_ids"]


def test_flags_say_what_is_out_of_range(imports, tmp_path):
    _, summary, refs = open_dataset(imports["fits"])
    plan = make_plan("cpu", summary, refs, batch_size=16, threads=1, precision="fp32")  # random-init weights
    outcome = predict.predict(plan, tmp_path / "c.parquet", None)
    columns = read_catalogue(tmp_path / "c.parquet")[0]
    flags = columns["flags"]
    assert (flags & RANDOM_WEIGHTS).all()
    magnitudes = np.concatenate([read_partition(ref).magnitudes.numpy() for ref in refs])
    outside = (magnitudes[:, 2] > 17.8) | (magnitudes[:, 0] > 22) | (magnitudes[:, 0] < 16) | (magnitudes[:, 1] < 15)
    assert ((flags & MAG_OUT_OF_RANGE) != 0)[outside].all()
    z = columns["z_pred"]
    assert (((flags & Z_OUT_OF_RANGE) != 0) == ((z < 0.01) | (z > 0.55))).all()
    assert outcome.provenance["flag_counts"][str(RANDOM_WEIGHTS)] == N


def test_truth_joined_by_id_gives_the_metrics_of_the_matched(cli, imports, galaxies, weights_file, tmp_path):
    rows = np.arange(0, N, 3)  # a third of the objects, in another order, with another redshift, and strangers
    truth_ids = np.concatenate([galaxies["objid"][rows][::-1], [7, 8]])
    truth_z = np.concatenate([galaxies["redshift"][rows][::-1] + 0.02, [0.1, 0.2]])
    Table({"objid": truth_ids, "zspec": truth_z}).write(tmp_path / "truth.fits")
    out = tmp_path / "c.parquet"
    code, stdout, err = cli("predict", "--data", imports["fits"], "--weights", weights_file, "--precision", "fp32",
                            "--out", out, "--truth", tmp_path / "truth.fits", "--on", "objid", "--results", tmp_path,
                            "--json", "-q")  # fmt: skip
    assert code == 0, err
    figures = json.loads(stdout)
    columns = read_catalogue(out)[0]
    matched = np.isfinite(columns["z_true"])
    assert matched.sum() == len(rows) and np.flatnonzero(matched).tolist() == rows.tolist()
    np.testing.assert_allclose(columns["z_true"][rows], galaxies["redshift"][rows] + 0.02, rtol=1e-6)
    expected = point_metrics(columns["z_pred"][rows], columns["z_true"][rows])
    assert figures["accuracy"]["photoz"] == pytest.approx(expected)
    joined = figures["provenance"]["z_true"]
    assert (joined["matched"], joined["objects"], joined["z_column"]) == (len(rows), N, "zspec")


def test_truth_catalogue_problems_are_one_line(cli, imports, galaxies, tmp_path):
    base = ["predict", "--data", imports["hdf5"], "--precision", "fp32", "--results", tmp_path, "-q"]
    pq.write_table(pa.table({"objid": ["a", "a"], "z": [0.1, 0.2]}), tmp_path / "twice.parquet")
    pq.write_table(pa.table({"objid": ["x", "y"], "z": [0.1, 0.2]}), tmp_path / "strangers.parquet")
    cases = {
        "twice.parquet": ("--on", "objid", "id a appears 2 times in column objid"),
        "strangers.parquet": ("--on", "name", "no column 'name' to join on (--on); found objid, z"),
    }
    for name, (flag, column, message) in cases.items():
        code, _, err = cli(*base, "--out", tmp_path / f"{name}.csv", "--truth", tmp_path / name, flag, column)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    out = tmp_path / "none.csv"
    code, _, err = cli(*base, "--out", out, "--truth", tmp_path / "strangers.parquet", "--on", "objid")
    assert code == 2 and "none of the 90 ids is in its column objid: nothing was compared" in err
    assert out.is_file()  # the predictions are kept


def _bad_files(root: Path, galaxies: dict) -> dict[str, tuple[Path, str]]:
    """Each kind of bad input, and the words its one line must hold."""
    few = _part(galaxies, slice(0, 10))
    big = {**few, "images": np.zeros((10, 5, 64, 64), np.float32)}
    bands = {**few, "images": np.zeros((10, 3, 32, 32), np.float32)}
    nan = {**few, "images": few["images"].copy()}
    nan["images"][7, 2, 3, 4] = np.nan
    twice = {**few, "objid": np.concatenate([few["objid"][:9], few["objid"][:1]])}
    cases = {
        "64.fits": (write_fits(root / "64.fits", big), "64.fits HDU 1 (CUTOUTS): cutouts are 64x64 pixels; the model"
                    " needs 32x32"),
        "bands.fits": (write_fits(root / "bands.fits", bands), "images have shape [10, 3, 32, 32]"),
        "nan.fits": (write_fits(root / "nan.fits", nan), "nan.fits HDU 1 (CUTOUTS): cutout 7 holds NaN or inf pixels"),
        "twice.fits": (write_fits(root / "twice.fits", twice), "appears 2 times or more: "),
        "nomags.fits": (write_fits(root / "nomags.fits", few, mags="none"), "HDU 2 (OBJECTS): no magnitude column(s)"),
        "text.fits": (root / "text.fits", "not a readable FITS file"),
        "nan.h5": (write_hdf5(root / "nan.h5", nan), "nan.h5 dataset images: cutout 7 holds NaN"),
    }  # fmt: skip
    (root / "text.fits").write_text("SIMPLE? no, a text file\n")
    rows = write_fits(root / "rows.fits", few)
    with fits.open(rows) as hdul:  # a table one row short of the images
        short = fits.BinTableHDU(hdul[2].data[:9], name="OBJECTS")
        fits.HDUList([fits.PrimaryHDU(), hdul[1].copy(), short]).writeto(root / "short.fits")
    cases["short.fits"] = (root / "short.fits", "short.fits HDU 2 (OBJECTS): id has 9 rows, the images 10")
    import h5py

    with h5py.File(root / "noid.h5", "w") as handle:
        handle["images"], handle["magnitudes"] = few["images"], few["magnitudes"]
    cases["noid.h5"] = (root / "noid.h5", "noid.h5: no id column 'objid' (--id-column names it; found magnitudes)")
    return cases


def test_each_bad_input_is_one_line_and_exit_2(cli, galaxies, tmp_path):
    for name, (path, message) in _bad_files(tmp_path, galaxies).items():
        code, _, err = cli("data", "import", path, "--partition-mb", "1", "--out", tmp_path / f"out-{name}", "-q")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (tmp_path / f"out-{name}").exists()  # nothing half-written
    code, _, err = cli("data", "import", tmp_path / "nan.fits", tmp_path / "nan.h5", "--partition-mb", "1", "--out",
                       tmp_path / "mixed")  # fmt: skip
    assert code == 2 and "several kinds (fits, hdf5); import each kind separately" in err
    code, _, err = cli("data", "import", tmp_path / "x.pt", "--id-column", "objid", "--partition-mb", "1", "--out",
                       tmp_path / "pt")  # fmt: skip
    assert code == 2 and "--id-column: only FITS and HDF5 files have named columns" in err


def test_named_columns_and_hdus(cli, galaxies, tmp_path):
    few = _part(galaxies, slice(0, 12))
    path = write_fits(tmp_path / "plain.fits", few, mags="plain", z=False)
    out = tmp_path / "out"
    code, stdout, err = cli("data", "import", path, "--partition-mb", "1", "--out", out, "--images", "CUTOUTS",
                            "--mag-columns", "u,g,r,i,z", "--id-column", "objid", "-q")  # fmt: skip
    assert code == 0, err
    assert "labels: no" in stdout and "ids: int64, from column objid, with ra and dec" in stdout
    manifest = load_manifest(out)
    assert manifest.has_labels is False
    both = write_fits(tmp_path / "both.fits", few, mags="both", z=False)  # u..z beside dered_*: z is a band
    code, stdout, err = cli("data", "import", both, "--partition-mb", "1", "--out", tmp_path / "both", "-q")
    assert code == 0 and "labels: no" in stdout, err
    magnitudes = read_partition(open_dataset(tmp_path / "both")[2][0]).magnitudes.numpy()
    np.testing.assert_array_equal(magnitudes, few["magnitudes"])  # dered_* chosen first
    with fits.open(path) as hdul:  # an SDSS-style table: every column name in capitals
        hdul[2].columns.change_name("objid", "OBJID")
        hdul[2].columns.change_name("redshift" if "redshift" in hdul[2].columns.names else "u", "U")
        hdul.writeto(tmp_path / "capitals.fits")
    code, _, err = cli("data", "import", tmp_path / "capitals.fits", "--partition-mb", "1", "--out", tmp_path / "o1",
                       "--mag-columns", "u,g,r,i,z", "-q")  # fmt: skip
    assert code == 0, err
    assert pq.read_table(tmp_path / "o1" / "objects.parquet").column("id").to_pylist() == few["objid"].tolist()
    code, _, err = cli("data", "import", path, "--partition-mb", "1", "--out", tmp_path / "o2", "--images", "9")
    assert code == 2 and "no HDU '9'" in err
    code, _, err = cli("data", "import", path, "--partition-mb", "1", "--out", tmp_path / "o3", "--z-column", "zz")
    assert code == 2 and "no redshift column 'zz' (--z-column)" in err


def test_split_keeps_the_ids_and_verify_checks_them(cli, imports, tmp_path, galaxies):
    out = tmp_path / "split"
    code, _, err = cli("data", "split", imports["fits"], "--partition-mb", "0.2", "--out", out, "-q")
    assert code == 0, err
    assert pq.read_table(out / "objects.parquet").column("id").to_pylist() == galaxies["objid"].tolist()
    code, stdout, _ = cli("data", "verify", out)
    assert code == 0 and "all 9 partitions match" in stdout
    table = pq.read_table(out / "objects.parquet")
    pq.write_table(table.slice(0, N - 1), out / "objects.parquet")  # a row lost
    code, _, err = cli("data", "verify", out)
    assert code == 2 and "objects.parquet: does not match the manifest's size and sha256" in err


def test_without_the_astro_extra_one_line_says_what_to_install(cli, galaxies, tmp_path, monkeypatch, tiny_data):
    path = write_fits(tmp_path / "a.fits", _part(galaxies, slice(0, 4)))
    h5 = write_hdf5(tmp_path / "a.h5", _part(galaxies, slice(0, 4)))
    for module in ("astropy", "astropy.io", "astropy.io.fits", "h5py"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    code, _, err = cli("data", "import", path, "--partition-mb", "1", "--out", tmp_path / "o")
    assert code == 2 and err.strip() == "error: reading FITS files needs astropy: pip install 'cai-bench[astro]'"
    code, _, err = cli("data", "import", h5, "--partition-mb", "1", "--out", tmp_path / "o")
    assert code == 2 and err.strip() == "error: reading HDF5 files needs h5py: pip install 'cai-bench[astro]'"
    code, _, err = cli("predict", "--data", tiny_data, "--out", tmp_path / "c.fits")
    assert code == 2 and "writing a FITS catalogue needs astropy: pip install 'cai-bench[astro]'" in err


# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec (pytest's, with torch loaded)
MEASURE_IMPORT = """
import json, re, sys
from pathlib import Path
import astropy.io.fits, astropy.table, h5py, pyarrow.parquet, safetensors.numpy  # loaded before measuring
from cai_bench.data.astro import import_catalogue
def kib(name):
    return int(re.search(name + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
before = kib("VmRSS")
import_catalogue([sys.argv[1]], sys.argv[2], 2.0)
print(json.dumps({"grew": kib("VmHWM") - before}))
"""


def test_a_fits_set_is_imported_a_slice_at_a_time(tmp_path):
    """The peak memory an import adds does not grow with the set: 4x the cutouts (335 MB against 84 MB) add
    less than a quarter of the larger set, where holding it would add all of it."""
    from astro_samples import write_large_fits

    grew = {}
    for n in (4096, 16384):
        path = write_large_fits(tmp_path / f"{n}.fits", n)
        done = subprocess.run([sys.executable, "-c", MEASURE_IMPORT, str(path), str(tmp_path / f"set-{n}")],
                              capture_output=True, text=True, check=True)  # fmt: skip
        grew[n] = json.loads(done.stdout)["grew"]
        assert load_manifest(tmp_path / f"set-{n}").samples == n
        path.unlink()
    large = 16384 * 20480
    # What the larger set adds beyond the smaller: holding the sets would add 3/4 of the larger one. Not the
    # peak itself: its fixed part (what the first use of a reader allocates, the allocator's arenas) is the
    # machine's and install's, and came within 2 MB of half the larger set on a fresh clone
    assert grew[16384] - grew[4096] < large / 4, grew


def test_ids_reach_the_catalogue_from_lambda_functions_reading_s3(cli, s3, local_s3, imports, galaxies, tmp_path):
    """A data set with string ids, uploaded with its objects table; emulated Lambda functions (AWS's runtime
    client) read the partitions from S3 and the driver joins the ids back from the table in S3."""
    from cai_bench.data.catalogue import MAGS_UNCHECKED
    from cai_bench.data.upload import upload_dataset

    done = upload_dataset(imports["hdf5"], f"s3://{s3}/astro")
    assert "objects.parquet" in done.uploaded
    common = ["predict", "--precision", "fp32", "-q", "--results", tmp_path / "r"]
    code, _, err = cli(*common, "--data", imports["hdf5"], "--out", tmp_path / "here.parquet")
    assert code == 0, err
    code, _, err = cli(*common, "--data", f"s3://{s3}/astro", "--backend", "lambda", "--emulate", "--endpoint-url",
                       local_s3, "--bucket", f"s3://{s3}", "--max-concurrency", "2",
                       "--out", tmp_path / "far.parquet")  # fmt: skip
    assert code == 0, err
    here, far = (read_catalogue(tmp_path / f"{name}.parquet")[0] for name in ("here", "far"))
    assert far["id"].tolist() == here["id"].tolist() == [f"J{i:019d}" for i in galaxies["objid"]]
    np.testing.assert_allclose(far["z_pred"], here["z_pred"], atol=1e-5)
    np.testing.assert_array_equal(far["dec"], galaxies["dec"])
    assert (far["flags"] & MAGS_UNCHECKED).all() and not (here["flags"] & MAGS_UNCHECKED).any()


def _hdf5_that_reads_elsewhere(root: Path, few: dict) -> dict[str, Path]:
    """Files whose cutouts live in another file: what HDF5 would follow and cai-bench must not."""
    import h5py

    other = write_hdf5(root / "other.h5", few)
    files = {}
    for kind in ("external-link", "soft-link", "virtual", "external-storage"):
        path = files[kind] = root / f"{kind}.h5"
        with h5py.File(path, "w") as handle:
            for name in ("magnitudes", "objid", "redshift"):
                handle[name] = few[name]
            if kind == "external-link":
                handle["images"] = h5py.ExternalLink(str(other), "/images")
            elif kind == "soft-link":
                handle["pixels"] = few["images"]
                handle["images"] = h5py.SoftLink("/pixels")
            elif kind == "virtual":
                layout = h5py.VirtualLayout(shape=few["images"].shape, dtype="f4")
                layout[:] = h5py.VirtualSource(str(other), "images", shape=few["images"].shape)
                handle.create_virtual_dataset("images", layout)
            else:  # raw pixels "stored" in /etc/passwd: reading them used to echo its lines in the error
                handle.create_dataset("images", shape=few["images"].shape, dtype="f4",
                                      external=[("/etc/passwd", 0, h5py.h5f.UNLIMITED)])  # fmt: skip
    return files


def test_hdf5_links_virtual_datasets_and_external_storage_are_refused_before_they_are_read(cli, galaxies, tmp_path):
    few = _part(galaxies, slice(0, 10))
    for kind, path in _hdf5_that_reads_elsewhere(tmp_path, few).items():
        code, _, err = cli("data", "import", path, "--partition-mb", "1", "--out", tmp_path / f"out-{kind}", "-q")
        says = "is a link" if "link" in kind else "a virtual dataset" if kind == "virtual" else "external storage"
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (kind, err)
        assert "root:" not in err and not (tmp_path / f"out-{kind}").exists(), (kind, err)


def test_an_hdf5_file_that_claims_more_than_it_holds_is_refused_before_anything_is_read(cli, galaxies, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    """A sparse file claims 20 million cutouts (410 GB of partitions) in a few kB; a column claims more rows than
    there are cutouts; a chunk is larger than any slice (decompressed again for each one)."""
    import h5py

    few = _part(galaxies, slice(0, 10))
    claims = tmp_path / "claims.h5"
    with h5py.File(claims, "w") as handle:
        handle.create_dataset("images", shape=(20_000_000, 5, 32, 32), dtype="f4", chunks=(64, 5, 32, 32))
        for name in ("magnitudes", "objid", "redshift"):
            handle[name] = few[name]
    monkeypatch.setattr("cai_bench.data.astro.free_bytes_at", lambda out: 100 * 10**9)  # whatever this disk has
    code, _, err = cli("data", "import", claims, "--partition-mb", "1", "--out", tmp_path / "out-claims", "-q")
    assert code == 2 and "20,000,000 cutouts would take 410.4 GB of partitions, and 100.0 GB are free" in err, err
    column = tmp_path / "column.h5"
    with h5py.File(column, "w") as handle:
        handle["images"], handle["magnitudes"], handle["redshift"] = few["images"], few["magnitudes"], few["redshift"]
        handle.create_dataset("objid", shape=(2_000_000_000,), dtype="i8", chunks=(1024,))
    code, _, err = cli("data", "import", column, "--partition-mb", "1", "--out", tmp_path / "out-column", "-q")
    assert code == 2 and "dataset objid: 2,000,000,000 rows, and 10 cutouts" in err, err
    chunked = tmp_path / "chunked.h5"
    with h5py.File(chunked, "w") as handle:
        handle.create_dataset("images", data=few["images"], chunks=(10, 5, 32, 32), compression="gzip")
        for name in ("magnitudes", "objid", "redshift"):
            handle[name] = few[name]
    monkeypatch.setattr("cai_bench.data.astro.CHUNK_MAX", 2**17)  # 128 KiB: the 200 KiB chunk is over it
    code, _, err = cli("data", "import", chunked, "--partition-mb", "1", "--out", tmp_path / "out-chunked", "-q")
    assert code == 2 and "chunks of 0.2 MiB (over 0.125 MiB); rechunk it: h5repack -l images:CHUNK=1024x5x32x32" in err
