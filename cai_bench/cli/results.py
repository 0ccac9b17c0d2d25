"""``results list``, ``show`` and ``export``: the records in the store, as rows, one whole, or all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench.analysis.results import export_text, find_record, listed_rows, record_row
from cai_bench.cli import options as o
from cai_bench.cli.app import results_app
from cai_bench.render import console, tool_views
from cai_bench.store.jsonl import ResultsStore

Last = Annotated[int, typer.Option(help="Show the newest N records (0: all).")]
RunId = Annotated[str, typer.Argument(help="A run id, or enough of its start to be unique.")]
Whole = Annotated[bool, typer.Option("--json", help="The whole record, per-partition workers included.")]
Csv = Annotated[bool, typer.Option("--csv", help="One CSV row per record (the default).")]
Json = Annotated[bool, typer.Option("--json", help="A JSON array of the whole records instead.")]
ExportOut = Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")]


@results_app.command("list")
def results_list(results: o.ResultsRead = Path("results"), backend: o.BackendList = None, last: Last = 30) -> None:
    """The records in the store, newest last: id, status, what ran and how fast, and where."""
    store = ResultsStore(results)
    rows, total = listed_rows(store, o.comma_list(backend, "--backend"), last, warn=console.warn)
    tool_views.show_record_list(rows, total, store.path)


@results_app.command("show")
def results_show(run_id: RunId, results: o.ResultsRead = Path("results"), as_json: Whole = False) -> None:
    """One record: its summary, plan and environment (the whole record with --json)."""
    record = find_record(ResultsStore(results), run_id, warn=console.warn)
    tool_views.show_record(record, record_row(record), as_json)


@results_app.command("export")
def results_export(
    results: o.ResultsRead = Path("results"), csv_format: Csv = True, json_format: Json = False, out: ExportOut = None
) -> None:
    """Every record, as CSV rows (the summary's figures, plan and machine) or as JSON."""
    console.show_export(export_text(ResultsStore(results), json_format, warn=console.warn), out)
