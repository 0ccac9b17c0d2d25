"""Seeded fuzzing of everything cai-bench reads from users: weights, upstream files, manifests and partitions.

Each case is a random or bit-flipped file; the readers must either accept it or raise UserError (which the CLI
prints as one line with exit code 2), never anything else. Thousands of cases in all, a few seconds each group:
the files are small, and one model serves every key check.
"""

import contextlib
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors
from test_cli import one_error_line
from torch.utils.data import TensorDataset

from cai_bench.core.errors import UserError
from cai_bench.data import upstream
from cai_bench.data.partitions import open_dataset, read_partition
from cai_bench.data.storage import MANIFEST
from cai_bench.model.astromae import build_model
from cai_bench.model.checkpoint import _read_any_checkpoint, check_keys, filter_upstream_state_dict, load_weights


@pytest.fixture(scope="module")
def model():
    return build_model()


def _flip(data: bytes, rng: random.Random) -> bytes:
    """1-8 random bytes changed, or the file cut short, or a run of bytes zeroed."""
    out = bytearray(data)
    what = rng.random()
    if what < 0.15:
        return bytes(out[: rng.randrange(len(out))])
    if what < 0.25:
        start = rng.randrange(len(out))
        out[start : start + rng.randint(1, 64)] = bytes(min(64, len(out) - start))
        return bytes(out)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 7, 8, 64, 512, 4096]))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _accepts_or_refuses(read, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with contextlib.suppress(UserError):
        read(path)


def test_fuzzed_weights_files_are_read_or_refused(tmp_path, model):
    rng = random.Random(2026)
    small = {"fc_norm.weight": torch.ones(3), "head.bias": torch.zeros(2, dtype=torch.float64)}
    seeds = {
        ".pt": _torch_bytes(small),
        ".safetensors": save_safetensors(small),
    }

    def read(path: Path) -> None:
        load_weights(model, path)  # every file here is refused at the latest by the strict key check

    for case in range(1500):
        suffix = rng.choice(list(seeds))
        data = _random_bytes(rng) if case % 5 == 0 else _flip(seeds[suffix], rng)
        _accepts_or_refuses(read, tmp_path / f"w{suffix}", data)


def test_fuzzed_pickled_models_are_converted_or_refused(tmp_path, model):
    """What ``model convert`` reads before its key check: the restricted unpickler over a damaged archive."""
    rng = random.Random(7)
    seed = _torch_bytes(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.ReLU()))

    def read(path: Path) -> None:
        tensors, _ = _read_any_checkpoint(path)
        check_keys(model, filter_upstream_state_dict(tensors, path), path)

    for case in range(1500):
        data = _random_bytes(rng) if case % 10 == 0 else _flip(seed, rng)
        _accepts_or_refuses(read, tmp_path / "model.pt", data)


def test_fuzzed_upstream_data_files_are_read_or_refused(tmp_path):
    rng = random.Random(3)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 64, 64, 5, generator=generator)
    seed = _torch_bytes(TensorDataset(images, torch.rand(4, 5, dtype=torch.float64), torch.rand(4, 1)))

    def read(path: Path) -> None:
        tensors = upstream._load(path)
        info = upstream._inspect(path, tensors)
        upstream._slice(info, tensors, 0, info.samples, 0)

    for case in range(600):
        data = _random_bytes(rng) if case % 10 == 0 else _flip(seed, rng)
        _accepts_or_refuses(read, tmp_path / "data.pt", data)


def _mutated_manifest(manifest: dict, rng: random.Random) -> dict:
    out = json.loads(json.dumps(manifest))
    values = [None, "", "x", -1, 0, 2.5, 1e309, True, [], {}, "../part-00000.safetensors", "/etc/hosts", "a/b"]
    target = out["partitions"][rng.randrange(len(out["partitions"]))] if rng.random() < 0.6 else out
    key = rng.choice(list(target))
    if rng.random() < 0.2:
        del target[key]
    else:
        target[key] = rng.choice(values)
    return out


def test_fuzzed_manifests_are_read_or_refused(data_copy):
    rng = random.Random(5)
    text = (data_copy / MANIFEST).read_text()
    manifest = json.loads(text)
    for case in range(2000):
        data = _flip(text.encode(), rng) if case % 4 == 0 else json.dumps(_mutated_manifest(manifest, rng)).encode()
        (data_copy / MANIFEST).write_bytes(data)
        try:
            _, _, refs = open_dataset(data_copy)
        except UserError:
            continue
        for ref in refs:  # whatever was accepted is inside the data set
            assert Path(ref.path).resolve().parent == data_copy.resolve()


def test_fuzzed_partitions_are_read_or_refused(data_copy):
    rng = random.Random(9)
    _, _, refs = open_dataset(data_copy)
    ref = refs[0]
    original = Path(ref.path).read_bytes()
    for _ in range(800):
        Path(ref.path).write_bytes(_flip(original, rng))
        flipped = type(ref)(ref.path, ref.index, ref.samples, len(Path(ref.path).read_bytes()), ref.sha256)
        with contextlib.suppress(UserError):
            # the checksum would catch every flip: without it, the header and the values are what is tested
            read_partition(flipped, verify=False)


@pytest.mark.probe
def test_a_sample_of_fuzzed_files_through_the_command_line(cli, data_copy, tmp_path):
    rng = random.Random(1)
    seed = _torch_bytes({"fc_norm.weight": torch.ones(3)})
    original = (data_copy / "part-00001.safetensors").read_bytes()
    for case in range(12):
        weights = tmp_path / "w.pt"
        weights.write_bytes(_flip(seed, rng) if case % 2 else _random_bytes(rng))
        code, _, err = cli("model", "convert", weights, "--out", tmp_path / "o.safetensors", "--force")
        assert code == 2 and one_error_line(err)
        broken = tmp_path / f"d{case}"
        shutil.copytree(data_copy, broken)
        (broken / "part-00001.safetensors").write_bytes(_flip(original, rng))
        code, _, err = cli("run", "--data", broken, "--no-verify", "--results", tmp_path / "r", "-q", "--threads", "1")
        assert code in (0, 2), err
        if code == 2:
            assert "part-00001.safetensors" in one_error_line(err)


@pytest.mark.parametrize("suffix", [".fits", ".h5"])
def test_fuzzed_fits_and_hdf5_cutouts_are_imported_or_refused(tmp_path, suffix):
    """Damaged survey files: astropy's and h5py's many failures all become one UserError, or the file imports."""
    from astro_samples import sample_galaxies, write_fits, write_hdf5

    from cai_bench.data.astro import import_catalogue

    rng = random.Random(39)
    write = write_fits if suffix == ".fits" else write_hdf5
    seed = write(tmp_path / f"seed{suffix}", sample_galaxies(4)).read_bytes()

    def read(path: Path) -> None:
        import_catalogue([path], tmp_path / "out", 1.0, overwrite=True)

    for case in range(300):
        data = _random_bytes(rng) if case % 10 == 0 else _flip(seed, rng)
        _accepts_or_refuses(read, tmp_path / f"cutouts{suffix}", data)
