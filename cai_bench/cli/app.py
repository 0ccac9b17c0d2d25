"""The Typer applications (the root and its command groups), what every command shares (``--debug``,
``--version``, help where no command is given), and how the way a measuring command ended becomes what the user
sees and its exit code."""

from __future__ import annotations

import signal
from pathlib import Path

import typer
from typer.core import TyperCommand

from cai_bench import __version__
from cai_bench.backends.base import PartitionsFailed
from cai_bench.core.choices import UPSTREAM_WEIGHTS, UPSTREAM_WEIGHTS_WHERE
from cai_bench.render import run_views
from cai_bench.store.jsonl import ResultsStore


class State:
    """What the root options set for the command that runs (``--debug``)."""

    debug = False


# Help as click writes it (rich_markup_mode None), not in Rich's boxed table: at 80 columns the table left some
# 20 columns for the text, broke choice lists inside a word and showed <bool> for flags; click's keeps a long
# option on a line of its own, re-wraps each paragraph to the terminal, and shows a flag as a flag
PLAIN_HELP = {"rich_markup_mode": None}


class SectionedCommand(TyperCommand):
    """Plain help whose options are grouped as the declarations group them (``rich_help_panel``): the common
    options first, then each backend's own under its name, as the boxed layout did."""

    def format_options(self, ctx: typer.Context, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            row = param.get_help_record(ctx)
            if row is not None:
                sections.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(row)
        for name, rows in sections.items():
            with formatter.section(name):
                formatter.write_dl(rows)


class _Commands(typer.Typer):
    """The root's commands with sectioned plain help, whatever module adds them."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", SectionedCommand)
        return super().command(*args, **kwargs)


app = _Commands(
    help="Benchmark pcm-AstroMAE galaxy-redshift inference across CPU, HPC, GPU and serverless backends.",
    pretty_exceptions_enable=False,
    add_completion=False,
    **PLAIN_HELP,
)
data_app = typer.Typer(
    help="Make, re-partition, inspect, verify and upload partitioned galaxy data sets.", **PLAIN_HELP
)
model_app = typer.Typer(
    help=f"Inspect, convert and export pcm-AstroMAE. The fine-tuned weights are {UPSTREAM_WEIGHTS} in "
    f"{UPSTREAM_WEIGHTS_WHERE}: download it, then cai-bench model convert PATH --out weights.safetensors.",
    **PLAIN_HELP,
)
results_app = typer.Typer(help="List, show and export the records in the results store.", **PLAIN_HELP)
comm_app = typer.Typer(
    help="Collectives between workers: the direct channel's rendezvous server, channel latency.", **PLAIN_HELP
)
lambda_app = typer.Typer(
    help="The AWS Lambda backend's tools: the image and the function on AWS, the local emulator, costs.", **PLAIN_HELP
)


def _help_where_no_command(ctx: typer.Context) -> None:
    """A command group called alone shows its help, and exits 2 as a command line that asks for nothing does."""
    if ctx.invoked_subcommand is None:
        text = ctx.get_help()
        if text:
            print(text)
        raise typer.Exit(2)


for group, name in ((data_app, "data"), (model_app, "model"), (results_app, "results"), (lambda_app, "lambda"),
                    (comm_app, "comm")):  # fmt: skip
    group.callback(invoke_without_command=True)(_help_where_no_command)
    app.add_typer(group, name=name)


def _version(value: bool) -> None:
    if value:
        print(f"cai-bench {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    State.debug = debug
    _help_where_no_command(ctx)


# ---------------------------------------------------------------------------------------------- how a run ended


class Terminated(KeyboardInterrupt):
    """SIGTERM (a SLURM time limit, ``timeout``, ``kill``): stops a command as Ctrl-C does, so what finished is
    recorded as ``interrupted``; the command then exits with 143 (128 + SIGTERM)."""


def interrupt_exit_code(exc: BaseException) -> int:
    return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130


def measured(work, results: str | Path, interrupted: str | None = None, again: str = ""):
    """Run ``work`` (which records its runs in the store under ``results``) and turn how it ended into what the
    user sees: partitions that failed for good (exit 1), Ctrl-C or SIGTERM (exit 130 or 143; where the work goes
    on without us, the command that records it later). ``interrupted`` replaces the Ctrl-C line (``{store}``
    in it: the store's path); ``again`` is said after a failure, where a rerun continues."""
    store_path = ResultsStore(results).path
    try:
        return work()
    except PartitionsFailed as exc:
        run_views.show_partitions_failed(exc, store_path, again)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        run_views.show_interrupted(exc, store_path, interrupted.format(store=store_path) if interrupted else None)
        raise typer.Exit(interrupt_exit_code(exc)) from None
