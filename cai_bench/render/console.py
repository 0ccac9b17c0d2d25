"""Where the command line writes: results on stdout, progress, warnings and errors on stderr, never wrapped;
the plain lines and the tables that fit the terminal."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from cai_bench.core.errors import UserError
from cai_bench.core.text import clip, visible

LINE_MAX = 2_000  # characters of one line of one string printed; a field from a record is cut shorter first


class _TextConsole(Console):
    """A console that takes every string it is given as text: no markup (a "[/]" in a host name would end the
    command, a "[link=...]" hide a hyperlink), no emoji codes, control characters written as escapes and no line
    longer than LINE_MAX, whether the string is printed, a table's cell or its title."""

    def render_str(self, text: str, **kwargs) -> Text:
        lines = [clip(line, LINE_MAX) for line in visible(text).split("\n")]
        return super().render_str("\n".join(lines), **{**kwargs, "markup": False, "emoji": False})


# Progress and errors go to stderr, results to stdout. Messages are never wrapped (soft_wrap), so a path or
# a figure stays on one line in logs and pipes.
console = _TextConsole(stderr=True, soft_wrap=True)


stdout = _TextConsole(soft_wrap=True)


if not stdout.is_terminal:
    stdout.width = max(stdout.width, 160)  # logs and pipes: wide enough for the report tables


def mb_text(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def ms_text(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f}"


def print_fitted(renderable) -> None:
    """A report on a terminal, its notes wrapped to it (the table fits it: ``report_table``); in a pipe or a log,
    at its natural width, nothing wrapped or cut."""
    if stdout.is_terminal:
        stdout.print(renderable, soft_wrap=False)
        return
    width = stdout.width
    stdout.width = 100_000  # print takes no width over the console's own
    try:
        stdout.print(renderable, soft_wrap=True)
    finally:
        stdout.width = width


def natural_width(table: Table) -> int:
    """The width ``table`` takes with no cell wrapped or cut."""
    return Measurement.get(stdout, stdout.options.update(width=10_000), table).maximum


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def say(text: str) -> None:
    """One result line on stdout, as it is (no markup, no highlighting)."""
    stdout.print(text, markup=False, highlight=False)


def warn(text: str) -> None:
    console.print(f"warning: {text}", markup=False, highlight=False)


def tell(text: str) -> None:
    """A line on stderr: what happened to a command, beside its results."""
    console.print(text, markup=False, highlight=False)


def show_paths(paths) -> None:
    for path in paths:
        say(str(path))


def show_export(text: str, out: Path | None) -> None:
    """``results export``: on stdout (a terminal, maybe: control characters from the records written as escapes;
    JSON has its own), or into ``out`` as it is."""
    if out is None:
        print(visible(text), end="")
        return
    try:
        out.write_text(text)
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror})") from None
