"""``redis://[:PASSWORD@]host:port/db``: a message is pushed onto a list per (sender, receiver) and taken with a
blocking pop, so a receiver waits on the server, not in a polling loop. Keys live under the run's space (its id
and a token from its secret, ``seal.space``) and expire, so a run that dies leaves nothing behind for long; a
rank's heartbeat is a key that expires unless refreshed.

Whoever else reaches the server can push onto those lists: the frames are sealed (``seal.py``), and a frame that
is not the run's is dropped by the communicator. Every Redis error (a refused connection, a server gone, a read
past its socket timeout) is a CommError naming the channel, never redis-py's own exception.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager

from cai_bench.comm.channel import Heartbeat, heartbeat_interval
from cai_bench.comm.frames import CommError
from cai_bench.comm.urls import redact

_LONGEST_POP_S = 5.0  # a long wait is cut in pieces, so that a dead server is noticed


class RedisChannel:
    scheme = "redis"
    peer_to_peer = False

    def __init__(self, url: str, rank: int, world_size: int, run_space: str, timeout_s: float, names: bytes = b""):
        """``names``: unused here (a list's name is its pair's; the frames' seals keep others' pushes out)."""
        try:
            import redis  # the redis extra: only where a run talks through Redis
        except ImportError:
            raise CommError(f"{redact(url)}: the Redis channel needs redis-py: pip install 'cai-bench[comm]'") from None
        self._redis_error = redis.RedisError
        self.url, self.rank, self.world_size = redact(url), rank, world_size
        self._ns = f"cai-bench:{run_space}"
        self._ttl_s = max(60, int(timeout_s * 4))
        # The socket's own timeout outlasts the longest blocking pop, so a read only times out on a dead server
        self._client = redis.Redis.from_url(url, socket_connect_timeout=min(10.0, timeout_s),
                                            socket_timeout=_LONGEST_POP_S + min(10.0, timeout_s))  # fmt: skip
        self._beat_s = heartbeat_interval(timeout_s)
        with self._errors("cannot reach Redis"):
            self._heartbeat = Heartbeat(self._beat, self._beat_s)

    @contextmanager
    def _errors(self, doing: str):
        try:
            yield
        except self._redis_error as exc:
            raise CommError(f"{self.url}: {doing} ({type(exc).__name__}: {redact(str(exc))})") from None

    def _key(self, *parts) -> str:
        return ":".join([self._ns, *map(str, parts)])

    def _beat(self) -> None:
        self._client.set(self._key("alive", self.rank), b"1", px=int(self._beat_s * 3000))

    def send(self, dst: int, frame: bytes, deadline: float) -> None:
        key = self._key("m", self.rank, dst)
        with self._errors(f"rank {self.rank} could not send to rank {dst}"), self._client.pipeline(False) as pipe:
            pipe.rpush(key, frame).expire(key, self._ttl_s).execute()

    def recv(self, src: int, deadline: float) -> bytes | None:
        key = self._key("m", src, self.rank)
        with self._errors(f"rank {self.rank} could not read from rank {src}"):
            while (left := deadline - time.monotonic()) > 0:
                got = self._client.blpop([key], timeout=max(0.01, min(left, _LONGEST_POP_S)))
                if got is not None:
                    return got[1]
        return None

    def dropped(self, src: int) -> None:
        pass  # a forged frame was one more item of the list: the sender's own are still behind it

    def missing(self) -> list[int]:
        keys = [self._key("alive", r) for r in range(self.world_size)]
        with self._errors("cannot read the ranks' heartbeats"):
            present = [self._client.exists(k) for k in keys]
        return [r for r, there in enumerate(present) if not there]

    def info(self) -> dict:
        return {"scheme": self.scheme, "url": self.url}

    def close(self) -> None:
        self._heartbeat.stop()
        # Left, not gone: a rank that gave up waiting is not the one that died; the key expires with the run's. A
        # server already gone: the others find this rank's heartbeat stale, which is true enough
        with contextlib.suppress(self._redis_error):
            self._client.set(self._key("alive", self.rank), b"left", ex=self._ttl_s)
        self._client.close()
