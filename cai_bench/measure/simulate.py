"""A discrete-event simulation of a run from measured behaviour: how long its work units take, drawn from a
profile, and how they queue on the workers a backend can have at once.

One model for every backend (``docs/estimate.md`` says what it assumes and where it stops being right):

- A unit of ``n`` samples takes ``unit_overhead + typical * n * f + excess * f + read``, where ``typical`` is the
  profile's median compute seconds per sample, ``excess`` one measured unit's compute beyond ``typical`` times its
  own samples (a straggler's delay, which does not grow with the unit's size), ``f`` how much slower the target's
  CPU share is than the profile's, and ``read`` the same unit's seconds per byte times its bytes, or, where the
  workers at once share a read bandwidth, their share of it if that is slower.
- Workers are created at a rate: the ``k``-th not before ``(k // create_every) * create_s`` (Lambda's scaling
  rate, a scheduler's launch rate), and at most ``slots`` exist at once. A worker's first unit pays a cold
  start drawn from the profile's.
- Two ways to hand out units, the two ways the backends run:
  - ``reuse`` (Lambda, a node's worker processes): units go in order, each to whichever comes first, a free
    worker (warm) or a new one the rate and the cap allow (cold); a worker lives to the end of the run.
  - ``groups`` (a SLURM array): each task is given its group of units, runs them one after another and ends; a
    task starts once the launch rate allows it and one of the ``slots`` that run at once is free. Every task is
    cold.
- The run's wall is the last unit's end plus a per-run overhead.

Pure numpy and heapq: it imports nothing of the tool, so any layer may use it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Profile:
    """How long units take, as measured: per-unit arrays drawn together (one measured unit's excess and load
    rate), cold starts drawn apart."""

    name: str
    compute_s_per_sample: float  # typical (median) compute seconds per sample
    compute_excess_s: np.ndarray  # per measured unit: compute beyond typical * its samples
    load_s_per_byte: np.ndarray  # per measured unit, the same units in the same order
    cold_s: np.ndarray  # per measured worker start
    unit_overhead_s: float = 0.0  # per unit: time the unit records do not hold (calibrated where unmeasured)
    run_overhead_s: float = 0.0  # per run: what the wall holds beyond its units (calibrated)
    cpu_share: float | None = None  # the CPUs a slot of the profile computed on (Lambda: from its memory size)
    facts: dict = field(default_factory=dict)  # where it came from: runs, records, machine, memory

    def __post_init__(self):
        if len(self.compute_excess_s) != len(self.load_s_per_byte) or len(self.compute_excess_s) == 0:
            raise ValueError("a profile needs one excess and one load rate per measured unit, and at least one unit")
        if len(self.cold_s) == 0:
            raise ValueError("a profile needs at least one cold start (0 where none was measured)")


@dataclass(frozen=True)
class Scenario:
    """The run to simulate: its units' sizes and where they can run."""

    unit_samples: np.ndarray  # samples per unit, in dispatch order
    bytes_per_sample: int
    slots: int  # workers at once (Lambda: min of the concurrency quota and the Map's; hpc: tasks; gpu: devices)
    create_every: int = 0  # workers that may be created per step (0: all at once)
    create_s: float = 0.0  # seconds per step
    compute_factor: float = 1.0  # target compute time over the profile's (CPU share)
    groups: tuple[int, ...] | None = None  # a SLURM array: units per task, in order (None: workers are reused)
    shared_read_bytes_per_s: float | None = None  # what the workers at once read together at most (None: no cap)

    def __post_init__(self):
        if self.slots < 1:
            raise ValueError("a scenario needs at least one slot")
        if len(self.unit_samples) == 0:
            raise ValueError("a scenario needs at least one unit")
        if self.groups is not None and (sum(self.groups) != len(self.unit_samples) or min(self.groups) < 1):
            raise ValueError("an array's groups must hold every unit, at least one each")

    @property
    def items(self) -> int:
        """What is handed out: units to reused workers, groups to array tasks."""
        return len(self.unit_samples) if self.groups is None else len(self.groups)


@dataclass(frozen=True)
class Simulated:
    """Per trial: the wall, every unit's duration summed with the cold starts (what workers were busy), the same
    rounded up to the millisecond per invocation (as Lambda bills), and how many workers were created."""

    wall_s: np.ndarray
    busy_s: np.ndarray
    billed_ms: np.ndarray
    created: np.ndarray
    units: int
    slots: int


