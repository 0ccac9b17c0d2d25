"""``hpc``: all cores of one node in N worker processes (``--workers N``), or a SLURM job array over partition
groups across nodes (``--slurm``, in ``backends/slurm.py``).

On one node, each worker process builds the model once and pulls partitions from one queue the driver holds: a
worker asks for work when it has none, so a slow worker never holds partitions that an idle one could run. While
it computes one partition it may hold one more, which it reads in the background, but only while at least as
many partitions wait as there are workers, so the last ones go to whoever is free first.

This module is the transport (``NodeTransport``): it starts the processes, talks to each over its own pipe and
watches it; what runs where is the dispatcher's (``dispatch.py``). A worker that dies (killed, out of memory)
loses the partition it was running: that partition goes back to the front of the queue for another worker, up
to ``retries`` times, and a replacement worker starts. A partition that raised an error is retried the same
way, on another worker where there is one. What finally failed ends the run with ``PartitionsFailed``, which
carries everything the other partitions measured. Results cross the pipe in the wire format
(``records.encode_result``).

Workers come from a fork server that has imported torch and this package once and never runs a model: a plain
fork of a process whose torch thread pools have started can hang, and spawning each worker afresh costs 3-4 s
of imports per worker on the 2-core dev VM (all of them at once on a wide node). The server is started before
the run's clock, as the driver's own imports are, and reused by later repeats; its start-up is recorded
(``fork_server_start_s``). Where there is no fork server (Windows), workers are spawned.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

from cai_bench import comm
from cai_bench.backends.base import BackendOption, BackendRun, Emit, Job, dispatched_run
from cai_bench.backends.cpu import lane_layout
from cai_bench.backends.dispatch import DEFAULT_RETRIES, Dispatcher, Event, Unit, drive
from cai_bench.backends.options import COMM_OPTIONS, LANES, RETRIES, RUNTIME, WORKERS
from cai_bench.backends.slurm import arrays
from cai_bench.backends.slurm import options as slurm_options
from cai_bench.comm import CommError
from cai_bench.core.choices import CPU_PRECISIONS
from cai_bench.core.errors import UserError, describe
from cai_bench.core.machine import default_threads
from cai_bench.core.plan import Plan, work_units
from cai_bench.core.records import decode_result, encode_result
from cai_bench.inference.gathering import CommConfig, config_for_run, finish_together, read_aggregate, record_of
from cai_bench.inference.loop import model_worker, prepare_model, worker_loop
from cai_bench.inference.runtime_choice import Layout
from cai_bench.inference.worker import EngineOptions, plan_options

NODE_OPTIONS = (
    WORKERS,
    RETRIES,
    LANES,
    RUNTIME,
    *COMM_OPTIONS,
)
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
    context.set_forkserver_preload(["cai_bench.backends.hpc", "cai_bench.inference.engine"])
    started = time.perf_counter()
    # The first process through a new server waits for its imports; later ones take milliseconds
    probe = context.Process(target=_noop, daemon=True)
    probe.start()
    probe.join()
    return context, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- worker process


def quiet_signals() -> None:
    """For a worker process: a Ctrl-C in the terminal reaches every process of the group, and SIGTERM too (SLURM
    sends it to every process of a job step at its time limit); the driver alone decides what stops, records
    what finished and stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_main(
    conn: Connection, worker_id: str, options: EngineOptions, weights: str | None, seed: int, intra: int,
    together: dict | None = None,
) -> None:  # fmt: skip
    """One hpc worker process: the worker loop over units asked of the driver over ``conn``; ``weights`` is what
    ``runtimes.model_for_workers`` made ready (an export, for the runtimes other than torch); ``together``: its
    part in the run's closing collectives (--comm)."""
    quiet_signals()
    if options.runtime == "torch":
        import torch  # only in a worker that runs the model through it

        torch.set_num_threads(intra)
    start, load, run = model_worker(worker_id, options, weights, seed)
    serve_pipe(conn, start, options, load=load, run=run, together=together and {**together, "worker": worker_id})


def finish_together_in_task(together: dict, kept: list) -> None:
    """The closing collectives of a node worker (``gathering``), once the driver said stop: rank 0 writes the
    aggregate, each rank what it recorded of them, to the run's folder, where the driver reads them after."""
    folder = Path(together["folder"])
    try:
        aggregate, info = finish_together(CommConfig.from_dict(together), together["rank"], kept)
    except CommError as exc:
        info, aggregate = {"rank": together["rank"], "error": str(exc)}, None
    info["worker"] = together["worker"]
    if aggregate is not None:
        (folder / "aggregate.npz.part").write_bytes(aggregate)
        (folder / "aggregate.npz.part").rename(folder / "aggregate.npz")
    (folder / f"rank-{together['rank']}.json").write_text(json.dumps(info))


