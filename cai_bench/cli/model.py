"""``model info``, ``convert`` and ``export``: what pcm-AstroMAE is, upstream checkpoints recovered, exports made.

Each command imports the model's modules (torch) when it runs, so that the rest of the command line
starts without them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench.cli import options as o
from cai_bench.cli.app import model_app
from cai_bench.render import tool_views

CheckWeights = Annotated[Path | None, typer.Option("--weights", help="Load these weights first (checks they fit).")]
Source = Annotated[Path, typer.Argument(help="Upstream's pickled model (.pt), a plain state dict, or safetensors.")]
SafetensorsOut = Annotated[Path, typer.Option("--out", help="The safetensors file to write.")]
ExportDir = Annotated[Path, typer.Option("--out", help="The export directory to create.")]
Format = Annotated[
    o.ExportFormat, typer.Option("--format", help="onnx (for onnxruntime or openvino) or openvino (its IR).")
]
ExportWeights = Annotated[Path | None, typer.Option("--weights", help="The weights to export (default: random-init).")]
ExportSeed = Annotated[int, typer.Option(min=0, help="Random-init seed (0 or more), without --weights.")]


@model_app.command("info")
def model_info(weights: CheckWeights = None, as_json: o.AsJson = False) -> None:
    """Parameters (total, frozen, learnable), FLOPs per sample and the weights' source."""
    from cai_bench.model.checkpoint import model_info as facts  # torch: the model is built

    tool_views.show_model_info(facts(weights), as_json)


@model_app.command("convert")
def model_convert(src: Source, out: SafetensorsOut, force: o.Force = False) -> None:
    """Recover the model's tensors into a safetensors file, without importing or running anything from SRC.

    A whole pickled model (upstream's DataParallel-wrapped ViT_Astro) is read by a restricted unpickler: tensor
    building blocks are rebuilt, module classes become inert placeholders, any other pickled name is refused.
    """
    from cai_bench.model.checkpoint import convert_checkpoint  # torch: the tensors are rebuilt

    tool_views.show_conversion(convert_checkpoint(src, out, overwrite=force))


@model_app.command("export")
def model_export(
    out: ExportDir, format: Format, weights: ExportWeights = None, seed: ExportSeed = 0, force: o.Force = False,
    as_json: o.AsJson = False,
) -> None:  # fmt: skip
    """Export the model once, with torch, for --runtime onnxruntime or openvino: checked against torch fp32 on
    a fixed batch before anything is written, and naming its weights, so records of runs on it still do.

    Run it with --weights OUT; without an export, --runtime onnxruntime or openvino exports into the cache.
    """
    from cai_bench.inference.export import export_command  # torch: the model is exported with it

    tool_views.show_model_export(*export_command(weights, format.value, out, seed=seed, overwrite=force), as_json)
