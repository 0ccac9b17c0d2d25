"""The mechanisms of scale the estimate simulates, each a named term with the default it starts from and where
that default comes from (a documentation page, the profile, or an assumption said as one). ``--term NAME=VALUE``
changes any of them; ``docs/estimate.md`` lists them.

The simulation's own parts (``measure/simulate.py``) are general: a creation rate, a start rate, a write rate,
fixed time, a straggler tail. This module says what each is on each backend and orchestrator."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cai_bench.core.errors import UserError


@dataclass(frozen=True)
class Term:
    name: str
    default: float | None  # None: not limiting (or: the profile's own), unless given
    unit: str
    applies: str  # which runs it shapes
    what: str
    source: str


TERMS = {
    t.name: t
    for t in (
        Term("lambda_scaling_per_10s", 1000, "environments", "lambda",
             "execution environments a function may add every 10 s, up to the concurrency quota",
             "AWS Lambda Developer Guide, Lambda scaling behavior: 1,000 every 10 seconds per function"),
        Term("straggler_tail", 1, "on/off", "every profile of 10 or more units",
             "draw delays past the measured p90 from an exponential tail fitted to them (0: measured draws only)",
             "fitted to the profile's own units"),
        Term("cold_start_s", None, "s", "every backend",
             "one cold start (a Lambda init and image load, an array task's interpreter, imports and weights)",
             "the profile's measured cold starts (the local SLURM cluster, the emulator)"),
        Term("map_start_per_s", None, "child executions/s", "lambda --orchestrator stepfunctions",
             "child executions a Distributed Map starts per second",
             "not documented by AWS: not limiting unless given"),
        Term("map_run_s", 0.0, "s", "lambda --orchestrator stepfunctions",
             "a Map Run's own start and finish, beyond its child executions",
             "not documented by AWS; the paper profile's calibration holds what its runs had"),
        Term("map_retry_interval_s", 1.0, "s", "lambda --orchestrator stepfunctions",
             "a throttled child's first wait before it invokes again (the state machine's Retry IntervalSeconds)",
             "cai-bench's state machine (deploy/lambda): 1 s, as the Amazon States Language's default"),
        Term("map_retry_backoff", 2.0, "x", "lambda --orchestrator stepfunctions",
             "each further wait is this many times the last (Retry BackoffRate)",
             "cai-bench's state machine: 2.0, as the Amazon States Language's default"),
        Term("map_retry_attempts", 8, "tries", "lambda --orchestrator stepfunctions",
             "waits that grow (Retry MaxAttempts); past them the simulation keeps the last wait",
             "cai-bench's state machine: 8 (the Amazon States Language's default is 3)"),
        Term("items_per_batch", 1, "items", "lambda --orchestrator stepfunctions",
             "partitions per child execution (the Distributed Map's ItemBatcher MaxItemsPerBatch), run one after "
             "another", "AWS Step Functions Developer Guide, ItemBatcher"),
        Term("item_reader_s_per_1000", 0.05, "s", "lambda --orchestrator stepfunctions",
             "listing the input: one S3 ListObjectsV2 call per 1,000 objects, one after another",
             "1,000 keys per call: Amazon S3 API Reference, ListObjectsV2; 50 ms a call is an assumption"),
        Term("s3_get_per_s", 5500, "requests/s per prefix", "lambda",
             "GET requests S3 serves per second on one prefix: partitions start no faster",
             "Amazon S3 User Guide, optimizing performance: 5,500 GET/HEAD per second per prefix"),
        Term("s3_put_per_s", 3500, "requests/s per prefix", "lambda",
             "PUT requests S3 serves per second on one prefix: results are written no faster",
             "Amazon S3 User Guide, optimizing performance: 3,500 PUT/COPY/POST/DELETE per second per prefix"),
        Term("s3_prefixes", 1, "prefixes", "lambda", "prefixes the partitions and results are spread over",
             "one: cai-bench writes a run's partitions and results each under one prefix"),
        Term("s3_part_mb", 8, "MB", "lambda", "a partition is read in ranged GETs of this size",
             "boto3's TransferConfig default multipart_chunksize, 8 MB"),
        Term("free_cores", None, "cores", "hpc as a SLURM array",
             "the cluster's cores free for the array: its tasks at once are at most these over --cores-per-task",
             "not known before a run (a queue's state): not limiting unless given; --tasks is the array's own cap"),
        Term("driver_invoke_per_s", None, "invocations/s", "lambda --orchestrator direct",
             "invocations the driver starts per second", "not limiting unless given (its threads, its network)"),
    )
}  # fmt: skip


def parse_terms(items: list[str] | None) -> tuple[tuple[str, float], ...]:
    """``--term NAME=VALUE`` (repeatable): the terms changed, checked against ``TERMS``."""
    out = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in TERMS:
            raise UserError(f"--term takes NAME=VALUE with NAME one of {', '.join(TERMS)}, got {item!r}")
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"--term {name}: {text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and name not in ("straggler_tail", "map_run_s")):
            raise UserError(f"--term {name} must be a positive number, got {text!r}")
        out[name] = value
    return tuple(sorted(out.items()))


def term_value(given: tuple[tuple[str, float], ...], name: str) -> float | None:
    """What ``name`` is for a target: as given, else its default."""
    return dict(given).get(name, TERMS[name].default)


def _slowest(*rates: float | None) -> float | None:
    limits = [r for r in rates if r]
    return min(limits) if limits else None


def lambda_rates(given: tuple, orchestrator: str, partition_mb: float) -> tuple[float | None, float | None]:
    """A Lambda run's start rate (the slowest of the Map's child executions, the driver's invokes and the GETs its
    partitions need) and its write rate (the results' PUTs), per second."""
    prefixes = term_value(given, "s3_prefixes")
    gets = math.ceil(partition_mb / term_value(given, "s3_part_mb"))
    starter = "map_start_per_s" if orchestrator == "stepfunctions" else "driver_invoke_per_s"
    start = _slowest(term_value(given, starter), term_value(given, "s3_get_per_s") * prefixes / gets)
    return start, term_value(given, "s3_put_per_s") * prefixes


def fixed_seconds(given: tuple, orchestrator: str, units: int) -> float:
    """What a run takes beyond its units: with a Distributed Map, listing its input and the Map Run's own start
    and finish."""
    if orchestrator != "stepfunctions":
        return 0.0
    pages = math.ceil(units / 1000)
    return term_value(given, "map_run_s") + pages * term_value(given, "item_reader_s_per_1000")


def map_retry_waits(given: tuple) -> tuple[float, ...]:
    """The waits of a throttled child between its tries: interval x backoff^k for each of the attempts."""
    interval, backoff = term_value(given, "map_retry_interval_s"), term_value(given, "map_retry_backoff")
    return tuple(interval * backoff**k for k in range(max(1, int(term_value(given, "map_retry_attempts")))))
