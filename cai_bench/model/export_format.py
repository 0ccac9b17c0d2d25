"""An export of pcm-AstroMAE as a directory: the model file(s) and ``export.json``, which names the weights it was
made from (so records still name them), its format and how far the exported model's predictions were from torch's
on a fixed batch. Reading one needs neither torch nor a runtime: ``model/export.py`` makes exports (with torch),
``runtimes`` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cai_bench.core.errors import UserError
from cai_bench.core.files import loads_json
from cai_bench.core.records import WeightsInfo

EXPORT_META = "export.json"
EXPORT_KIND = "cai-bench/model-export"
EXPORT_VERSION = 1
# Which export formats a runtime reads
READS = {"onnxruntime": ("onnx",), "openvino": ("openvino", "onnx")}


@dataclass(frozen=True)
class Export:
    """An export directory as ``export.json`` describes it."""

    directory: str
    format: str  # "onnx" or "openvino"
    files: tuple[str, ...]  # every file of the export, the model file first
    weights: WeightsInfo
    check: dict  # {"batch", "max_abs_dz", "runtime", ...}: the export's own check against torch
    meta: dict

    @property
    def model_file(self) -> str:
        return str(Path(self.directory) / self.files[0])


def is_export(path: str | None) -> bool:
    return bool(path) and (Path(path) / EXPORT_META).is_file()


def read_export(directory: str | Path, runtime: str | None = None) -> Export:
    """The export in ``directory``, checked: its metadata, every file it names present, and (given ``runtime``)
    a format that runtime reads."""
    directory = Path(directory)
    try:
        text = (directory / EXPORT_META).read_bytes()
    except OSError:
        raise UserError(f"{directory}: not a model export (no {EXPORT_META}); see cai-bench model export") from None
    meta = loads_json(text, str(directory / EXPORT_META))
    if not isinstance(meta, dict) or meta.get("kind") != EXPORT_KIND:
        raise UserError(f"{directory / EXPORT_META}: not a cai-bench model export")
    if meta.get("version") != EXPORT_VERSION:
        raise UserError(f"{directory}: export version {meta.get('version')!r}, this cai-bench reads {EXPORT_VERSION}")
    files = tuple(meta.get("files") or ())
    if meta.get("format") not in ("onnx", "openvino") or not files:
        raise UserError(f"{directory / EXPORT_META}: no format or no files named")
    for name in files:
        plain = isinstance(name, str) and "/" not in name and "\\" not in name and not name.startswith(".")
        if not plain or not (directory / name).is_file():
            raise UserError(f"{directory}: the export names {name!r}, which is not a file there")
    check = meta.get("check") or {}
    problem = _check_problem(check)
    if problem:
        raise UserError(
            f"{directory / EXPORT_META}: its check {problem}; export the model again (cai-bench model export)"
        )
    weights = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
    info = WeightsInfo(weights.get("source", "unknown"), weights.get("sha256"), weights.get("seed"))
    if runtime is not None and meta["format"] not in READS[runtime]:
        reads = " or ".join(READS[runtime])
        raise UserError(f"{directory}: a {meta['format']} export; --runtime {runtime} reads {reads}")
    return Export(str(directory), meta["format"], files, info, dict(check), meta)


def _check_problem(check) -> str | None:
    """What is wrong with an export's record of its check against torch (None: nothing): the largest difference
    and the tolerance are finite numbers of 0 or more, the batch a whole number."""
    if not isinstance(check, dict):
        return "is not a table"
    for name in ("max_abs_dz", "tolerance"):
        value = check.get(name)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        ):
            return f"{name} is {value!r:.40}, not a finite number of 0 or more"
    if check.get("batch") is not None and (type(check["batch"]) is not int or check["batch"] < 0):
        return f"batch is {check['batch']!r:.40}, not a whole number"
    return None