def serve_pipe(conn: Connection, start, options: EngineOptions, together: dict | None = None, **loop) -> None:
    """Run ``engine.worker_loop`` with its units asked of the driver over ``conn``: what every worker process of
    a NodeTransport runs (``loop`` goes to the worker loop: the GPU worker's own load and run).

    To the driver: ("want", ahead), ("ready", weights, choices), ("done", unit, wire bytes), ("failed", unit,
    message), ("fatal", message) when start-up fails. From the driver: ("units", [(unit, ref), ...]), ("none",)
    to a read-ahead it cannot serve yet, ("stop",). With ``together`` (--comm) the worker keeps its results and,
    once stopped, joins the run's closing collectives.
    """
    stopped = False
    kept: list = []

    def done(unit: int, result) -> None:
        send(("done", unit, encode_result(result)))
        if together is not None:
            kept.append((unit, result))

    def send(message: tuple) -> None:
        try:
            conn.send(message)
        except OSError:
            raise _DriverGone() from None

    def started():
        worker = start()
        send(("ready", asdict(worker.weights), worker.choices))
        return worker

    def next_units(ahead: bool) -> list:
        nonlocal stopped
        if stopped:
            return []
        send(("want", ahead))
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            raise _DriverGone() from None
        stopped = reply[0] == "stop"
        return reply[1] if reply[0] == "units" else []

    try:
        worker = worker_loop(
            started,
            next_units,
            options,
            on_done=done,
            on_failed=lambda unit, error: send(("failed", unit, error)),
            **loop,
        )
    except _DriverGone:  # the driver stopped (Ctrl-C, SIGTERM): there is no one left to tell anything
        return
    except Exception as exc:  # only start-up raises here: a unit's error goes to on_failed
        with contextlib.suppress(OSError):
            conn.send(("fatal", describe(exc)))
        return
    if worker is not None:
        worker.close()
    if together is not None:
        finish_together_in_task(together, kept)


class _DriverGone(Exception):
    """The driver's end of the pipe closed."""


# ---------------------------------------------------------------------------------------------- transport


@dataclass
class _Process:
    process: multiprocessing.process.BaseProcess
    conn: Connection


