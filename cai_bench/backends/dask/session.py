"""What a Dask worker process runs for a cai-bench run: a worker plugin holding the model for the run, started
once per worker process on its first unit, and the task that runs one unit through the one worker loop.

This module imports ``distributed`` (the ``dask`` extra) and is imported only where a dask run starts, and by
the Dask workers themselves when they unpickle the plugin and the task.

A worker process may run two of a run's tasks at once (the running unit and one read ahead, which the driver
hands it while at least as many units wait as there are workers): each task reads its partition in the worker
loop's reader thread, and the plugin's compute lock lets one partition through the model at a time, so the
read-ahead unit's reading overlaps the other's compute, as in an hpc node process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict
from typing import Any

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from cai_bench.backends.dask.cluster import NANNY_ENVIRON
from cai_bench.backends.hpc import finish_together_in_task
from cai_bench.core.errors import describe
from cai_bench.core.plan import PartitionRef
from cai_bench.core.records import encode_result
from cai_bench.inference.loop import loop_functions, model_worker, units_from, worker_loop
from cai_bench.inference.worker import EngineOptions


class ModelPlugin(WorkerPlugin):
    """One run's model on one Dask worker process: ``run_unit`` starts it on the worker's first unit (its start-up
    charged to that unit, as every worker's is) and every later unit of the run uses it; ``teardown`` (the driver
    unregisters the plugin when the run ends) closes it, so a long-lived cluster keeps no model between runs."""

    def __init__(self, name: str, options: EngineOptions, model: str | None, seed: int, intra_threads: int,
                 keep: bool = False):  # fmt: skip
        self.name = name  # a fresh name per run: a worker never mixes two runs' models
        self.options = options
        self.model = model
        self.seed = seed
        self.intra_threads = intra_threads
        self.keep = keep  # --comm: each worker keeps its results for the closing collectives
        self._state: dict[str, Any] = {}

    def setup(self, worker) -> None:
        # Locks cannot travel with the pickled plugin: each worker process makes its own
        self._state = {"start": threading.Lock(), "compute": threading.Lock(), "worker": None, "reported": False,
                       "kept": []}  # fmt: skip

    def teardown(self, worker) -> None:
        started = self._state.get("worker")
        if started is not None:
            started.close()
        self._state.clear()

    def started(self, label: str):
        """The worker's model, started once (by whichever of its tasks comes first; the other waits)."""
        with self._state["start"]:
            if self._state["worker"] is None:
                if self.options.runtime == "torch":
                    import torch  # only in a worker that runs the model through it

                    torch.set_num_threads(self.intra_threads)
                start, _, _ = model_worker(label, self.options, self.model, self.seed)
                self._state["worker"] = start()
            return self._state["worker"]

    def ready_info(self) -> dict | None:
        """What the worker chose at start-up, sent with its first result only."""
        if self._state["reported"]:
            return None
        self._state["reported"] = True
        worker = self._state["worker"]
        environ = {name: os.environ[name] for name in NANNY_ENVIRON if name in os.environ}
        return {"weights": asdict(worker.weights), "choices": worker.choices, "pid": os.getpid(), "environ": environ}

    def run(self, label: str, position: int, ref: PartitionRef) -> tuple:
        """One unit through the worker loop: ("done", wire bytes, ready info or None), ("failed", message), or
        ("fatal", message) when the model could not start here.

        The loop starts reading the partition first, then calls ``start``, which waits for the model to be free:
        a unit read ahead reads while the other runs, and its wait is only what remains of its read once the
        model is free, as in the loop of an hpc node process."""
        outcome: list[tuple] = []
        compute = self._state["compute"]
        held = []

        def start():
            compute.acquire()
            held.append(True)
            return self.started(label)

        load, run = loop_functions(self.options)
        try:
            worker_loop(
                start,
                units_from([(position, ref)]),
                self.options,
                on_done=lambda unit, result: self._done(outcome, unit, result),
                on_failed=lambda _, error: outcome.append(("failed", error)),
                load=load,
                run=run,
            )
        except Exception as exc:  # only start-up raises here: the model, weights or runtime of this worker
            return ("fatal", describe(exc))
        finally:
            if held:
                compute.release()
        return outcome[0]

    def _done(self, outcome: list, unit: int, result) -> None:
        outcome.append(("done", encode_result(result), self.ready_info()))
        if self.keep:
            self._state["kept"].append((unit, result))

    def finish(self, label: str, together: dict) -> None:
        """This worker's part in the run's closing collectives (--comm), as an hpc node process takes it."""
        finish_together_in_task({**together, "worker": label}, self._state.get("kept", []))


def run_unit(plugin_name: str, label: str, position: int, ref: PartitionRef) -> tuple:
    """The task the driver submits for one unit, restricted to the worker it handed the unit to."""
    return get_worker().plugins[plugin_name].run(label, position, ref)


def finish_unit(plugin_name: str, label: str, together: dict) -> None:
    """The task each ranked worker gets once every unit is done: its closing collectives."""
    get_worker().plugins[plugin_name].finish(label, together)
