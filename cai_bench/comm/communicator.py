"""``Communicator``: point-to-point and the collectives, written once over a channel's ordered messages.

Between peers (``direct``) the collectives are trees: binomial for bcast, reduce, gather and scatter, recursive
doubling for allreduce and scan, dissemination for barrier, so each takes about log2(P) rounds. Over a store
(``redis``, ``s3``) a message is a request to a service, and every rank can reach every other in one, so they go
through rank 0 instead: P-1 writes in, P-1 out. Every call is numbered the same way on every rank; each message
names its call, so a rank that called another operation is an error that names both. Every message is sealed
with the run's secret (``seal.py``): a frame that fails the check is dropped and counted, and a rank whose expected
frame never comes names the channel, the peer and what it dropped.

The channel an operation takes is chosen from its ``size_hint``: every rank must pass the same one.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from contextlib import contextmanager

from cai_bench.comm import frames
from cai_bench.comm.channel import Channel
from cai_bench.comm.frames import CommError
from cai_bench.comm.ops import ReduceOp, as_op, combine
from cai_bench.comm.policy import ChannelModel, choose_channel, default_models
from cai_bench.comm.seal import Sealer


class Communicator:
    def __init__(
        self,
        rank: int,
        world_size: int,
        channels: Channel | list[Channel],
        run_id: str,
        timeout_s: float = 60.0,
        hint: str = "fast",
        models: dict[str, ChannelModel] | None = None,
        secret: str = "",
    ):
        if not 0 <= rank < world_size:
            raise CommError(f"rank {rank} is not in a world of {world_size}")
        if not secret:
            raise CommError("a communicator seals its messages with the run's secret (comm.new_key()): none given")
        self._sealer = Sealer(secret, run_id, rank)
        self.rank, self.world_size, self.run_id, self.timeout_s, self.hint = rank, world_size, run_id, timeout_s, hint
        self.channels = channels if isinstance(channels, list) else [channels]
        self.models = models or default_models()
        self._seq = 0
        self._sent: dict[int, int] = defaultdict(int)  # point-to-point calls per peer, numbered apart
        self._received: dict[int, int] = defaultdict(int)
        self.stats: dict[str, dict] = {}
        self._to_self: deque = deque()
        self._deadline = 0.0

    # ------------------------------------------------------------------------------------------ plumbing

    def _pick(self, op: str, size_hint: int) -> Channel:
        if len(self.channels) == 1:
            return self.channels[0]
        name = choose_channel([c.scheme for c in self.channels], self.models, op, self.world_size, size_hint, self.hint)
        return next(c for c in self.channels if c.scheme == name)

    @contextmanager
    def _call(self, op: str, size_hint: int):
        """One collective call: its number (the same on every rank), its channel, its deadline and time."""
        self._seq += 1
        with self._timed(op, self._pick(op, size_hint)) as channel:
            yield channel

    @contextmanager
    def _timed(self, op: str, channel: Channel):
        self._deadline = time.monotonic() + self.timeout_s
        started = time.perf_counter()
        try:
            yield channel
        finally:
            entry = self.stats.setdefault(op, {"calls": 0, "seconds": 0.0, "channel": channel.scheme})
            entry["calls"] += 1
            entry["seconds"] += time.perf_counter() - started

    def _put(self, channel: Channel, op: str, seq: int, dst: int, values: list) -> None:
        sealed = self._sealer.seal(channel.scheme, dst, frames.encode(op, seq, self.rank, values))
        channel.send(dst, sealed, self._deadline)

    def _take(self, channel: Channel, op: str, seq: int, src: int) -> list:
        """The next frame ``src`` sealed for this rank on ``channel``; frames that fail the seal are dropped."""
        while True:
            sealed = channel.recv(src, self._deadline)
            if sealed is None:
                raise CommError(self._nothing_from(channel, op, seq, src))
            frame = self._sealer.open(channel.scheme, src, sealed)
            if frame is not None:
                break
            channel.dropped(src)
        try:
            return frames.decode(frame, self.rank, op, seq, src)
        except CommError:
            raise
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # sealed by a rank of the run: a bug, said so
            raise CommError(f"rank {self.rank}: {op} #{seq}: rank {src}'s message over {channel.scheme} could not "
                            f"be read ({type(exc).__name__}: {exc})") from None  # fmt: skip

    def _nothing_from(self, channel: Channel, op: str, seq: int, src: int) -> str:
        dropped = self._sealer.rejected_from(channel.scheme, src)
        dropped_text = f"; dropped {dropped} frame(s) that failed the seal" if dropped else ""
        gone = channel.missing()
        if gone:
            return (
                f"rank {self.rank}: {op} #{seq} over {channel.scheme} cannot complete: rank(s) {_ranks(gone)} "
                f"of run {self.run_id} are gone (waited {self.timeout_s:g} s for rank {src}){dropped_text}"
            )
        return (f"rank {self.rank}: {op} #{seq}: nothing from rank {src} over {channel.scheme} within "
                f"{self.timeout_s:g} s{dropped_text}")  # fmt: skip

    def comm_seconds(self) -> float:
        return sum(entry["seconds"] for entry in self.stats.values())

    def info(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "collectives_s": round(self.comm_seconds(), 6),
            "operations": {op: {**e, "seconds": round(e["seconds"], 6)} for op, e in self.stats.items()},
            "channels": [c.info() for c in self.channels],
            "rejected": self._sealer.report(),
        }

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ point to point

    def send(self, value, dst: int) -> None:
        self._check_rank(dst, "dst")
        if dst == self.rank:  # to itself: no channel has a connection to its own rank
            self._to_self.append(
                frames.decode(frames.encode("send", 0, self.rank, [value]), self.rank, "send", 0, self.rank)[0]
            )
            return
        # Point to point has no call number both ends agree on: it takes the first channel given
        with self._timed("send", self.channels[0]) as channel:
            self._sent[dst] += 1
            self._put(channel, "send", self._sent[dst], dst, [value])

    def recv(self, src: int):
        self._check_rank(src, "src")
        if src == self.rank:
            if not self._to_self:
                raise CommError(f"rank {self.rank} receives from itself, but sent itself nothing")
            return self._to_self.popleft()
        with self._timed("recv", self.channels[0]) as channel:
            self._received[src] += 1
            return self._take(channel, "send", self._received[src], src)[0]

    def _check_rank(self, rank: int, what: str) -> None:
        if not 0 <= rank < self.world_size:
            raise CommError(f"{what} rank {rank} is not in a world of {self.world_size}")

    # ---------------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        with self._call("barrier", 0) as channel:
            if channel.peer_to_peer:
                distance = 1
                while distance < self.world_size:  # dissemination: log2(P) rounds, each rank one send, one recv
                    self._put(channel, "barrier", self._seq, (self.rank + distance) % self.world_size, [])
                    self._take(channel, "barrier", self._seq, (self.rank - distance) % self.world_size)
                    distance *= 2
            else:  # sealed messages through rank 0: a store's own counter could be bumped by anyone who reaches it
                self._collect_at(channel, "barrier", 0, None)
                self._hand_out(channel, "barrier", 0, [None] * self.world_size)

    def bcast(self, value=None, root: int = 0, size_hint: int = 8):
        self._check_rank(root, "root")
        with self._call("bcast", size_hint) as channel:
            if not channel.peer_to_peer:
                return self._hand_out(channel, "bcast", root, [value] * self.world_size)
            return self._tree_bcast(channel, "bcast", value, root)

    def _tree_bcast(self, channel: Channel, op: str, value, root: int):
        size, me = self.world_size, (self.rank - root) % self.world_size
        mask = 1
        while mask < size:
            if me & mask:
                value = self._take(channel, op, self._seq, (me - mask + root) % size)[0]
                break
            mask <<= 1
        mask >>= 1
        while mask > 0:
            if me + mask < size:
                self._put(channel, op, self._seq, (me + mask + root) % size, [value])
            mask >>= 1
        return value

    def reduce(self, value, op: ReduceOp | str = "sum", root: int = 0, size_hint: int = 8):
        """The reduction of every rank's value at ``root`` (None elsewhere), in rank order for ``op``s that care."""
        self._check_rank(root, "root")
        op = as_op(op)
        with self._call("reduce", size_hint) as channel:
            if not channel.peer_to_peer or not op.associative:
                values = self._collect_at(channel, "reduce", root, value)
                return _fold(op, values) if values is not None else None
            return self._tree_reduce(channel, value, op, root)

    def _tree_reduce(self, channel: Channel, value, op: ReduceOp, root: int):
        # Not commutative: the tree over the ranks as they are (each node holds a run of consecutive ranks, its
        # own on the left), then rank 0 hands the result to the root
        tree_root = root if op.commutative else 0
        size, me = self.world_size, (self.rank - tree_root) % self.world_size
        mask, acc, span = 1, value, 1
        while mask < size:
            if me & mask:
                self._put(channel, "reduce", self._seq, (me - mask + tree_root) % size, [acc])
                acc = None
                break
            if me + mask < size:
                theirs = self._take(channel, "reduce", self._seq, (me + mask + tree_root) % size)[0]
                acc = combine(
                    op,
                    acc,
                    theirs,
                    _block(self.rank, span),
                    _block((me + mask + tree_root) % size, min(mask, size - me - mask)),
                )
                span += min(mask, size - me - mask)
            mask <<= 1
        if tree_root != root:
            if self.rank == tree_root:
                self._put(channel, "reduce", self._seq, root, [acc])
            if self.rank == root:
                acc = self._take(channel, "reduce", self._seq, tree_root)[0]
        return acc if self.rank == root else None

    def allreduce(self, value, op: ReduceOp | str = "sum", size_hint: int = 8):
        op = as_op(op)
        with self._call("allreduce", size_hint) as channel:
            if not channel.peer_to_peer or not op.associative:
                values = self._collect_at(channel, "allreduce", 0, value)
                return self._hand_out(channel, "allreduce", 0, values and [_fold(op, values)] * self.world_size)
            if not op.commutative:
                return self._tree_bcast(channel, "allreduce", self._tree_reduce(channel, value, op, 0), 0)
            return self._recursive_doubling(channel, value, op)

    def _recursive_doubling(self, channel: Channel, value, op: ReduceOp):
        # P not a power of two: the first 2*extra ranks pair up (even into odd), the odd ones join the doubling,
        # and send the result back to their even partner at the end
        size, rank, seq = self.world_size, self.rank, self._seq
        power = 1 << (size.bit_length() - 1)
        extra = size - power
        if rank < 2 * extra and rank % 2 == 0:
            self._put(channel, "allreduce", seq, rank + 1, [value])
            return self._take(channel, "allreduce", seq, rank + 1)[0]
        if rank < 2 * extra:
            theirs = self._take(channel, "allreduce", seq, rank - 1)[0]
            value = combine(op, theirs, value, f"rank {rank - 1}", f"rank {rank}")
        virtual = rank // 2 if rank < 2 * extra else rank - extra
        mask = 1
        while mask < power:
            partner_virtual = virtual ^ mask
            partner = partner_virtual * 2 + 1 if partner_virtual < extra else partner_virtual + extra
            self._put(channel, "allreduce", seq, partner, [value])
            theirs = self._take(channel, "allreduce", seq, partner)[0]
            value = (
                combine(op, theirs, value, f"rank {partner}", f"rank {rank}")
                if partner < rank
                else combine(op, value, theirs, f"rank {rank}", f"rank {partner}")
            )
            mask <<= 1
        if rank < 2 * extra:
            self._put(channel, "allreduce", seq, rank - 1, [value])
        return value

    def scan(self, value, op: ReduceOp | str = "sum", size_hint: int = 8):
        """Inclusive prefix: rank r gets op over ranks 0..r, in that order."""
        op = as_op(op)
        with self._call("scan", size_hint) as channel:
            if not channel.peer_to_peer or not op.associative:
                values = self._collect_at(channel, "scan", 0, value)
                return self._hand_out(channel, "scan", 0, values and _prefixes(op, values))
            size, rank, seq = self.world_size, self.rank, self._seq
            result, partial, mask = value, value, 1  # partial: op over the block of ranks this rank has seen
            while mask < size:
                partner = rank ^ mask
                if partner < size:
                    self._put(channel, "scan", seq, partner, [partial])
                    theirs = self._take(channel, "scan", seq, partner)[0]
                    if partner < rank:
                        partial = combine(op, theirs, partial, f"rank {partner}", f"rank {rank}")
                        result = combine(op, theirs, result, f"rank {partner}", f"rank {rank}")
                    else:
                        partial = combine(op, partial, theirs, f"rank {rank}", f"rank {partner}")
                mask <<= 1
            return result

    def gather(self, value, root: int = 0, size_hint: int = 8) -> list | None:
        """Every rank's value, in rank order, at ``root``; None elsewhere."""
        self._check_rank(root, "root")
        with self._call("gather", size_hint) as channel:
            if not channel.peer_to_peer:
                return self._collect_at(channel, "gather", root, value)
            size, me = self.world_size, (self.rank - root) % self.world_size
            held, mask = [value], 1  # the values of ranks me, me+1, ... (relative to root), in that order
            while mask < size:
                if me & mask:
                    self._put(channel, "gather", self._seq, (me - mask + root) % size, held)
                    return None
                if me + mask < size:
                    held += self._take(channel, "gather", self._seq, (me + mask + root) % size)
                mask <<= 1
            return held[size - root :] + held[: size - root]

    def scatter(self, values: list | None = None, root: int = 0, size_hint: int = 8):
        """Rank r gets ``values[r]`` of the root's list."""
        self._check_rank(root, "root")
        if self.rank == root and (values is None or len(values) != self.world_size):
            raise CommError(f"scatter: the root passes one value per rank ({self.world_size}), not {values!r:.60}")
        with self._call("scatter", size_hint) as channel:
            if not channel.peer_to_peer:
                return self._hand_out(channel, "scatter", root, values)
            size, me = self.world_size, (self.rank - root) % self.world_size
            held = (values[root:] + values[:root]) if self.rank == root else None  # relative order from the root
            mask = 1
            while mask < size:
                if me & mask:
                    held = self._take(channel, "scatter", self._seq, (me - mask + root) % size)
                    break
                mask <<= 1
            mask >>= 1
            while mask > 0:
                if me + mask < size:
                    self._put(channel, "scatter", self._seq, (me + mask + root) % size, held[mask:])
                    held = held[:mask]
                mask >>= 1
            return held[0]

    # --------------------------------------------------------------------------- through one rank (stores)

    def _collect_at(self, channel: Channel, op: str, root: int, value) -> list | None:
        """Every rank's value at ``root``, in rank order (None elsewhere): P-1 messages into one rank."""
        if self.rank != root:
            self._put(channel, op, self._seq, root, [value])
            return None
        return [value if r == root else self._take(channel, op, self._seq, r)[0] for r in range(self.world_size)]

    def _hand_out(self, channel: Channel, op: str, root: int, answers: list | None):
        """``answers[r]`` from ``root`` to each rank r: P-1 messages out of one rank."""
        if self.rank != root:
            return self._take(channel, op, self._seq, root)[0]
        for other in range(self.world_size):
            if other != root:
                self._put(channel, op, self._seq, other, [answers[other]])
        return answers[root]


def _fold(op: ReduceOp, values: list):
    acc = values[0]
    for rank, value in enumerate(values[1:], start=1):
        acc = combine(op, acc, value, _block(0, rank), f"rank {rank}")
    return acc


def _prefixes(op: ReduceOp, values: list) -> list:
    out = [values[0]]
    for rank, value in enumerate(values[1:], start=1):
        out.append(combine(op, out[-1], value, _block(0, rank), f"rank {rank}"))
    return out


def _block(first: int, count: int) -> str:
    return f"rank {first}" if count == 1 else f"ranks {first}-{first + count - 1}"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in sorted(ranks))
