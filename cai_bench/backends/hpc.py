"""``hpc``: all cores of one node in N worker processes (``--workers N``), or a SLURM job array over partition
groups across nodes (``--slurm``, in ``backends/slurm.py``).

On one node, each worker process builds the model once and pulls partitions from one queue the driver holds: a
worker asks for work when it has none, so a slow worker never holds partitions that an idle one could run. While
it computes one partition it may hold one more, which it reads in the background, but only while at least as
many partitions wait as there are workers, so the last ones go to whoever is free first.

The driver talks to each worker over its own pipe and watches its process. A worker that dies (killed, out of
memory) loses the partition it was running: that partition goes back to the front of the queue for another
worker, up to ``retries`` times, and a replacement worker starts. A partition that raised an error is retried
the same way, on another worker where there is one. What finally failed ends the run with
``PartitionsFailed``, which carries everything the other partitions measured.

Workers come from a fork server that has imported torch and this package once and never runs a model: a plain
fork of a process whose torch thread pools have started can hang, and spawning each worker afresh costs 3-4 s
of imports per worker on the 2-core dev VM (all of them at once on a wide node). The server is started before
the run's clock, as the driver's own imports are, and reused by later repeats; its start-up is recorded
(``fork_server_start_s``). Where there is no fork server (Windows), workers are spawned.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import torch

from cai_bench.backends.base import BackendRun, Emit, PartitionsFailed, refuse_unknown
from cai_bench.backends.cpu import default_threads, lane_layout
from cai_bench.engine import EngineOptions, load_partition, plan_options, run_partition, start_worker
from cai_bench.errors import UserError, describe
from cai_bench.model.checkpoint import RANDOM_INIT, WeightsInfo
from cai_bench.plan import PartitionRef, Plan, work_units

NODE_OPTIONS = ("workers", "retries", "lanes")
SLURM_OPTIONS = (
    "slurm",
    "slurm_executor",
    "tasks",
    "partitions_per_task",
    "slurm_partition",
    "time_min",
    "mem_gb",
    "cpus_per_task",
    "array_parallelism",
    "slurm_options",
    "wait",
    "jobs_dir",
)
DEFAULT_RETRIES = 2
STOP_TIMEOUT_S = 10.0


def worker_threads(plan: Plan) -> tuple[int, int, int, int]:
    """(workers, threads per worker, lanes, intra-op threads per lane): the node's threads split evenly."""
    workers = plan.backend_options.get("workers") or 1
    per_worker = max(1, (plan.threads or default_threads()) // workers)
    if plan.compile:  # a compiled model is called from one thread only
        return workers, per_worker, 1, per_worker
    lanes, intra = lane_layout(per_worker, plan.backend_options.get("lanes"))
    return workers, per_worker, lanes, intra


def _noop() -> None:
    pass


def worker_context() -> tuple[multiprocessing.context.BaseContext, float]:
    """The context worker processes start from, and the seconds it took to get it ready (milliseconds when it
    already was)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn"), 0.0
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cai_bench.backends.hpc"])
    started = time.perf_counter()
    # The first process through a new server waits for its imports; later ones take milliseconds
    probe = context.Process(target=_noop, daemon=True)
    probe.start()
    probe.join()
    return context, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- worker process


def worker_main(
    conn: Connection, worker_id: str, options: EngineOptions, weights: str | None, seed: int, intra: int
) -> None:
    """One worker process: start once, then ask the driver for partitions until it says stop.

    Messages to the driver: ("ready", weights, choices), ("fatal", message) when start-up fails, ("want",
    ahead), ("done", unit, PartitionResult), ("failed", unit, message). From the driver: ("unit", unit, ref),
    ("none",) to an ``ahead`` request it cannot serve yet, ("stop",).
    """
    # A Ctrl-C in the terminal reaches every process of the group; the driver alone decides what stops.
    # SIGTERM too (SLURM sends it to every process of a job step at its time limit): the driver records what
    # finished and stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(intra)
    try:
        worker = start_worker(worker_id, options, weights=weights, seed=seed)
    except Exception as exc:
        conn.send(("fatal", describe(exc)))
        return
    conn.send(("ready", worker.weights, worker.choices))
    held: deque = deque()  # (unit, future of its partition), in the order they run

    def ask(ahead: bool) -> str:
        conn.send(("want", ahead))
        reply = conn.recv()
        if reply[0] == "unit":
            _, unit, ref = reply
            held.append((unit, reader.submit(load_partition, ref, options)))
        return reply[0]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cai-prefetch") as reader:
        while held or ask(ahead=False) != "stop":
            unit, pending = held[0]
            try:
                waited = time.perf_counter()
                partition = pending.result()
                wait_s = time.perf_counter() - waited
                if len(held) == 1:
                    ask(ahead=True)
                result = run_partition(partition, worker, options, wait_s=wait_s)
            except Exception as exc:
                held.popleft()
                conn.send(("failed", unit, describe(exc)))
                continue
            held.popleft()
            del partition
            conn.send(("done", unit, result))
    worker.close()


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class _Unit:
    position: int  # place in the run's list of work units
    ref: PartitionRef
    attempts: int = 0  # failed attempts so far
    errors: list[str] = field(default_factory=list)
    failed_on: set[str] = field(default_factory=set)  # workers it failed on, to retry elsewhere

    def failure(self) -> dict:
        return {"partition": self.ref.index, "unit": self.position, "attempts": self.attempts, "errors": self.errors}


@dataclass
class _Worker:
    worker_id: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    held: list[_Unit] = field(default_factory=list)  # sent to it and not finished, in the order it runs them
    parked: bool = False  # asked for work when there was none; answered when some comes back or at the end


@dataclass
class _NodeRun:
    plan: Plan
    emit: Emit
    options: EngineOptions
    intra: int
    workers_wanted: int
    retries: int
    queue: deque = field(default_factory=deque)
    live: dict = field(default_factory=dict)  # worker_id -> _Worker
    done: set = field(default_factory=set)
    failed: list = field(default_factory=list)
    crashes: list = field(default_factory=list)
    retried: dict = field(default_factory=dict)  # position -> _Unit that failed at least once
    weights: WeightsInfo | None = None
    choices: dict = field(default_factory=dict)
    precisions: set = field(default_factory=set)
    started: int = 0  # worker processes started, replacements included
    dispatched: float = field(default_factory=time.perf_counter)
    ready_after_s: list = field(default_factory=list)  # dispatch to each worker's "ready": process start, start-up
    context: multiprocessing.context.BaseContext | None = None

    # -- workers

    def spawn(self) -> None:
        worker_id = f"hpc-{self.started}"
        self.started += 1
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=worker_main,
            args=(theirs, worker_id, self.options, self.plan.weights, self.plan.seed, self.intra),
            name=f"cai-bench {worker_id}",
            daemon=True,
        )
        process.start()
        theirs.close()
        self.live[worker_id] = _Worker(worker_id, process, ours)

    def send_unit(self, worker: _Worker, unit: _Unit) -> None:
        worker.held.append(unit)
        worker.conn.send(("unit", unit.position, unit.ref))

    def next_unit_for(self, worker: _Worker) -> _Unit | None:
        """The first waiting unit that has not failed on this worker; one that has, when nothing else waits."""
        for unit in self.queue:
            if worker.worker_id not in unit.failed_on:
                self.queue.remove(unit)
                return unit
        return self.queue.popleft() if self.queue else None

    def outstanding(self) -> int:
        return len(self.queue) + sum(len(w.held) for w in self.live.values())

    # -- events

    def on_message(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            _, weights, choices = message
            self.weights = self.weights or weights
            self.choices = self.choices or choices
            self.precisions.add(choices.get("precision"))
            self.ready_after_s.append(round(time.perf_counter() - self.dispatched, 3))
        elif kind == "want":
            self.on_want(worker, ahead=message[1])
        elif kind == "done":
            _, position, result = message
            worker.held = [u for u in worker.held if u.position != position]
            if position not in self.done:  # a result is emitted once, whatever happened around it
                self.done.add(position)
                self.emit(result)
        elif kind == "failed":
            _, position, error = message
            unit = next(u for u in worker.held if u.position == position)
            worker.held.remove(unit)
            self.attempt_failed(unit, worker, error)
        elif kind == "fatal":
            raise UserError(f"worker {worker.worker_id} could not start: {message[1]}")

    def on_want(self, worker: _Worker, ahead: bool) -> None:
        if ahead:
            # Read-ahead only while the queue is long enough that every worker still gets a partition
            unit = self.next_unit_for(worker) if len(self.queue) >= len(self.live) else None
            if unit is None:
                worker.conn.send(("none",))
            else:
                self.send_unit(worker, unit)
            return
        unit = self.next_unit_for(worker)
        if unit is None:
            worker.parked = True
        else:
            self.send_unit(worker, unit)

    def on_exit(self, worker: _Worker) -> None:
        """A worker process ended without being told to: what it was running is retried elsewhere."""
        del self.live[worker.worker_id]
        worker.conn.close()
        code = worker.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        crash = {"worker_id": worker.worker_id, "pid": worker.process.pid, "exit": how, "partition": None}
        if worker.held:
            running, *read_ahead = worker.held
            crash["partition"] = running.ref.index
            crash["unit"] = running.position
            for unit in reversed(read_ahead):  # never started: back to the front, no attempt charged
                self.queue.appendleft(unit)
            self.attempt_failed(running, worker, f"worker {worker.worker_id} (pid {worker.process.pid}) died: {how}")
        self.crashes.append(crash)
        # A replacement keeps the node busy; at most as many as were asked for, so a worker that dies at
        # start-up every time cannot loop forever.
        if self.outstanding() and self.started < 2 * self.workers_wanted:
            self.spawn()

    def attempt_failed(self, unit: _Unit, worker: _Worker, error: str) -> None:
        unit.attempts += 1
        unit.errors.append(error)
        unit.failed_on.add(worker.worker_id)
        self.retried[unit.position] = unit
        if unit.attempts <= self.retries:
            self.queue.appendleft(unit)
        else:
            self.failed.append(unit)

    def serve_parked(self) -> None:
        for worker in self.live.values():
            if worker.parked and self.queue:
                worker.parked = False
                self.send_unit(worker, self.next_unit_for(worker))

    # -- the loop

    def finished(self) -> bool:
        return self.outstanding() == 0

    def step(self) -> None:
        by_object = {}
        for worker in self.live.values():
            by_object[worker.conn] = worker
            by_object[worker.process.sentinel] = worker
        for ready in wait(list(by_object)):
            worker = by_object[ready]
            if worker.worker_id not in self.live:
                continue  # its exit was handled with an earlier object of this round
            if ready is worker.conn:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):  # its end of the pipe closed: it is exiting
                    worker.process.join()
                    self.on_exit(worker)
                    continue
                self.on_message(worker, message)
            else:
                # Dead: first take whatever it sent before dying (a finished partition is not run again)
                while True:
                    try:
                        if not worker.conn.poll():
                            break
                        self.on_message(worker, worker.conn.recv())
                    except (EOFError, OSError):
                        break
                worker.process.join()
                self.on_exit(worker)
        self.serve_parked()

    def fail_the_rest(self, why: str) -> None:
        while self.queue:
            unit = self.queue.popleft()
            unit.errors.append(why)
            self.failed.append(unit)

    def stop(self) -> None:
        """Tell every worker to stop; whichever has not ended soon after is terminated."""
        for worker in self.live.values():
            with contextlib.suppress(OSError):  # already gone
                worker.conn.send(("stop",))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in self.live.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.live.clear()

    def kill_all(self) -> None:
        for worker in self.live.values():
            if worker.process.is_alive():
                worker.process.kill()
        for worker in self.live.values():
            worker.process.join()
            worker.conn.close()
        self.live.clear()


def run_node(plan: Plan, emit: Emit) -> BackendRun:
    if plan.engine == "reference":
        raise UserError("--engine reference is the one-process upstream loop: run it with --backend cpu")
    workers, per_worker, lanes, intra = worker_threads(plan)
    retries = plan.backend_options.get("retries")
    retries = DEFAULT_RETRIES if retries is None else retries
    units = work_units(plan)
    context, server_s = worker_context()
    node = _NodeRun(plan, emit, plan_options(plan, lanes), intra, workers, retries, context=context)
    node.queue.extend(_Unit(position, ref) for position, ref in enumerate(units))
    start = node.dispatched = time.perf_counter()
    try:
        for _ in range(min(workers, len(units))):
            node.spawn()
        while not node.finished():
            if not node.live:
                node.fail_the_rest("no worker left to run it")
                break
            node.step()
        wall_s = time.perf_counter() - start
        node.stop()
    finally:
        node.kill_all()
    info = {
        "workers": workers,
        "threads": workers * per_worker,
        "threads_per_worker": per_worker,
        "lanes": lanes,
        "intra_op_threads": intra,
        "retries": retries,
        "worker_processes_started": node.started,
        "worker_ready_after_s": node.ready_after_s,
        "crashes": node.crashes,
        "retried": [unit.failure() for unit in node.retried.values() if all(unit is not f for f in node.failed)],
        "prefetch_partitions": 1,
        "start_method": context.get_start_method(),
        "fork_server_start_s": server_s,
        **node.choices,
        "precisions": sorted(p for p in node.precisions if p),
    }
    weights = node.weights or WeightsInfo(source=plan.weights or RANDOM_INIT, seed=plan.seed)
    run = BackendRun(wall_s=wall_s, weights=weights, info=info)
    if node.failed:
        raise PartitionsFailed(run, [unit.failure() for unit in sorted(node.failed, key=lambda u: u.position)])
    return run


@dataclass
class HpcBackend:
    name: str = "hpc"

    def check(self, options: dict) -> None:
        refuse_unknown(self.name, options, NODE_OPTIONS + SLURM_OPTIONS)
        if options.get("slurm"):
            from cai_bench.backends import slurm

            slurm.check(options)
            return
        extra = sorted(set(options) & set(SLURM_OPTIONS))
        if extra:
            flag = "no-wait" if extra[0] == "wait" else extra[0].replace("_", "-")
            raise UserError(f"--{flag} applies to SLURM arrays: add --slurm")
        if options.get("workers") is not None and options["workers"] < 1:
            raise UserError(f"--workers must be at least 1, got {options['workers']}")
        if options.get("retries") is not None and options["retries"] < 0:
            raise UserError(f"--retries must be 0 or more, got {options['retries']}")

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        self.check(plan.backend_options)
        if plan.backend_options.get("slurm"):
            from cai_bench.backends import slurm

            return slurm.run_array(plan, emit)
        return run_node(plan, emit)


def create() -> HpcBackend:
    return HpcBackend()
