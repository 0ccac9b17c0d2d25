"""Every message between two ranks is sealed with the run's secret, whatever channel carries it: a store anyone
with access to the same Redis or bucket can write into, or a TCP port anyone on the network can reach.

A sealed frame is a fixed header (a marker, sender, receiver, the pair's sequence number on that channel), a
HMAC-SHA256 tag over the channel's name, that header and the frame, then the frame. The tag's key is derived from
the run's secret and the run's id, so a frame of another run (or of no run) fails the check, and the sequence
number makes a captured frame useless a second time. A frame that fails is dropped and counted by its reason; the
rank goes on waiting for the frame it expected, and when that never comes its error names the channel, the peer
and what was dropped.

The secret never leaves the driver and its workers: the rendezvous server gets a token derived from it, and the
stores' key names carry another (``space``), so that they cannot be found from the run id alone.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import Counter, defaultdict

_MARK = b"CBS1"
_HEAD = struct.Struct("!4sIIQ")  # marker, sender, receiver, sequence number of the pair on this channel
_TAG = hashlib.sha256().digest_size
OVERHEAD = _HEAD.size + _TAG  # bytes a seal adds to each frame


def derive(secret: str, purpose: str, run_id: str) -> bytes:
    """A key (or token) for one use in one run, from the run's secret: none of them gives back the secret."""
    return hmac.digest(secret.encode(), f"cai-bench/{purpose}/{run_id}".encode(), "sha256")


def space(secret: str, run_id: str) -> str:
    """Where a run's keys live in a store: its id and a token only its ranks can work out."""
    return f"{run_id}-{derive(secret, 'space', run_id).hex()[:24]}"


class Sealer:
    """One rank's seals: what it sends is numbered per (channel, receiver); what it takes must come from the
    expected sender with the next number of that pair, under the run's key."""

    def __init__(self, secret: str, run_id: str, rank: int):
        if not secret:
            raise ValueError("a run's frames are sealed with its secret: none was given")
        self.rank = rank
        self._key = derive(secret, "frames", run_id)
        self._sent: dict[tuple[str, int], int] = defaultdict(int)
        self._taken: dict[tuple[str, int], int] = defaultdict(int)
        self.rejected: dict[tuple[str, int], Counter] = defaultdict(Counter)  # (channel, from) -> reason -> count

    def _tag(self, channel: str, head: bytes, frame: bytes) -> bytes:
        mac = hmac.new(self._key, channel.encode(), hashlib.sha256)
        mac.update(head)
        mac.update(frame)
        return mac.digest()

    def seal(self, channel: str, dst: int, frame: bytes) -> bytes:
        self._sent[channel, dst] += 1
        head = _HEAD.pack(_MARK, self.rank, dst, self._sent[channel, dst])
        return b"".join((head, self._tag(channel, head, frame), frame))

    def open(self, channel: str, src: int, sealed: bytes) -> bytes | None:
        """The frame inside ``sealed`` if it is the next one ``src`` sent this rank over ``channel``; None (and
        counted) otherwise."""
        reason = self._problem(channel, src, sealed)
        if reason is not None:
            self.rejected[channel, src][reason] += 1
            return None
        self._taken[channel, src] += 1
        return bytes(sealed[OVERHEAD:])

    def _problem(self, channel: str, src: int, sealed: bytes) -> str | None:
        if not isinstance(sealed, bytes | bytearray | memoryview) or len(sealed) < OVERHEAD:
            return "not a sealed frame"
        mark, sender, receiver, number = _HEAD.unpack_from(sealed)
        if mark != _MARK:
            return "not a sealed frame"
        if (sender, receiver) != (src, self.rank):
            return "wrong sender or receiver"
        tag = self._tag(channel, bytes(sealed[: _HEAD.size]), memoryview(sealed)[OVERHEAD:])
        if not hmac.compare_digest(tag, bytes(sealed[_HEAD.size : OVERHEAD])):
            return "bad tag (not this run's key)"
        expected = self._taken[channel, src] + 1
        if number < expected:
            return "replayed"
        if number > expected:
            return "out of order"
        return None

    def rejected_from(self, channel: str, src: int) -> int:
        return sum(self.rejected[channel, src].values()) if (channel, src) in self.rejected else 0

    def report(self) -> list[dict]:
        """What the record keeps: each (channel, sender) whose frames were dropped, with the counts by reason."""
        return [
            {"channel": channel, "from_rank": src, "dropped": sum(reasons.values()), "reasons": dict(reasons)}
            for (channel, src), reasons in sorted(self.rejected.items())
            if reasons
        ]
