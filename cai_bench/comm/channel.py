"""What a channel gives the communicator: ordered messages between two ranks, a send and a wait with a deadline,
and which ranks it knows to be gone. Collectives are written once over this (``communicator.py``); a channel that
stores messages (Redis, S3) is marked so the collectives go through one rank there.

A channel raises nothing but ``CommError`` (its service's errors, timeouts and refusals turned into one line that
names the channel), and ``close`` raises nothing at all: the communicator's caller falls back on any CommError.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Protocol


class Channel(Protocol):
    scheme: str  # direct, redis, s3: what the policy and the records call it
    peer_to_peer: bool  # True: trees between the ranks; False: a store, where the collectives go through rank 0

    def send(self, dst: int, frame: bytes, deadline: float) -> None:
        """``frame`` on its way to ``dst``, or a CommError once ``deadline`` (time.monotonic) has passed."""

    def recv(self, src: int, deadline: float) -> bytes | None:
        """The next message from ``src`` in the order sent, or None at ``deadline`` (time.monotonic)."""

    def dropped(self, src: int) -> None:
        """The last frame ``recv`` gave from ``src`` failed its seal: the next ``recv`` waits for the one it
        stood in for (a store whose messages have numbered names reads that name again)."""

    def missing(self) -> list[int]:
        """Ranks this channel knows to be gone: a heartbeat that stopped, a connection closed without goodbye."""

    def info(self) -> dict:
        """What the run's record keeps of the channel (its scheme, pairs that fell back, ...)."""

    def close(self) -> None:
        """Delete what this rank wrote and leave; the others may still be finishing."""


class Heartbeat:
    """``beat()`` every ``interval_s`` in a daemon thread, so that the others can tell this rank is alive."""

    def __init__(self, beat: Callable[[], None], interval_s: float):
        self._beat, self._interval_s = beat, interval_s
        self._stop = threading.Event()
        beat()
        self._thread = threading.Thread(target=self._run, name="cai-comm-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            with contextlib.suppress(Exception):  # a beat lost to a blip: the next may land; staleness is what counts
                self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def heartbeat_interval(timeout_s: float) -> float:
    """Beats often enough that a rank gone before a collective looks stale well inside one timeout (3 beats)."""
    return max(0.05, min(2.0, timeout_s / 8))
