"""Upstream files: a whole pickled DataParallel model, TensorDataset data files, and pickles that try to run code.

The fixtures are made here the way upstream made its files: our model's classes are given upstream's module
names in throw-away modules while torch.save runs, and those modules are gone before anything is converted.
"""

import os
import subprocess
import sys
import types
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import UPSTREAM_KEYS
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from cai_bench.data.partitions import open_dataset, read_partition
from cai_bench.model import astromae
from cai_bench.model.checkpoint import load_weights

UPSTREAM_NAMES = {
    astromae.AstroMAE: ("blocks.model_vit_inception", "ViT_Astro"),
    astromae.InceptionMagnitudeModel: ("blocks.photoz", "Input_Mix_Model"),
    astromae.InceptionBlock: ("blocks.photoz", "InceptionBlock"),
    astromae.ConvBlock: ("blocks.photoz", "ConvBlock"),
    astromae.NormalCell: ("NormalCell", "NormalCell"),
    astromae.Attention: ("NormalCell", "Attention"),
    astromae.Mlp: ("NormalCell", "Mlp"),
    astromae.PatchEmbed: ("timm.models.layers.patch_embed", "PatchEmbed"),
}
THROWAWAY_MODULES = ("blocks", "blocks.model_vit_inception", "blocks.photoz", "NormalCell", "timm")


@contextmanager
def upstream_classes(model: nn.Module):
    """While inside: every module of ours in ``model`` is an instance of a class named as upstream names it."""
    created = []
    swapped = []
    try:
        for cls, (module_name, name) in UPSTREAM_NAMES.items():
            parts = module_name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix not in sys.modules:
                    sys.modules[prefix] = types.ModuleType(prefix)
                    created.append(prefix)
            upstream = type(name, (cls,), {"__module__": module_name, "__qualname__": name})
            setattr(sys.modules[module_name], name, upstream)
            for m in model.modules():
                if type(m) is cls:
                    m.__class__ = upstream
                    swapped.append((m, cls))
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls
        for name in reversed(created):
            del sys.modules[name]