@dataclass
class NodeTransport:
    """Worker processes on this node, each over its own pipe; a dead one is replaced while work remains."""

    plan: Plan
    workers_wanted: int
    context: multiprocessing.context.BaseContext
    # What each worker process runs: ``target(conn, worker_id, *args_for(n))`` for the n-th process started
    target: Callable = worker_main
    args_for: Callable[[int], tuple] = tuple
    prefix: str = "hpc"
    replace: bool = True  # start a replacement for a worker that died, while work remains
    stop_timeout_s: float = STOP_TIMEOUT_S  # how long stopped workers may take to end (--comm: their collectives)
    stopping: float | None = None  # when the dispatch ended and the workers were told to stop (perf_counter)
    stop_s: float = 0.0  # how long they took to end after that
    live: dict = field(default_factory=dict)  # worker id -> _Process
    exits: dict = field(default_factory=dict)  # worker id -> (pid, "signal 9" / "exit code 1")
    started: int = 0  # processes started, replacements included
    dispatched: float = field(default_factory=time.perf_counter)
    ready_after_s: list = field(default_factory=list)  # dispatch to each worker's "ready": process start, start-up

    def spawn(self, dispatcher: Dispatcher) -> None:
        worker_id = f"{self.prefix}-{self.started}"
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=self.target,
            args=(theirs, worker_id, *self.args_for(self.started)),
            name=f"cai-bench {worker_id}",
            daemon=True,
        )
        self.started += 1
        process.start()
        theirs.close()
        self.live[worker_id] = _Process(process, ours)
        dispatcher.join(worker_id)

    def start(self, dispatcher: Dispatcher) -> None:
        self.dispatched = time.perf_counter()
        for _ in range(min(self.workers_wanted, dispatcher.outstanding())):
            self.spawn(dispatcher)

    def _event(self, worker_id: str, message: tuple) -> Event:
        kind = message[0]
        if kind == "want":
            return Event("want", worker_id, ahead=message[1])
        if kind == "done":
            return Event("done", worker_id, position=message[1], result=decode_result(message[2]))
        if kind == "failed":
            return Event("failed", worker_id, position=message[1], error=message[2])
        if kind == "ready":
            self.ready_after_s.append(round(time.perf_counter() - self.dispatched, 3))
            return Event("ready", worker_id, info={"weights": message[1], "choices": message[2]})
        raise UserError(f"worker {worker_id} could not start: {message[1]}")  # "fatal"

    def _exited(self, worker_id: str) -> Event:
        worker = self.live.pop(worker_id)
        worker.process.join()
        worker.conn.close()
        code = worker.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.exits[worker_id] = (worker.process.pid, how)
        return Event("lost", worker_id, error=f"worker {worker_id} (pid {worker.process.pid}) died: {how}")

    def poll(self, timeout_s: float | None) -> list[Event]:
        by_object = {}
        for worker_id, worker in self.live.items():
            by_object[worker.conn] = worker_id
            by_object[worker.process.sentinel] = worker_id
        events = []
        for ready in wait(list(by_object), timeout_s):
            worker_id = by_object[ready]
            if worker_id not in self.live:
                continue  # its exit was handled with an earlier object of this round
            if ready is self.live[worker_id].conn:
                events += self._receive(worker_id, drain=False)
            else:  # its process ended: first what it sent before, so a finished partition is not run again
                events += self._receive(worker_id, drain=True)
                if worker_id in self.live:
                    events.append(self._exited(worker_id))
        return events

    def _receive(self, worker_id: str, drain: bool) -> list[Event]:
        """One message from the worker, or (``drain``) every message waiting."""
        conn, out = self.live[worker_id].conn, []
        try:
            while not drain or conn.poll():
                out.append(self._event(worker_id, conn.recv()))
                if not drain:
                    break
        except (EOFError, OSError):  # its end of the pipe closed: it is exiting
            out.append(self._exited(worker_id))
        return out

    def send(self, worker_id: str, units: list[Unit], ahead: bool) -> None:
        worker = self.live.get(worker_id)
        if worker is None:
            return
        with contextlib.suppress(OSError):  # it died meanwhile: its exit event returns the units
            worker.conn.send(("units", [(u.position, u.item) for u in units]) if units else ("none",))

    def after_exit(self, dispatcher: Dispatcher, worker_id: str) -> None:
        # A replacement keeps the node busy; at most as many as were asked for, so a worker that dies at
        # start-up every time cannot loop forever.
        if self.replace and dispatcher.outstanding() and self.started < 2 * self.workers_wanted:
            self.spawn(dispatcher)

    def abandon(self, worker_id: str) -> None:
        worker = self.live.get(worker_id)
        if worker is not None and worker.process.is_alive():
            worker.process.kill()

    def drive(self, dispatcher: Dispatcher) -> float:
        """Run the dispatcher's units on these processes; the wall clock, from dispatch to the last result. Each
        lost worker the dispatcher counted gets its pid and how its process ended."""
        start = time.perf_counter()
        drive(dispatcher, self)
        end = time.perf_counter()
        # The workers' stop comes after the last result: kept apart from the wall (with --comm it is their closing
        # collectives, whose time each rank records as comm_s)
        self.stop_s = end - (self.stopping or end)
        wall_s = (self.stopping or end) - start
        for crash in dispatcher.lost_workers:
            crash["worker_id"] = crash["worker"]
            crash["pid"], crash["exit"] = self.exits.get(crash["worker"], (None, None))
        return wall_s

    def stop(self, finished: bool) -> None:
        """Tell every worker to stop; whichever has not ended soon after is killed. A run cut short kills them at
        once: what they would still send has no reader."""
        self.stopping = time.perf_counter()
        for worker in self.live.values():
            with contextlib.suppress(OSError):  # already gone
                worker.conn.send(("stop",))
        deadline = time.monotonic() + (self.stop_timeout_s if finished else 0.0)
        for worker in self.live.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.live.clear()


