"""The model's FLOPs per galaxy for records: counted from the model itself by torch's FLOP counter
(``astromae.flops_per_sample``), once per version of the architecture's source, and kept in the cache, so a record
names them without every process building the model (and importing torch) to count them again."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

from cai_bench.core.errors import UserError
from cai_bench.core.files import cache_dir, file_sha256, loads_json, write_json_atomic

ARCHITECTURE_MODULE = "cai_bench.model.astromae"


def model_flops_per_sample() -> int:
    """FLOPs of one galaxy's forward pass (2 per multiply-add), as torch counts them on the model."""
    source = importlib.util.find_spec(ARCHITECTURE_MODULE).origin
    key = file_sha256(source)
    path = cache_dir() / "model-flops" / f"{key[:24]}.json"
    with contextlib.suppress(OSError, UserError):
        kept = loads_json(Path(path).read_bytes(), str(path))
        if isinstance(kept, dict) and kept.get("source_sha256") == key and isinstance(kept.get("flops"), int):
            return kept["flops"]
    from cai_bench.model import astromae  # torch: only where the count is not kept yet

    flops = astromae.flops_per_sample(astromae.build_model(seed=0))
    write_json_atomic(path, {"source_sha256": key, "flops": flops})
    return flops
