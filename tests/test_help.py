"""Help and tables for an 80-column terminal and for a pipe: every command's help, the report."""

from __future__ import annotations

import itertools
import re

import click
import pytest
from rich.console import Console
from typer.main import get_command

from cai_bench.analysis.report import PointReport
from cai_bench.cli import app
from cai_bench.render import tables


def leaf_commands() -> list[tuple[str, click.Command]]:
    """Every command of the tool with its full name (``results show``), the groups' own help included."""
    found = []

    def walk(command: click.Command, name: str) -> None:
        found.append((name, command))
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{name} {sub_name}".strip())

    walk(get_command(app), "")
    return found


def help_text(command: click.Command, name: str) -> str:
    with click.Context(command, info_name=f"cai-bench {name}".strip(), terminal_width=80) as ctx:
        return command.get_help(ctx)


def test_every_commands_help_fits_80_columns_with_no_bool_and_no_choice_list_split(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    commands = leaf_commands()
    assert len(commands) > 30 and any(name == "run" for name, _ in commands)
    for name, command in commands:
        text = help_text(command, name)
        for line in text.splitlines():
            assert len(line) <= 80, f"{name}: {line!r}"
            split = re.search(r"<[\w.-]*\|[\w|.-]*$", line) or re.match(r"^\s*[\w.-]*\|[\w|.-]*>", line)
            assert not split, f"{name}: a choice list split: {line!r}"
        assert "<bool>" not in text, name
    run = help_text(dict(commands)["run"], "run")
    assert "--compile " in run and "--quiet" in run and len(run.splitlines()) < 200


def test_a_sentence_of_help_is_rewrapped_not_broken_where_the_source_broke_it(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    text = help_text(dict(leaf_commands())["predict"], "predict")
    assert "predicts only the rest and the file holds every object exactly" in " ".join(text.split())
    description = text.split("\n\n")[2].splitlines()  # "Resumable: ...", broken in the docstring at 116 columns
    assert len(description) >= 2
    for line, after in itertools.pairwise(description):  # filled: the next word would not have fitted
        assert len(line) + 1 + len(after.split()[0]) > 78, (line, after)


def points() -> list[PointReport]:
    from conftest import hand_record

    from cai_bench.analysis.report import summarize_points

    records = [hand_record("hpc", w, gb=gb) for gb in (0.02, 0.05) for w in (2.0, 2.2)]
    records += [hand_record("lambda", w, gb=0.02, host="beta", cpu="Xeon B") for w in (3.0, 3.1)]
    return summarize_points(records)


def rendered(table, width: int, terminal: bool) -> str:
    console = Console(width=width, force_terminal=terminal, color_system=None, record=True)
    console.print(table, soft_wrap=False)
    return console.export_text()


def test_the_report_fits_80_columns_by_stacking_and_leaving_out_columns_never_by_cutting_cells():
    table = tables.report_table(points(), "store", width=80)
    text = rendered(table, 80, True)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "..." not in text  # no cell cut short
    assert "Xeon A" in text and "Xeon B" in text  # one table per machine, the machine in its title
    wide = rendered(tables.report_table(points(), "store", width=1_000_000), 1_000, False)
    assert "Left out" not in wide and "RSS MB" in wide and "Mbps Σw" in wide  # a pipe gets every column


@pytest.mark.parametrize("width", [60, 100, 140])
def test_the_report_fits_whatever_the_terminal(width):
    text = rendered(tables.report_table(points(), "store", width=width), width, True)
    assert max(len(line) for line in text.splitlines()) <= width and "…" not in text


def test_each_results_option_says_what_the_command_does_with_the_store(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    commands = dict(leaf_commands())
    for reader in ("report", "plot", "compare", "results list"):
        assert "RESULTS/runs.jsonl is read" in " ".join(help_text(commands[reader], reader).split()), reader
    assert "appended to RESULTS/comm.jsonl" in " ".join(help_text(commands["comm bench"], "comm bench").split())
    assert "appended to RESULTS/runs.jsonl" in " ".join(help_text(commands["run"], "run").split())


def test_in_a_log_each_finished_run_is_one_line_with_no_second_figure(cli, tiny_data, tmp_path):
    """stderr is no terminal here, as in a log or a pipe: no bar is drawn (each stop would draw every bar again),
    and each repeat leaves one line that counts its partitions; the rate and the wall are the table's alone (a
    figure on the line's own clock, start-up included, said another number for the same repeat)."""
    code, out, err = cli("run", "--data", tiny_data, "--precision", "fp32", "--threads", "1", "--repeats", "2",
                         "--results", tmp_path)  # fmt: skip
    assert code == 0, err
    lines = [line for line in err.splitlines() if "partitions" in line]
    assert [line.split(":")[0] for line in lines] == ["repeat 1/2", "repeat 2/2"]
    assert all(line.endswith("4/4 partitions done") for line in lines), lines
    assert "samples/s (wall)" not in err
    assert "━" not in err  # no bar
    assert "run ids: " in out  # two repeats, two records
