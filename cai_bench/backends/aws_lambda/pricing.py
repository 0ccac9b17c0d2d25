"""What a Lambda run costs: billed GB-seconds times the architecture's duration price, plus requests times the
request price. The prices are one dated table; ``--price-file`` replaces it (another region, a later price list,
a negotiated rate) with a JSON file of the same shape.

Billed duration is Lambda's own (the REPORT line's ``Billed Duration``: the duration rounded up to the next
millisecond, with the init phase of a container image included), never recomputed from ``Duration``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cai_bench.backends.aws_lambda.report_log import parse_reports
from cai_bench.core.errors import UserError
from cai_bench.core.files import loads_json, read_small_file

# AWS Lambda on-demand prices, us-east-1, first pricing tier (the tier every benchmark-sized run is in), as
# published on aws.amazon.com/lambda/pricing and used by the CAI paper
PRICES = {
    "as_of": "2024-11",
    "region": "us-east-1",
    "request_usd": 0.20 / 1_000_000,
    "gb_second_usd": {"x86_64": 0.0000166667, "arm64": 0.0000133334},
    # Step Functions Standard workflows (a Distributed Map's child executions too): per state transition
    "state_transition_usd": 0.025 / 1000,
    # S3 Standard requests (the estimate's reads of partitions and weights, and writes of results)
    "s3_get_usd": 0.0004 / 1000,
    "s3_put_usd": 0.005 / 1000,
}


@dataclass(frozen=True)
class Cost:
    usd: float
    requests: int
    billed_gb_s: float
    duration_usd: float
    request_usd: float
    architecture: str
    prices_as_of: str
    transitions: int = 0  # Step Functions state transitions (--orchestrator stepfunctions)
    transitions_usd: float = 0.0

    def to_dict(self) -> dict:
        return {
            "cost_usd": self.usd,
            "requests": self.requests,
            "billed_gb_s": self.billed_gb_s,
            "duration_usd": self.duration_usd,
            "request_usd": self.request_usd,
            "architecture": self.architecture,
            "prices_as_of": self.prices_as_of,
            "transitions": self.transitions,
            "transitions_usd": self.transitions_usd,
        }


PRICE_FILE_MAX = 1 << 20  # a price table is a few hundred bytes


def load_prices(path: str | Path | None = None) -> dict:
    """The price table: the built-in one, or a JSON file with the same keys (checked, one line when wrong)."""
    if path is None:
        return PRICES
    text = read_small_file(path, PRICE_FILE_MAX, "price file")
    table = loads_json(text, f"{path} (the price file)")
    problem = _price_table_problem(table)
    if problem:
        raise UserError(f"{path}: the price file is not usable: {problem}")
    return {"as_of": str(table.get("as_of", "unknown")), "region": str(table.get("region", "")), **table}


# No AWS price of a request, a GB-second or a state transition comes near a dollar: a price file that says so is
# a mistake (a price per million, a misplaced exponent), and its costs would be nonsense or overflow
MOST_USD = 1.0


def _price(value) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= MOST_USD)  # fmt: skip


def _seconds(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _price_table_problem(table) -> str | None:
    """What is wrong with a price file's table (None: nothing): each price a number from 0 to MOST_USD."""
    shape = "a price file holds request_usd (a number), gb_second_usd ({architecture: number}), and as_of"
    if not isinstance(table, dict):
        return shape
    per_gb_s = table.get("gb_second_usd")
    if not isinstance(per_gb_s, dict) or not per_gb_s:
        return shape
    prices = {"request_usd": table.get("request_usd"), **{f"gb_second_usd.{k}": v for k, v in per_gb_s.items()}}
    for optional in ("state_transition_usd", "s3_get_usd", "s3_put_usd"):
        if optional in table:
            prices[optional] = table[optional]
    for name, value in prices.items():
        if not _price(value):
            return f"{name} is {json.dumps(value)[:40]}: a price in USD is a number from 0 to {MOST_USD:g}"
    for name in ("as_of", "region"):  # shown beside every cost: a short line of printable text
        if name in table and not (
            isinstance(table[name], str) and len(table[name]) <= 40 and table[name].isprintable()
        ):
            return f"{name} is {json.dumps(table[name])[:40]}: a text of up to 40 printable characters"
    return None


def cost(billed_ms: Iterable[float], memory_mb: float, architecture: str = "x86_64", prices: dict = PRICES,
         transitions: int = 0) -> Cost:  # fmt: skip
    """The cost of invocations that were billed ``billed_ms`` each, at ``memory_mb`` of memory, plus
    ``transitions`` Step Functions state transitions.

    Lambda meters memory in MB and charges per GB-second with 1 GB = 1,024 MB."""
    billed = list(billed_ms)
    return total_cost(sum(billed), len(billed), memory_mb, architecture, prices, transitions)


