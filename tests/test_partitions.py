import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_GB, TINY_MB
from safetensors.numpy import load_file, save_file

from cai_bench.core.errors import UserError
from cai_bench.core.plan import samples_for_gb
from cai_bench.data.manifest import load_manifest
from cai_bench.data.partitions import open_dataset, read_partition, split, synthesize, verify_dataset
from cai_bench.data.storage import MANIFEST


def rewrite_partition(directory, index, arrays):
    """Replace partition ``index`` with ``arrays`` and update the manifest so size and checksum agree."""
    manifest = json.loads((directory / MANIFEST).read_text())
    entry = manifest["partitions"][index]
    path = directory / entry["file"]
    save_file(arrays, str(path))
    data = path.read_bytes()
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_manifest_describes_the_partitions(tiny_data):
    manifest = load_manifest(tiny_data)
    assert manifest.samples == samples_for_gb(TINY_GB) == 104
    assert [p.samples for p in manifest.partitions] == [26, 26, 26, 26]
    assert manifest.source == {"kind": "synthetic", "seed": 3, "generator_version": 1, "gb": TINY_GB}
    for entry in manifest.partitions:
        data = (tiny_data / entry.file).read_bytes()
        assert entry.bytes == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
    arrays = load_file(str(tiny_data / manifest.partitions[1].file))
    assert arrays["images"].shape == (26, 5, 32, 32) and arrays["images"].dtype == np.float32
    assert arrays["magnitudes"].dtype == np.float64 and arrays["redshift"].shape == (26,)
    assert np.array_equal(arrays["object_id"], np.arange(26, 52))


def test_same_seed_gives_identical_files(tiny_data, tmp_path):
    again = synthesize(tmp_path / "again", TINY_GB, TINY_MB, seed=3)
    other = synthesize(tmp_path / "other", TINY_GB, TINY_MB, seed=4)
    first = load_manifest(tiny_data)
    assert [p.sha256 for p in again.partitions] == [p.sha256 for p in first.partitions]
    assert again.dataset_id == first.dataset_id
    assert other.dataset_id != first.dataset_id


def test_split_equals_generating_at_the_new_size(tiny_data, tmp_path):
    resplit = split(tiny_data, 1.1, tmp_path / "split")
    direct = synthesize(tmp_path / "direct", TINY_GB, 1.1, seed=3)
    assert [p.samples for p in resplit.partitions] == [p.samples for p in direct.partitions] == [52, 52]
    assert [p.sha256 for p in resplit.partitions] == [p.sha256 for p in direct.partitions]
    assert resplit.source["split_from"][0]["dataset_id"] == load_manifest(tiny_data).dataset_id
    # and back to smaller, uneven partitions
    finer = split(tmp_path / "split", 0.3, tmp_path / "finer")
    assert sum(p.samples for p in finer.partitions) == 104
    assert len(finer.partitions) == 7


def test_synth_refuses_to_overwrite_and_leaves_no_partial_directory(tiny_data, tmp_path):
    with pytest.raises(UserError, match="exists and is not empty"):
        synthesize(tiny_data, TINY_GB, TINY_MB)
    assert not [p for p in tmp_path.parent.iterdir() if ".partial-" in p.name]


