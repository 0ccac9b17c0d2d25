"""cai-bench installed as a user installs it: a wheel in a fresh virtual environment, run from another directory.

The fresh environment borrows the third-party packages of this one through a path file, so nothing is
downloaded; cai-bench itself comes only from the wheel (this checkout is neither installed there nor on the
path), so the presets and the paper's table must be in the wheel and found with importlib.resources.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import TINY_GB, TINY_MB

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("install")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", base, ROOT],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    (wheel,) = base.glob("cai_bench-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    # This environment's packages (torch, numpy, ...) come after the fresh one's own: a path file in a path file's
    # directory is not read, so the editable install of this checkout stays out
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return venv


def _run(venv: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAI_BENCH_CACHE": str(cwd / "cache"), "PYTHONPATH": "", **(env or {})}
    return subprocess.run([venv / "bin" / "cai-bench", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_the_wheel_holds_the_package_and_its_data(installed, tmp_path):
    where = subprocess.run(
        [installed / "bin" / "python", "-c", "import cai_bench; print(cai_bench.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(installed)), where


@pytest.mark.long
def test_an_installed_cai_bench_plots_sweeps_and_runs_from_any_directory(installed, tmp_path):
    """About 30 s on 2 cores: the installed command run as a user runs it, a sweep, a run, a report and a plot, each
    its own process."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    small = ["--gb", str(TINY_GB), "--partition-mb", str(TINY_MB), "--threads", "1", "-q"]
    swept = _run(installed, elsewhere, "sweep", "--config", "laptop-quick", *small, "--batch-size", "32",
                 "--repeats", "1", "--precision", "fp32")  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    assert "sweep laptop-quick" in swept.stdout and "1 record(s) appended to results/runs.jsonl" in swept.stdout
    plotted = _run(installed, elsewhere, "plot", "--reference", "paper", "--out-dir", "figures")
    assert plotted.returncode == 0, plotted.stderr
    assert (elsewhere / "figures" / "wall-vs-data-size.png").stat().st_size > 10_000
    ran = _run(installed, elsewhere, "run", *small, "--precision", "fp32")
    assert ran.returncode == 0, ran.stderr
    assert len((elsewhere / "results" / "runs.jsonl").read_text().splitlines()) == 2


PLUGIN = '''
"""A backend from another package: cai-bench's cpu backend under its own name, with an option of its own (which
makes a point of its own, so a sweep can run over it) beside one that several backends share."""
from dataclasses import dataclass

from cai_bench.backends.base import BackendOption
from cai_bench.backends.options import LANES
from cai_bench.backends.registry import get_backend


@dataclass
class Toy:
    name: str = "toy"
    options: tuple = (BackendOption("toy_label", str, "A label each record keeps."), LANES)
    precisions: tuple = ("auto", "fp32")
    default_batch_size: int = 32

    def check(self, options): ...
    def machine(self, plan): ...

    def run(self, plan, emit):
        run = get_backend("cpu").run(plan, emit)
        run.info["toy_label"] = plan.backend_options.get("toy_label")
        return run


def create():
    return Toy()
'''

PLUGIN_PROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "cai-bench-toy-backend"
version = "0.1"

[project.entry-points."cai_bench.backends"]
toy = "toy_backend:create"

[tool.setuptools]
py-modules = ["toy_backend"]
"""


def test_a_backend_installed_from_another_package_is_a_choice_with_its_options_and_sweeps(installed, tmp_path):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "toy_backend.py").write_text(PLUGIN)
    (plugin / "pyproject.toml").write_text(PLUGIN_PROJECT)
    # Built as cai-bench's own wheel is (this environment's setuptools), installed as a user installs it
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, plugin]
    subprocess.run(build, check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("cai_bench_toy_backend-*.whl")
    install = [installed / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel]
    subprocess.run(install, check=True, timeout=300, capture_output=True)
    helped = _run(installed, tmp_path, "run", "--help", env={"COLUMNS": "250"})
    assert helped.returncode == 0, helped.stderr
    text = " ".join(helped.stdout.split())
    assert "<cpu|hpc|gpu|lambda|dask|toy>" in text and "--toy-label" in text
    assert "--backend toy:" in helped.stdout.splitlines()  # its own section of the help
    assert "cpu, hpc, dask, toy: Partitions split between" in text  # a shared option: one text, naming all who take it
    small = ["--gb", str(TINY_GB), "--partition-mb", str(TINY_MB), "--precision", "fp32", "--threads", "1", "-q"]
    swept = _run(installed, tmp_path, "sweep", "--backend", "toy", "--toy-label", "a,b", "--repeats", "1", *small)
    assert swept.returncode == 0, swept.stderr
    assert "2 points on toy" in swept.stdout and "2 record(s) appended" in swept.stdout
    records = [json.loads(line) for line in (tmp_path / "results" / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["backend_info"]["toy_label"] for r in records) == ["a", "b"]
    assert all(r["backend"] == "toy" and r["summary"]["samples"] == 104 for r in records)
