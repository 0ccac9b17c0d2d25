"""What crosses S3 between the driver and the function, in one place: the units of an event, where each unit's
result lands and how it is read back, and the text of a function's error. The handler writes what the driver's
transports (direct invocations, Step Functions executions) read.

Event (what the driver sends; under Step Functions the Map's item ``{"base": the shared fields, "units": [...]}``):
    run_id       the run's id
    results      s3://bucket/prefix where the unit results go
    units        [{"position": int, "ref": PartitionRef fields}]
    options      EngineOptions fields (batch_size, precision, engine, verify_checksums, compile, runtime)
    weights      runtime torch: a path in the image, an s3:// key (fetched once to /tmp), or null for random-init
                 weights; onnxruntime, openvino: an export's directory in the image, or its s3:// folder
    seed         random-init seed
    mode         "model" (default) or "no-model": read and verify each partition, return its record, run nothing
    hold_s       no-model only: seconds each unit holds its worker, standing in for compute (tests, benches)
    replies      Step Functions only: the folder under ``results`` where the handler writes its reply as
                 ``<request id>.json`` (a Map's output is too small to carry them)
    comm         --comm only: ``gathering.CommConfig`` fields and this invocation's ``rank``; after its units the
                 function joins the run's closing collectives, and rank 0 writes the aggregate of every rank's
                 results to ``<results>/aggregate-<comm run id>.npz``

Results: each unit's ``PartitionResult`` in the wire format (``records.encode_result``) at
``<results>/unit-NNNNNN.npz``; a retried unit overwrites its own key.

Reply: {"environment", "request_id", "cold", "ready": {"weights", "choices"}, "done": [{"position", "key",
"record"}], "failed": [{"position", "error"}], "timing": {"duration_ms"}, "comm": {"rank", "comm_s", "aggregate"
(rank 0: its key), "error" (the collectives failed: the driver reads the units' own results)}} (timing: the
handler's own time, what the driver has of an invocation when no REPORT line reaches it).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from cai_bench.data.s3 import S3Prefix
from cai_bench.errors import UserError
from cai_bench.plan import PartitionRef
from cai_bench.records import PartitionResult, WireFormatError, decode_result


def result_key(position: int) -> str:
    return f"unit-{position:06d}.npz"


def read_result(results: S3Prefix, position: int) -> PartitionResult | None:
    """A unit's result as an invocation wrote it to ``results``; None when it is not there (or not whole yet)."""
    try:
        return decode_result(results.read(result_key(position)))
    except (UserError, WireFormatError):
        return None


def unit_items(units) -> list[dict]:
    """Dispatcher units (a position and a PartitionRef each) as an event's ``units``."""
    return [{"position": u.position, "ref": asdict(u.item)} for u in units]


def event_units(event: dict) -> list[tuple[int, PartitionRef]]:
    """An event's ``units`` back as (position, PartitionRef), the worker loop's units."""
    return [(int(u["position"]), PartitionRef(**u["ref"])) for u in event["units"]]


def aggregate_key(comm_run_id: str) -> str:
    return f"aggregate-{comm_run_id}.npz"


def reply_key(replies: str, request_id: str) -> str:
    return f"{replies}/{request_id}.json"


def error_text(payload: bytes | str | None, kind: str | None = None) -> str:
    """``errorType: errorMessage`` from Lambda's error JSON (a function error's body, or the Cause Step Functions
    gives it); the text itself, cut short, when it is not that JSON."""
    try:
        error = json.loads(payload or "")
        return f"{error.get('errorType') or kind or 'Unhandled'}: {error.get('errorMessage', '')}".strip()
    except (ValueError, TypeError, AttributeError):
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload or "")
        return f"{kind}: {text[:300]}".strip() if kind else text[:300]
