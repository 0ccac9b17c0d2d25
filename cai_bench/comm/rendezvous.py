"""The rendezvous server of the direct channel: each rank of a run tells it its rank from the port it will also use
for its peers, the server records the address it sees (the rank's public address, after any NAT) and hands the
whole run's addresses to every rank of that run once all have come. Then the ranks connect to each other from
those ports (``direct.py``).

A run is its id and a key that its ranks share: the first rank to register sets the key (the server keeps its
SHA-256), and a client without it can neither read the run's addresses nor register a rank in it; a rank
registered by a connection still open cannot be taken over. Entries expire ``ttl_s`` after they were made.

The protocol: one JSON object per line each way. ``{"op": "register", "run", "key", "rank", "world"}`` answers
``{"address": [host, port]}``; ``{"op": "peers", "run", "key", "timeout"}`` answers ``{"peers": {rank: [host,
port]}}`` once every rank has registered; an error answers ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field

MAX_LINE = 4096


@dataclass
class _Entry:
    address: tuple[str, int]
    expires: float
    writer: asyncio.StreamWriter


@dataclass
class _Run:
    key_digest: bytes
    world: int
    entries: dict[int, _Entry] = field(default_factory=dict)
    complete: asyncio.Event = field(default_factory=asyncio.Event)


class Rendezvous:
    def __init__(self, ttl_s: float = 600.0):
        self.ttl_s = ttl_s
        self.runs: dict[str, _Run] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        for run_id, run in list(self.runs.items()):
            run.entries = {r: e for r, e in run.entries.items() if e.expires > now}
            if not run.entries:
                del self.runs[run_id]

    def _run(self, request: dict, create: bool) -> _Run | str:
        run_id, key = str(request.get("run", "")), str(request.get("key", ""))
        if not run_id or not key:
            return "a request names its run and carries the run's key"
        digest = hashlib.sha256(key.encode()).digest()
        run = self.runs.get(run_id)
        if run is None:
            if not create:
                return f"no run {run_id!r} here"
            world = int(request.get("world", 0))
            if not 1 <= world <= 100_000:
                return f"world {world}: a run has 1 to 100000 ranks"
            run = self.runs[run_id] = _Run(digest, world)
        if not hmac.compare_digest(run.key_digest, digest):
            return f"run {run_id!r} belongs to another key"
        return run

    def register(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        self._expire()
        run = self._run(request, create=True)
        if isinstance(run, str):
            return {"error": run}
        rank = int(request.get("rank", -1))
        if not 0 <= rank < run.world or int(request.get("world", run.world)) != run.world:
            return {"error": f"rank {rank} of world {request.get('world')}: the run has {run.world} ranks"}
        held = run.entries.get(rank)
        if held is not None and held.writer is not writer and not held.writer.is_closing():
            return {"error": f"rank {rank} of run {request['run']!r} is registered by another connection"}
        host, port = writer.get_extra_info("peername")[:2]
        run.entries[rank] = _Entry((host, port), time.monotonic() + self.ttl_s, writer)
        if len(run.entries) == run.world:
            run.complete.set()
        return {"address": [host, port]}

    async def peers(self, request: dict) -> dict:
        run = self._run(request, create=False)
        if isinstance(run, str):
            return {"error": run}
        try:
            await asyncio.wait_for(run.complete.wait(), timeout=float(request.get("timeout", 30)))
        except asyncio.TimeoutError:
            return {
                "error": f"{len(run.entries)} of {run.world} ranks registered; missing "
                f"{sorted(set(range(run.world)) - set(run.entries))[:20]}"
            }
        return {"peers": {str(r): list(e.address) for r, e in run.entries.items()}}

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if len(line) > MAX_LINE:
                    break
                try:
                    request = json.loads(line)
                    op = request.get("op")
                except (ValueError, AttributeError):
                    request, op = {}, None
                if op == "register":
                    reply = self.register(request, writer)
                elif op == "peers":
                    reply = await self.peers(request)
                else:
                    reply = {"error": "unknown request: op is register or peers"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def serve(host: str, port: int, ttl_s: float, ready=None) -> None:
    """Serve until cancelled; ``ready(bound_port)`` once listening."""
    rendezvous = Rendezvous(ttl_s)
    server = await asyncio.start_server(rendezvous.serve_client, host, port, limit=MAX_LINE * 2)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()
