"""``s3://bucket/prefix``: a message is an object named by its sender, receiver and number, read by polling with
a growing interval (S3 cannot block), and deleted by its reader. A rank's heartbeat is an object holding the time
it last beat ("left" once it closed). All of it lives under ``<prefix>/<run space>/`` (the run's id and a token
from its secret, ``seal.space``); whoever runs the channel deletes what is left once every rank is done (``purge``).

Each message's name ends in a tag made from the run's secret, so nobody else can place an object where a rank
will look before the sender has written it (whoever may write to the bucket can still overwrite one once it is
listed: the seal then fails, the communicator drops it and the rank names the peer when nothing else comes).
Every S3 error (AccessDenied, SlowDown past botocore's retries, a connection that failed) is a CommError naming
the channel and the request."""

from __future__ import annotations

import contextlib
import hmac
import time
from collections import defaultdict
from contextlib import contextmanager

from cai_bench.comm.channel import Heartbeat, heartbeat_interval
from cai_bench.comm.frames import CommError
from cai_bench.core import aws
from cai_bench.core.errors import UserError

_FIRST_POLL_S, _LONGEST_POLL_S = 0.002, 0.1


class S3Channel:
    scheme = "s3"
    peer_to_peer = False

    def __init__(self, url: str, rank: int, world_size: int, run_space: str, timeout_s: float, names: bytes):
        self.url, self.rank, self.world_size, self._names = url, rank, world_size, names
        self.requests = 0
        with self._errors("cannot start"):
            self.bucket, prefix = aws.parse_s3_url(url)
            self._root = f"{prefix}/{run_space}" if prefix else run_space
            self._client = aws.s3_client()
            self._sent: dict[int, int] = defaultdict(int)
            self._taken: dict[int, int] = defaultdict(int)
            self._beat_s = heartbeat_interval(timeout_s)
            self._heartbeat = Heartbeat(self._beat, self._beat_s)

    @contextmanager
    def _errors(self, doing: str):
        """botocore's errors (and a bad URL) as one CommError line naming this channel."""
        try:
            with aws.one_line_errors(f"S3 channel {self.url}: {doing}"):
                yield
        except UserError as exc:
            raise CommError(str(exc)) from None

    def _put(self, key: str, body: bytes) -> None:
        self.requests += 1
        self._client.put_object(Bucket=self.bucket, Key=f"{self._root}/{key}", Body=body)

    def _beat(self) -> None:
        self._put(f"alive/{self.rank}", repr(time.time()).encode())

    def send(self, dst: int, frame: bytes, deadline: float) -> None:
        self._sent[dst] += 1
        with self._errors(f"rank {self.rank} could not send to rank {dst}"):
            self._put(self._message(self.rank, dst, self._sent[dst]), frame)

    def recv(self, src: int, deadline: float) -> bytes | None:
        """The next object of ``src`` to this rank, read and deleted."""
        with self._errors(f"rank {self.rank} could not read from rank {src}"):
            body = self._poll(f"{self._root}/{self._message(src, self.rank, self._taken[src] + 1)}", deadline)
        if body is not None:
            self._taken[src] += 1
        return body

    def _message(self, src: int, dst: int, number: int) -> str:
        tag = hmac.digest(self._names, f"{src}-{dst}-{number}".encode(), "sha256").hex()[:20]
        return f"m/{src}-{dst}/{number:09d}-{tag}"

    def dropped(self, src: int) -> None:
        self._taken[src] -= 1  # a forger's object stood under the number; the sender's own may still come there

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

    def missing(self) -> list[int]:
        stale_after = time.time() - 3 * self._beat_s
        gone = []
        for rank in range(self.world_size):
            with self._errors("cannot read the ranks' heartbeats"):
                try:
                    beat = self._client.get_object(Bucket=self.bucket, Key=f"{self._root}/alive/{rank}")["Body"].read()
                except self._client.exceptions.NoSuchKey:
                    beat = b"0"
            if beat != b"left" and _beat_time(beat) < stale_after:
                gone.append(rank)
        return gone

    def info(self) -> dict:
        return {"scheme": self.scheme, "url": self.url, "requests": self.requests}

    def close(self) -> None:
        # Its heartbeat says it left (not gone: a rank that gave up waiting is not the one that died); a message
        # it sent may not be read yet, and what a rank that died never read goes with the run's purge
        self._heartbeat.stop()
        with contextlib.suppress(Exception):  # closing must not fail the run: the heartbeat goes stale instead
            self._put(f"alive/{self.rank}", b"left")


def _beat_time(beat: bytes) -> float:
    """When a heartbeat object says its rank last beat; 0 (long ago) for anything that is not a time."""
    try:
        return float(beat.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return 0.0


def purge(url: str, run_space: str) -> int:
    """Delete everything a run left under ``url`` (once every rank has closed): the count of objects deleted.
    ``run_space`` is the run's ``seal.space``."""
    bucket, prefix = aws.parse_s3_url(url)
    root = f"{prefix}/{run_space}/" if prefix else f"{run_space}/"
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
