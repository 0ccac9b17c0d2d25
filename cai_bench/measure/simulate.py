"""A discrete-event simulation of a run from measured behaviour: how long its work units take, drawn from a
profile, and how they queue on the workers a backend can have at once.

One model for every backend (``docs/estimate.md`` says what it assumes and where it stops being right):

- A unit of ``n`` samples takes ``unit_overhead + typical * n * f + excess * f + read``, where ``typical`` is the
  profile's median compute seconds per sample, ``excess`` one measured unit's compute beyond ``typical`` times its
  own samples (a straggler's delay, which does not grow with the unit's size), ``f`` how much slower the target's
  CPU share is than the profile's, and ``read`` the same unit's seconds per byte times its bytes, or, where the
  workers at once share a read bandwidth, their share of it if that is slower.
- A straggler's delay is drawn from the measured units; with a ``tail_scale_s``, the delays past the measured
  p90 are drawn from an exponential tail fitted to them instead, so that the slowest of ``n`` units grows with
  ``n`` (as ``ln n``) rather than stopping at the slowest unit ever measured.
- Workers are created at a rate: the ``k``-th not before ``(k // create_every) * create_s`` (Lambda's scaling
  rate, a scheduler's launch rate), and at most ``slots`` exist at once. A worker's first unit pays a cold
  start drawn from the profile's.
- Units start no faster than ``start_per_s`` (the ``i``-th not before ``i / start_per_s``: a Distributed Map's
  child executions, S3 GETs on one prefix, a driver's invokes), and their results are written no faster than
  ``finish_per_s`` (S3 PUTs on one prefix): a first-in first-out queue in the order the units end.
- Two ways to hand out units, the two ways the backends run:
  - ``reuse`` (Lambda, a node's worker processes): units go in order, each to whichever comes first, a free
    worker (warm) or a new one the rate and the cap allow (cold); a worker lives to the end of the run.
  - ``groups`` (a SLURM array): each task is given its group of units, runs them one after another and ends; a
    task starts once the launch rate allows it and one of the ``slots`` that run at once is free. Every task is
    cold.
- The run's wall is the last result written plus a per-run overhead and the scenario's fixed time (listing the
  input, a Map Run's own start and finish). ``Simulated.terms`` splits each trial's wall along the path of its
  last unit: where the time went.

Pure numpy and heapq: it imports nothing of the tool, so any layer may use it.
"""

from __future__ import annotations

import heapq
import itertools
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
    tail_scale_s: float | None = None  # the exponential tail of the excess past its p90 (None: measured draws only)
    unit_overhead_s_per_mb: float = 0.0  # per unit and MB of its data: reading the records do not hold (calibrated)

    def __post_init__(self):
        if len(self.compute_excess_s) != len(self.load_s_per_byte) or len(self.compute_excess_s) == 0:
            raise ValueError("a profile needs one excess and one load rate per measured unit, and at least one unit")
        if len(self.cold_s) == 0:
            raise ValueError("a profile needs at least one cold start (0 where none was measured)")

    @property
    def tail_from_s(self) -> float:
        """Where the fitted tail begins: the measured excess's p90."""
        return float(np.quantile(self.compute_excess_s, TAIL_FROM))


TAIL_FROM = 0.9  # the quantile of the measured excess past which the tail is fitted


def exponential_tail_scale(excess: np.ndarray) -> float | None:
    """The scale (mean) of an exponential fitted to the excess past its p90: the maximum-likelihood fit of what a
    straggler adds there. None where fewer than 5 units lie past it (too few to fit)."""
    over = excess[excess > np.quantile(excess, TAIL_FROM)] - np.quantile(excess, TAIL_FROM)
    return float(over.mean()) if len(over) >= 5 and over.mean() > 0 else None


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
    start_per_s: float | None = None  # units started per second at most (None: no limit)
    finish_per_s: float | None = None  # results written per second at most (None: no limit)
    fixed_s: float = 0.0  # the run's own time beyond its units: listing its input, the orchestrator's start and end
    # A Distributed Map: its children (at most ``in_flight`` at once) all try at once, and one that finds no
    # environment is throttled and tries again after these waits (the last repeated)
    retry_s: tuple[float, ...] = ()
    in_flight: int | None = None

    def __post_init__(self):
        if self.slots < 1:
            raise ValueError("a scenario needs at least one slot")
        if len(self.unit_samples) == 0:
            raise ValueError("a scenario needs at least one unit")
        if self.groups is not None and (sum(self.groups) != len(self.unit_samples) or min(self.groups) < 1):
            raise ValueError("an array's groups must hold every unit, at least one each")
        for rate in (self.start_per_s, self.finish_per_s):
            if rate is not None and not rate > 0:
                raise ValueError("a rate must be above zero")

    @property
    def items(self) -> int:
        """What is handed out: units to reused workers, groups to array tasks."""
        return len(self.unit_samples) if self.groups is None else len(self.groups)