def run_node(plan: Plan, emit: Emit) -> BackendRun:
    if plan.engine == "reference":
        raise UserError("--engine reference is the one-process upstream loop: run it with --backend cpu")
    workers, per_worker, lanes, intra = worker_threads(plan)
    retries = plan.backend_options.get("retries")
    dispatcher = Dispatcher(work_units(plan), emit, DEFAULT_RETRIES if retries is None else retries)
    context, server_s = worker_context()
    options = plan_options(plan, lanes, intra_threads=intra)
    model, prepared = prepare_model(plan.weights, options.runtime, plan.seed, options.precision)
    # The ranks are the processes that will start: no more than there are units (the transport starts no more)
    together = node_together(plan, min(workers, dispatcher.outstanding()))
    transport = NodeTransport(plan, workers, context, args_for=lambda n: (options, model, plan.seed, intra,
                                                                          together and together.rank(n)))  # fmt: skip
    if together is not None:
        transport.stop_timeout_s += together.config.timeout_s
    wall_s = transport.drive(dispatcher)  # to the last result: the workers' stop (their collectives) is apart
    info = {
        "threads_per_worker": per_worker,
        "lanes": lanes,
        "intra_op_threads": intra,
        "worker_processes_started": transport.started,
        "worker_ready_after_s": transport.ready_after_s,
        "prefetch_partitions": 1,
        "start_method": context.get_start_method(),
        "fork_server_start_s": server_s,
        "workers_stop_s": round(transport.stop_s, 6),
        **prepared,
        **({"comm": together.read()} if together is not None else {}),
    }
    return dispatched_run(plan, dispatcher, wall_s, info, workers=workers, threads=workers * per_worker)


@dataclass
class NodeTogether:
    """The driver's side of --comm on a node: the first ``workers`` processes (the dask backend: workers) are
    ranks 0..workers-1 (a replacement for one that died is none: the others name it missing and the units' own
    results stand), and the folder where rank 0's aggregate lands."""

    config: CommConfig
    folder: Path

    def rank(self, n: int) -> dict | None:
        if n >= self.config.world_size:
            return None
        return {**self.config.to_dict(), "rank": n, "folder": str(self.folder)}

    def read(self) -> dict:
        """What the record keeps: rank 0's aggregate summary (read once) and each rank's own account."""
        ranks = [json.loads(p.read_text()) for p in sorted(self.folder.glob("rank-*.json"))]
        aggregate, summary = self.folder / "aggregate.npz", None
        if aggregate.exists():
            _, summary = read_aggregate(aggregate.read_bytes())
        shutil.rmtree(self.folder, ignore_errors=True)
        return record_of(self.config, ranks, summary, aggregate_reads=int(summary is not None))


def node_together(plan: Plan, workers: int) -> NodeTogether | None:
    """The driver's side of --comm for ``workers`` ranks on this node (or any that see ``plan.work_dir``)."""
    config = config_for_run(plan.backend_options, workers, plan.work_dir)
    if config is None:
        return None
    folder = Path(tempfile.mkdtemp(prefix=f"cai-bench-{config.run_id}-", dir=plan.work_dir))
    return NodeTogether(config, folder)


@dataclass
class HpcBackend:
    name: str = "hpc"
    options: tuple[BackendOption, ...] = NODE_OPTIONS + slurm_options.OPTIONS
    precisions: tuple[str, ...] = CPU_PRECISIONS
    default_batch_size: int = 512

    def check(self, options: dict) -> None:
        if options.get("comm"):
            comm.check_urls(comm.split_urls(options["comm"]))
        if options.get("slurm"):
            slurm_options.check(options)
            return
        extra = [o for o in slurm_options.OPTIONS if o.name in options]
        if extra:
            raise UserError(f"{extra[0].flag} applies to SLURM arrays: add --slurm")

    def machine(self, plan: Plan) -> str | None:
        return slurm_options.machine(plan.backend_options) if plan.backend_options.get("slurm") else None

    def worker_layout(self, plan: Plan) -> Layout | None:
        """One worker process's lanes and threads, for --runtime auto's probe; None under --slurm, whose tasks run
        on nodes this driver cannot time."""
        if plan.backend_options.get("slurm"):
            return None
        _, _, lanes, intra = worker_threads(plan)
        return Layout(lanes, intra)

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        if plan.backend_options.get("slurm"):
            return arrays.run_array(plan, emit)
        return run_node(plan, emit)

    def check_detach(self, options: dict) -> None:
        if not options.get("slurm"):
            raise UserError("--no-wait submits a SLURM array: add --slurm")

    def submit(self, plan: Plan) -> Job:
        return arrays.submit(plan)

    def collect(self, job: Job, emit: Emit) -> BackendRun:
        return arrays.collect(job, emit)


def create() -> HpcBackend:
    return HpcBackend()
