"""The policy of a run, once for every backend: work units, the queue, which worker holds what, retries on
another worker, exactly-once emission, final failures, and the loop that drives a transport.

A transport (pipes to node processes, SLURM task files, CUDA device processes, Lambda invocations, threads in
a test) only starts workers, carries units to them and brings back what happened, as ``Event``s. It never
decides what runs where, what is retried or what is emitted: ``Dispatcher`` does, and ``drive`` runs the two
together. Nothing here knows of processes, pipes, files or HTTP.

Words: a *unit* is one entry of the run's list of work (a partition; with ``--cycle-to-gb`` the same partition
can be several units); a *worker* is whatever runs units one after another and asks for more; it *holds* the
units it was given and has not finished, the first of which it is running.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cai_bench.core.errors import UserError
from cai_bench.core.records import UnitFailure

DEFAULT_RETRIES = 2


# A unit whose worker was lost before the unit started (its environment never came up) did not fail: it goes back
# uncharged, this many times; past that it is charged as a failure, so an environment that can never start ends
# the run instead of taking every unit round for ever
UNSTARTED_RETRIES = 3


@dataclass(eq=False)  # a unit is itself: two are never equal by value
class Unit:
    position: int  # place in the run's list of work units: its identity
    item: Any  # what the transport carries to a worker (a PartitionRef)
    attempts: int = 0  # failed attempts so far
    errors: list[str] = field(default_factory=list)
    failed_on: list[str] = field(default_factory=list)  # the workers it failed on, to retry it elsewhere
    unstarted: int = 0  # times its worker was lost before it started (not charged, up to UNSTARTED_RETRIES)

    @property
    def partition(self) -> int:
        return getattr(self.item, "index", self.position)

    def failure(self) -> UnitFailure:
        return UnitFailure(self.partition, self.position, self.attempts, tuple(self.errors), tuple(self.failed_on))


@dataclass(frozen=True)
class Event:
    """What a transport saw happen to one of its workers.

    kind      fields used
    ready     worker, info (what the worker chose at start-up: weights, precision)
    want      worker, count (units wanted at once), ahead (a read-ahead request: refused rather than parked)
    done      worker, position, result
    failed    worker, position, error (the unit raised; the worker goes on)
    lost      worker, error (it is gone: crashed, killed, timed out; whatever it held is returned), started
              (False: it died before it began its first unit, so that unit is not charged)
    left      worker (it ended normally, holding nothing)

    ``fatal`` (failed, lost): what the worker was given is not what the driver sent (forged input): the run
    stops with the error, since a retry would run on what someone else wrote.
    """

    kind: str
    worker: str
    position: int | None = None
    result: Any = None
    error: str | None = None
    count: int = 1
    ahead: bool = False
    info: dict | None = None
    fatal: bool = False
    started: bool = True


class ForgedRun(UserError):
    """A worker was given, or returned, what the driver did not send it: the run stops here."""


class Dispatcher:
    """The bookkeeping of one run. ``emit`` is called once per unit that finished, in the order they finish."""

    def __init__(
        self,
        items: Sequence,
        emit: Callable[[Any], None],
        retries: int = DEFAULT_RETRIES,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.units = [Unit(position, item) for position, item in enumerate(items)]
        self.queue: deque[Unit] = deque(self.units)
        self.emit = emit
        self.retries = retries
        self.clock = clock
        self.held: dict[str, list[Unit]] = {}  # live worker -> units it holds, the running one first
        self.running_since: dict[str, float] = {}  # live worker -> when it began the unit it is running
        self.parked: list[str] = []  # workers that asked for work when none waited, first come first served
        self.emitted: set[int] = set()
        self.failed: dict[int, Unit] = {}  # position -> unit that failed for good
        self.ready: dict[str, dict] = {}  # worker -> what it reported at start-up
        self.attempts = 0  # units handed to workers, retries included
        self.joined = 0
        self.lost_workers: list[dict] = []  # {"worker", "error", "unit", "partition"}

    # -- workers

    @property
    def live(self) -> list[str]:
        return list(self.held)

    def join(self, worker: str) -> None:
        if worker in self.held:
            raise ValueError(f"worker {worker} joined twice")
        self.held[worker] = []
        self.joined += 1

    def on_ready(self, worker: str, info: dict | None) -> None:
        self.ready[worker] = dict(info or {})

    def want(self, worker: str, count: int = 1, ahead: bool = False) -> list[Unit]:
        """Up to ``count`` units for ``worker``. A read-ahead is served only while at least as many units wait as
        there are workers, so the last units go to whoever is free first; a plain request that finds nothing
        parks the worker until a unit comes back (``deliveries``) or the run ends."""
        if worker not in self.held:
            return []
        if ahead and len(self.queue) < len(self.held):
            return []
        units = []
        while len(units) < count and self.queue:
            units.append(self._take_for(worker))
        if units:
            self._hand(worker, units)
        elif not ahead and worker not in self.parked:
            self.parked.append(worker)
        return units

    def _take_for(self, worker: str) -> Unit:
        """The first waiting unit that has not failed on this worker; one that has, when nothing else waits."""
        for unit in self.queue:
            if worker not in unit.failed_on:
                self.queue.remove(unit)
                return unit
        return self.queue.popleft()

    def _hand(self, worker: str, units: list[Unit]) -> None:
        if not self.held[worker]:
            self.running_since[worker] = self.clock()
        self.held[worker].extend(units)
        self.attempts += len(units)

    def hand_over(self, worker: str, positions: list[int]) -> None:
        """Give ``worker`` exactly these units, in this order: work that was handed out before this dispatcher
        existed (a SLURM array submitted by an earlier command), taken up again to be followed."""
        units = [self.units[p] for p in positions]
        for unit in units:
            self.queue.remove(unit)
        self._hand(worker, units)

    def deliveries(self) -> list[tuple[str, list[Unit]]]:
        """Units for parked workers, now that some are waiting again; the transport sends them."""
        out = []
        while self.parked and self.queue:
            worker = self.parked.pop(0)
            if worker in self.held:
                units = [self._take_for(worker)]
                self._hand(worker, units)
                out.append((worker, units))
        return out

    # -- outcomes

    def _release(self, worker: str, position: int) -> None:
        holding = self.held.get(worker)
        if holding is None:
            return
        was_running = bool(holding) and holding[0].position == position
        holding[:] = [u for u in holding if u.position != position]
        if was_running and holding:
            self.running_since[worker] = self.clock()

    def done(self, worker: str, position: int, result: Any) -> bool:
        """A unit finished; emitted unless it already was. A late result from a worker given up on, or for a unit
        that had failed for good, still counts: it is emitted once and the unit is no longer waiting or failed."""
        self._release(worker, position)
        if position in self.emitted:
            return False
        unit = self.units[position]
        named = getattr(getattr(result, "record", None), "partition", None)
        if named is not None and named != unit.partition:  # every backend's results, checked once here
            raise ForgedRun(f"unit {position}'s result is of partition {named}, not the {unit.partition} it was "
                            f"given ({worker}): its input was changed on the way")  # fmt: skip
        self.failed.pop(position, None)
        if unit in self.queue:
            self.queue.remove(unit)
        self.emitted.add(position)
        self.emit(result)
        return True

    def on_failed(self, worker: str, position: int, error: str) -> None:
        """A unit raised on ``worker``: charged one attempt, retried elsewhere while attempts remain. A failure
        reported by a worker that no longer holds the unit (given up on, its unit already charged) changes nothing."""
        if all(u.position != position for u in self.held.get(worker, ())):
            return
        self._release(worker, position)
        if position not in self.emitted and position not in self.failed:
            self._charge(self.units[position], worker, error)

    def _charge(self, unit: Unit, worker: str, error: str) -> None:
        unit.attempts += 1
        unit.errors.append(error)
        unit.failed_on.append(worker)
        if unit.attempts <= self.retries:
            self.queue.appendleft(unit)
        else:
            self.failed[unit.position] = unit

    def lost(self, worker: str, error: str, started: bool = True) -> None:
        """``worker`` is gone. The unit it was running is charged an attempt (not when the worker never
        ``started`` it, up to UNSTARTED_RETRIES times); those it held to read ahead never started and go back to
        the front of the queue as they were."""
        holding = self.held.pop(worker, None)
        self.running_since.pop(worker, None)
        if worker in self.parked:
            self.parked.remove(worker)
        if holding is None:
            return
        pending = [u for u in holding if u.position not in self.emitted and u.position not in self.failed]
        crash = {"worker": worker, "error": error, "unit": None, "partition": None, "started": started}
        if pending:
            running, *ahead = pending
            crash["unit"], crash["partition"] = running.position, running.partition
            for unit in reversed(ahead):
                if unit not in self.queue:
                    self.queue.appendleft(unit)
            if not started and running.unstarted < UNSTARTED_RETRIES:
                running.unstarted += 1
                self.queue.appendleft(running)
            else:
                self._charge(running, worker, error)
        self.lost_workers.append(crash)

    def left(self, worker: str) -> None:
        """``worker`` ended normally; anything it still held (it should hold nothing) counts as lost."""
        if self.held.get(worker):
            self.lost(worker, f"worker {worker} ended holding work")
            return
        self.held.pop(worker, None)
        self.running_since.pop(worker, None)
        if worker in self.parked:
            self.parked.remove(worker)

    def overdue(self, timeout_s: float) -> list[str]:
        """Workers that have been running one unit for longer than ``timeout_s``."""
        now = self.clock()
        return [w for w, since in self.running_since.items() if self.held.get(w) and now - since > timeout_s]

    def fail_the_rest(self, why: str) -> None:
        """No worker is left: every unit not finished fails with ``why``."""
        for unit in self.units:
            if unit.position not in self.emitted and unit.position not in self.failed:
                unit.errors.append(why)
                self.failed[unit.position] = unit
        self.queue.clear()

    # -- the run

    def outstanding(self) -> int:
        return len(self.units) - len(self.emitted) - len(self.failed)

    def finished(self) -> bool:
        return self.outstanding() == 0

    def failures(self) -> list[UnitFailure]:
        return [self.failed[p].failure() for p in sorted(self.failed)]

    def summary(self) -> dict:
        """What the run record keeps of the dispatch: attempts, the units that needed a retry, lost workers."""
        retried = [u for u in self.units if u.attempts and u.position in self.emitted]
        return {
            "retries": self.retries,
            "attempts": self.attempts,
            "workers_started": self.joined,
            "retried_units": len(retried),
            "units_returned_unstarted": sum(u.unstarted for u in self.units),
            "retried": [u.failure().to_dict() for u in retried],
            "lost_workers": len(self.lost_workers),
            "crashes": list(self.lost_workers),
        }


def drain(events: queue.Queue, timeout_s: float | None, idle_s: float = 1.0) -> list[Event]:
    """For transports whose threads put their ``Event``s on a queue: wait for the first (at most ``timeout_s``,
    or ``idle_s`` so that ``drive`` looks round now and then), then take whatever else is there."""
    out = []
    with contextlib.suppress(queue.Empty):
        out.append(events.get(timeout=idle_s if timeout_s is None else max(0.0, timeout_s)))
        while True:
            out.append(events.get_nowait())
    return out


class Transport(Protocol):
    """How a backend reaches its workers. ``drive`` calls these; a transport never touches the queue."""

    def start(self, dispatcher: Dispatcher) -> None:
        """Start the first workers (``dispatcher.join`` each); they ask for work with ``want`` events."""

    def poll(self, timeout_s: float | None) -> Iterable[Event]:
        """Block until something happened (at most ``timeout_s``, where given) and say what."""

    def send(self, worker: str, units: list[Unit], ahead: bool) -> None:
        """Carry ``units`` to ``worker``; an empty list answers a read-ahead that could not be served."""

    def after_exit(self, dispatcher: Dispatcher, worker: str) -> None:
        """A worker was lost or left: start another if the transport wants one (``dispatcher.join``)."""

    def abandon(self, worker: str) -> None:
        """Give up on a worker that overran the unit timeout (kill it where that is possible)."""

    def stop(self, finished: bool) -> None:
        """The run is over: stop every worker still running. ``finished`` is False when the run is being cut
        short (Ctrl-C, SIGTERM, an error): then nothing they would still send is wanted."""


def drive(dispatcher: Dispatcher, transport: Transport, unit_timeout_s: float | None = None) -> Dispatcher:
    """Run ``transport``'s workers until every unit is emitted or failed for good; always stops the transport."""
    finished = False
    try:
        transport.start(dispatcher)
        while not dispatcher.finished():
            if not dispatcher.live:
                dispatcher.fail_the_rest("no worker left to run it")
                break
            for event in transport.poll(unit_timeout_s):
                apply(dispatcher, transport, event)
            if unit_timeout_s is not None:
                for worker in dispatcher.overdue(unit_timeout_s):
                    transport.abandon(worker)
                    dispatcher.lost(worker, f"worker {worker} ran one unit for more than {unit_timeout_s:g} s")
                    transport.after_exit(dispatcher, worker)
            # Last, so that a unit that came back in any way above reaches a parked worker before the next poll
            for worker, units in dispatcher.deliveries():
                transport.send(worker, units, False)
        finished = True
    finally:
        transport.stop(finished)
    return dispatcher


def apply(dispatcher: Dispatcher, transport: Transport, event: Event) -> None:
    """One event's effect on the dispatcher, and the units it sends in answer to a request."""
    kind, worker = event.kind, event.worker
    if event.fatal:
        raise ForgedRun(event.error.removeprefix("function error: ").removeprefix("ForgedInput: "))
    if kind == "want":
        units = dispatcher.want(worker, event.count, event.ahead)
        if units or event.ahead:
            transport.send(worker, units, event.ahead)
    elif kind == "done":
        dispatcher.done(worker, event.position, event.result)
    elif kind == "failed":
        dispatcher.on_failed(worker, event.position, event.error or "failed")
    elif kind == "ready":
        dispatcher.on_ready(worker, event.info)
    elif kind in ("lost", "left"):
        if worker not in dispatcher.held:
            return  # already given up on (timed out): its exit changes nothing
        if kind == "lost":
            dispatcher.lost(worker, event.error or f"worker {worker} was lost", event.started)
        else:
            dispatcher.left(worker)
        transport.after_exit(dispatcher, worker)
    else:
        raise ValueError(f"unknown event {kind!r}")