def total_cost(billed_ms: float, requests: int, memory_mb: float, architecture: str = "x86_64",
               prices: dict = PRICES, transitions: int = 0) -> Cost:  # fmt: skip
    """``cost`` of ``requests`` invocations billed ``billed_ms`` in all (the estimate prices simulated runs so)."""
    per_gb_s = prices["gb_second_usd"].get(architecture)
    if per_gb_s is None:
        known = ", ".join(sorted(prices["gb_second_usd"]))
        raise UserError(f"no Lambda price for architecture {architecture!r} (prices for {known})")
    gb_s = billed_ms / 1000 * memory_mb / 1024
    duration_usd = gb_s * per_gb_s
    request_usd = requests * prices["request_usd"]
    transitions_usd = transitions * prices.get("state_transition_usd", PRICES["state_transition_usd"])
    return Cost(duration_usd + request_usd + transitions_usd, requests, gb_s, duration_usd, request_usd,
                architecture, prices.get("as_of", "unknown"), transitions, transitions_usd)  # fmt: skip


def estimate(invocations: int, seconds_each: float, memory_gb: float, architecture: str = "x86_64",
             prices: dict = PRICES) -> Cost:  # fmt: skip
    """The paper's way of estimating a run: so many invocations of the same duration at ``memory_gb`` (GB as
    the paper writes memory, 1 GB = 1,024 MB)."""
    billed_ms = math.ceil(seconds_each * 1000)
    return cost([billed_ms] * invocations, memory_gb * 1024, architecture, prices)


@dataclass(frozen=True)
class Billed:
    """What ``lambda cost`` prices: each invocation's billed milliseconds at one memory size."""

    billed_ms: list[int]
    memory_mb: int


def billed_before_a_run(invocations: int, seconds_each: float | None, memory_mb: int | None) -> Billed:
    if seconds_each is None or memory_mb is None:
        raise UserError("--invocations needs --seconds-each and --memory-mb")
    return Billed([math.ceil(seconds_each * 1000)] * invocations, memory_mb)


def billed_from_workers(path: Path, memory_mb: int | None) -> Billed:
    """Per-function records (a JSON list, each with ``total_cpu_time (seconds)``, as the paper's are): each
    one's time, rounded up to the millisecond, as its billed duration."""
    if memory_mb is None:
        raise UserError("--workers needs --memory-mb (the records do not say)")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    rows = loads_json(text, str(path))
    key = "total_cpu_time (seconds)"
    ok = isinstance(rows, list) and rows and all(isinstance(r, dict) and _seconds(r.get(key)) for r in rows)
    if not ok:
        raise UserError(f"{path}: expected a JSON list of records, each with a number {key!r}")
    return Billed([math.ceil(float(r[key]) * 1000) for r in rows], memory_mb)


def billed_from_log(path: Path, memory_mb: int | None) -> Billed:
    """Every REPORT line's billed duration, at the memory the lines name (or ``memory_mb``)."""
    try:
        reports = parse_reports(path.read_text(errors="replace"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if not reports:
        raise UserError(f"{path}: no REPORT line in it")
    sizes = {r.memory_size_mb for r in reports}
    memory = memory_mb or (sizes.pop() if len(sizes) == 1 else 0)
    if not memory:
        raise UserError(f"{path}: REPORT lines of several memory sizes; give --memory-mb")
    return Billed([r.billed_duration_ms for r in reports], memory)


def billed_from(workers: Path | None, log: Path | None, invocations: int | None, seconds_each: float | None,
                memory_mb: int | None) -> Billed:  # fmt: skip
    """``lambda cost``'s one source of billed durations: per-function records, a log, or invocations to come."""
    if sum(x is not None for x in (workers, log, invocations)) != 1:
        raise UserError("give one of --workers FILE, --log FILE or --invocations N")
    if invocations is not None:
        return billed_before_a_run(invocations, seconds_each, memory_mb)
    if workers is not None:
        return billed_from_workers(workers, memory_mb)
    return billed_from_log(log, memory_mb)


def price(billed: Billed, architecture: str = "x86_64", price_file: str | Path | None = None,
          transitions: int = 0) -> Cost:  # fmt: skip
    """What ``billed`` costs at the built-in prices, or at those of ``price_file``."""
    return cost(billed.billed_ms, billed.memory_mb, architecture, load_prices(price_file), transitions=transitions)
