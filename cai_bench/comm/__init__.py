"""Collectives between the workers of a run, after FMI's design: three channels (``direct://`` TCP through a
rendezvous server, ``redis://``, ``s3://``), the nine operations written once over point-to-point messages, and a
policy that picks a channel per operation when several are given.

``connect(urls, rank, world_size, run_id, key)`` is what a worker calls; ``Communicator`` is what it gets.
"""

from __future__ import annotations

import secrets

from cai_bench.comm.communicator import Communicator
from cai_bench.comm.direct import DirectChannel, parse_direct_url
from cai_bench.comm.frames import CommError
from cai_bench.comm.ops import MAX, MIN, PROD, SUM, ReduceOp, user_op
from cai_bench.comm.policy import HINTS, ChannelModel, default_models
from cai_bench.comm.redis_channel import RedisChannel
from cai_bench.comm.s3_channel import S3Channel

__all__ = [
    "HINTS",
    "MAX",
    "MIN",
    "PROD",
    "SUM",
    "ChannelModel",
    "CommError",
    "Communicator",
    "ReduceOp",
    "check_urls",
    "connect",
    "default_models",
    "new_key",
    "user_op",
]

SCHEMES = ("direct", "redis", "s3")


def check_urls(urls: list[str]) -> list[str]:
    """``urls`` checked without connecting anything: known schemes, each at most once, a direct channel's address."""
    seen = []
    for url in urls:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in SCHEMES:
            raise CommError(
                f"--comm {url!r}: a channel is direct://HOST:PORT, redis://HOST:PORT/DB or s3://BUCKET/PREFIX"
            )
        if scheme in seen:
            raise CommError(f"--comm: {scheme} given twice; give each channel once")
        if scheme == "direct":
            parse_direct_url(url)
        seen.append(scheme)
    if not urls:
        raise CommError("--comm needs at least one channel")
    return seen


def new_key() -> str:
    """A run's secret for the rendezvous server: the driver makes it and hands it to its workers only."""
    return secrets.token_hex(16)


def connect(
    urls: list[str],
    rank: int,
    world_size: int,
    run_id: str,
    key: str = "",
    timeout_s: float = 60.0,
    hint: str = "fast",
    models: dict[str, ChannelModel] | None = None,
    connect_timeout_s: float | None = None,
) -> Communicator:
    """This rank's communicator over the channels of ``urls``; a direct channel falls back, pair by pair, to the
    first store channel given."""
    schemes = check_urls(urls)
    stores = {"redis": RedisChannel, "s3": S3Channel}
    channels = {
        s: stores[s](u, rank, world_size, run_id, timeout_s) for s, u in zip(schemes, urls, strict=False) if s in stores
    }
    fallback = next(iter(channels.values()), None)
    ordered = []
    try:
        for scheme, url in zip(schemes, urls, strict=False):
            if scheme == "direct":
                if not key:
                    raise CommError("a direct channel needs the run's key (comm.new_key(), handed to every rank)")
                ordered.append(
                    DirectChannel(url, rank, world_size, run_id, timeout_s, key, fallback, connect_timeout_s)
                )
            else:
                ordered.append(channels[scheme])
    except BaseException:
        for channel in channels.values():
            channel.close()
        raise
    return Communicator(rank, world_size, ordered, run_id, timeout_s, hint, models)
