"""Direct invocations (``--orchestrator direct``): the Lambda backend's transport on the dispatcher.

Each of ``--max-concurrency`` invokers is a worker to the dispatcher: it asks for
``--partitions-per-invocation`` units, invokes the function with them (``LogType=Tail``), and reports each unit
done (its result read back from S3) or failed. Throttling (429) and the service's 5xx are retried here, with
exponential backoff and full jitter, since no unit ran; a function error (a timeout, an out-of-memory kill, an
environment that died) loses the invoker like a crashed process: the unit it was running is charged, the ones
behind it go back as they were, and a fresh invoker takes its place.

With ``--comm`` the first invocation of each group of units is rank (its first position // units per
invocation) of the run's closing collectives (``gathering``); rank 0's aggregate is read once, and every
invoker takes its units' results from it. An invoker whose collectives failed, or that waited in vain for rank
0's aggregate, reads its units' own results instead.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from dataclasses import dataclass, field

from cai_bench.backends.aws_lambda.emulator import SERVICE_TIME_HEADER
from cai_bench.backends.aws_lambda.gathered import Gathered
from cai_bench.backends.aws_lambda.report_log import report_from_tail
from cai_bench.backends.aws_lambda.wire import ForgedObject, RunKeys, error_text, is_forged, read_result, unit_items
from cai_bench.backends.dispatch import Dispatcher, Event, Unit, drain
from cai_bench.core import aws
from cai_bench.core.stats import percentiles
from cai_bench.inference.gathering import CommConfig

THROTTLE_RETRIES = 8
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 20.0


# The error types of an environment that was lost rather than of code that raised: it exited without a word, or
# overran its time
ENVIRONMENT_LOST = ("Runtime.ExitError", "Sandbox.Timedout")


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return rng.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


@dataclass
class Invocation:
    """One call of the function, as the record keeps it."""

    request_id: str | None
    invoker: str
    units: list[int]
    sent_s: float  # since the run's first invoke
    client_s: float  # from the request sent to the response read, throttled tries included
    throttled: int = 0  # 429 answers (and 5xx) before this call went through
    function_error: str | None = None
    error: str | None = None
    report: dict | None = None  # the REPORT line, parsed
    environment: str | None = None
    cold: bool | None = None
    service_s: float | None = None  # emulated only: how long the emulator held the call, request read to reply

    @property
    def overhead_s(self) -> float | None:
        """The driver's time beyond the function's own (its Duration, and its Init Duration on a cold start):
        network, queueing, (de)serialising, backoff after throttling."""
        if self.report is None:
            return None
        return self.client_s - (self.report["duration_ms"] + (self.report["init_duration_ms"] or 0.0)) / 1000

    @property
    def client_side_s(self) -> float | None:
        """Emulated only: the part of that overhead outside the emulator (the driver's threads, boto3, HTTP)."""
        return None if self.service_s is None else self.client_s - self.service_s


@dataclass
class _Invoker:
    name: str
    inbox: queue.Queue = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None


class InvokeTransport:
    """Invokers (threads) that each run one synchronous invocation at a time."""

    def __init__(self, client, function: str, event_base: dict, keys: RunKeys, results, invokers: int,
                 per_invocation: int, seed: int = 0, comm: CommConfig | None = None):  # fmt: skip
        self.client = client
        self.function = function
        self.event_base = event_base
        self.keys = keys
        self.results = results  # S3Prefix of this run's unit results
        self.count = invokers
        self.per_invocation = per_invocation
        self.events: queue.Queue = queue.Queue()
        self.invokers: dict[str, _Invoker] = {}
        self.invocations: list[Invocation] = []
        self.started = 0
        self.first_sent: float | None = None
        self.first_sent_epoch: float | None = None  # the same moment by the wall clock: where a timeline starts
        self.last_answer: float | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.sealing = keys.sealing  # what the handler seals its objects with
        self.gathered = Gathered(comm, results, self.sealing)

    # -- Transport

    def start(self, dispatcher: Dispatcher) -> None:
        for _ in range(min(self.count, len(dispatcher.units))):
            self._add(dispatcher)

    def _add(self, dispatcher: Dispatcher) -> None:
        self.started += 1
        invoker = _Invoker(f"invoker-{self.started}")
        self.invokers[invoker.name] = invoker
        dispatcher.join(invoker.name)
        invoker.thread = threading.Thread(target=self._serve, args=(invoker,), name=invoker.name, daemon=True)
        invoker.thread.start()
        self.events.put(Event("want", invoker.name, count=self.per_invocation))

    def poll(self, timeout_s: float | None):
        return drain(self.events, timeout_s)

    def send(self, worker: str, units: list[Unit], ahead: bool) -> None:
        if units:
            self.invokers[worker].inbox.put(units)

    def after_exit(self, dispatcher: Dispatcher, worker: str) -> None:
        self.invokers.pop(worker, None)
        if dispatcher.outstanding() and len(self.invokers) < self.count:
            self._add(dispatcher)

    def abandon(self, worker: str) -> None:
        self.invokers.pop(worker, None)

    def stop(self, finished: bool) -> None:
        self.stopping.set()
        for invoker in list(self.invokers.values()):
            invoker.inbox.put(None)
        if finished:
            for invoker in list(self.invokers.values()):
                invoker.thread.join(timeout=5)

    # -- one invoker

    def _serve(self, invoker: _Invoker) -> None:
        while True:
            units = invoker.inbox.get()
            if units is None or self.stopping.is_set():
                return
            if not self._invoke(invoker, units):
                return  # lost: a fresh invoker takes its place

    def _invoke(self, invoker: _Invoker, units: list[Unit]) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError  # the [aws] extra: only where a run invokes

        fields = dict(self.event_base)
        rank = self.gathered.rank_of(units, self.per_invocation)
        if rank is not None:
            fields["comm"] = {**self.gathered.config.public(), "rank": rank}
        base = self.keys.base(fields)
        payload = json.dumps({"base": base, "item": self.keys.item(base, unit_items(units))}).encode()
        sent = time.perf_counter()
        with self.lock:
            if self.first_sent is None:
                self.first_sent, self.first_sent_epoch = sent, time.time()
        record = Invocation(None, invoker.name, [u.position for u in units], sent - self.first_sent, 0.0)
        answer = None
        for attempt in range(THROTTLE_RETRIES + 1):
            try:
                answer = self.client.invoke(FunctionName=self.function, InvocationType="RequestResponse",
                                            LogType="Tail", Payload=payload)  # fmt: skip
                break
            except (ClientError, BotoCoreError) as exc:
                code = aws.error_code(exc)
                status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                transient = code in ("TooManyRequestsException", "ThrottlingException") or status >= 500 or (
                    isinstance(exc, BotoCoreError))  # fmt: skip
                if not transient or attempt == THROTTLE_RETRIES or self.stopping.is_set():
                    record.error = f"{code or type(exc).__name__}: {exc}"
                    break
                record.throttled += 1
                time.sleep(backoff_s(attempt, self.rng))
        now = time.perf_counter()
        record.client_s = now - sent
        with self.lock:
            self.last_answer = now if self.last_answer is None else max(self.last_answer, now)
            self.invocations.append(record)
        if answer is None:
            self.events.put(Event("lost", invoker.name, error=f"invoke failed: {record.error}"))
            return False
        metadata = answer.get("ResponseMetadata", {})
        record.request_id = metadata.get("RequestId")
        service_ms = metadata.get("HTTPHeaders", {}).get(SERVICE_TIME_HEADER.lower())  # botocore lowers names
        record.service_s = float(service_ms) / 1000 if service_ms else None
        report = report_from_tail(answer.get("LogResult"))
        record.report = report.to_dict() if report else None
        body = answer["Payload"].read()
        if answer.get("FunctionError"):
            error = error_text(body)
            record.function_error = error
            if rank is not None:
                self.gathered.failed(rank, f"function error: {error}")
            # What finished before the function died is in S3 under its own key, from this very invocation
            for unit in units:
                event = self._done_event(invoker.name, {"position": unit.position}, {}, record.request_id)
                if event.kind == "done":  # the rest are charged with the function's error
                    self.events.put(event)
            # An environment that died or overran in its init never ran a unit: they go back uncharged. An init
            # error the runtime posted (a missing module) is the function's own and is charged as any other
            started = not (report and report.init_failed and error.split(":")[0] in ENVIRONMENT_LOST)
            self.events.put(Event("lost", invoker.name, error=f"function error: {error}", fatal=is_forged(error),
                                  started=started))  # fmt: skip
            return False
        try:
            reply = json.loads(body)
            record.environment, record.cold = reply.get("environment"), reply.get("cold")
            self.events.put(Event("ready", invoker.name, info=reply["ready"]))
            aggregate = self.gathered.results(rank, reply.get("comm")) if rank is not None else {}
            for done in reply["done"]:
                self.events.put(self._done_event(invoker.name, done, aggregate, reply["request_id"]))
            for failed in reply["failed"]:
                self.events.put(Event("failed", invoker.name, int(failed["position"]), error=failed["error"],
                                      fatal=is_forged(failed["error"])))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            self.events.put(Event("lost", invoker.name, error=f"the function's answer is not a handler reply ({exc})"))
            return False
        self.events.put(Event("want", invoker.name, count=self.per_invocation))
        return True

    def _done_event(self, invoker: str, done: dict, aggregate: dict, request_id: str | None) -> Event:
        """The event of a unit an invocation reports done: its result (from the aggregate, else its own object),
        or why it failed: missing, or an object that is not this run's (the unit is tried again, which rewrites
        it)."""
        position = int(done["position"])
        try:
            result = aggregate.get(position) or self._read_result(position, request_id)
        except ForgedObject as exc:
            return Event("failed", invoker, position, error=str(exc))
        if result is None:
            return Event("failed", invoker, position, error=f"its result is missing from {done.get('key')}")
        return Event("done", invoker, position, result=result)

    def _read_result(self, position: int, request_id: str | None):
        """A unit's result from S3, if the invocation ``request_id`` wrote it (not an older attempt)."""
        self.gathered.unit_reads += 1
        result = read_result(self.results, position, *self.sealing)
        return result if result is not None and result.record.worker_id == request_id else None

    @property
    def wall_s(self) -> float:
        if self.first_sent is None or self.last_answer is None:
            return 0.0
        return self.last_answer - self.first_sent


def report_summary(reports: list[dict]) -> dict:
    """What REPORT lines (parsed) say in all: cold starts, their init time, the most memory used, billed time."""
    inits = [r["init_duration_ms"] for r in reports if r["init_duration_ms"] is not None]
    timed_out = [r for r in reports if r.get("init_timeouts")]
    return {
        # an init past Lambda's limit ran again inside its invocation: a cold start with no Init Duration
        "cold_starts": len(inits) + sum(1 for r in timed_out if r["init_duration_ms"] is None),
        "init_timeouts": sum(r["init_timeouts"] for r in timed_out),
        "init_duration_ms_median": percentiles(inits, (50,))["p50"],
        "max_memory_used_mb": max((r["max_memory_used_mb"] for r in reports), default=None),
        "billed_duration_ms": sum(r["billed_duration_ms"] for r in reports),
    }


def invocation_summary(invocations: list[Invocation]) -> dict:
    """What the record says of the invocations in all: counts, cold starts, throttles, and the driver's overhead
    per invocation (its time beyond the function's own Duration)."""
    reported = [i for i in invocations if i.report]
    overheads = [i.overhead_s for i in reported]
    overhead = percentiles(overheads, (50, 90))
    client = percentiles([i.client_side_s for i in reported if i.client_side_s is not None], (50, 90))
    return {
        "invocations_made": len(invocations),
        **report_summary([i.report for i in reported]),
        "throttled": sum(i.throttled for i in invocations),
        "function_errors": sum(1 for i in invocations if i.function_error),
        "overhead_s_median": overhead["p50"],
        "overhead_s_p90": overhead["p90"],
        "overhead_s_mean": sum(overheads) / len(overheads) if overheads else None,
        "client_side_s_median": client["p50"],
        "client_side_s_p90": client["p90"],
    }
