"""``dask``: the run's partitions as Dask tasks, one per unit, on the workers of a Dask cluster: an embedded
``LocalCluster`` (``--workers`` processes, one per core by default, ``--threads`` split between them), an existing
scheduler (``--scheduler``; none is started) or workers that dask-jobqueue submits to SLURM (``--dask-jobqueue
slurm``). The dispatcher, the worker loop, the runtimes and the records are every backend's; this package adds
where the workers come from (``cluster.py``), the transport (``transport.py``) and what a worker process holds
for a run (``session.py``: the model, started once per worker process by a worker plugin).

Nothing here imports Dask until a dask run starts, so listing the flags needs no ``dask`` extra.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

from cai_bench import comm
from cai_bench.backends.base import BackendOption, BackendRun, Emit, dispatched_run
from cai_bench.backends.cpu import lane_layout
from cai_bench.backends.dask.cluster import Cluster, check_address, cluster_for
from cai_bench.backends.dask.transport import DaskTransport
from cai_bench.backends.dispatch import DEFAULT_RETRIES, Dispatcher, drive
from cai_bench.backends.hpc import NodeTogether, node_together
from cai_bench.backends.options import COMM_OPTIONS, LANES, RETRIES, RUNTIME, WORKERS
from cai_bench.core.choices import CPU_PRECISIONS
from cai_bench.core.errors import UserError, describe
from cai_bench.core.machine import default_threads
from cai_bench.core.plan import Plan, work_units
from cai_bench.inference.loop import prepare_model
from cai_bench.inference.runtime_choice import Layout
from cai_bench.inference.worker import plan_options

SCHEDULER = BackendOption(
    "scheduler", str, "dask: the address of a running Dask scheduler (tcp://127.0.0.1:PORT on loopback, or "
    "tls://HOST:PORT with Dask's TLS settings): its workers run the partitions, and none is started.", None,
    sweepable=False, parse=check_address,
)  # fmt: skip
JOBQUEUE = BackendOption(
    "dask_jobqueue", str, "dask: start --workers Dask workers as batch jobs through dask-jobqueue (the "
    "dask-jobqueue extra) instead of on this machine.", None, choices=("slurm",), sweepable=False,
)  # fmt: skip
WAIT = BackendOption(
    "dask_wait_s", float, "dask: seconds to wait for a first worker to join, and for another when none is left.",
    60.0, minimum=1.0, identity=False, sweepable=False,
)  # fmt: skip
HOST = BackendOption(
    "dask_host", str, "dask --dask-jobqueue: the address the scheduler listens on, where the batch jobs reach it "
    "(TLS); loopback by default, which only jobs on this node reach.", "127.0.0.1", identity=False, sweepable=False,
)  # fmt: skip
DASK_OPTIONS = (WORKERS, SCHEDULER, JOBQUEUE, HOST, WAIT, RETRIES, LANES, RUNTIME, *COMM_OPTIONS)


def _threads_per_worker(plan: Plan, workers: int, present: dict | None = None) -> int:
    """The threads each worker's model runs on: --threads split between the workers; without it, on this
    machine its cores split the same way, and on a cluster of workers started elsewhere the fewest any of them
    was started with (``dask worker --nthreads``)."""
    if plan.threads:
        return max(1, plan.threads // workers)
    if present:
        return max(1, min(int(w.get("nthreads") or 1) for w in present.values()))
    return max(1, default_threads() // workers)


def _preload(runtime: str) -> tuple[str, ...]:
    """What an embedded worker process imports as it starts, before the run's clock, as the hpc fork server
    does: the engine (torch) or the runtimes."""
    return ("cai_bench.inference.engine",) if runtime == "torch" else ("cai_bench.inference.runtimes",)


def _workers_and_wait(plan: Plan) -> tuple[int, float]:
    """--workers (one per core by default) and --dask-wait-s as the run takes them."""
    options = plan.backend_options
    return options.get("workers") or default_threads(), options.get("dask_wait_s") or WAIT.default


def _cluster(plan: Plan) -> Cluster:
    """The run's cluster: the one this process already has open for the same options, or a new one."""
    options = plan.backend_options
    workers, wait_s = _workers_and_wait(plan)
    preload = _preload(options.get("runtime") or "torch")
    per_job = max(1, plan.threads // workers) if plan.threads else 1  # jobqueue's: cores each job asks for
    return cluster_for({**options, "work_dir": plan.work_dir, "threads_per_job": per_job}, workers, preload, wait_s)


def run_dask(plan: Plan, emit: Emit) -> BackendRun:
    from cai_bench.backends.dask import session  # distributed (the dask extra): only where a dask run starts

    if plan.engine == "reference":
        raise UserError("--engine reference is the one-process upstream loop: run it with --backend cpu")
    options = plan.backend_options
    workers, wait_s = _workers_and_wait(plan)
    cluster = _cluster(plan)
    present = cluster.client.scheduler_info(n_workers=-1)["workers"] if cluster.kind != "embedded" else None
    per_worker = _threads_per_worker(plan, len(present) if present else workers, present)
    lanes, intra = (1, per_worker) if plan.compile else lane_layout(per_worker, options.get("lanes"))
    engine_options = plan_options(plan, lanes, intra_threads=intra)
    model, prepared = prepare_model(plan.weights, engine_options.runtime, plan.seed, engine_options.precision)
    retries = options.get("retries")
    dispatcher = Dispatcher(work_units(plan), emit, DEFAULT_RETRIES if retries is None else retries)
    # The ranks of --comm: the workers the run starts with (no more than there are units)
    started_with = len(present) if present else workers
    together = node_together(plan, min(started_with, dispatcher.outstanding()))
    plugin = session.ModelPlugin(f"cai-bench-{uuid.uuid4().hex[:12]}", engine_options, model, plan.seed, intra,
                                 keep=together is not None)  # fmt: skip
    transport = DaskTransport(cluster.client, plugin.name, session.run_unit, wait_s)
    start = time.perf_counter()
    try:
        _register(cluster, plugin)
        drive(dispatcher, transport)
        wall_s = time.perf_counter() - start
        stop_s = _finish_together(transport, session.finish_unit, together) if together is not None else 0.0
    finally:
        _unregister(cluster, plugin.name)
    info = {
        "dask": _dask_info(cluster, transport),
        "threads_per_worker": per_worker,
        "lanes": lanes,
        "intra_op_threads": intra,
        "prefetch_partitions": 1,
        "workers_stop_s": round(stop_s, 6),
        **prepared,
        **({"comm": together.read()} if together is not None else {}),
    }
    ran = len(transport.workers)
    return dispatched_run(plan, dispatcher, wall_s, info, workers=ran, threads=ran * per_worker)


def _finish_together(transport: DaskTransport, task, together: NodeTogether) -> float:
    """After the last result: each ranked worker still there joins the closing collectives (a task of its own);
    the seconds they took, kept apart from the wall as an hpc node's workers' stop is. A rank that left is named
    missing by the others, whose deadline ends the wait."""
    began = time.perf_counter()
    futures = []
    for rank in range(together.config.world_size):
        label = f"dask-{rank}"  # numbered as they joined: the first ones are the workers the run started with
        address = transport.workers.get(label, {}).get("address")
        if address in transport.labels:
            futures.append(transport.client.submit(
                task, transport.plugin_name, label, together.rank(rank),
                workers=[address], allow_other_workers=False, pure=False,
            ))  # fmt: skip
    deadline = time.monotonic() + together.config.timeout_s + 30
    for future in futures:
        with contextlib.suppress(Exception):  # a rank that fails or dies: its account says so, or its absence does
            future.result(timeout=max(0.0, deadline - time.monotonic()))
    transport.client.cancel([f for f in futures if not f.done()])
    return time.perf_counter() - began


def _register(cluster: Cluster, plugin) -> None:
    try:
        cluster.client.register_plugin(plugin)
    except Exception as exc:  # a worker without cai-bench, or of another version: it cannot unpickle the plugin
        raise UserError(f"the Dask workers at {cluster.address} cannot take cai-bench's worker plugin "
                        f"({describe(exc)}): install this cai-bench where they run") from None  # fmt: skip


def _unregister(cluster: Cluster, name: str) -> None:
    """Each worker closes the run's model (the plugin's teardown): a long-lived cluster keeps none."""
    with contextlib.suppress(Exception):  # a worker gone meanwhile, a cluster stopping: nothing left to free there
        cluster.client.unregister_worker_plugin(name)


def _dask_info(cluster: Cluster, transport: DaskTransport) -> dict:
    """What the record keeps of the cluster: the scheduler, every worker the run had (by the name its units'
    records carry), and how long the cluster took to start or reach (before the clock)."""
    from distributed import __version__

    return {
        "cluster": cluster.kind,
        "scheduler": cluster.address,
        "cluster_start_s": round(cluster.start_s, 3),
        "cluster_reused": cluster.uses > 1,  # started for an earlier repeat of this command
        "workers": transport.workers,
        "distributed": __version__,
    }


@dataclass
class DaskBackend:
    name: str = "dask"
    options: tuple[BackendOption, ...] = DASK_OPTIONS
    precisions: tuple[str, ...] = CPU_PRECISIONS
    default_batch_size: int = 512

    def check(self, options: dict) -> None:
        if options.get("comm"):
            comm.check_urls(comm.split_urls(options["comm"]))
        if options.get("scheduler"):  # a preset's too, which no command line parsed
            check_address(options["scheduler"])
        if options.get("scheduler") and options.get("dask_jobqueue"):
            raise UserError("--scheduler uses a running cluster and --dask-jobqueue starts one: give one of them")
        if options.get("scheduler") and options.get("workers"):
            raise UserError("--workers: a --scheduler's workers are those it has; start more with dask worker")
        if options.get("dask_host") and not options.get("dask_jobqueue"):
            raise UserError("--dask-host is where a --dask-jobqueue scheduler listens: add --dask-jobqueue")

    def machine(self, plan: Plan) -> str | None:
        """Where the workers run, known before they run: this machine for an embedded cluster or a scheduler on
        loopback, the scheduler for any other, the batch system for jobqueue's."""
        options = plan.backend_options
        if options.get("dask_jobqueue"):
            return f"dask-jobqueue | {options['dask_jobqueue']}"
        scheduler = options.get("scheduler")
        if scheduler and not scheduler.startswith("tcp://"):
            return f"dask | {scheduler}"
        return None

    def worker_layout(self, plan: Plan) -> Layout | None:
        """One embedded worker's lanes and threads, for --runtime auto's probe; None where the workers are not
        this machine's processes of known threads (a scheduler's, jobqueue's)."""
        options = plan.backend_options
        if options.get("scheduler") or options.get("dask_jobqueue"):
            return None
        per_worker = _threads_per_worker(plan, options.get("workers") or default_threads())
        lanes, intra = lane_layout(per_worker, options.get("lanes"))
        return Layout(lanes, intra)

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        return run_dask(plan, emit)

    def catalogue_computing(self, plan: Plan):
        """Where predict's HATS catalogue is written: by the workers of the run's cluster, its client made the
        current one while lsdb computes its writing tasks (the output directory must be one they see, as the data
        set is)."""
        return _cluster(plan).client.as_current()


def create() -> DaskBackend:
    return DaskBackend()
