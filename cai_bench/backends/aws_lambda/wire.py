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

    secret       the run's secret for its objects in S3 (``seal_metadata``): never stored, never in a record

Results: each unit's ``PartitionResult`` in the wire format (``records.encode_result``) at
``<results>/unit-NNNNNN.npz``; a retried unit overwrites its own key. Every object the handler writes for the
driver (a unit's result, rank 0's aggregate, a Step Functions reply) carries a tag in its user metadata: a
HMAC-SHA256 of its name and bytes under a key derived from the run's secret. The driver reads none without it,
so whoever else may write to the bucket cannot replace a result with one of their own.

Reply: {"environment", "request_id", "cold", "ready": {"weights", "choices"}, "done": [{"position", "key",
"record"}], "failed": [{"position", "error"}], "timing": {"duration_ms"}, "comm": {"rank", "comm_s", "aggregate"
(rank 0: its key), "error" (the collectives failed: the driver reads the units' own results)}} (timing: the
handler's own time, what the driver has of an invocation when no REPORT line reaches it).
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import asdict

from cai_bench.comm.seal import derive
from cai_bench.core.errors import UserError
from cai_bench.core.plan import PartitionRef
from cai_bench.core.records import PartitionResult, WireFormatError, decode_result
from cai_bench.data.s3 import S3Prefix

SEAL_METADATA = "cai-bench-seal"  # x-amz-meta-cai-bench-seal: the object's tag


class ForgedObject(WireFormatError):
    """An object where the run's handler writes, whose tag is missing or wrong: not written by this run."""


def new_secret() -> str:
    """A run's secret for its objects in S3, made by the driver and sent in each event."""
    return secrets.token_hex(16)


def _tag(secret: str, run_id: str, name: str, data: bytes) -> str:
    mac = hmac.new(derive(secret, "objects", run_id), name.encode() + b"\n", "sha256")
    mac.update(data)
    return mac.hexdigest()


def write_sealed(prefix: S3Prefix, name: str, data: bytes, secret: str, run_id: str) -> None:
    """``data`` at ``name`` with its tag in the object's metadata."""
    prefix.write(name, data, {SEAL_METADATA: _tag(secret, run_id, prefix.key(name), data)})


def read_sealed(prefix: S3Prefix, name: str, secret: str, run_id: str) -> bytes:
    """The object at ``name``, checked against its tag; ForgedObject where it is not this run's."""
    data, metadata = prefix.read_with_metadata(name)
    if not hmac.compare_digest(metadata.get(SEAL_METADATA, ""), _tag(secret, run_id, prefix.key(name), data)):
        raise ForgedObject(f"{prefix.where(name)} failed its seal: not written by this run's functions")
    return data


def result_key(position: int) -> str:
    return f"unit-{position:06d}.npz"


def read_result(results: S3Prefix, position: int, secret: str, run_id: str) -> PartitionResult | None:
    """A unit's result as an invocation wrote it to ``results``; None when it is not there (or not whole yet).
    ForgedObject where the object there is not this run's."""
    try:
        return decode_result(read_sealed(results, result_key(position), secret, run_id))
    except ForgedObject:
        raise
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
