"""A discrete-event simulation of a run from measured behaviour: how long its work units take, drawn from a
profile, and how they queue on the workers a backend can have at once.

One model for every backend (``docs/estimate.md`` says what it assumes and where it stops being right):

- A unit of ``n`` samples takes ``unit_overhead + typical * n * f + excess * f + load_rate * bytes``, where
  ``typical`` is the profile's median compute seconds per sample, ``excess`` one measured unit's compute beyond
  ``typical`` times its own samples (a straggler's delay, which does not grow with the unit's size), ``load_rate``
  the same unit's seconds per byte read, and ``f`` how much slower the target's CPU share is than the profile's.
- The first unit a worker runs also pays a cold start drawn from the profile's cold starts; later ones are warm.
- Workers are slots: ``slots`` at most at once, slot ``k`` available from ``(k // ramp_every) * ramp_s`` (Lambda's
  scaling rate), each unit given to the slot that frees first, in order, as the dispatcher does.
- The run's wall is the last unit's end plus a per-run overhead.

Pure numpy and heapq: it imports nothing of the tool, so any layer may use it.
"""

from __future__ import annotations

import heapq
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
    ramp_every: int = 0  # slots that may start per ramp step (0: all at once)
    ramp_s: float = 0.0  # seconds per ramp step
    compute_factor: float = 1.0  # target compute time over the profile's (CPU share)

    def __post_init__(self):
        if self.slots < 1:
            raise ValueError("a scenario needs at least one slot")
        if len(self.unit_samples) == 0:
            raise ValueError("a scenario needs at least one unit")


@dataclass(frozen=True)
class Simulated:
    """Per trial: the wall, every unit's duration summed, and every unit's duration rounded up to the millisecond
    (as Lambda bills), summed."""

    wall_s: np.ndarray
    busy_s: np.ndarray
    billed_ms: np.ndarray
    units: int
    slots: int


def slot_starts(slots: int, ramp_every: int, ramp_s: float) -> np.ndarray:
    """When each slot may take its first unit: ``ramp_every`` more every ``ramp_s`` seconds (all at 0 with no ramp)."""
    index = np.arange(slots)
    if ramp_every <= 0 or ramp_s <= 0:
        return np.zeros(slots)
    return (index // ramp_every) * float(ramp_s)


def unit_durations(profile: Profile, scenario: Scenario, rng: np.random.Generator, trials: int) -> np.ndarray:
    """``[trials, units]`` warm durations: each unit's time from one measured unit drawn at random."""
    samples = np.asarray(scenario.unit_samples, dtype=np.float64)
    drawn = rng.integers(0, len(profile.compute_excess_s), size=(trials, len(samples)))
    factor = scenario.compute_factor
    compute = profile.compute_s_per_sample * samples * factor + profile.compute_excess_s[drawn] * factor
    load = profile.load_s_per_byte[drawn] * (samples * scenario.bytes_per_sample)
    return np.maximum(compute, 0.0) + load + profile.unit_overhead_s


def simulate(profile: Profile, scenario: Scenario, trials: int, seed: int) -> Simulated:
    """``trials`` runs of ``scenario``; the same seed gives the same draws, so the same answer."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    rng = np.random.default_rng(seed)
    units = len(scenario.unit_samples)
    slots = min(scenario.slots, units)
    durations = unit_durations(profile, scenario, rng, trials)
    cold = profile.cold_s[rng.integers(0, len(profile.cold_s), size=(trials, slots))]
    durations[:, :slots] += cold  # each slot's first unit starts its worker
    first_ends = slot_starts(slots, scenario.ramp_every, scenario.ramp_s) + durations[:, :slots]
    if units == slots:
        ends = first_ends.max(axis=1)
    else:
        ends = np.array([_last_end(first_ends[t], durations[t, slots:]) for t in range(trials)])
    wall = ends + profile.run_overhead_s
    billed = np.ceil(durations * 1000.0).sum(axis=1)
    return Simulated(wall, durations.sum(axis=1), billed, units, slots)


def _last_end(first_ends: np.ndarray, queued: np.ndarray) -> float:
    """When the last unit ends: each queued unit goes to the slot that frees first."""
    free = first_ends.tolist()
    heapq.heapify(free)
    replace = heapq.heapreplace
    for duration in queued.tolist():
        replace(free, free[0] + duration)
    return max(free)
