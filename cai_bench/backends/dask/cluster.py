"""Where a dask run's workers come from: an embedded ``LocalCluster`` this process starts (and keeps for the
later repeats of the command), an existing scheduler it connects to and never starts, or workers that
dask-jobqueue submits to SLURM.

Every link is authenticated or stays on this machine: the embedded cluster (and the jobqueue one) speak TLS with
certificates made for the run (``Security.temporary``), listen on loopback and start no dashboard; an existing
scheduler is reached over ``tls://`` with Dask's own TLS settings, or over plain ``tcp://`` only on loopback.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cai_bench.core.errors import UserError, import_extra

LOOPBACK_NAMES = ("localhost",)


@dataclass
class Cluster:
    """A connected client and what the record says of where it came from."""

    client: Any
    kind: str  # "embedded", "scheduler" or "jobqueue-slurm"
    address: str  # the scheduler's, without credentials (a Dask address holds none)
    start_s: float  # seconds to start (or reach) it, before the run's clock
    key: tuple
    owned: Any = None  # the cluster object this process started, closed with it
    uses: int = 0  # runs (repeats, sweep points) that used it

    def close(self) -> None:
        self.client.close()
        if self.owned is not None:
            self.owned.close()


_OPEN: dict[str, Cluster] = {}  # the one open cluster of this process, kept for the command's later repeats


def close_clusters() -> None:
    """Close the cluster this process has open (at exit, or before its scheduler is stopped)."""
    for cluster in _OPEN.values():
        cluster.close()
    _OPEN.clear()


atexit.register(close_clusters)


def check_address(address: str) -> str:
    """A scheduler address the backend may use: tls:// anywhere (Dask's TLS settings authenticate it), tcp://
    only on loopback, where no other machine sees what passes."""
    parts = urlsplit(address)
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or parts.port is None:
        raise UserError(f"--scheduler {address!r}: give tcp://HOST:PORT or tls://HOST:PORT of a Dask scheduler")
    if parts.username or parts.password:
        raise UserError("--scheduler: an address holds no credentials; Dask's TLS settings authenticate tls://")
    if parts.scheme == "tcp" and not _loopback(parts.hostname):
        raise UserError(f"--scheduler {parts.scheme}://{parts.hostname}:{parts.port}: plain tcp:// is neither "
                        "encrypted nor authenticated, so it is taken on loopback only; use tls:// with Dask's TLS "
                        "settings (distributed.comm.tls.* in its configuration)")  # fmt: skip
    return f"{parts.scheme}://{parts.hostname}:{parts.port}"


def _loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cluster_for(options: dict, workers: int, preload: tuple[str, ...], wait_s: float) -> Cluster:
    """The cluster for a run with ``options``: the one already open where it matches, else a new one (the old
    one closed). ``workers`` and ``preload`` shape an embedded cluster only."""
    scheduler, jobqueue = options.get("scheduler"), options.get("dask_jobqueue")
    key = (scheduler, jobqueue, workers, preload, tuple(sorted((options.get("slurm_options") or {}).items())))
    cluster = _OPEN.get("cluster")
    if cluster is not None and cluster.key == key and cluster.client.status == "running":
        cluster.uses += 1
        return cluster
    close_clusters()
    import_extra("distributed", "dask", "--backend dask")
    began = time.perf_counter()
    if scheduler:
        client, owned, kind, address = _connect(scheduler, wait_s), None, "scheduler", scheduler
    elif jobqueue:
        client, owned = _jobqueue(options, workers, preload, wait_s)
        kind, address = f"jobqueue-{jobqueue}", owned.scheduler_address
    else:
        client, owned = _embedded(workers, preload)
        kind, address = "embedded", owned.scheduler_address
    cluster = Cluster(client, kind, address, time.perf_counter() - began, key, owned, uses=1)
    _OPEN["cluster"] = cluster
    return cluster


def _embedded(workers: int, preload: tuple[str, ...]) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster
    from distributed.security import Security

    security = Security.temporary()
    # Two task threads a worker: the running unit and the one read ahead (the plugin's lock runs one at a time)
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=2, processes=True, host="127.0.0.1", protocol="tls://",
        security=security, dashboard_address=None, scheduler_kwargs={"dashboard": False},
        silence_logs=logging.ERROR, preload=list(preload),
    )  # fmt: skip
    return Client(cluster, security=security, set_as_default=False), cluster


def _connect(address: str, wait_s: float) -> Any:
    from distributed import Client

    try:
        client = Client(address, timeout=f"{max(1.0, min(wait_s, 30.0))}s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise UserError(f"--scheduler {address}: no Dask scheduler answered there ({type(exc).__name__}); start one "
                        "(dask scheduler --host 127.0.0.1) or give its address") from None  # fmt: skip
    _await_workers(client, address, wait_s)
    return client


def _await_workers(client: Any, address: str, wait_s: float) -> None:
    try:
        client.wait_for_workers(1, timeout=wait_s)
    except TimeoutError:
        client.close()
        raise UserError(f"the Dask scheduler at {address} has no worker after {wait_s:g} s: start some (dask worker "
                        f"{address}) or raise --dask-wait-s") from None  # fmt: skip


def _jobqueue(options: dict, workers: int, preload: tuple[str, ...], wait_s: float) -> tuple[Any, Any]:
    jobqueue = import_extra("dask_jobqueue", "dask-jobqueue", "--dask-jobqueue slurm")
    from distributed import Client
    from distributed.security import Security

    security = Security.temporary()
    threads = max(1, int(options.get("threads_per_worker") or 1))
    cluster = jobqueue.SLURMCluster(
        cores=threads, processes=1, memory=f"{options.get('mem_gb') or 4}GB", walltime=_walltime(options),
        queue=options.get("slurm_partition"), security=security, protocol="tls://",
        scheduler_options={"host": "127.0.0.1", "dashboard_address": None},
        worker_extra_args=[f"--nthreads={2}", *(f"--preload={p}" for p in preload)],
        job_extra_directives=[f"--{k}={v}" for k, v in (options.get("slurm_options") or {}).items()],
        name="cai-bench", shared_temp_directory=options.get("work_dir"), silence_logs=logging.ERROR,
    )  # fmt: skip
    cluster.scale(jobs=workers)
    client = Client(cluster, security=security, set_as_default=False)
    _await_workers(client, cluster.scheduler_address, wait_s)
    return client, cluster


def _walltime(options: dict) -> str:
    minutes = int(options.get("time_min") or 30)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"
