"""Every kind of bad input the adversarial pass found: one line naming the problem, exit code 2, nothing lost."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import one_error_line

from cai_bench.data.storage import MANIFEST


def _garbage(path: Path, size: int = 4096, seed: int = 0) -> Path:
    path.write_bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed)).byte().numpy())
    return path


def _manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _flipped_pickle(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2)), path)
    data = bytearray(path.read_bytes())
    for offset in range(60, 90):  # inside the archive's first entry: its name, header and pickle
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def _setup(case: str, tmp_path: Path, data: Path) -> list:
    """The command line of each case, after making what it needs under ``tmp_path``."""
    if case == "convert a bit-flipped .pt":
        return ["model", "convert", _flipped_pickle(tmp_path), "--out", tmp_path / "w.safetensors"]
    if case == "convert random bytes":
        return ["model", "convert", _garbage(tmp_path / "x.pt"), "--out", tmp_path / "w.safetensors"]
    if case == "run --weights of random bytes":
        return ["run", "--data", data, "--weights", _garbage(tmp_path / "w.pt", seed=1), "--threads", "1"]
    if case == "run --weights of random safetensors bytes":
        return ["run", "--data", data, "--weights", _garbage(tmp_path / "w.safetensors", seed=2), "--threads", "1"]
    if case == "data import of random bytes":
        return ["data", "import", _garbage(tmp_path / "d.pt", seed=3), "--partition-mb", "1", "--out", tmp_path / "o"]
    if case == 'manifest "file": null':
        _manifest(data, lambda m: m["partitions"][0].update(file=None))
        return ["run", "--data", data]
    if case == 'manifest "samples": "26"':
        _manifest(data, lambda m: m["partitions"][1].update(samples="26"))
        return ["data", "info", data]
    if case == "manifest that is a list of partitions only":
        (data / MANIFEST).write_text(json.dumps([{"file": "part-00000.safetensors"}]))
        return ["data", "verify", data]
    if case == "data info on a data set with no partitions":
        _manifest(data, lambda m: m.update(partitions=[], samples=0))
        return ["data", "info", data]
    if case == "manifest pointing outside with ..":
        _manifest(data, lambda m: m["partitions"][0].update(file="../outside.safetensors"))
        return ["run", "--data", data]
    if case == "manifest with an absolute path":
        _manifest(data, lambda m: m["partitions"][0].update(file="/etc/passwd"))
        return ["data", "verify", data]
    if case == "manifest naming a link that leaves the data set":
        outside = tmp_path / "elsewhere.safetensors"
        shutil.copy(data / "part-00000.safetensors", outside)
        (data / "part-00000.safetensors").unlink()
        (data / "part-00000.safetensors").symlink_to(outside)
        return ["run", "--data", data]
    if case == "run --gb inf":
        return ["run", "--gb", "inf"]
    if case == "run --partition-mb 0":
        return ["run", "--gb", "0.01", "--partition-mb", "0"]
    if case == "run --partition-mb nan with --data":
        return ["run", "--data", data, "--partition-mb", "nan"]
    if case == "run --cycle-to-gb inf":
        return ["run", "--data", data, "--cycle-to-gb", "inf"]
    if case == "data synth --gb nan":
        return ["data", "synth", "--gb", "nan", "--out", tmp_path / "s"]
    if case == "data synth --partition-mb 0":
        return ["data", "synth", "--gb", "0.01", "--partition-mb", "0", "--out", tmp_path / "s"]
    if case == "data split --partition-mb inf":
        return ["data", "split", data, "--partition-mb", "inf", "--out", tmp_path / "s"]
    if case == "data import --partition-mb 0":
        return ["data", "import", _garbage(tmp_path / "d.pt"), "--partition-mb", "0", "--out", tmp_path / "o"]
    if case == "preset that is not UTF-8":
        (tmp_path / "bad.toml").write_bytes(b"name = '\xff\xfe'\n")
        return ["sweep", "--config", tmp_path / "bad.toml"]
    if case == "preset that is a directory":
        (tmp_path / "dir.toml").mkdir()
        return ["sweep", "--config", tmp_path / "dir.toml"]
    if case == "preset that does not exist":
        return ["sweep", "--config", "no-such-preset"]
    if case == "--results that is a file":
        (tmp_path / "results").write_text("x")
        return ["run", "--data", data, "--results", tmp_path / "results"]
    if case == "predict --out under a file":
        (tmp_path / "file").write_text("x")
        return ["predict", "--data", data, "--out", tmp_path / "file" / "p.csv"]
    if case == "predict --out an existing directory with --force":
        (tmp_path / "p.csv").mkdir()
        return ["predict", "--data", data, "--out", tmp_path / "p.csv", "--force"]
    if case == "data synth --out an existing file":
        (tmp_path / "f").write_text("x")
        return ["data", "synth", "--gb", "0.001", "--out", tmp_path / "f"]
    if case == "model convert onto an existing file without --force":
        (tmp_path / "w.safetensors").write_text("keep me")
        return ["model", "convert", _flipped_pickle(tmp_path), "--out", tmp_path / "w.safetensors"]
    if case == "--threads above the usable cores":
        return ["run", "--data", data, "--threads", str(os.cpu_count() * 4 + 1)]
    if case == "--precision that is not a choice":
        return ["run", "--data", data, "--precision", "fp8"]
    if case == "report --format that is not a choice":
        return ["report", "--format", "xml"]
    raise AssertionError(case)


CASES = {
    "convert a bit-flipped .pt": "model.pt: not a",
    "convert random bytes": "x.pt: not a PyTorch zip archive",
    "run --weights of random bytes": "w.pt: not a readable PyTorch file",
    "run --weights of random safetensors bytes": "w.safetensors: not a readable safetensors file",
    "data import of random bytes": "d.pt: not a readable PyTorch file",
    'manifest "file": null': "partitions[0].file is null, expected a string",
    'manifest "samples": "26"': 'partitions[1].samples is "26", expected a whole number (0 or more)',
    "manifest that is a list of partitions only": "not a cai-bench manifest (expected a JSON object)",
    "data info on a data set with no partitions": "the data set has no partitions",
    "manifest pointing outside with ..": "'../outside.safetensors' is not a plain file name inside the data set",
    "manifest with an absolute path": "'/etc/passwd' is not a plain file name inside the data set",
    "manifest naming a link that leaves the data set": "is a link that leads outside the data set",
    "run --gb inf": "--gb must be a positive, finite number, got inf",
    "run --partition-mb 0": "--partition-mb must be a positive, finite number, got 0",
    "run --partition-mb nan with --data": "--partition-mb must be a positive, finite number, got nan",
    "run --cycle-to-gb inf": "--cycle-to-gb must be a positive, finite number, got inf",
    "data synth --gb nan": "--gb must be a positive, finite number, got nan",
    "data synth --partition-mb 0": "--partition-mb must be a positive, finite number, got 0",
    "data split --partition-mb inf": "--partition-mb must be a positive, finite number, got inf",
    "data import --partition-mb 0": "--partition-mb must be a positive, finite number, got 0",
    "preset that is not UTF-8": "bad.toml: not a text file (TOML must be UTF-8)",
    "preset that is a directory": "dir.toml: is a directory, not a TOML config file",
    "preset that does not exist": (
        "no-such-preset: no such config file, nor a preset (hpc-node, lambda-emulated, laptop-quick, paper)"
    ),
    "--results that is a file": "cannot write results here",
    "predict --out under a file": "file is a file, not a directory",
    "predict --out an existing directory with --force": "p.csv: is a directory; --out names the catalogue file",
    "data synth --out an existing file": "f: exists and is not a directory",
    "model convert onto an existing file without --force": "w.safetensors: exists; pass --force to replace it",
    "--threads above the usable cores": "pass --oversubscribe",
    "--precision that is not a choice": "'fp8' is not one of 'auto', 'fp32', 'bf16'",
    "report --format that is not a choice": "'xml' is not one of 'table', 'markdown', 'csv', 'json'",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(cli, data_copy, tmp_path, measured_store, case):
    results = tmp_path / "kept"
    results.mkdir()
    before = shutil.copyfile(measured_store, results / "runs.jsonl").read_bytes()
    args = _setup(case, tmp_path, data_copy)
    if "--results" not in args and args[0] in ("run", "sweep", "predict", "report"):
        args += ["--results", results]
    code, out, err = cli(*args, "-q") if args[0] in ("run", "sweep", "predict") else cli(*args)
    assert code == 2, (out, err)
    assert CASES[case] in one_error_line(err)
    assert "\x1b[" not in err
    assert (results / "runs.jsonl").read_bytes() == before  # nothing measured before is lost or changed
    if case == "model convert onto an existing file without --force":
        assert (tmp_path / "w.safetensors").read_text() == "keep me"


def test_a_manifest_or_partition_that_cannot_be_read_is_one_line(cli, data_copy, monkeypatch):
    real = Path.read_bytes

    def denied(self):
        if self.name in (MANIFEST, "part-00002.safetensors"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    code, _, err = cli("data", "info", data_copy)
    assert code == 2 and one_error_line(err).endswith("manifest.json: cannot read the manifest (Permission denied)")
    monkeypatch.setattr(
        Path, "read_bytes", lambda self: denied(self) if self.name != MANIFEST else real(self), raising=True
    )
    code, _, err = cli("data", "verify", data_copy)
    assert code == 2 and "part-00002.safetensors: cannot read partition (Permission denied)" in err


def test_model_convert_replaces_an_existing_file_with_force(cli, tmp_path):
    from test_upstream import upstream_model

    torch.save(upstream_model(seed=2).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "w.safetensors").write_text("old")
    code, _, err = cli("model", "convert", tmp_path / "sd.pt", "--out", tmp_path / "w.safetensors", "--force")
    assert code == 0, err
    assert (tmp_path / "w.safetensors").stat().st_size > 1e6


def test_enumerated_options_show_their_choices_and_defaults_one_way(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one option a line
    code, out, _ = cli("run", "--help")
    assert code == 0
    text = " ".join(out.split())
    for choices in (
        "<cpu|hpc|gpu|lambda|dask>",
        "<auto|fp32|bf16|int8|tf32|fp16>",
        "<fast|reference>",
        "<slurm|local>",
        "<auto|torch|onnxruntime|openvino>",
    ):
        assert choices in text
    assert "(default:" not in text and "[default: (512; gpu: 4096)]" in text and "[default: (physical cores)]" in text
    code, out, _ = cli("report", "--help")
    assert "<table|markdown|csv|json>" in " ".join(out.split())


def test_oversubscribe_runs_and_the_record_says_so(cli, tiny_data, tmp_path):
    from cai_bench.core.machine import allowed_cpus

    threads = str(allowed_cpus() + 1)
    code, out, err = cli("run", "--data", tiny_data, "--threads", threads, "--oversubscribe", "--precision", "fp32",
                         "--batch-size", "32", "--json", "--results", tmp_path)  # fmt: skip
    assert code == 0, err
    (record,) = json.loads(out)
    assert record["plan"]["oversubscribe"] is True and record["backend_info"]["threads"] == int(threads)
