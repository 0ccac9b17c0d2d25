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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cai_bench.core.errors import UserError, describe, import_extra

LOOPBACK_NAMES = ("localhost",)
# What Dask's nanny sets in a worker's environment before it starts it, and the workers this backend starts go
# without, as an hpc node's do: MALLOC_TRIM_THRESHOLD_ turns off glibc's adaptive mmap threshold, so every large
# tensor is a fresh mmap whose pages fault in again (the model ran 1.7x slower for it on a 2-vCPU AMD EPYC); the
# thread counts are the run's own (--threads), which each runtime sets
NANNY_ENVIRON = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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
    key = (scheduler, jobqueue, workers, preload, options.get("threads_per_job"), options.get("dask_host"))
    cluster = _OPEN.get("cluster")
    if cluster is not None and cluster.key == key and cluster.client.status == "running":
        cluster.uses += 1
        return cluster
    close_clusters()
    import_extra("distributed", "dask", "--backend dask")
    # After distributed's own exit handlers, so that ours runs first (they run last in, first out): the cluster is
    # closed while its event loop still runs, and its workers stop without a word
    atexit.unregister(close_clusters)
    atexit.register(close_clusters)
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
    import dask
    from distributed import Client, LocalCluster
    from distributed.security import Security

    security = Security.temporary()
    unset = {f"distributed.nanny.pre-spawn-environ.{name}": None for name in NANNY_ENVIRON}
    # Two task threads a worker: the running unit and the one read ahead (the plugin's lock runs one at a time)
    with dask.config.set(unset):
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=2, processes=True, host="127.0.0.1", protocol="tls://",
            security=security, dashboard_address=None, scheduler_kwargs={"dashboard": False},
            silence_logs=logging.ERROR, preload=list(preload),
        )  # fmt: skip
    return Client(cluster, security=security, set_as_default=False), cluster


def _connect(address: str, wait_s: float) -> Any:
    from distributed import Client

    # A scheduler that goes away is said in one line of ours (transport.py), not in the client's own log lines
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)

    try:
        client = Client(address, timeout=f"{max(1.0, min(wait_s, 30.0))}s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise UserError(f"--scheduler {address}: no Dask scheduler answered there ({type(exc).__name__}); start one "
                        "(dask scheduler --host 127.0.0.1) or give its address") from None  # fmt: skip
    _await_workers(client, address, wait_s)
    return client


def _await_workers(client: Any, address: str, wait_s: float, how: str | None = None) -> None:
    try:
        client.wait_for_workers(1, timeout=wait_s)
    except TimeoutError:
        client.close()
        how = how or f"start some (dask worker {address})"
        raise UserError(f"the Dask scheduler at {address} has no worker after {wait_s:g} s: {how}, or raise "
                        "--dask-wait-s") from None  # fmt: skip


def _jobqueue(options: dict, workers: int, preload: tuple[str, ...], wait_s: float) -> tuple[Any, Any]:
    """``workers`` Dask workers as SLURM jobs through dask-jobqueue, one worker process a job, TLS between them
    with certificates made for the run (the workers read them from a folder only this user can read, removed
    with the cluster). The queue, account, memory and time limit come from dask-jobqueue's own configuration
    (jobqueue.slurm.* in Dask's settings), as for any dask-jobqueue user; the scheduler listens on loopback
    (a one-node cluster) unless --dask-host names the address the jobs reach it at."""
    jobqueue = import_extra("dask_jobqueue", "dask-jobqueue", "--dask-jobqueue slurm")
    import dask
    from distributed import Client

    secrets = tempfile.mkdtemp(prefix="cai-bench-dask-", dir=options.get("work_dir"))  # mode 0700
    cores = max(1, int(options.get("threads_per_job") or 1))
    try:
        cluster = jobqueue.SLURMCluster(
            cores=cores, processes=1, memory=dask.config.get("jobqueue.slurm.memory", None) or "4GiB",
            security=True, shared_temp_directory=secrets, protocol="tls://", silence_logs="error",
            scheduler_options={"host": options.get("dask_host") or "127.0.0.1", "dashboard": False},
            worker_extra_args=[*(f"--preload={module}" for module in preload), *_worker_host(options)],
            name="cai-bench", job_script_prologue=[f"export {_unset_in_job(name)}=None" for name in NANNY_ENVIRON],
            # The jobs' own output beside the run's results, not in whatever directory the command ran from
            log_directory=str(Path(options.get("work_dir") or tempfile.gettempdir()) / "dask-jobqueue-logs"),
        )  # fmt: skip
    except Exception as exc:  # dask-jobqueue's own refusal of its configuration: one line, not a traceback
        shutil.rmtree(secrets, ignore_errors=True)
        raise UserError(f"--dask-jobqueue slurm: dask-jobqueue refused its settings ({describe(exc)})") from None
    owned = _Owned(cluster, secrets)
    cluster.scale(jobs=workers)
    client = Client(cluster, security=cluster.security, set_as_default=False)
    try:
        _await_workers(client, cluster.scheduler_address, wait_s, "see whether its jobs are pending (squeue)")
    except UserError:
        owned.close()  # its jobs cancelled, its certificates removed
        raise
    return client, owned


def _unset_in_job(name: str) -> str:
    """The variable that tells a job's nanny (Dask reads its settings from DASK_* variables) to leave ``name``
    unset in its worker's environment."""
    return f"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__{name}"


def _worker_host(options: dict) -> list[str]:
    """Where a job's worker listens: loopback beside a scheduler on loopback (the jobs run on this node)."""
    return [] if options.get("dask_host") else ["--host", "127.0.0.1"]


@dataclass
class _Owned:
    """A jobqueue cluster and the folder of its certificates, closed and removed together."""

    cluster: Any
    secrets: str

    @property
    def scheduler_address(self) -> str:
        return self.cluster.scheduler_address

    def close(self) -> None:
        self.cluster.close()
        shutil.rmtree(self.secrets, ignore_errors=True)
