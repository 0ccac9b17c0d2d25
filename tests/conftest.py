from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cai_bench.data.partitions import synthesize

# A copy of shared/spec/upstream-state-dict.tsv, so that the tests run in any clone.
UPSTREAM_KEYS = Path(__file__).resolve().parent / "data" / "upstream-state-dict.tsv"
TINY_GB = 0.002  # 104 samples
TINY_MB = 0.52  # 4 partitions of 26 samples


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's cache."""
    monkeypatch.setenv("CAI_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic data set; tests that change files copy it first (see ``data_copy``)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    synthesize(out, TINY_GB, TINY_MB, seed=3)
    return out


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``cai-bench ARGS`` in this process through the real entry point; returns (exit code, stdout, stderr)."""
    from cai_bench import cli as cli_module

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["cai-bench", *map(str, args)])
        monkeypatch.setattr(cli_module, "_debug", False)
        code = 0
        try:
            cli_module.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def upstream_spec() -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of every entry of the upstream state dict, from shared/spec."""
    rows = []
    for line in UPSTREAM_KEYS.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        dims = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        rows.append((key, dims, dtype))
    return rows