def test_an_interrupted_synth_leaves_nothing_behind(tmp_path):
    def stop(done, total):
        if done > 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "out", TINY_GB, TINY_MB, progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_read_partition_returns_checked_tensors(tiny_data):
    _, summary, refs = open_dataset(tiny_data)
    part = read_partition(refs[2])
    assert len(part) == 26 and part.images.shape == (26, 5, 32, 32)
    assert part.object_id[0].item() == 52
    assert summary.partitions == 4 and summary.samples == 104


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(UserError, match="no such data directory"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty/manifest.json: manifest not found"):
        open_dataset(tmp_path / "empty")


def test_manifest_that_is_not_json(data_copy):
    (data_copy / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="manifest.json: not valid JSON"):
        open_dataset(data_copy)


def test_manifest_from_a_newer_schema_is_refused(data_copy):
    manifest = json.loads((data_copy / MANIFEST).read_text())
    manifest["schema_version"] = "2.0"
    (data_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="schema version '2.0' is not supported"):
        open_dataset(data_copy)


def test_manifest_whose_counts_disagree(data_copy):
    manifest = json.loads((data_copy / MANIFEST).read_text())
    manifest["partitions"][1]["samples"] = 30
    (data_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="add up to 108, manifest says 104"):
        open_dataset(data_copy)
    manifest["samples"] = 108
    (data_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"part-00001.safetensors: images has shape \[26, 5, 32, 32\], expected \[30"):
        open_dataset(data_copy)


def test_missing_partition_file(data_copy):
    (data_copy / "part-00002.safetensors").unlink()
    with pytest.raises(UserError, match="part-00002.safetensors: partition listed in .* is missing"):
        open_dataset(data_copy)


def test_truncated_partition(data_copy):
    path = data_copy / "part-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="part-00001.safetensors: .* bytes on disk but the manifest says"):
        open_dataset(data_copy)


def test_corrupt_partition_fails_its_checksum_when_read(data_copy):
    path = data_copy / "part-00003.safetensors"
    data = bytearray(path.read_bytes())
    data[-5000] ^= 0xFF
    path.write_bytes(bytes(data))
    _, _, refs = open_dataset(data_copy)  # same size, header intact: only the checksum can tell
    with pytest.raises(UserError, match="part-00003.safetensors: sha256 does not match"):
        read_partition(refs[3])


def test_corrupt_header(data_copy):
    path = data_copy / "part-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\x00" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="part-00000.safetensors: corrupt partition"):
        open_dataset(data_copy)


def test_wrong_dtype(data_copy):
    arrays = load_file(str(data_copy / "part-00001.safetensors"))
    arrays["images"] = arrays["images"].astype(np.float64)
    rewrite_partition(data_copy, 1, arrays)
    with pytest.raises(UserError, match="part-00001.safetensors: images has dtype F64, expected F32"):
        open_dataset(data_copy)


def test_wrong_shape(data_copy):
    arrays = load_file(str(data_copy / "part-00001.safetensors"))
    arrays["images"] = np.ascontiguousarray(arrays["images"][:, :, :, :31])
    rewrite_partition(data_copy, 1, arrays)
    with pytest.raises(UserError, match=r"images has shape \[26, 5, 32, 31\], expected \[26, 5, 32, 32\]"):
        open_dataset(data_copy)


def test_missing_field(data_copy):
    arrays = load_file(str(data_copy / "part-00001.safetensors"))
    del arrays["magnitudes"]
    rewrite_partition(data_copy, 1, arrays)
    with pytest.raises(UserError, match=r"not a cai-bench partition \(missing \['magnitudes'\]\)"):
        open_dataset(data_copy)


@pytest.mark.parametrize(("field", "value"), [("images", np.nan), ("magnitudes", np.inf), ("redshift", -np.inf)])
def test_non_finite_values(data_copy, field, value):
    arrays = load_file(str(data_copy / "part-00002.safetensors"))
    arrays[field].reshape(26, -1)[7, 0] = value
    rewrite_partition(data_copy, 2, arrays)
    _, _, refs = open_dataset(data_copy)
    with pytest.raises(
        UserError, match=f"part-00002.safetensors: {field} holds NaN or inf values \\(first at sample 7\\)"
    ):
        read_partition(refs[2])


def test_verify_reports_every_bad_partition(data_copy):
    assert verify_dataset(data_copy)[1] == []
    for name in ("part-00001.safetensors", "part-00003.safetensors"):
        path = data_copy / name
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    _, problems = verify_dataset(data_copy)
    assert len(problems) == 2
    assert "part-00001" in problems[0] and "sha256 does not match" in problems[0]


def test_partitions_are_read_through_the_storage_interface(tiny_data, cli):
    from cai_bench.data.storage import LocalDirectory, split_ref, storage_for

    storage = storage_for(tiny_data)
    assert isinstance(storage, LocalDirectory) and "manifest.json" in storage.names()
    _, _, refs = open_dataset(tiny_data)
    located, name = split_ref(refs[2].path)
    assert located == storage and name == Path(refs[2].path).name
    assert located.read(name) == Path(refs[2].path).read_bytes()
    assert located.read_head(name, 8) == Path(refs[2].path).read_bytes()[:8]
    assert located.size("no-such-file") is None
    code, _, err = cli("data", "info", "gs://bucket/galaxies")
    assert code == 2 and err.strip() == (
        "error: gs://bucket/galaxies: cai-bench reads data sets from local directories and s3:// only"
    )
