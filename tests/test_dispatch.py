"""The dispatcher without processes: fake workers that succeed, raise, vanish or straggle on seeded random
schedules, and the promises that must hold whatever they do."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cai_bench.backends.dispatch import UNSTARTED_RETRIES, Dispatcher, Event, drive


class FakeTransport:
    """Simulated workers. Each poll advances one worker by one step, chosen at random: it finishes the unit it
    is running (succeeds, raises, or vanishes with everything it holds), or straggles (makes the clock jump past
    the unit timeout). A straggler that was given up on may still report its result later."""

    def __init__(self, rng: random.Random, workers: int, poison: set[int], p_raise: float, p_vanish: float,
                 p_straggle: float, max_workers: int):  # fmt: skip
        self.rng, self.workers, self.poison, self.max_workers = rng, workers, poison, max_workers
        self.p_raise, self.p_vanish, self.p_straggle = p_raise, p_vanish, p_straggle
        self.holding: dict[str, list[int]] = {}
        self.events: list[Event] = []
        self.started = 0
        self.now = 0.0
        self.late: list[Event] = []  # what abandoned stragglers report afterwards
        self.stopped = False

    def clock(self) -> float:
        return self.now

    def spawn(self, dispatcher: Dispatcher) -> None:
        worker = f"w{self.started}"
        self.started += 1
        dispatcher.join(worker)
        self.holding[worker] = []
        self.events.append(Event("ready", worker, info={"n": self.started}))
        self.events.append(Event("want", worker, count=self.rng.choice([1, 1, 2])))

    def start(self, dispatcher):
        self.dispatcher = dispatcher
        for _ in range(self.workers):
            self.spawn(dispatcher)

    def send(self, worker, units, ahead):
        self.holding[worker].extend(u.position for u in units)

    def poll(self, timeout_s):
        if self.events:
            out, self.events = self.events, []
            return out
        if self.late and self.rng.random() < 0.3:
            return [self.late.pop()]
        busy = [w for w, held in self.holding.items() if held]
        assert busy or self.late, "the dispatcher waits on workers that hold nothing"
        if not busy:
            return [self.late.pop()]
        worker = self.rng.choice(busy)
        position = self.holding[worker][0]
        roll = self.rng.random()
        if roll < self.p_vanish:
            del self.holding[worker]
            return [Event("lost", worker, error=f"{worker} vanished")]
        if roll < self.p_vanish + self.p_straggle:
            self.now += 100.0  # past the unit timeout: the dispatcher gives up on it
            return []
        self.holding[worker].pop(0)
        out = []
        if position in self.poison or self.rng.random() < self.p_raise:
            out.append(Event("failed", worker, position=position, error=f"unit {position} raised on {worker}"))
        else:
            out.append(Event("done", worker, position=position, result=position))
        if not self.holding[worker]:
            out.append(Event("want", worker, count=self.rng.choice([1, 2])))
        elif self.rng.random() < 0.5:
            out.append(Event("want", worker, ahead=True))
        return out

    def after_exit(self, dispatcher, worker):
        if self.started < self.max_workers and dispatcher.outstanding():
            self.spawn(dispatcher)

    def abandon(self, worker):
        held = self.holding.pop(worker, [])
        if held and held[0] not in self.poison and self.rng.random() < 0.5:  # only slow: its result comes after all
            self.late.append(Event("done", worker, position=held[0], result=held[0]))

    def stop(self, finished):
        self.stopped = finished


@pytest.mark.parametrize("seed", range(400))
def test_every_unit_is_emitted_once_or_failed_never_both_and_the_run_ends(seed):
    rng = random.Random(seed)
    units = rng.randint(0, 30)
    retries = rng.randint(0, 3)
    poison = {p for p in range(units) if rng.random() < 0.1}
    emitted = Counter()
    transport = FakeTransport(
        rng, workers=rng.randint(1, 5), poison=poison, p_raise=rng.choice([0, 0.1, 0.3]),
        p_vanish=rng.choice([0, 0.05, 0.2]), p_straggle=rng.choice([0, 0.05]), max_workers=rng.randint(1, 12),
    )  # fmt: skip
    dispatcher = Dispatcher(list(range(units)), lambda result: emitted.update([result]), retries, transport.clock)
    # a bounded number of polls: a dispatcher that never ends fails here instead of hanging
    polls = 0
    original = transport.poll

    def counted(timeout_s):
        nonlocal polls
        polls += 1
        assert polls < 20_000, "the run did not end"
        return original(timeout_s)

    transport.poll = counted
    drive(dispatcher, transport, unit_timeout_s=50.0)

    failed = {f.unit for f in dispatcher.failures()}
    assert transport.stopped
    assert all(count == 1 for count in emitted.values()), "a unit was emitted twice"
    assert set(emitted) | failed == set(range(units)), "a unit was neither emitted nor failed"
    assert not set(emitted) & failed, "a unit was both emitted and failed"
    assert set(emitted) == dispatcher.emitted
    for failure in dispatcher.failures():
        # failed for good: out of attempts, or no worker was left to run it
        assert failure.attempts == retries + 1 or failure.errors[-1] == "no worker left to run it"
        assert len(failure.errors) >= failure.attempts
    assert poison.isdisjoint(emitted)
    summary = dispatcher.summary()
    assert summary["attempts"] >= len(emitted)
    assert summary["lost_workers"] == len(dispatcher.lost_workers)


def test_a_retry_goes_to_a_worker_the_unit_has_not_failed_on():
    out = []
    d = Dispatcher(["a", "b", "c"], out.append, retries=2)
    d.join("x")
    d.join("y")
    (first,) = d.want("x")
    d.on_failed("x", first.position, "boom")
    assert [u.position for u in d.want("x")] == [1]  # unit 0 failed on x: x gets the next one
    assert [u.position for u in d.want("y")] == [0]  # and y gets unit 0
    d.done("y", 0, "result 0")
    assert out == ["result 0"]
    summary = d.summary()
    assert summary["retried_units"] == 1 and summary["retried"][0]["workers"] == ["x"]


def test_a_lost_worker_charges_only_the_unit_it_was_running():
    d = Dispatcher(list(range(4)), lambda r: None, retries=0)
    d.join("x")
    d.join("y")
    assert [u.position for u in d.want("x", count=2)] == [0, 1]
    d.lost("x", "killed")
    # unit 0 was running: with no retries it failed for good; unit 1 was read-ahead and waits again, first
    assert [f.unit for f in d.failures()] == [0]
    assert d.failures()[0].errors == ("killed",)
    assert [u.position for u in d.queue] == [1, 2, 3]
    assert d.lost_workers == [{"worker": "x", "error": "killed", "unit": 0, "partition": 0, "started": True}]


def test_a_worker_lost_before_it_started_returns_its_unit_uncharged_a_bounded_number_of_times():
    """An environment that never came up (its init timed out twice, or it exited) did not run the unit: even
    with no retries the unit goes back to the front, uncharged, UNSTARTED_RETRIES times; then it is charged, so
    a worker that can never start ends the run."""
    out = []
    d = Dispatcher(list(range(3)), out.append, retries=0)
    for n in range(UNSTARTED_RETRIES):
        d.join(f"w{n}")
        assert [u.position for u in d.want(f"w{n}", count=2)] == [0, 1]
        d.lost(f"w{n}", "Runtime.ExitError: init", started=False)
        assert [u.position for u in d.queue] == [0, 1, 2] and not d.failures()
    d.join("ok")
    (unit,) = d.want("ok")
    d.done("ok", unit.position, "result 0")
    assert out == ["result 0"] and d.summary()["units_returned_unstarted"] == UNSTARTED_RETRIES
    assert d.summary()["retried_units"] == 0 and d.lost_workers[0]["started"] is False
    for n in range(UNSTARTED_RETRIES + 1):  # unit 1 is returned as often, then fails for good
        d.join(f"v{n}")
        assert d.want(f"v{n}")[0].position == 1
        d.lost(f"v{n}", "Sandbox.Timedout: init", started=False)
    assert [f.unit for f in d.failures()] == [1] and d.failures()[0].errors == ("Sandbox.Timedout: init",)


def test_read_ahead_is_refused_while_fewer_units_wait_than_there_are_workers():
    d = Dispatcher(list(range(4)), lambda r: None)
    for worker in ("x", "y"):
        d.join(worker)
    d.want("x")
    assert [u.position for u in d.want("x", ahead=True)] == [1]  # 2 wait for 2 workers: x may read ahead
    d.want("y")
    assert d.want("y", ahead=True) == []  # 1 waits for 2 workers: it goes to whoever is free first
    d.done("x", 0, None)
    d.done("x", 1, None)
    assert [u.position for u in d.want("x")] == [3]
    assert d.want("x") == [] and d.parked == ["x"]  # parked until a unit comes back
    d.on_failed("y", 2, "boom")
    assert [(w, [u.position for u in units]) for w, units in d.deliveries()] == [("x", [2])]


def test_a_late_result_rescues_a_unit_that_had_failed_for_good():
    out = []
    d = Dispatcher(["only"], out.append, retries=0)
    d.join("x")
    d.want("x")
    d.lost("x", "timed out")
    assert d.finished() and [f.unit for f in d.failures()] == [0]
    d.done("x", 0, "late")
    assert out == ["late"] and d.failures() == [] and d.finished()
    d.done("x", 0, "later")
    assert out == ["late"]
