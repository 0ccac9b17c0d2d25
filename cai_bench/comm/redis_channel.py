"""``redis://host:port/db``: a message is pushed onto a list per (sender, receiver) and taken with a blocking
pop, so a receiver waits on the server, not in a polling loop; a barrier is a counter and a release list. Keys
live under the run's namespace and expire, so a run that dies leaves nothing behind for long; a rank's heartbeat
is a key that expires unless refreshed."""

from __future__ import annotations

import time

from cai_bench.comm.channel import Heartbeat, heartbeat_interval
from cai_bench.comm.frames import CommError


class RedisChannel:
    scheme = "redis"
    peer_to_peer = False

    def __init__(self, url: str, rank: int, world_size: int, run_id: str, timeout_s: float):
        try:
            import redis  # the redis extra: only where a run talks through Redis
        except ImportError:
            raise CommError(f"{url}: the Redis channel needs redis-py (pip install 'cai-bench[comm]')") from None
        self.url, self.rank, self.world_size = url, rank, world_size
        self._ns = f"cai-bench:{run_id}"
        self._ttl_s = max(60, int(timeout_s * 4))
        self._client = redis.Redis.from_url(url, socket_connect_timeout=min(10.0, timeout_s))
        self._beat_s = heartbeat_interval(timeout_s)
        try:
            self._heartbeat = Heartbeat(self._beat, self._beat_s)
        except redis.RedisError as exc:
            raise CommError(f"{url}: cannot reach Redis ({exc})") from None

    def _key(self, *parts) -> str:
        return ":".join([self._ns, *map(str, parts)])

    def _beat(self) -> None:
        self._client.set(self._key("alive", self.rank), b"1", px=int(self._beat_s * 3000))

    def send(self, dst: int, frame: bytes) -> None:
        key = self._key("m", self.rank, dst)
        with self._client.pipeline(transaction=False) as pipe:
            pipe.rpush(key, frame).expire(key, self._ttl_s).execute()

    def recv(self, src: int, deadline: float) -> bytes | None:
        key = self._key("m", src, self.rank)
        while (left := deadline - time.monotonic()) > 0:
            # BLPOP's timeout is seconds; a long wait is cut in pieces so that a dead server is noticed
            got = self._client.blpop([key], timeout=max(0.01, min(left, 5.0)))
            if got is not None:
                return got[1]
        return None

    def barrier(self, seq: int, deadline: float) -> bool:
        """Each rank counts itself in; the last to arrive releases the others, who wait in a blocking pop: one
        round trip each, none of them through one rank."""
        counter, release = self._key("b", seq), self._key("go", seq)
        with self._client.pipeline(transaction=True) as pipe:
            arrived = pipe.incr(counter).expire(counter, self._ttl_s).execute()[0]
        if arrived == self.world_size:
            if self.world_size > 1:
                with self._client.pipeline(transaction=True) as pipe:
                    pipe.rpush(release, *[b"1"] * (self.world_size - 1)).expire(release, self._ttl_s)
                    pipe.delete(counter).execute()
            return True
        while (left := deadline - time.monotonic()) > 0:
            if self._client.blpop([release], timeout=max(0.01, min(left, 5.0))) is not None:
                return True
        return False

    def missing(self) -> list[int]:
        keys = [self._key("alive", r) for r in range(self.world_size)]
        return [r for r, present in enumerate(self._client.exists(k) for k in keys) if not present]

    def info(self) -> dict:
        return {"scheme": self.scheme, "url": self.url}

    def close(self) -> None:
        self._heartbeat.stop()
        # Left, not gone: a rank that gave up waiting is not the one that died; the key expires with the run's
        self._client.set(self._key("alive", self.rank), b"left", ex=self._ttl_s)
        self._client.close()
