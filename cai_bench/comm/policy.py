"""Which channel an operation takes when a run gives several: a latency model and a price model per channel, and a
hint, ``fast`` (least time) or ``cheap`` (least money, the waiting functions' GB-seconds included).

A message over a channel costs ``overhead_s`` plus its bytes over ``bandwidth_Bps`` (plus, for a store that is
polled, half a polling interval on average). An operation is a number of such messages one after another (its
rounds: log2(P) for a tree, P-1 at the one rank a store's collectives go through) and a number of requests in all.
The defaults: FMI's per-message overheads (0.34 ms direct, 5.2 ms Redis, 40.4 ms S3); the bandwidths and prices
are cai-bench's round figures (AWS list prices of us-east-1 for S3 requests and Lambda GB-seconds, a small
ElastiCache node and a small EC2 instance for the rendezvous); ``cai-bench comm bench`` measures the machine's own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from cai_bench.comm.frames import CommError

LAMBDA_GB_SECOND_USD = 0.0000166667
HINTS = ("fast", "cheap")


@dataclass(frozen=True)
class ChannelModel:
    scheme: str
    overhead_s: float  # one message, however small
    bandwidth_Bps: float
    poll_s: float  # a store that is polled: the interval's mean wait is half of it
    request_usd: float  # per message: a write and a read
    hourly_usd: float  # the service kept up while it is used (a Redis node, the rendezvous VM); S3 none
    peer_to_peer: bool
    source: str = "default"  # default, or where it was measured

    def message_s(self, nbytes: int) -> float:
        return self.overhead_s + nbytes / self.bandwidth_Bps + self.poll_s / 2


def default_models() -> dict[str, ChannelModel]:
    return {
        "direct": ChannelModel("direct", 0.34e-3, 500e6, 0.0, 0.0, 0.0104, True),  # t3.micro rendezvous
        "redis": ChannelModel("redis", 5.2e-3, 100e6, 0.0, 0.0, 0.017, False),  # cache.t4g.micro
        "s3": ChannelModel("s3", 40.4e-3, 50e6, 0.1, 0.005e-3 + 0.0004e-3, 0.0, False),  # PUT + GET
    }


def rounds_and_messages(op: str, world_size: int, peer_to_peer: bool) -> tuple[int, int]:
    """Messages one after another on the longest path, and messages in all, for ``op`` over ``world_size``."""
    p = max(1, world_size)
    depth = math.ceil(math.log2(p)) if p > 1 else 0
    if op in ("send", "recv"):
        return 1, 1
    if peer_to_peer:
        all_pairs = p * depth  # barrier, allreduce, scan: every rank every round
        return {"barrier": (depth, all_pairs), "allreduce": (depth, all_pairs), "scan": (depth, all_pairs)}.get(
            op, (depth, p - 1)
        )
    one_way = (p - 1, p - 1)  # the root reads or writes each other rank's message in turn
    return (2 * (p - 1), 2 * (p - 1)) if op in ("barrier", "allreduce", "scan") else one_way


def estimate(model: ChannelModel, op: str, world_size: int, nbytes: int, memory_gb: float = 2.0) -> dict:
    """Seconds and dollars of one ``op``: the requests, the service's hours, and the functions waiting."""
    rounds, messages = rounds_and_messages(op, world_size, model.peer_to_peer)
    seconds = rounds * model.message_s(nbytes)
    usd = (
        messages * model.request_usd
        + model.hourly_usd * seconds / 3600
        + world_size * memory_gb * seconds * LAMBDA_GB_SECOND_USD
    )
    return {"seconds": seconds, "usd": usd}


def choose_channel(
    schemes: list[str], models: dict[str, ChannelModel], op: str, world_size: int, nbytes: int, hint: str
) -> str:
    """The channel of ``schemes`` that ``hint`` prefers for this operation; the same answer on every rank."""
    if hint not in HINTS:
        raise CommError(f"unknown --comm-hint {hint!r}: one of {', '.join(HINTS)}")
    key = "seconds" if hint == "fast" else "usd"
    unknown = [s for s in schemes if s not in models]
    if unknown:
        raise CommError(f"no model of channel(s) {', '.join(unknown)}")
    return min(schemes, key=lambda s: (estimate(models[s], op, world_size, nbytes)[key], schemes.index(s)))


def models_from(measured: dict[str, dict]) -> dict[str, ChannelModel]:
    """The defaults with what ``comm bench`` measured (per scheme: overhead_s, bandwidth_Bps, source)."""
    models = default_models()
    for scheme, fields in measured.items():
        if scheme in models:
            models[scheme] = replace(models[scheme], **{k: v for k, v in fields.items() if k in asdict(models[scheme])})
    return models
