"""What crosses S3 between the driver and the function, in one place: the units of an event, where each unit's
result lands and how it is read back, and the text of a function's error. The handler writes what the driver's
transports (direct invocations, Step Functions executions) read.

Event: ``{"base": {"secret_ref", "fields": the shared fields as JSON text, "seal"}, "item": {"units": [...],
"seal"}}``; under Step Functions the base is the execution's input and each item one entry of the items file. The
seals are HMACs under a key derived from the run's secret: the base's over its text, an item's over the base's seal
and its units, so that neither can be changed, nor an item moved to another run, without the handler refusing it
(``ForgedInput``). The shared fields travel as text so that no JSON engine on the way (Step Functions') can
change a number's spelling under the seal. The secret itself is in none of it: ``secret_ref`` names the run's
secret in AWS Secrets Manager (``run_secret.py``), which the function role may read and the driver deletes.
Fields:
    run_id       the run's id
    results      s3://bucket/prefix where the unit results go
    units        [{"position": int, "ref": PartitionRef fields}]
    options      EngineOptions fields (batch_size, precision, engine, verify_checksums, compile, runtime)
    weights      runtime torch: a path in the image, an s3:// key (fetched once to /tmp), or null for random-init
                 weights; onnxruntime, openvino: an export's directory in the image, or its s3:// folder
    staged       {object name: sha256} of what ``weights`` names in S3: the handler checks every object it fetches
    items        Step Functions only: the items file (s3://...), named where an item fails its seal
    seed         random-init seed
    mode         "model" (default) or "no-model": read and verify each partition, return its record, run nothing
    hold_s       no-model only: seconds each unit holds its worker, standing in for compute (tests, benches)
    replies      Step Functions only: the folder under ``results`` where the handler writes its reply as
                 ``<request id>.json`` (a Map's output is too small to carry them)
    comm         --comm only: ``CommConfig.public`` fields and this invocation's ``rank``; its key and URLs are in
                 the run's secret; after its units the function joins the run's closing collectives, and rank 0
                 writes the aggregate of every rank's results to ``<results>/aggregate-<comm run id>.npz``

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
from dataclasses import asdict, dataclass

from cai_bench.comm.seal import derive
from cai_bench.core.errors import UserError
from cai_bench.core.plan import PartitionRef
from cai_bench.core.records import PartitionResult, WireFormatError, decode_result
from cai_bench.data.s3 import S3Prefix

SEAL_METADATA = "cai-bench-seal"  # x-amz-meta-cai-bench-seal: the object's tag


class ForgedObject(WireFormatError):
    """An object where the run's handler writes, whose tag is missing or wrong: not written by this run."""


class ForgedInput(Exception):
    """What a function was given is not what the driver sent: an event or item that fails its seal, a staged
    object whose digest is not the one the driver staged. The run stops on it (``is_forged``), never retrying
    what someone else may have written."""


@dataclass(frozen=True)
class RunKeys:
    """The driver's hold on a run's secret: the secret itself (in memory only), where the functions read it, and
    the run it seals."""

    secret: str
    secret_ref: str
    run_id: str

    @property
    def sealing(self) -> tuple[str, str]:
        """What ``read_sealed`` checks the handler's objects with."""
        return self.secret, self.run_id

    def base(self, fields: dict) -> dict:
        return seal_base(fields, self.secret_ref, self.secret)

    def item(self, base: dict, units: list[dict]) -> dict:
        return seal_item(base, units, self.secret, self.run_id)


def is_forged(error: str) -> bool:
    """Whether a unit's error (a reply's, a function error's, a Map's caught one) is a ForgedInput."""
    return error.removeprefix("function error: ").startswith(f"{ForgedInput.__name__}: ")


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _event_mac(secret: str, run_id: str, what: bytes) -> str:
    return hmac.new(derive(secret, "event", run_id), what, "sha256").hexdigest()


def seal_base(fields: dict, secret_ref: str, secret: str) -> dict:
    """The fields every invocation of an execution (or one direct invocation) shares, sealed."""
    text = json.dumps(fields, sort_keys=True)
    return {"secret_ref": secret_ref, "fields": text, "seal": _event_mac(secret, fields["run_id"], text.encode())}


def seal_item(base: dict, units: list[dict], secret: str, run_id: str) -> dict:
    """One invocation's units, sealed to its base."""
    return {"units": units, "seal": _event_mac(secret, run_id, base["seal"].encode() + b"\n" + _canonical(units))}


def open_event(event: dict, secret_of) -> tuple[dict, list[dict], dict]:
    """The fields and units of a sealed event, and the run's secret (``secret_of(secret_ref)``); ForgedInput
    where either seal does not hold."""
    base, item = event["base"], event["item"]
    fields = json.loads(base["fields"])
    secrets_ = secret_of(base["secret_ref"])
    if not hmac.compare_digest(str(base.get("seal")), _event_mac(secrets_["seal"], fields["run_id"],
                                                                  base["fields"].encode())):  # fmt: skip
        raise ForgedInput(f"run {fields.get('run_id')!r:.60}: the invocation's shared fields fail their seal")
    units = item["units"]
    expected = _event_mac(secrets_["seal"], fields["run_id"], base["seal"].encode() + b"\n" + _canonical(units))
    if not hmac.compare_digest(str(item.get("seal")), expected):
        where = fields.get("items") or f"run {fields['run_id']}'s invocation event"
        positions = [u.get("position") for u in units if isinstance(u, dict)][:8]
        raise ForgedInput(f"{where}: the item of units {positions} fails its seal (changed after the driver wrote "
                          "it); nothing of it was run")  # fmt: skip
    return fields, units, secrets_


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


def event_units(units: list[dict]) -> list[tuple[int, PartitionRef]]:
    """An event's ``units`` back as (position, PartitionRef), the worker loop's units."""
    return [(int(u["position"]), PartitionRef(**u["ref"])) for u in units]


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
