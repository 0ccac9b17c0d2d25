"""The rendezvous server of the direct channel: each rank of a run tells it its rank from the port it will also use
for its peers, the server records the address it sees (the rank's public address, after any NAT) and hands the
whole run's addresses to every rank of that run once all have come. Then the ranks connect to each other from
those ports (``direct.py``).

A run is its id and a key that its ranks share (a token derived from the run's secret, never the secret): the
first rank to register sets the key (the server keeps its SHA-256), and a client without it can neither read the
run's addresses nor register a rank in it; a rank registered by a connection still open cannot be taken over.
A rank's entry goes with the connection that made it; a run goes ``ttl_s`` after its last registration.

Every request is checked field by field (a wrong type or size is an error answer, never a traceback); a client's
wait is capped (``MAX_WAIT_S``), and so are the runs and the connections the server holds at once.

The protocol: one JSON object per line each way. ``{"op": "register", "run", "key", "rank", "world"}`` answers
``{"address": [host, port]}``; ``{"op": "peers", "run", "key", "timeout"}`` answers ``{"peers": {rank: [host,
port]}}`` once every rank has registered; ``{"op": "settle", "run", "key", "rank", "missing", "timeout"}`` (on
the connection that registered the rank; ``missing``: the ranks it could not connect to, or ``"all"``) answers
``{"fallback": [[a, b], ...]}`` once every rank has settled: each pair that either of its ranks could not
connect, so that both ranks of a pair take the same channel; an error answers ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field

MAX_LINE = 4096
MAX_WAIT_S = 900.0  # a peers request waits at most this long, whatever it asks (Lambda's longest timeout)
MAX_RUNS = 1000
MAX_CONNECTIONS = 2048
MAX_ENTRIES_PER_CONNECTION = 4  # a rank registers once, on its own connection; a little room for a retry
MAX_WORLD = 100_000
_TEXT_MAX = 128  # a run id or key longer than this is not one of ours


def _text(request: dict, name: str) -> str | None:
    value = request.get(name)
    return value if isinstance(value, str) and 0 < len(value) <= _TEXT_MAX else None


def _whole(request: dict, name: str) -> int | None:
    value = request.get(name)
    return value if type(value) is int else None


def _wait_s(request: dict) -> float | None:
    value = request.get("timeout", 30)
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        return None
    return min(float(value), MAX_WAIT_S)


@dataclass
class _Entry:
    address: tuple[str, int]
    writer: asyncio.StreamWriter


@dataclass
class _Run:
    key_digest: bytes
    world: int
    expires: float
    entries: dict[int, _Entry] = field(default_factory=dict)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    addresses: dict[str, list] | None = None  # every rank's, fixed once all came: what peers answers
    unreached: dict[int, frozenset | str] = field(default_factory=dict)  # rank -> peers it could not connect
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    fallback: list[list[int]] | None = None  # the pairs either rank could not connect: what settle answers


class Rendezvous:
    """The runs the server holds. A rank's entry lives as long as the connection that registered it (a client
    that leaves takes its entries along, so nobody squats run ids or the server's room by connecting once), a
    connection holds at most MAX_ENTRIES_PER_CONNECTION, and a run goes ``ttl_s`` after its last registration;
    expiry pops a heap of deadlines, so no request walks every run."""

    def __init__(self, ttl_s: float = 600.0):
        self.ttl_s = ttl_s
        self.runs: dict[str, _Run] = {}
        self.connections = 0
        self._deadlines: list[tuple[float, str]] = []  # (when, run id); a run's older deadlines are popped as stale
        self._held: dict[asyncio.StreamWriter, set[tuple[str, int]]] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, run_id = heapq.heappop(self._deadlines)
            run = self.runs.get(run_id)
            if run is not None and run.expires <= now:
                self._drop(run_id)

    def _drop(self, run_id: str) -> None:
        for rank, entry in self.runs.pop(run_id).entries.items():
            self._held.get(entry.writer, set()).discard((run_id, rank))

    def forget(self, writer: asyncio.StreamWriter) -> None:
        """A connection ended: the entries it registered go, and a run goes with its last entry."""
        for run_id, rank in self._held.pop(writer, ()):
            run = self.runs.get(run_id)
            entry = run.entries.get(rank) if run is not None else None
            if entry is None or entry.writer is not writer:
                continue
            del run.entries[rank]
            if not run.entries:
                self._drop(run_id)

    def _run(self, request: dict, create: bool) -> _Run | str:
        run_id, key = _text(request, "run"), _text(request, "key")
        if run_id is None or key is None:
            return f"a request names its run and carries the run's key (strings of 1 to {_TEXT_MAX} characters)"
        digest = hashlib.sha256(key.encode()).digest()
        run = self.runs.get(run_id)
        if run is None:
            if not create:
                return f"no run {run_id!r} here"
            world = _whole(request, "world")
            if world is None or not 1 <= world <= MAX_WORLD:
                return f"world {request.get('world')!r:.40}: a run has 1 to {MAX_WORLD} ranks (a whole number)"
            if len(self.runs) >= MAX_RUNS:
                return f"this server holds {MAX_RUNS} runs already; try again when some have ended"
            run = self.runs[run_id] = _Run(digest, world, time.monotonic() + self.ttl_s)
        if not hmac.compare_digest(run.key_digest, digest):
            return f"run {run_id!r} belongs to another key"
        return run

    def register(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        self._expire()
        held = self._held.setdefault(writer, set())
        again = _text(request, "run"), _whole(request, "rank")
        if len(held) >= MAX_ENTRIES_PER_CONNECTION and again not in held:
            return {"error": f"a connection registers at most {MAX_ENTRIES_PER_CONNECTION} ranks"}
        run = self._run(request, create=True)
        if isinstance(run, str):
            return {"error": run}
        run_id, rank = request["run"], _whole(request, "rank")
        if rank is None or not 0 <= rank < run.world or request.get("world", run.world) != run.world:
            if not run.entries:  # made by this request: nothing of it stays
                self._drop(run_id)
            return {"error": f"rank {request.get('rank')!r:.40} of world {request.get('world')!r:.40}: the run has "
                             f"{run.world} ranks"}  # fmt: skip
        there = run.entries.get(rank)
        if there is not None and there.writer is not writer:
            return {"error": f"rank {rank} of run {run_id!r} is registered by another connection"}
        host, port = writer.get_extra_info("peername")[:2]
        run.entries[rank] = _Entry((host, port), writer)
        held.add((run_id, rank))
        run.expires = time.monotonic() + self.ttl_s
        heapq.heappush(self._deadlines, (run.expires, run_id))
        if len(run.entries) == run.world and run.addresses is None:
            run.addresses = {str(r): list(e.address) for r, e in run.entries.items()}
            run.complete.set()
        return {"address": [host, port]}

    def _waiting(self, request: dict) -> tuple[_Run, float] | dict:
        """A waiting request's run and how long it may wait; the error answer where either is wrong."""
        run = self._run(request, create=False)
        if isinstance(run, str):
            return {"error": run}
        wait_s = _wait_s(request)
        if wait_s is None:
            return {"error": f"timeout {request.get('timeout')!r:.40}: a number of seconds, 0 or more"}
        return run, wait_s

    async def peers(self, request: dict) -> dict:
        waiting = self._waiting(request)
        if isinstance(waiting, dict):
            return waiting
        run, wait_s = waiting
        try:
            await asyncio.wait_for(run.complete.wait(), timeout=wait_s)
        except asyncio.TimeoutError:
            return {
                "error": f"{len(run.entries)} of {run.world} ranks registered; missing "
                f"{sorted(set(range(run.world)) - set(run.entries))[:20]}"
            }
        return {"peers": run.addresses}

    def _unreached(self, request: dict, writer: asyncio.StreamWriter, run: _Run) -> tuple[frozenset | str, str]:
        """A settle request's peers that its rank (registered by this connection) could not connect, checked:
        (the peers, or "all"; "") or (None, why not)."""
        rank, missing = _whole(request, "rank"), request.get("missing")
        if (request.get("run"), rank) not in self._held.get(writer, ()):
            return None, "a rank settles on the connection that registered it"
        if missing == "all":
            return missing, ""
        if not isinstance(missing, list) or not all(type(r) is int and 0 <= r < run.world for r in missing):
            return None, 'missing: the ranks of the run this rank could not connect to, or "all"'
        return frozenset(r for r in missing if r != rank), ""

    async def settle(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        """Wait for every rank's unreached peers; answer the pairs that fall back, the same for every rank."""
        waiting = self._waiting(request)
        if isinstance(waiting, dict):
            return waiting
        run, wait_s = waiting
        unreached, problem = self._unreached(request, writer, run)
        if unreached is None:
            return {"error": problem}
        run.unreached[request["rank"]] = unreached
        if len(run.unreached) == run.world and run.fallback is None:
            pairs = set()
            for rank, peers in run.unreached.items():
                pairs |= {
                    tuple(sorted((rank, p))) for p in (range(run.world) if peers == "all" else peers) if p != rank
                }
            run.fallback = [list(p) for p in sorted(pairs)]
            run.settled.set()
        try:
            await asyncio.wait_for(run.settled.wait(), timeout=wait_s)
        except asyncio.TimeoutError:
            return {"error": f"{len(run.unreached)} of {run.world} ranks settled which pairs connected"}
        return {"fallback": run.fallback}

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.connections > MAX_CONNECTIONS:
                writer.write(b'{"error": "too many connections to this rendezvous server; try again later"}\n')
                await writer.drain()
                return
            while line := await reader.readline():
                if len(line) > MAX_LINE:
                    break
                writer.write(json.dumps(await self.answer(line, writer)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a client gone, or a line longer than the reader's limit: the connection ends
        except asyncio.CancelledError:
            pass  # the server is stopping: end quietly (a cancelled client task is logged as an error otherwise)
        except Exception as exc:  # one client's fault never ends the server nor prints a traceback
            print(f"rendezvous: dropped a client: {type(exc).__name__}: {exc}"[:300], file=sys.stderr, flush=True)
        finally:
            self.connections -= 1
            self.forget(writer)
            writer.close()

    async def answer(self, line: bytes, writer: asyncio.StreamWriter) -> dict:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            request = None
        if not isinstance(request, dict):
            return {"error": "a request is one JSON object per line"}
        op = request.get("op")
        if op == "register":
            return self.register(request, writer)
        if op == "peers":
            return await self.peers(request)
        if op == "settle":
            return await self.settle(request, writer)
        return {"error": "unknown request: op is register, peers or settle"}


async def serve(host: str, port: int, ttl_s: float, ready=None) -> None:
    """Serve until cancelled, or until SIGTERM or SIGINT (then it returns, so that the process ends cleanly, with
    no client's callback interrupted mid-write); ``ready(bound_port)`` once listening."""
    rendezvous = Rendezvous(ttl_s)
    server = await asyncio.start_server(rendezvous.serve_client, host, port, limit=MAX_LINE * 2)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
            loop.add_signal_handler(number, stop.set)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await stop.wait()
