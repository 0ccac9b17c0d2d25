"""``s3://bucket/prefix``: a message is an object named by its sender, receiver and number, read by polling with
a growing interval (S3 cannot block), and deleted by its reader. A barrier is an object per rank that rank 0 lists
(paginated). A rank's heartbeat is an object holding the time it last beat ("left" once it closed). All of it
lives under ``<prefix>/<run id>/``; the run's driver deletes what is left once every rank is done (``purge``)."""

from __future__ import annotations

import time
from collections import defaultdict

from cai_bench import aws
from cai_bench.comm.channel import Heartbeat, heartbeat_interval

_FIRST_POLL_S, _LONGEST_POLL_S = 0.002, 0.1


class S3Channel:
    scheme = "s3"
    peer_to_peer = False

    def __init__(self, url: str, rank: int, world_size: int, run_id: str, timeout_s: float):
        self.url, self.rank, self.world_size = url, rank, world_size
        self.bucket, prefix = aws.parse_s3_url(url)
        self._root = f"{prefix}/{run_id}" if prefix else run_id
        self._client = aws.s3_client()
        self._sent: dict[int, int] = defaultdict(int)
        self._taken: dict[int, int] = defaultdict(int)
        self._beat_s = heartbeat_interval(timeout_s)
        self.requests = 0
        with aws.one_line_errors(f"S3 channel {url}"):
            self._heartbeat = Heartbeat(self._beat, self._beat_s)

    def _put(self, key: str, body: bytes) -> None:
        self.requests += 1
        self._client.put_object(Bucket=self.bucket, Key=f"{self._root}/{key}", Body=body)

    def _beat(self) -> None:
        self._put(f"alive/{self.rank}", repr(time.time()).encode())

    def send(self, dst: int, frame: bytes) -> None:
        self._sent[dst] += 1
        self._put(f"m/{self.rank}-{dst}/{self._sent[dst]:09d}", frame)

    def recv(self, src: int, deadline: float) -> bytes | None:
        body = self._poll(f"{self._root}/m/{src}-{self.rank}/{self._taken[src] + 1:09d}", deadline)
        if body is not None:
            self._taken[src] += 1
        return body

    def _poll(self, key: str, deadline: float) -> bytes | None:
        """The object at ``key`` once it is there (then deleted: its reader is its only reader), or None at
        ``deadline``."""
        delay = _FIRST_POLL_S
        while True:
            self.requests += 1
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except self._client.exceptions.NoSuchKey:
                if time.monotonic() + delay > deadline:
                    return None
                time.sleep(delay)
                delay = min(delay * 1.5, _LONGEST_POLL_S)
                continue
            self._client.delete_object(Bucket=self.bucket, Key=key)
            return body

    def barrier(self, seq: int, deadline: float) -> bool:
        """Everyone writes an object, rank 0 lists them (paginated) until all are there, deletes them and writes
        each other rank its release, which that rank deletes once read."""
        self._put(f"b/{seq}/in-{self.rank}", b"")
        if self.rank != 0:
            return self._poll(f"{self._root}/b/{seq}/go-{self.rank}", deadline) is not None
        delay = _FIRST_POLL_S
        while len(arrived := self._list(f"b/{seq}/in-")) < self.world_size:
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 1.5, _LONGEST_POLL_S)
        self._delete(arrived)
        for rank in range(1, self.world_size):
            self._put(f"b/{seq}/go-{rank}", b"")
        return True

    def _list(self, under: str) -> list[str]:
        keys = []
        for page in self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self._root}/{under}"
        ):
            self.requests += 1
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    def missing(self) -> list[int]:
        stale_after = time.time() - 3 * self._beat_s
        gone = []
        for rank in range(self.world_size):
            try:
                beat = self._client.get_object(Bucket=self.bucket, Key=f"{self._root}/alive/{rank}")["Body"].read()
            except self._client.exceptions.NoSuchKey:
                beat = b"0"
            if beat != b"left" and float(beat) < stale_after:
                gone.append(rank)
        return gone

    def info(self) -> dict:
        return {"scheme": self.scheme, "url": self.url, "requests": self.requests}

    def close(self) -> None:
        # Its heartbeat says it left (not gone: a rank that gave up waiting is not the one that died); a message
        # it sent may not be read yet, and what a rank that died never read goes with the run's purge
        self._heartbeat.stop()
        self._put(f"alive/{self.rank}", b"left")


def purge(url: str, run_id: str) -> int:
    """Delete everything a run left under ``url`` (once every rank has closed): the count of objects deleted."""
    bucket, prefix = aws.parse_s3_url(url)
    root = f"{prefix}/{run_id}/" if prefix else f"{run_id}/"
    client = aws.s3_client()
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root)
        for item in page.get("Contents", [])
    ]
    for start in range(0, len(keys), 1000):
        chunk = [{"Key": k} for k in keys[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    return len(keys)
