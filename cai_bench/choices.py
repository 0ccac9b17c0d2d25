"""The values of the enumerated options, importable without torch: the CLI builds its choices from them, and the
modules that act on a value check it against the same tuple."""

from __future__ import annotations

import enum

PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where a start-up probe finds it faster and close enough
ENGINES = ("fast", "reference")
# backend name -> module that defines ``create() -> Backend``, imported only when chosen
BACKEND_MODULES = {
    "cpu": "cai_bench.backends.cpu",
    "hpc": "cai_bench.backends.hpc",
}
SLURM_EXECUTORS = ("slurm", "local")
REPORT_FORMATS = ("table", "markdown", "csv", "json")
FIGURE_FORMATS = ("png", "svg", "pdf")


def choice(name: str, values) -> type[enum.Enum]:
    """A str-valued Enum of ``values``, which Typer shows and checks as the option's choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Precision = choice("Precision", PRECISIONS)
Engine = choice("Engine", ENGINES)
BackendName = choice("BackendName", BACKEND_MODULES)
ReportFormat = choice("ReportFormat", REPORT_FORMATS)