def upstream_model(seed: int = 11) -> nn.Module:
    """Our model with trained-looking buffers too (BatchNorm running statistics), so every key is checked."""
    model = astromae.build_model(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.num_batches_tracked.fill_(1234)
    return model.eval()


def sample_inputs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(n, 5, 32, 32, generator=generator) * 2
    magnitudes = 14 + 6 * torch.rand(n, 5, generator=generator, dtype=torch.float64)
    return images, magnitudes


def outputs(model: nn.Module) -> torch.Tensor:
    images, magnitudes = sample_inputs()
    with torch.inference_mode():
        return model(images, magnitudes.float())


@pytest.fixture(scope="module")
def pickled_upstream(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """Upstream's file: torch.save of a whole DataParallel(ViT_Astro), and the outputs of that model."""
    model = upstream_model()
    expected = outputs(model)
    path = tmp_path_factory.mktemp("upstream") / "Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt"
    with upstream_classes(model):
        torch.save(nn.DataParallel(model), path)
    assert not any(name in sys.modules for name in THROWAWAY_MODULES)
    return path, expected


def test_the_fixture_names_upstream_classes(pickled_upstream):
    path, _ = pickled_upstream
    with zipfile.ZipFile(path) as archive:
        (pkl,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        text = archive.read(pkl)
    for module_name, name in UPSTREAM_NAMES.values():
        assert f"{module_name}\n{name}".encode() in text
    assert b"torch.nn.parallel.data_parallel\nDataParallel" in text
    with pytest.raises(ModuleNotFoundError, match="blocks"):
        torch.load(path, weights_only=False)  # the ordinary way needs upstream's code


def test_convert_recovers_the_pickled_model_without_importing_it(cli, pickled_upstream, tmp_path):
    path, expected = pickled_upstream
    out = tmp_path / "weights.safetensors"
    code, stdout, err = cli("model", "convert", path, "--out", out)
    assert code == 0, err
    assert "pickled model" in stdout
    assert not any(name in sys.modules for name in THROWAWAY_MODULES)  # nothing of upstream was imported
    tensors = load_file(out)
    upstream_keys = [line.split("\t")[0] for line in UPSTREAM_KEYS.read_text().splitlines()[1:]]
    assert sorted(tensors) == sorted(upstream_keys)
    model = astromae.build_model(seed=0)
    load_weights(model, out)
    assert torch.equal(outputs(model.eval()), expected)
    assert int(tensors["inception_model.vis_inception.2.branch1.bn.num_batches_tracked"]) == 1234


def test_convert_accepts_plain_state_dicts_and_safetensors(cli, tmp_path):
    model = upstream_model(seed=3)
    expected = outputs(model)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "sd.pt")
    code, _, err = cli("model", "convert", tmp_path / "sd.pt", "--out", tmp_path / "a.safetensors")
    assert code == 0, err
    code, _, err = cli("model", "convert", tmp_path / "a.safetensors", "--out", tmp_path / "b.safetensors")
    assert code == 0, err
    for name in ("a", "b"):
        fresh = astromae.build_model(seed=0)
        load_weights(fresh, tmp_path / f"{name}.safetensors")
        assert torch.equal(outputs(fresh.eval()), expected)


def test_convert_refuses_another_model(cli, tmp_path):
    torch.save(nn.Sequential(nn.Linear(3, 4)), tmp_path / "other.pt")
    code, _, err = cli("model", "convert", tmp_path / "other.pt", "--out", tmp_path / "w.safetensors")
    assert code == 2 and "does not match pcm-AstroMAE" in err and "missing keys" in err
    assert not (tmp_path / "w.safetensors").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    code, _, err = cli("model", "convert", tmp_path / "junk.pt", "--out", tmp_path / "w.safetensors")
    assert code == 2 and "not a PyTorch zip archive" in err


# ---------------------------------------------------------------------------------------------- refusing code


class RunsCommand:
    """Pickles as a call of ``function(*args)``: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict[str, object]:
    return {
        "posix.system": RunsCommand(os.system, f"touch {marker}"),
        "builtins.eval": RunsCommand(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": RunsCommand(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "subprocess.Popen"])
def test_pickles_that_would_run_code_are_refused_and_nothing_runs(cli, tmp_path, name):
    marker = tmp_path / "ran"
    payload = payloads(marker)[name]
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": payload}, tmp_path / "model.pt")
    images, magnitudes = sample_inputs(4)
    torch.save((images, magnitudes, payload), tmp_path / "data.pt")
    code, _, err = cli("model", "convert", tmp_path / "model.pt", "--out", tmp_path / "w.safetensors")
    assert code == 2 and f"refused: the pickle calls {name}" in err and "nothing was run" in err
    code, _, err = cli("data", "import", tmp_path / "data.pt", "--partition-mb", "1", "--out", tmp_path / "d")
    assert code == 2 and "refused: the pickle names" in err and name.split(".")[-1] in err  # torch's spelling
    code, _, err = cli("run", "--data", tmp_path / "d", "--weights", tmp_path / "model.pt", "--results", tmp_path)
    assert code == 2
    code, _, err = cli("model", "info", "--weights", tmp_path / "model.pt")
    assert code == 2 and "refused" in err
    assert not marker.exists()
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------- data import


def upstream_data(n: int, seed: int, layout: str) -> tuple[TensorDataset, torch.Tensor]:
    """A TensorDataset as upstream saved it, and the [N,5,32,32] images our partitions must hold."""
    g = torch.Generator().manual_seed(seed)
    magnitudes = 14 + 6 * torch.rand(n, 5, generator=g, dtype=torch.float64)
    redshift = torch.rand(n, 1, generator=g) * 0.5
    if layout == "NHWC":
        big = torch.rand(n, 64, 64, 5, generator=g)
        expected = big.permute(0, 3, 1, 2)[:, :, 16:48, 16:48]
        return TensorDataset(big, magnitudes, redshift), expected
    images = torch.rand(n, 5, 32, 32, generator=g)
    return TensorDataset(images, magnitudes, redshift.reshape(-1)), images


def test_import_both_image_layouts_into_partitions(cli, tmp_path):
    first, first_images = upstream_data(30, 1, "NHWC")
    second, second_images = upstream_data(45, 2, "NCHW")
    torch.save(first, tmp_path / "part0.pt")
    torch.save(second, tmp_path / "part1.pt")
    out = tmp_path / "imported"
    code, stdout, err = cli(
        "data", "import", tmp_path / "part0.pt", tmp_path / "part1.pt", "--partition-mb", "0.4", "--out", out, "-q"
    )
    assert code == 0, err
    assert "75 samples from 2 file(s)" in stdout
    manifest, summary, refs = open_dataset(out)
    assert summary.has_labels and summary.samples == 75 and len(refs) == 4  # ceil(75 * 20,524 B / 0.4 MB)
    assert [f["image_layout"] for f in manifest.source["files"]] == ["NHWC", "NCHW"]
    parts = [read_partition(ref) for ref in refs]
    images = torch.cat([p.images for p in parts])
    assert torch.equal(images, torch.cat([first_images, second_images]))
    magnitudes = torch.cat([p.magnitudes for p in parts])
    assert magnitudes.dtype == torch.float64
    assert torch.equal(magnitudes, torch.cat([first.tensors[1], second.tensors[1]]))
    assert torch.equal(
        torch.cat([p.redshift for p in parts]), torch.cat([first.tensors[2].reshape(-1), second.tensors[2]])
    )
    assert torch.equal(torch.cat([p.object_id for p in parts]), torch.arange(75))


def test_import_without_labels_and_bad_files(cli, tmp_path):
    images, magnitudes = sample_inputs(8)
    torch.save(TensorDataset(images, magnitudes), tmp_path / "unlabelled.pt")
    code, _, err = cli("data", "import", tmp_path / "unlabelled.pt", "--partition-mb", "1", "--out", tmp_path / "u")
    assert code == 0, err
    assert not open_dataset(tmp_path / "u")[1].has_labels

    bad_images = images.clone()
    bad_images[5, 2, 3, 3] = float("nan")
    cases = {
        "nan.pt": (TensorDataset(bad_images, magnitudes, torch.rand(8)), "sample 5 has NaN or inf in images"),
        "shape.pt": (TensorDataset(torch.rand(8, 3, 32, 32), magnitudes, torch.rand(8)), "images have shape [8, 3,"),
        "z.pt": (TensorDataset(images, magnitudes, torch.rand(8, 2)), "redshift has shape [8, 2]"),
        "mags.pt": (TensorDataset(images, magnitudes[:, :4], torch.rand(8)), "magnitudes have shape [8, 4]"),
        "dict.pt": ({"images": images}, "expected a TensorDataset"),
    }  # fmt: skip
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        code, _, err = cli("data", "import", tmp_path / name, "--partition-mb", "1", "--out", tmp_path / name[:-3])
        assert code == 2 and message in err, (name, err)
        assert not (tmp_path / name[:-3]).exists()
