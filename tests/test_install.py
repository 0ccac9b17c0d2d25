"""cai-bench installed as a user installs it: a wheel in a fresh virtual environment, run from another directory.

The fresh environment borrows the third-party packages of this one through a path file, so nothing is
downloaded; cai-bench itself comes only from the wheel (this checkout is neither installed there nor on the
path), so the presets and the paper's table must be in the wheel and found with importlib.resources.
"""

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
    # This environment's packages (torch, timm, ...) come after the fresh one's own: a path file in a path file's
    # directory is not read, so the editable install of this checkout stays out
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return venv


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAI_BENCH_CACHE": str(cwd / "cache"), "PYTHONPATH": ""}
    return subprocess.run([venv / "bin" / "cai-bench", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_the_wheel_holds_the_package_and_its_data(installed, tmp_path):
    where = subprocess.run(
        [installed / "bin" / "python", "-c", "import cai_bench; print(cai_bench.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(installed)), where


def test_an_installed_cai_bench_plots_sweeps_and_runs_from_any_directory(installed, tmp_path):
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
