"""The ``cai-bench`` command line: one module per command group, each command a short adapter (its options
parsed, one call into the layers below, one renderer from ``ui``), and the entry point, which turns every way a
command can end into one line and an exit code."""

from __future__ import annotations

import signal
import sys

import typer

from cai_bench.cli import aws_lambda, bench, comm, compare, data, estimate, model, results, run, sweep  # noqa: F401 (they add the commands)
from cai_bench.cli.app import State, Terminated, app, interrupt_exit_code
from cai_bench.core.errors import UserError, one_line

__all__ = ["app", "main"]

UNEXPECTED_EXIT = 3


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _fail(message: str, code: int) -> None:
    """One line on stderr, whatever the message holds (newlines, other libraries' colour codes), and exit."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _help_hint(ctx) -> str:
    """Where to read more: ``cai-bench data synth --help`` (named by the commands, whatever ran the program)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return f" (see: cai-bench {' '.join([*reversed(names), '--help'])})"


def main() -> None:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    State.debug = False
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        if State.debug:
            raise
        _fail(str(exc), exc.exit_code)
    except typer.TyperException as exc:  # the parser's own errors: unknown option, a value that is not a choice
        _fail(exc.format_message().replace("Value error, ", "") + _help_hint(getattr(exc, "ctx", None)), 2)
    except KeyboardInterrupt as exc:  # outside a run, which reports its own
        print("interrupted", file=sys.stderr)
        sys.exit(interrupt_exit_code(exc))
    except Exception as exc:
        if State.debug:
            raise
        # Not a mistake of the user's that we foresaw: say so on one line, and how to see more; exit 3, a code no
        # command gives a verdict with (compare's 1 is "a regression")
        _fail(f"unexpected {type(exc).__name__}: {exc} (cai-bench --debug ... shows the traceback)", UNEXPECTED_EXIT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code if isinstance(code, int) else 0)
