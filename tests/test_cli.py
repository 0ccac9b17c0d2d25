import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cai_bench.data.storage import MANIFEST


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.probe
def test_run_prints_the_summary_and_appends_a_record(cli, tiny_data, tmp_path):
    code, out, _ = cli("run", "--data", tiny_data, "--batch-size", "16", "--threads", "1", "--results", tmp_path)
    assert code == 0
    for text in ("wall s", "samples/s", "Mbps", "RSS MB", "104", "weights: random-init"):
        assert text in out
    (record,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert record["summary"]["samples"] == 104 and record["plan"]["batch_size"] == 16
    assert f"run id: {record['run_id']}" in out  # what results show and plot --timeline take


@pytest.mark.probe
def test_run_json_output_is_the_records(cli, tiny_data, tmp_path):
    code, out, _ = cli("run", "--data", tiny_data, "--repeats", "2", "--json", "--results", tmp_path, "--threads", "1")
    assert code == 0
    printed = json.loads(out)
    stored = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in printed] == [r["run_id"] for r in stored]


@pytest.mark.probe
def test_run_without_data_generates_the_default_into_the_cache(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_BENCH_CACHE", str(tmp_path / "cache"))
    code, out, _ = cli("run", "--gb", "0.001", "--partition-mb", "0.3", "-q", "--results", tmp_path / "r")
    assert code == 0, out
    (dataset,) = (tmp_path / "cache" / "datasets").iterdir()
    assert (dataset / MANIFEST).is_file()
    assert "52" in out  # floor(0.001 GiB / 20,524 B) samples


def test_model_info(cli):
    code, out, _ = cli("model", "info", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["parameters"] == 15_902_889
    assert info["frozen_parameters"] == 5_504_832 and info["learnable_parameters"] == 10_398_057
    assert info["weights"] == "random-init" and info["state_dict_keys"] == 508
    assert info["flops_per_sample"] > 2e8


def test_data_synth_info_verify_split(cli, tmp_path):
    code, out, _ = cli("data", "synth", "--gb", "0.001", "--partition-mb", "0.3", "--out", tmp_path / "d", "-q")
    assert code == 0 and "MB/s" in out
    code, out, _ = cli("data", "info", tmp_path / "d", "--json")
    info = json.loads(out)
    assert info["samples"] == 52 and info["partitions"] == 4 and info["source"]["kind"] == "synthetic"
    code, out, _ = cli("data", "verify", tmp_path / "d")
    assert code == 0 and "all 4 partitions match" in out
    code, out, _ = cli("data", "split", tmp_path / "d", "--partition-mb", "0.6", "--out", tmp_path / "e", "-q")
    assert code == 0 and "52 samples in 2 partitions" in out


# ---------------------------------------------------------------------------------------------- bad input


def test_unknown_backend(cli, tiny_data):
    code, _, err = cli("run", "--backend", "quantum", "--data", tiny_data)
    assert code == 2
    assert one_error_line(err) == (
        "error: Invalid value for '--backend': 'quantum' is not one of 'cpu', 'hpc', 'gpu', 'lambda', 'dask'. "
        "(see: cai-bench run --help)"
    )


def test_missing_data_path(cli, tmp_path):
    code, _, err = cli("run", "--data", tmp_path / "nowhere")
    assert code == 2
    assert "nowhere: no such data directory" in one_error_line(err)


def test_partition_size_that_disagrees_with_the_data(cli, tiny_data):
    code, _, err = cli("run", "--data", tiny_data, "--partition-mb", "25")
    assert code == 2
    assert "cai-bench data split" in one_error_line(err)


def test_data_and_gb_together(cli, tiny_data):
    code, _, err = cli("run", "--data", tiny_data, "--gb", "1")
    assert code == 2 and "either --data DIR or --gb X" in one_error_line(err)


def _rewrite_manifest(directory, change):
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _flip_byte(path, offset=-7):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_value(directory, name, field, value):
    from safetensors.numpy import load_file, save_file

    path = directory / name
    arrays = load_file(str(path))
    arrays[field].reshape(-1)[5] = value
    save_file(arrays, str(path))
    data = path.read_bytes()

    def fix(manifest):
        entry = next(e for e in manifest["partitions"] if e["file"] == name)
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    _rewrite_manifest(directory, fix)


BAD_DATA = {
    "manifest disagrees": (
        lambda d: _rewrite_manifest(d, lambda m: m["partitions"][1].update(bytes=123)),
        "part-00001.safetensors: 534",
    ),
    "truncated": (
        lambda d: (d / "part-00003.safetensors").write_bytes((d / "part-00003.safetensors").read_bytes()[:5000]),
        "part-00003.safetensors: 5000 bytes on disk but the manifest says",
    ),
    "corrupt": (lambda d: _flip_byte(d / "part-00002.safetensors"), "part-00002.safetensors: sha256 does not match"),
    "wrong dtype": (
        lambda d: _set_dtype(d),
        "part-00000.safetensors: redshift has dtype F64, expected F32",
    ),
    "nan": (
        lambda d: _set_value(d, "part-00001.safetensors", "images", float("nan")),
        "part-00001.safetensors: images holds NaN or inf values",
    ),
    "inf": (
        lambda d: _set_value(d, "part-00002.safetensors", "magnitudes", float("inf")),
        "part-00002.safetensors: magnitudes holds NaN or inf values",
    ),
}


def _set_dtype(directory):
    from safetensors.numpy import load_file, save_file

    path = directory / "part-00000.safetensors"
    arrays = load_file(str(path))
    arrays["redshift"] = arrays["redshift"].astype("float64")
    save_file(arrays, str(path))
    data = path.read_bytes()
    _rewrite_manifest(
        directory,
        lambda m: m["partitions"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()),
    )


@pytest.mark.parametrize("case", sorted(BAD_DATA))
@pytest.mark.probe
def test_bad_data_is_one_clear_line_and_earlier_results_stay(cli, data_copy, tmp_path, measured_store, case):
    results = tmp_path / "results"
    results.mkdir()
    before = shutil.copyfile(measured_store, results / "runs.jsonl").read_bytes()
    damage, message = BAD_DATA[case]
    damage(data_copy)
    code, _, err = cli("run", "--data", data_copy, "--results", results, "-q", "--threads", "1")
    assert code == 2
    assert message in one_error_line(err)
    assert (results / "runs.jsonl").read_bytes().startswith(before)


def test_weights_that_are_not_a_plain_state_dict(cli, tiny_data, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    with open(path, "wb") as fh:
        pickle.dump({"x": _Exploit(str(marker))}, fh, protocol=2)
    code, _, err = cli("run", "--data", tiny_data, "--weights", path, "--results", tmp_path, "-q")
    assert code == 2
    assert "model.pt: not a plain state dict" in one_error_line(err)
    assert not marker.exists()


def test_weights_with_a_missing_key(cli, tiny_data, tmp_path):
    from cai_bench.model.astromae import build_model

    state = build_model().state_dict()
    del state["fc_norm.bias"]
    torch.save(state, tmp_path / "w.pt")
    code, _, err = cli("run", "--data", tiny_data, "--weights", tmp_path / "w.pt", "--results", tmp_path, "-q")
    assert code == 2
    assert "w.pt: does not match pcm-AstroMAE: missing key: fc_norm.bias" in one_error_line(err)


def test_verify_names_each_bad_partition_and_exits_2(cli, data_copy):
    _flip_byte(data_copy / "part-00001.safetensors")
    code, _, err = cli("data", "verify", data_copy)
    assert code == 2
    assert "part-00001.safetensors: sha256 does not match" in err
    assert err.strip().splitlines()[-1] == f"error: {data_copy}: 1 of 4 partitions failed verification"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, self.marker))


def test_the_installed_command_exits_2_without_a_traceback_and_debug_shows_one(tmp_path):
    exe = str(Path(sys.executable).parent / "cai-bench")  # the console script installed beside this Python
    plain = subprocess.run([exe, "run", "--data", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert one_error_line(plain.stderr).endswith("x: no such data directory")
    debug = subprocess.run(
        [exe, "--debug", "run", "--data", str(tmp_path / "x")], capture_output=True, text=True, timeout=120
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_run_help_has_one_text_per_option_and_groups_each_backends_own(cli, monkeypatch):
    """The registry feeds the flags: --retries is one declaration shared by hpc, gpu and lambda, so it has one
    help text; each backend's own options sit under its name."""
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = cli("run", "--help")
    assert code == 0
    flags = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert flags.count("--retries") == 1 and len(flags) == len(set(flags))
    text = " ".join(out.split())
    assert "hpc, gpu, lambda, dask: Times a partition whose worker was lost or that failed is tried again" in text
    for panel in ("Options of several backends", "--backend hpc", "--backend gpu", "--backend lambda"):
        assert f"{panel}:" in out.splitlines()  # a section of its own
    code, out, _ = cli("sweep", "--help")
    assert "Comma-separated values: a sweep axis." in " ".join(out.split())