# Where a trial's wall went, along the path of the unit that ended it (an array: of the task that did)
TERMS = (
    "waited_for_a_worker_s",  # until a worker was there for it: the scaling or launch rate, the cap, earlier units
    "throttled_s",  # a Map's child: from its first try to the try that found an environment (backing off)
    "start_rate_s",  # then until the start rate let it begin
    "cold_start_s",
    "compute_s",  # typical compute for its samples, at the target's CPU share
    "straggler_s",  # its drawn excess beyond typical
    "read_s",
    "unit_overhead_s",
    "results_write_s",  # waiting for the results' write rate
    "run_overhead_s",
    "fixed_s",
)


@dataclass(frozen=True)
class Simulated:
    """Per trial: the wall, every unit's duration summed with the cold starts (what workers were busy), the same
    rounded up to the millisecond per invocation (as Lambda bills), how many workers were created, and the wall
    split into ``TERMS``."""

    wall_s: np.ndarray
    busy_s: np.ndarray
    billed_ms: np.ndarray
    created: np.ndarray
    units: int
    slots: int
    terms: dict = field(default_factory=dict)  # TERMS -> per trial seconds
    exhausted: np.ndarray | None = None  # per trial: a Map's children throttled past their last retry


def creation_times(count: int, every: int, step_s: float) -> np.ndarray:
    """When the ``k``-th worker may be created, for k < count: ``every`` more every ``step_s`` seconds (all at 0
    with no rate)."""
    index = np.arange(count)
    if every <= 0 or step_s <= 0:
        return np.zeros(count)
    return (index // every) * float(step_s)


@dataclass(frozen=True)
class _Parts:
    """``[trials, units]`` parts of each unit's warm duration."""

    compute: np.ndarray  # [units]: typical compute at the target's share
    excess: np.ndarray
    load: np.ndarray
    overhead: np.ndarray  # [units]

    @property
    def durations(self) -> np.ndarray:
        return np.maximum(self.compute + self.excess, 0.0) + self.load + self.overhead


def _drawn_excess(profile: Profile, drawn: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The excess of the drawn units; past the measured p90, from the fitted exponential tail where there is one."""
    excess = profile.compute_excess_s[drawn]
    if profile.tail_scale_s:
        start = profile.tail_from_s
        past = excess > start
        excess = np.where(past, start + rng.exponential(profile.tail_scale_s, size=excess.shape), excess)
    return excess


def unit_parts(profile: Profile, scenario: Scenario, rng: np.random.Generator, trials: int) -> _Parts:
    """Each unit's time from one measured unit drawn at random, in parts."""
    samples = np.asarray(scenario.unit_samples, dtype=np.float64)
    drawn = rng.integers(0, len(profile.compute_excess_s), size=(trials, len(samples)))
    factor = scenario.compute_factor
    excess = _drawn_excess(profile, drawn, rng) * factor
    nbytes = samples * scenario.bytes_per_sample
    load = profile.load_s_per_byte[drawn] * nbytes
    if scenario.shared_read_bytes_per_s:  # the workers at once divide the shared bandwidth between them
        together = min(scenario.slots, scenario.items)
        load = np.maximum(load, nbytes * together / scenario.shared_read_bytes_per_s)
    overhead = profile.unit_overhead_s + profile.unit_overhead_s_per_mb * nbytes / 2**20
    return _Parts(profile.compute_s_per_sample * samples * factor, excess, load, overhead)


def simulate(profile: Profile, scenario: Scenario, trials: int, seed: int) -> Simulated:
    """``trials`` runs of ``scenario``; the same seed gives the same draws, so the same answer, and the draws do
    not depend on the slots: two scenarios that differ only in them see the same units and cold starts."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    rng = np.random.default_rng(seed)
    parts = unit_parts(profile, scenario, rng, trials)
    durations = parts.durations
    cold = profile.cold_s[rng.integers(0, len(profile.cold_s), size=(trials, scenario.items))]
    create = creation_times(min(scenario.slots, scenario.items) if scenario.groups is None else scenario.items,
                            scenario.create_every, scenario.create_s)  # fmt: skip
    if scenario.groups is None and scenario.retry_s:
        release = _released(len(durations[0]), scenario.start_per_s)
        in_flight = scenario.in_flight or scenario.items
        runs = [_mapped(durations[t], cold[t], create, in_flight, scenario.retry_s, release) for t in range(trials)]
    elif scenario.groups is None:
        release = _released(len(durations[0]), scenario.start_per_s)
        runs = [_reused(durations[t], cold[t], create, release) for t in range(trials)]
    else:
        bounds = np.cumsum((0, *scenario.groups))
        per_task = np.add.reduceat(durations, bounds[:-1], axis=1)
        runs = [_array(per_task[t], cold[t], create, scenario.slots) for t in range(trials)]
    paths = [_path(run, scenario.finish_per_s) for run in runs]
    ends = np.array([p[0] for p in paths])
    cold_used = np.array([float(run.cold.sum()) for run in runs])
    created = np.array([run.created for run in runs])
    busy = durations.sum(axis=1) + cold_used
    # Billed per invocation, each unit's duration rounded up to the millisecond (rounding their sum once would miss
    # up to 1 ms per unit); the cold starts are added rounded up together, within 1 ms a run of rounding each
    billed = np.ceil(durations * 1000.0).sum(axis=1) + np.ceil(cold_used * 1000.0)
    terms = _terms(paths, runs, parts, scenario, profile)
    exhausted = np.array([run.exhausted for run in runs])
    return Simulated(ends + profile.run_overhead_s + scenario.fixed_s, busy, billed, created,
                     len(scenario.unit_samples), min(scenario.slots, scenario.items), terms, exhausted)  # fmt: skip


def _released(count: int, per_s: float | None) -> np.ndarray | None:
    """When the ``i``-th unit may start at the earliest, at ``per_s`` a second (None: at once)."""
    return None if per_s is None else np.arange(count) / float(per_s)


@dataclass
class _Run:
    """One trial's schedule, per item handed out (a unit, or an array's task)."""

    ready: np.ndarray  # when a worker was there for it (a Map's child: when it first tried)
    start: np.ndarray  # when it began (its cold start first, if it paid one)
    cold: np.ndarray  # the cold start it paid (0: warm)
    end: np.ndarray
    created: int
    got: np.ndarray | None = None  # a Map's child: when a try found an environment (None: at ``ready``)
    exhausted: int = 0  # a Map's children still throttled after their last retry: on AWS, they fail


def _reused(durations: np.ndarray, cold: np.ndarray, create: np.ndarray, release: np.ndarray | None) -> _Run:
    """One trial with reused workers. Each unit in order takes a free worker, else a new one where the rate and
    the cap allow it sooner (on AWS a request that finds no free environment starts a new one if it may,
    whatever a busy one's end would have been); it begins once ``release`` lets it."""
    n = len(durations)
    ready, start, paid = np.zeros(n), np.zeros(n), np.zeros(n)
    if len(create) >= n and not create.any():  # every unit its own worker, all at once
        start = release.copy() if release is not None else start
        return _Run(ready, start, cold[:n].copy(), start + cold[:n] + durations, n)
    free: list[float] = []
    created, limit, push, replace = 0, len(create), heapq.heappush, heapq.heapreplace
    releases = release.tolist() if release is not None else None
    for index, duration in enumerate(durations.tolist()):
        warm_at = free[0] if free else math.inf
        new_at = create[created] if created < limit else math.inf
        at = min(warm_at, new_at)
        begin = max(at, releases[index]) if releases is not None else at
        ready[index], start[index] = at, begin
        if warm_at <= new_at:
            replace(free, begin + duration)
        else:
            paid[index] = float(cold[index])
            push(free, begin + paid[index] + duration)
            created += 1
    return _Run(ready, start, paid, start + paid + durations, created)


def _mapped(durations: np.ndarray, cold: np.ndarray, create: np.ndarray, in_flight: int, retry: tuple,
            release: np.ndarray | None) -> _Run:  # fmt: skip
    """One trial of a Distributed Map. Its first ``in_flight`` children try at once, and each that ends lets the
    next one try. A try takes a free environment, or a new one where the scaling rate and the quota allow; else
    it is throttled and tries again after the next of the ``retry`` waits, as the state machine's Retry does (a
    try that would find nothing is skipped, not simulated: until an environment frees or may be created, every
    try is throttled). Children that try together are served in order."""
    n = len(durations)
    ready, got, start, paid, end = (np.zeros(n) for _ in range(5))
    exhausted: set[int] = set()
    free: list[float] = []
    created, limit, order = 0, len(create), itertools.count()
    first = min(in_flight, n)
    events = [(0.0, next(order), 0, list(range(first)))]
    children = first
    while events:
        at, _, attempt, waiting = heapq.heappop(events)
        for taken, unit in enumerate(waiting):
            if free and free[0] <= at:
                heapq.heappop(free)
            elif created < limit and create[created] <= at:
                paid[unit], created = float(cold[unit]), created + 1
            else:
                if _back_off(events, order, at, attempt, waiting[taken:], retry, free, create, created):
                    exhausted.update(waiting[taken:])
                break
            got[unit] = at
            start[unit] = max(at, release[unit]) if release is not None else at
            end[unit] = start[unit] + paid[unit] + float(durations[unit])
            heapq.heappush(free, end[unit])
            if children < n:  # its end lets the next child try
                ready[children] = end[unit]
                heapq.heappush(events, (end[unit], next(order), 0, [children]))
                children += 1
    return _Run(ready, start, paid, end, created, got, len(exhausted))


def _back_off(events: list, order, at: float, attempt: int, throttled: list, retry: tuple, free: list,
              create: np.ndarray, created: int) -> bool:  # fmt: skip
    """Schedule the throttled children's next try: the first of their retries at or after the moment an
    environment frees or may be created (the tries before it would all be throttled). True where that is past
    their last retry (they are simulated on, at the last wait, and counted)."""
    room = min(free[0] if free else math.inf, create[created] if created < len(create) else math.inf)
    while True:
        at += retry[min(attempt, len(retry) - 1)]
        attempt += 1
        if at >= room:
            break
    heapq.heappush(events, (at, next(order), attempt, throttled))
    return attempt > len(retry)


def _array(per_task: np.ndarray, cold: np.ndarray, create: np.ndarray, slots: int) -> _Run:
    """One trial of an array: task ``j`` starts once it is launched and one of ``slots`` is free, cold, and runs
    its group of units."""
    free = [0.0] * min(slots, len(per_task))
    n = len(per_task)
    ready, start = np.zeros(n), np.zeros(n)
    for task in range(n):
        start[task] = ready[task] = max(free[0], float(create[task]))
        heapq.heapreplace(free, start[task] + float(cold[task]) + float(per_task[task]))
    return _Run(ready, start, cold[:n].copy(), start + cold[:n] + per_task, n)


def _path(run: _Run, finish_per_s: float | None) -> tuple[float, int, float]:
    """The trial's last result written, the item it was of, and how long that item waited for the write rate.
    Writes queue first in first out at ``finish_per_s``: the ``k``-th to end is written at
    ``(k + 1) / rate + max(end_j - j / rate for j <= k)``."""
    if finish_per_s is None:
        last = int(np.argmax(run.end))
        return float(run.end[last]), last, 0.0
    order = np.argsort(run.end, kind="stable")
    step = np.arange(1, len(order) + 1) / float(finish_per_s)
    written = np.maximum.accumulate(run.end[order] - (step - step[0])) + step
    k = int(np.argmax(written))
    return float(written[k]), int(order[k]), float(written[k] - run.end[order[k]])


def _terms(paths: list, runs: list[_Run], parts: _Parts, scenario: Scenario, profile: Profile) -> dict:
    """Each trial's wall in ``TERMS``, along the path of the item whose result was written last."""
    out = {name: np.zeros(len(runs)) for name in TERMS}
    bounds = None if scenario.groups is None else np.cumsum((0, *scenario.groups))
    for t, ((_, item, write_wait), run) in enumerate(zip(paths, runs, strict=True)):
        units = slice(item, item + 1) if bounds is None else slice(bounds[item], bounds[item + 1])
        compute = parts.compute[units]
        excess = parts.excess[t, units]
        got = run.ready if run.got is None else run.got
        out["waited_for_a_worker_s"][t] = run.ready[item]
        out["throttled_s"][t] = got[item] - run.ready[item]
        out["start_rate_s"][t] = run.start[item] - got[item]
        out["cold_start_s"][t] = run.cold[item]
        out["compute_s"][t] = compute.sum()
        out["straggler_s"][t] = (np.maximum(compute + excess, 0.0) - compute).sum()
        out["read_s"][t] = parts.load[t, units].sum()
        out["unit_overhead_s"][t] = parts.overhead[units].sum()
        out["results_write_s"][t] = write_wait
    out["run_overhead_s"][:] = profile.run_overhead_s
    out["fixed_s"][:] = scenario.fixed_s
    return out
