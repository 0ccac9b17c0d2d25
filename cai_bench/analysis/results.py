"""What the store's records mean together: which measured point a record is a repeat of (the plan as its
backend declares what makes a measurement, the data, the precision that ran, the machine), a record as a flat
row, and the whole store as DataFrames for notebooks (``load``).

The store itself is ``store/jsonl.py``; the record schemas are ``core/records.py``. Nothing here imports torch."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from cai_bench.backends.registry import declared_options
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_id, machine_label
from cai_bench.core.plan import redacted_options
from cai_bench.store.jsonl import ResultsStore

# ---------------------------------------------------------------------------------------------- identities


def identity_options(backend: str, options: dict) -> dict:
    """The backend options that make a measurement what it is, as the backend declares them (workers: yes;
    retries, where files go: no). Options of a backend this cai-bench does not know all count."""
    declared = declared_options(backend)
    options = redacted_options(options)  # as records keep them
    if declared is None:
        return dict(options)
    identity = {o.name: o for o in declared if o.identity}
    return {k: v for k, v in options.items()
            if k in identity and v is not None and v is not False and v != identity[k].absent_as}  # fmt: skip


def data_identity(data: dict) -> str:
    """Which data a plan ran on. Synthetic data is fully given by generator, seed, size and partitioning, so
    that is its identity (a sweep can tell a point is done without generating its data); other data is
    identified by the checksums of its partitions (dataset_id)."""
    source = data.get("source") or {}
    if source.get("kind") == "synthetic":
        return (
            f"synthetic-v{source.get('generator_version')}-seed{source.get('seed')}-"
            f"{data.get('samples')}x{float(data.get('partition_mb', 0)):g}MB"
        )
    return f"dataset-{data.get('dataset_id')}"


_NOT_PART_OF_A_POINT = ("repeats", "warmup", "data", "work_dir", "runtime_choice")


def ran_precision(record: dict) -> str:
    """The precision a record's partitions ran in, never "auto": the probe's answer can differ between two runs
    on one machine, so repeats of "auto" are grouped by what they ran. Workers that resolved "auto" differently
    in one run give a mixed name (``bf16+fp32``), a point of its own."""
    ran = {w.get("precision") for w in record.get("workers") or [] if isinstance(w, dict)} - {None}
    if ran:
        return "+".join(sorted(str(p) for p in ran))
    info = record.get("backend_info") or {}
    return str(info.get("precision") or (record.get("plan") or {}).get("precision"))


def point_key(plan: dict, environment: dict, precision: str | None = None) -> str:
    """What makes two runs repeats of the same measurement: the plan (but how often it is repeated, and where
    its data lives) in the precision that ran (``precision``; the plan's where that is not known yet) on the
    same machine. New plan fields take part automatically; a field that is off (None, False) counts as absent,
    so records written before the field existed stay repeats of the same point."""
    fields = {k: v for k, v in plan.items() if k not in _NOT_PART_OF_A_POINT and v is not None and v is not False}
    options = fields.get("backend_options") or {}
    fields["backend_options"] = identity_options(str(plan.get("backend")), options)
    fields["data"] = data_identity(plan.get("data") or {})
    fields["machine"] = machine_id(environment)
    fields["precision"] = precision or plan.get("precision")
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def record_point_key(record: dict) -> str:
    """The point a stored record is a repeat of."""
    return point_key(record["plan"], record["environment"], ran_precision(record))


def record_row(record: dict) -> dict:
    """One record as a flat row (CSV export): identity, plan, where, and the summary's figures."""
    plan, data, env, summary = record["plan"], record["plan"]["data"], record["environment"], record["summary"]
    return {
        "run_id": record["run_id"],
        "created_utc": record["created_utc"],
        "kind": record.get("kind"),
        "status": record["status"],
        "backend": record["backend"],
        "repeat": record["repeat"],
        "repeats": record["repeats"],
        "data": data_identity(data),
        "data_gb": data["data_gb"],
        "samples_planned": data["samples"],
        "partition_mb": data["partition_mb"],
        "partitions_planned": data["partitions"],
        "batch_size": plan["batch_size"],
        "precision": plan["precision"],
        "precision_ran": ran_precision(record),
        "runtime": ran_runtime(record),
        "engine": (record.get("backend_info") or {}).get("engine") or plan.get("engine"),
        "threads": record.get("backend_info", {}).get("threads", plan.get("threads")),
        "weights": (record.get("weights") or {}).get("weights"),
        **summary,
        "machine": machine_label(env),
        "host": env.get("host"),
        "cpu_model": env.get("cpu_model"),
        "gpus": ";".join(env.get("gpus") or []),
        "torch": (env.get("packages") or {}).get("torch"),
        "git_commit": env.get("git_commit"),
        "error": record.get("error"),
        # the verdict the record carries (validity.verdict; None for records from before schema 1.3)
        "valid": (record.get("validity") or {}).get("valid"),
        "invalid_why": "; ".join((record.get("validity") or {}).get("failed") or []),
    }


def ran_runtime(record: dict) -> str:
    """The runtime that ran a record's partitions: what the run resolved ``--runtime auto`` to, else the plan's."""
    info, options = record.get("backend_info") or {}, (record.get("plan") or {}).get("backend_options") or {}
    return str(info.get("runtime") or options.get("runtime") or "torch")


# ---------------------------------------------------------------------------------------------- listings


def _reported(records: list[dict], store: ResultsStore, warn) -> list[dict]:
    for message in store.skipped:
        (warn or print)(message)
    return records


def read_records(store: ResultsStore, warn=None) -> list[dict]:
    """Every record of ``store``; ``warn`` gets what the read skipped (a torn last line)."""
    return _reported(store.read(), store, warn)


def nulled_figures(record: dict) -> list[str]:
    """The measured figures of ``record`` that were not finite when measured and are stored as null (its
    ``non_finite``): the run's summary and its workers' times."""
    found = record.get("non_finite")
    return [k for k in found if k.startswith(("summary.", "workers["))] if isinstance(found, dict) else []


def measured_only(records: list[dict], warn=None) -> list[dict]:
    """The records whose every measured figure is a number: a figure stored as null would be NaN in a median or a
    None in a sum. ``warn`` is told how many were left out, and which figures; the store keeps them."""
    kept = [r for r in records if not nulled_figures(r)]
    if len(kept) < len(records):
        names = sorted({re.sub(r"\[\d+\]", "[]", k) for r in records for k in nulled_figures(r)})
        (warn or print)(f"{len(records) - len(kept)} record(s) left out: figures that were not finite numbers "
                        f"(stored as null: {', '.join(names)}); cai-bench results show ID shows them")  # fmt: skip
    return kept


def read_finished_runs(store: ResultsStore, warn=None) -> list[dict]:
    """``store.runs()``, the timing runs that finished with every figure a number; ``warn`` gets what the read
    skipped."""
    return measured_only(_reported(store.runs(), store, warn), warn)


def listed_rows(store: ResultsStore, backends: list[str] | None, last: int, warn=None) -> tuple[list[dict], int]:
    """``results list``: the newest ``last`` records' rows (0: all) of ``backends``, and how many there are."""
    rows = [record_row(r) for r in read_records(store, warn) if not backends or r.get("backend") in backends]
    return (rows[-last:] if last > 0 else rows), len(rows)


def id_matches(record_id: str, given: str) -> bool:
    """Whether ``given`` names ``record_id``: a prefix of the whole id (``20261205T205251Z-0007e297``) or of its
    hash part (``0007e2``), which is what a table shows of it."""
    return bool(given) and (record_id.startswith(given) or record_id.rpartition("-")[2].startswith(given))


def find_record(store: ResultsStore, run_id: str, warn=None) -> dict:
    """The one record whose id, or the hash part of its id, starts with ``run_id``; a UserError naming the
    trouble otherwise."""
    found = [r for r in read_records(store, warn) if id_matches(r.get("run_id", ""), run_id)]
    if not found:
        raise UserError(f"{store.path}: no record with id {run_id!r}; cai-bench results list shows the ids")
    if len(found) > 1:
        raise UserError(f"{store.path}: {len(found)} records start with {run_id!r}; give more of the id")
    return found[0]


def export_text(store: ResultsStore, as_json: bool, warn=None) -> str:
    """``results export``: every record as CSV rows (the summary's figures, plan and machine) or JSON."""
    records = read_records(store, warn)
    if as_json:
        return json.dumps(records, indent=1) + "\n"
    return to_csv([record_row(r) for r in records])


def to_csv(rows: list[dict]) -> str:
    """Flat rows (``record_row``, ``report.export_row``) as CSV, the first row's keys as the header."""
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- analysis


def load(results_dir: str | Path = "results", *, finished_only: bool = False):
    """The store as two pandas DataFrames, for notebooks: ``(runs, partitions)``.

    ``runs`` has one row per record, its plan, summary, environment and backend facts flattened into columns
    (``plan.batch_size``, ``summary.wall_s``, ``environment.cpu_model``, ...) beside ``machine`` (a short label)
    and ``point`` (which measurement it repeats); ``partitions`` has one row per worker record (one partition
    of one run), with the run's id, backend and repeat. ``finished_only`` keeps timing runs that ended ok.
    """
    import pandas as pd

    store = ResultsStore(results_dir)
    records = store.runs() if finished_only else store.read()
    rows, partitions = [], []
    for record in records:
        flat = {k: v for k, v in record.items() if k != "workers"}
        flat["machine"] = machine_label(record["environment"])
        flat["point"] = record_point_key(record)
        rows.append(flat)
        run = {"run_id": record["run_id"], "backend": record["backend"], "repeat": record["repeat"]}
        partitions += [{**run, **worker} for worker in record["workers"]]
    runs = pd.json_normalize(rows, sep=".") if rows else pd.DataFrame(columns=["run_id"])
    return runs, pd.DataFrame(partitions, columns=None if partitions else ["run_id"])


def latest_comm_points(store: ResultsStore, channels: list[str] | None = None) -> list[dict]:
    """The newest record of each (machine, channel, op, world size, size), sorted for a table."""
    newest: dict[tuple, dict] = {}
    for record in store.read_comm():
        if channels and record["channel"] not in channels:
            continue
        key = (
            machine_id(record["environment"]),
            record["channel"],
            record["op"],
            record["world_size"],
            record["nbytes"],
        )
        newest[key] = record
    return [newest[k] for k in sorted(newest)]
