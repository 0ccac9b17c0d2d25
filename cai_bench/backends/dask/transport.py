"""The dask backend's transport: each Dask worker is a worker of the dispatcher, and each unit handed to it is
one task restricted to it (``session.run_unit``), so what runs where, what is retried and what is emitted stay
the dispatcher's. Dask itself retries nothing: its tasks have no retries, and a task whose worker left is
cancelled here and its unit returned to the dispatcher, which charges it and hands it to another worker.

A worker wants one unit when it holds none and one more to read ahead while it runs one; results come back as
each task ends (the futures' callbacks put events on a queue that ``poll`` drains), so nothing is gathered to
the driver before it is written. Workers are followed through the scheduler: one that joins (a nanny's
restart, a new jobqueue job, a worker started by hand) is a new worker of the run; one that leaves is lost.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cai_bench.backends.dispatch import Dispatcher, Event, Unit, drain
from cai_bench.core.errors import UserError, describe
from cai_bench.core.records import decode_result

REFRESH_S = 0.25  # how often the scheduler is asked which workers it has


@dataclass
class DaskTransport:
    client: Any
    plugin_name: str
    task: Any  # session.run_unit, the function each unit's task runs
    wait_s: float  # how long to wait for a worker when none is left and work remains
    events: queue.Queue = field(default_factory=queue.Queue)
    labels: dict[str, str] = field(default_factory=dict)  # a present worker's address -> our name for it, dask-N
    workers: dict[str, dict] = field(default_factory=dict)  # every worker's name -> address, name, host, nthreads
    inflight: dict[str, dict[str, int]] = field(default_factory=dict)  # our name -> task key -> unit position
    futures: dict[str, Any] = field(default_factory=dict)  # task key -> its future, while it runs
    lock: threading.Lock = field(default_factory=threading.Lock)  # inflight and futures: callbacks change them
    dispatcher: Dispatcher | None = None
    broken: str | None = None  # what makes the run stop: a worker whose model cannot start, a malformed reply
    said_broken: bool = False
    refreshed: float = 0.0
    run_key: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    handed: itertools.count = field(default_factory=itertools.count)

    # -- workers

    def _present(self) -> dict[str, dict]:
        try:
            return self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception as exc:  # the scheduler gone, or a reply not of a scheduler: nothing more can run
            why = "the client gave up reconnecting" if self.client.status != "running" else describe(exc)
            raise UserError(f"the Dask scheduler stopped answering ({why}); the partitions that finished are "
                            "kept") from None  # fmt: skip

    def _join(self, address: str, info: dict) -> None:
        label = f"dask-{len(self.workers)}"  # numbered as they joined, a restarted worker under a new number
        self.labels[address] = label
        self.workers[label] = {"address": address, "name": str(info.get("name")), "host": info.get("host"),
                               "nthreads": info.get("nthreads")}  # fmt: skip
        self.inflight[label] = {}
        self.dispatcher.join(label)
        self.events.put(Event("want", label))

    def _refresh(self) -> None:
        """Join the workers that arrived; report those that left (lost, with what they ran returned)."""
        self.refreshed = time.monotonic()
        present = self._present()
        for address, info in present.items():
            if address not in self.labels:
                self._join(address, info)
        for address, label in list(self.labels.items()):
            if address in present:
                continue
            del self.labels[address]
            if label not in self.dispatcher.held:
                continue
            kind = "lost" if self._cancel(label) else "left"
            self.events.put(Event(kind, label, error=f"dask worker {label} ({address}) left the scheduler"))

    def start(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._refresh()

    def poll(self, timeout_s: float | None) -> list[Event]:
        if self.broken and self.said_broken:
            raise UserError(self.broken)
        events = drain(self.events, timeout_s, idle_s=REFRESH_S)
        if self.broken:  # what came back before it broke is applied (emitted) first; the next poll stops the run
            self.said_broken = True
            return events
        if time.monotonic() - self.refreshed >= REFRESH_S:
            self._refresh()
            events += drain(self.events, 0.0)
        return events

    def after_exit(self, dispatcher: Dispatcher, worker: str) -> None:
        """With no worker left and work remaining, wait for one to join (a nanny restarts a killed worker)."""
        deadline = time.monotonic() + self.wait_s
        while not dispatcher.live and dispatcher.outstanding() and time.monotonic() < deadline:
            time.sleep(REFRESH_S)
            self._refresh()

    # -- units

    def send(self, worker: str, units: list[Unit], ahead: bool) -> None:
        address = self.workers[worker]["address"]
        for unit in units:
            # A key of its own each time: a unit handed out again (returned by a worker that left) is a new task
            key = f"cai-bench-{self.run_key}-unit-{unit.position}-{next(self.handed)}"
            future = self.client.submit(
                self.task, self.plugin_name, worker, unit.position, unit.item,
                key=key, workers=[address], allow_other_workers=False, retries=0, pure=False,
            )  # fmt: skip
            with self.lock:
                if worker not in self.inflight:  # it left meanwhile: its units are already returned
                    self.client.cancel([future])
                    return
                self.inflight[worker][future.key] = unit.position
                self.futures[future.key] = future
            future.add_done_callback(lambda f, w=worker: self._finished(w, f))
        if units and not ahead:
            self.events.put(Event("want", worker, ahead=True))

    def _finished(self, worker: str, future: Any) -> None:
        """A task ended (in the client's callback thread): its outcome, then what the worker wants next."""
        with self.lock:
            position = self.inflight.get(worker, {}).pop(future.key, None)
            self.futures.pop(future.key, None)
            holding = len(self.inflight.get(worker, {}))
        if position is None or future.status == "cancelled":
            return  # its worker left and its unit went back to the dispatcher
        try:
            outcome = future.result()
        except Exception as exc:  # the task raised outside the worker loop (unpickling it, the plugin missing)
            self.events.put(Event("failed", worker, position=position, error=describe(exc)))
        else:
            self._outcome(worker, position, outcome)
        self.events.put(Event("want", worker, ahead=holding > 0))

    def _outcome(self, worker: str, position: int, outcome: Any) -> None:
        kind = outcome[0] if isinstance(outcome, tuple) and outcome else None
        if kind == "done" and len(outcome) == 3:
            try:
                result = decode_result(outcome[1])
            except Exception as exc:
                self.broken = f"dask worker {worker} sent a malformed result for unit {position}: {describe(exc)}"
                return
            if isinstance(outcome[2], dict):
                # What the worker's nanny set that slows the model (cluster.NANNY_ENVIRON), kept per worker
                self.workers[worker]["environ"] = outcome[2].get("environ") or {}
                self.events.put(Event("ready", worker, info=outcome[2]))
            self.events.put(Event("done", worker, position=position, result=result))
        elif kind == "failed" and len(outcome) == 2:
            self.events.put(Event("failed", worker, position=position, error=str(outcome[1])))
        elif kind == "fatal":
            self.broken = f"dask worker {worker} could not start: {outcome[1]}"
        else:
            self.broken = f"dask worker {worker} sent an answer that is not cai-bench's for unit {position}"

    def _cancel(self, worker: str) -> dict[str, int]:
        """Cancel the tasks ``worker`` still runs; which they were (task key -> unit position)."""
        with self.lock:
            running = self.inflight.pop(worker, {})
            cancelled = [self.futures.pop(key) for key in running if key in self.futures]
        self.client.cancel(cancelled)
        return running

    def abandon(self, worker: str) -> None:
        self._cancel(worker)

    def stop(self, finished: bool) -> None:
        with self.lock:
            left = list(self.futures.values())
            self.futures.clear()
            self.inflight.clear()
        if left:
            self.client.cancel(left)
