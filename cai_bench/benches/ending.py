"""How a benchmark script ends when it cannot finish: one line on stderr that says what failed and which of its
options to lower (or raise), and an exit code; never a traceback. What a benchmark measured before it failed is
in its own output or record, not lost here."""

from __future__ import annotations

import sys
from collections.abc import Callable

from cai_bench.backends.base import PartitionsFailed, failure_kind
from cai_bench.core.errors import UserError, one_line

# Exit codes: 1 the benchmark ran and could not finish, 2 its input was wrong, 130 Ctrl-C
COULD_NOT_FINISH = 1


def finish(name: str, work: Callable[[], int], advice: dict[str, str]) -> int:
    """Run ``work`` (a benchmark's body, returning its exit code); where it cannot finish, the line that says
    why and ``advice[kind]`` (kind: ``memory``, ``time`` or ``other``, from the errors)."""
    try:
        return work()
    except PartitionsFailed as exc:
        return _said(f"{name}: could not finish: {exc}", advice[exc.kind], COULD_NOT_FINISH)
    except UserError as exc:
        return _said(f"{name}: {exc}", "", UserError.exit_code)
    except MemoryError:
        return _said(f"{name}: out of memory", advice["memory"], COULD_NOT_FINISH)
    except KeyboardInterrupt:
        return _said(f"{name}: interrupted", "", 130)
    except RuntimeError as exc:  # torch's OutOfMemoryError (CUDA) is one: named so that torch is not imported
        kind = failure_kind([type(exc).__name__, str(exc)])
        if kind == "other":
            raise
        return _said(f"{name}: could not finish: {type(exc).__name__}: {exc}", advice[kind], COULD_NOT_FINISH)


def _said(what: str, advice: str, code: int) -> int:
    print(one_line(f"{what}; {advice}" if advice else what), file=sys.stderr)
    return code
