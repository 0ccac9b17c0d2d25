"""The command line's options, each declared once: those several commands share (as ``Annotated`` types), the
backends' own (from the registry: one flag and one help text per option, whichever backends take it, grouped in
--help by the backends that do), and how a comma list is read."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Annotated

import typer

from cai_bench.backends.registry import all_options, available_backends
from cai_bench.core.choices import ENGINES, EXPORT_FORMATS, PRECISIONS, REPORT_FORMATS, REPROBE_ENV, choice
from cai_bench.core.errors import UserError

BackendName = choice("BackendName", available_backends())
Precision = choice("Precision", PRECISIONS)
Engine = choice("Engine", ENGINES)
ReportFormat = choice("ReportFormat", REPORT_FORMATS)
ExportFormat = choice("ExportFormat", EXPORT_FORMATS)

PRECISION_HELP = (
    "auto: the fastest a start-up probe finds 10% faster than fp32 and within 2e-3 of it (cpu, hpc, lambda: bf16 "
    "on torch and openvino, openvino int8 where the CPU has int8 dot products; gpu: tf32, bf16, fp16). int8: "
    "--runtime onnxruntime or openvino, kept only within 2e-3 of fp32. tf32 and fp16 are for --backend gpu."
)
ENGINE_HELP = "fast: the prepared model; reference: the upstream-style eager fp32 loop."

Backend = Annotated[BackendName, typer.Option(help="Where to run.")]
Results = Annotated[
    Path, typer.Option("--results", help="Results directory; records are appended to RESULTS/runs.jsonl.")
]
MinDuration = Annotated[
    float, typer.Option(help="A repeat shorter than this many seconds of wall clock is not a valid measurement.")
]
MinSamples = Annotated[int, typer.Option(help="A repeat over fewer galaxies than this is not a valid measurement.")]
# What commands that only read a store say of it (report, plot, results, compare)
ResultsRead = Annotated[Path, typer.Option("--results", help="Results directory whose RESULTS/runs.jsonl is read.")]
DataDir = Annotated[
    Path | None, typer.Option("--data", help="A data set directory or s3:// prefix (data synth / import).")
]
Gb = Annotated[float | None, typer.Option(help="Synthetic data size in GB (GiB), generated once into the cache.")]
PartitionMb = Annotated[
    float | None, typer.Option(help="Partition size in MB (MiB) of synthetic data.", show_default="25")
]
BatchSize = Annotated[int | None, typer.Option(help="Samples per forward pass.", show_default="512; gpu: 4096")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help=PRECISION_HELP)]
EngineOpt = Annotated[Engine, typer.Option("--engine", help=ENGINE_HELP)]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile", help="torch.compile the fast engine's model (25-35 s up front on 2 cores; timed as start-up)."
    ),
]
Threads = Annotated[int | None, typer.Option(help="Threads in all.", show_default="physical cores")]


def reprobe_if(asked: bool) -> None:
    """--reprobe: for this process and the workers it starts."""
    if asked:
        os.environ[REPROBE_ENV] = "1"


Reprobe = Annotated[
    bool,
    typer.Option(help="--runtime auto: time the runtimes again instead of taking the answer kept for this machine."),
]
Oversubscribe = Annotated[
    bool,
    typer.Option(
        "--oversubscribe", help="Allow more threads than this process may use; the record and report mark the point."
    ),
]
Weights = Annotated[
    Path | None,
    typer.Option(help="Weights (.safetensors or a .pt state dict), or an export.", show_default="random init"),
]
Seed = Annotated[
    int, typer.Option(min=0, help="Seed of the synthetic data and of the random-init weights (0 or more).")
]
Verify = Annotated[bool, typer.Option("--verify/--no-verify", help="Compare each partition's sha256 as it is read.")]
Warmup = Annotated[int, typer.Option(help="Unrecorded runs before the measured ones.")]
Force = Annotated[bool, typer.Option("--force", help="Replace what the command would otherwise refuse to overwrite.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout, nothing else.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
BackendList = Annotated[str | None, typer.Option("--backend", help="Only these backends, comma-separated.")]


def comma_list(text: str | None, option: str, kind: type = str) -> list | None:
    """``"0.05,0.1"`` -> ``[0.05, 0.1]``; a bad item is a UserError naming the option."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise UserError(f"{option} takes a comma-separated list of {kind.__name__} values, got {text!r}") from None
    if not values:
        raise UserError(f"{option} needs at least one value")
    return values


# ---------------------------------------------------------------------------------------------- backend options


def _panel(takers: list[str]) -> str:
    return f"--backend {takers[0]}" if len(takers) == 1 else "Options of several backends"


def _option_parameter(option, takers: list[str], sweep: bool) -> inspect.Parameter:
    """The command-line parameter of one declared backend option (a comma list in a sweep)."""
    shown = str(option.default) if option.default not in (None, False) else False
    text = option.help if len(takers) == 1 else f"{', '.join(takers)}: {option.help}"
    info = {"help": text, "show_default": shown, "rich_help_panel": _panel(takers)}
    if option.kind is bool:
        kind = bool
    elif option.kind is dict:
        kind = list[str] | None
    elif sweep and option.sweepable:
        kind = str | None
        info["help"] += " Comma-separated values: a sweep axis."
    elif option.choices:
        kind = choice(option.name.title().replace("_", ""), option.choices) | None
    else:
        kind = (str if option.parse else option.kind) | None
    annotation = Annotated[kind, typer.Option(option.flag, **info)]
    default = False if option.kind is bool else None
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _given_options(declared: dict, values: dict, sweep: bool) -> dict:
    """What the user gave of the declared options, read as each declares (lists of values in a sweep)."""
    out = {}
    for name, (option, _) in declared.items():
        value = values.get(name)
        if value is None or value is False:
            continue
        if option.kind is dict:
            out[name] = {k: v for item in value for k, v in option.from_text(item).items()}
        elif option.kind is bool:
            out[name] = [True] if sweep else True
        elif sweep and option.sweepable:
            out[name] = [option.from_text(t) for t in comma_list(value, option.flag)]
        else:
            value = value.value if hasattr(value, "value") else value
            out[name] = option.from_text(value) if isinstance(value, str) else option.check(value)
    return out


def with_backend_options(sweep: bool = False):
    """Give a command every option any backend declares (plugins' too), collected into its ``backend_options``
    argument: one declaration per option serves run, predict and sweep alike."""
    declared = all_options()

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "backend_options"]
        extra = [_option_parameter(option, takers, sweep) for option, takers in declared.values()]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name, None) for name in declared}
            return command(**kwargs, backend_options=_given_options(declared, values, sweep))

        wrapper.__signature__ = signature.replace(parameters=own + extra)
        return wrapper

    return decorate
