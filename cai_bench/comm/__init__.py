"""Collectives between the workers of a run, after FMI's design: three channels (``direct://`` TCP through a
rendezvous server, ``redis://``, ``s3://``), the nine operations written once over point-to-point messages, and a
policy that picks a channel per operation when several are given.

``connect(urls, rank, world_size, run_id, key)`` is what a worker calls; ``Communicator`` is what it gets. Every
message is sealed with the run's secret ``key`` (``seal.py``), on every channel.
"""

from __future__ import annotations

import secrets

from cai_bench.comm.communicator import Communicator
from cai_bench.comm.direct import DirectChannel
from cai_bench.comm.frames import CommError
from cai_bench.comm.ops import MAX, MIN, PROD, SUM, ReduceOp, user_op
from cai_bench.comm.policy import HINTS, ChannelModel, default_models
from cai_bench.comm.redis_channel import RedisChannel
from cai_bench.comm.s3_channel import S3Channel
from cai_bench.comm.seal import derive, space
from cai_bench.comm.urls import check_urls, redact, split_urls

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
    "redact",
    "space",
    "split_urls",
    "user_op",
]


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
    bind: str | None = None,
) -> Communicator:
    """This rank's communicator over the channels of ``urls``; a direct channel falls back, pair by pair, to the
    first store channel given. ``bind``: the address a direct channel listens on (default: the one this machine
    reaches the rendezvous server from)."""
    schemes = check_urls(urls)
    if not key:
        raise CommError("a communicator needs the run's secret (comm.new_key(), handed to every rank)")
    stores = {"redis": RedisChannel, "s3": S3Channel}
    # A store's keys live under the run's space and (S3) carry tags made with ``names``: neither is found from the
    # run id alone
    run_space, names = space(key, run_id), derive(key, "names", run_id)
    channels = {}
    ordered = []
    try:
        for scheme, url in zip(schemes, urls, strict=True):
            if scheme in stores:
                channels[scheme] = stores[scheme](url, rank, world_size, run_space, timeout_s, names)
        fallback = next(iter(channels.values()), None)
        for scheme, url in zip(schemes, urls, strict=True):
            if scheme == "direct":
                ordered.append(
                    DirectChannel(url, rank, world_size, run_id, timeout_s, key, fallback, connect_timeout_s, bind)
                )
            else:
                ordered.append(channels[scheme])
    except BaseException:
        for channel in channels.values():
            channel.close()
        raise
    return Communicator(rank, world_size, ordered, run_id, timeout_s, hint, models, secret=key)
