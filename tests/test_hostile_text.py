"""Strings from records and files are data, shown as text in every medium: rich markup is not interpreted,
matplotlib parses no mathtext, terminal escapes are shown and not sent, and a huge string is cut, so that a store
anyone could have written to cannot crash, rewrite or slow down what a user reads."""

from __future__ import annotations

import re

import pytest
from conftest import hand_record, write_store

MARKUP = "[link=https://evil.example]CLICK[/link][bold red]VALID[/] [/]"
MATH = "\\undefinedmacro $" + "\\sqrt{" * 40 + "$"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\r\x9b31m"
HOSTILE = f"{MARKUP} {MATH} {ESCAPES}"
HUGE = HOSTILE + " " + "H" * 2_000_000
# What the commands match, count and compare by: their values are the store's vocabulary (the run id is checked
# on read, apart)
KEPT = {"run_id", "status", "kind", "backend", "precision", "created_utc", "schema_version", "engine", "weights"}


def _hostile(value, text: str):
    """``value`` with every string in it but the KEPT fields' replaced by ``text``."""
    if isinstance(value, dict):
        return {k: v if k in KEPT else _hostile(v, text) for k, v in value.items()}
    if isinstance(value, list):
        return [_hostile(v, text) for v in value]
    return text if isinstance(value, str) else value


def _records(backend: str, walls: tuple[float, ...], huge: bool) -> list[dict]:
    """Runs on 0.2 GB in two partitions, each a valid measurement (10 s, 10,000 galaxies at least); with ``huge``
    the first holds 2 MB in each of its text fields."""
    runs = [hand_record(backend, w, gb=0.2, partition_mb=100.0) for w in walls]
    return [_hostile(r, HUGE if huge and i == 0 else HOSTILE) for i, r in enumerate(runs)]


@pytest.fixture(scope="module")
def hostile_stores(tmp_path_factory):
    base, other = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("other")
    # the first of base's: its own machine
    walls = {"cpu": (20.0, 20.4, 19.8, 20.2, 20.1), "hpc": (12.0, 12.2, 11.8, 12.1, 12.05)}
    records = [r for b, ws in walls.items() for r in _records(b, ws, huge=True)]
    forged = hand_record("cpu", 20.0, gb=0.2, partition_mb=100.0) | {
        "run_id": MARKUP
    }  # an id no cai-bench makes: skipped, said
    write_store(base, [*records, forged])
    write_store(other, [r for b, ws in walls.items() for r in _records(b, tuple(w * 1.01 for w in ws), huge=False)])
    return base, other, records[0]["run_id"]


def _literal(out: str, shows_machine: bool = True) -> None:
    """The markup is in ``out`` as text (wrapped or cut by a table maybe, never interpreted), no control character
    is, and the 2 MB strings were cut."""
    assert "\x1b[2J" not in out and "\x1b]0;" not in out and "\x07" not in out and "\x9b" not in out
    flat = re.sub(r"[\s\u2500-\u257f…]+", "", out)  # without the tables' borders, wrapping and cuts
    assert "CLICKVALID" not in flat and ("[link=https://evil.example]" in flat or not shows_machine), out[:2000]
    assert len(out) < 300_000, len(out)


@pytest.mark.parametrize(
    "args",
    [["report"], ["results", "list"], ["results", "show", "{run}"], ["compare", "{base}", "{other}"]],
    ids=["report", "results list", "results show", "compare"],
)
def test_text_commands_show_hostile_strings_literally(cli, hostile_stores, args):
    base, other, run = hostile_stores
    args = [a.format(base=base, other=other, run=run) for a in args]
    if args[0] != "compare":
        args += ["--results", str(base)]
    code, out, err = cli(*args)
    assert code in (0, 1) if args[0] == "compare" else code == 0, err[-2000:]
    assert "Traceback" not in err
    _literal(out + err, shows_machine=args[0] != "compare")  # compare names points, not machines
    if args[1:2] == ["show"]:
        assert "\\x1b[2J" in out  # the escape is shown as text
    if args[0] in ("report", "results"):
        assert "not one cai-bench makes" in err  # the forged run id: skipped, said, its text not shown


def test_report_html_and_plot_finish_with_hostile_strings(cli, hostile_stores, tmp_path):
    base, _, _ = hostile_stores
    page = tmp_path / "report.html"
    code, out, err = cli("report", "--results", base, "--html", page)
    assert code == 0, err[-2000:]
    text = page.read_text()
    assert "[link=https://evil.example]CLICK[/link]" in text and "\x1b" not in text
    assert len(text) < 5_000_000
    code, out, err = cli("plot", "--results", base, "--out-dir", tmp_path / "figs")
    assert code == 0, err[-2000:]
    _literal(out + err, shows_machine=False)  # the paths of the figures, which hold the machines
    assert list((tmp_path / "figs").glob("*.png"))


def test_an_unexpected_error_in_compare_exits_3_never_its_regression_code(cli, hostile_stores, monkeypatch):
    """1 is compare's "a point got worse": a bug on the way must not read as a verdict in a CI job."""
    base, other, _ = hostile_stores

    def broken(*args, **kwargs):
        raise RuntimeError("\x1b]0;pwned\x07 a bug")

    monkeypatch.setattr("cai_bench.cli.compare.compare_command", broken)
    code, _, err = cli("compare", base, other)
    assert code == 3 and err.startswith("error: unexpected RuntimeError: \\x1b]0;pwned\\x07 a bug"), (code, err)
    assert "\x1b" not in err and len(err.strip().splitlines()) == 1