def creation_times(count: int, every: int, step_s: float) -> np.ndarray:
    """When the ``k``-th worker may be created, for k < count: ``every`` more every ``step_s`` seconds (all at 0
    with no rate)."""
    index = np.arange(count)
    if every <= 0 or step_s <= 0:
        return np.zeros(count)
    return (index // every) * float(step_s)


def unit_durations(profile: Profile, scenario: Scenario, rng: np.random.Generator, trials: int) -> np.ndarray:
    """``[trials, units]`` warm durations: each unit's time from one measured unit drawn at random."""
    samples = np.asarray(scenario.unit_samples, dtype=np.float64)
    drawn = rng.integers(0, len(profile.compute_excess_s), size=(trials, len(samples)))
    factor = scenario.compute_factor
    compute = profile.compute_s_per_sample * samples * factor + profile.compute_excess_s[drawn] * factor
    nbytes = samples * scenario.bytes_per_sample
    load = profile.load_s_per_byte[drawn] * nbytes
    if scenario.shared_read_bytes_per_s:  # the workers at once divide the shared bandwidth between them
        together = min(scenario.slots, scenario.items)
        load = np.maximum(load, nbytes * together / scenario.shared_read_bytes_per_s)
    return np.maximum(compute, 0.0) + load + profile.unit_overhead_s


def simulate(profile: Profile, scenario: Scenario, trials: int, seed: int) -> Simulated:
    """``trials`` runs of ``scenario``; the same seed gives the same draws, so the same answer, and the draws do
    not depend on the slots: two scenarios that differ only in them see the same units and cold starts."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    rng = np.random.default_rng(seed)
    durations = unit_durations(profile, scenario, rng, trials)
    cold = profile.cold_s[rng.integers(0, len(profile.cold_s), size=(trials, scenario.items))]
    create = creation_times(min(scenario.slots, scenario.items) if scenario.groups is None else scenario.items,
                            scenario.create_every, scenario.create_s)  # fmt: skip
    if scenario.groups is None:
        runs = [_reused(durations[t], cold[t], create) for t in range(trials)]
    else:
        bounds = np.cumsum((0, *scenario.groups))
        per_task = np.add.reduceat(durations, bounds[:-1], axis=1)
        runs = [_array(per_task[t], cold[t], create, scenario.slots) for t in range(trials)]
    ends, cold_used, created = (np.array(column) for column in zip(*runs, strict=True))
    busy = durations.sum(axis=1) + cold_used
    # Billed per invocation, each unit's duration rounded up to the millisecond (rounding their sum once would miss
    # up to 1 ms per unit); the cold starts are added rounded up together, within 1 ms a run of rounding each
    billed = np.ceil(durations * 1000.0).sum(axis=1) + np.ceil(cold_used * 1000.0)
    return Simulated(ends + profile.run_overhead_s, busy, billed, created, len(scenario.unit_samples),
                     min(scenario.slots, scenario.items))  # fmt: skip


def _reused(durations: np.ndarray, cold: np.ndarray, create: np.ndarray) -> tuple[float, float, int]:
    """One trial with reused workers: the last end, the cold starts paid, and the workers created. Each unit in
    order takes a free worker, else a new one where the rate and the cap allow it sooner (on AWS a request
    that finds no free environment starts a new one if it may, whatever a busy one's end would have been)."""
    if len(create) >= len(durations) and not create.any():  # every unit its own worker, all at once
        return float((cold + durations).max()), float(cold.sum()), len(durations)
    free: list[float] = []
    created, cold_paid, last = 0, 0.0, 0.0
    limit, push, replace = len(create), heapq.heappush, heapq.heapreplace
    for index, duration in enumerate(durations.tolist()):
        warm_at = free[0] if free else math.inf
        new_at = create[created] if created < limit else math.inf
        if warm_at <= new_at:
            end = warm_at + duration
            replace(free, end)
        else:
            start_cold = float(cold[index])
            end = new_at + start_cold + duration
            push(free, end)
            created, cold_paid = created + 1, cold_paid + start_cold
        last = end if end > last else last
    return last, cold_paid, created


def _array(per_task: np.ndarray, cold: np.ndarray, create: np.ndarray, slots: int) -> tuple[float, float, int]:
    """One trial of an array: task ``j`` starts once it is launched and one of ``slots`` is free, cold, and runs
    its group of units; the last end, the cold starts, and the tasks."""
    free = [0.0] * min(slots, len(per_task))
    last = 0.0
    for task, duration in enumerate(per_task.tolist()):
        start = max(free[0], float(create[task]))
        end = start + float(cold[task]) + duration
        heapq.heapreplace(free, end)
        last = max(last, end)
    return last, float(cold.sum()), len(per_task)
