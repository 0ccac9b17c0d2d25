"""The paper's orchestration as a transport (``--orchestrator stepfunctions``): executions of a Step Functions
state machine (made by ``provision.ensure_state_machine``) whose Distributed Map reads the run's invocations from
S3 and invokes the function once per item, ``MaxConcurrency`` at a time; and what the record keeps of them.

The dispatcher keeps the queue and the retries, as for every backend: an execution is one worker, given every
unit still waiting. Its items file (``<results>/items-N.json``) lists the invocations, each a group of
``--partitions-per-invocation`` units. While it runs, results are read from S3 as they land; when it ends, each
invocation's reply (which units failed and why, the handler's own time, what it chose), which the handler
writes to ``<results>/replies/<execution>/``, and the Map's output (the items whose function failed) say what
became of the rest, and the history gives the Map state's duration. Units that failed go back to the queue, and
a fresh execution takes them, until their attempts are spent.

The replies go to S3, not through the Map: a Map's output is one state of at most 256 KiB, which a few hundred
replies would fill. Each item's output is ``{"ok": true}``, or for a caught failure its units and the error.

The state machine retries only what never ran (throttling, the Lambda service's own errors); a function error
is caught per item, so the Map always completes and one bad partition does not abort the others.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

from cai_bench.backends.aws_lambda.gathered import Gathered
from cai_bench.backends.aws_lambda.provision import MAP_STATE
from cai_bench.backends.aws_lambda.wire import (
    ForgedObject,
    RunKeys,
    error_text,
    is_forged,
    read_result,
    read_sealed,
    result_key,
    unit_items,
)
from cai_bench.backends.dispatch import Dispatcher, Event, Unit, drain
from cai_bench.core import aws
from cai_bench.core.errors import UserError
from cai_bench.data.s3 import S3Prefix
from cai_bench.inference.gathering import CommConfig

DONE_STATUSES = ("SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")

# ---------------------------------------------------------------------------------------------- the history


def _seconds(stamp) -> float:
    """A history timestamp as epoch seconds: boto3 gives datetimes, the wire JSON epoch numbers."""
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if isinstance(stamp, (int, float)):
        return float(stamp)
    return datetime.fromisoformat(str(stamp)).timestamp()


def history_events(client, execution_arn: str) -> list[dict]:
    """Every event of an execution, through every page."""
    events, token = [], None
    while True:
        page = client.get_execution_history(executionArn=execution_arn, maxResults=1000,
                                            **({"nextToken": token} if token else {}))  # fmt: skip
        events.extend(page["events"])
        token = page.get("nextToken")
        if not token:
            return events


def read_history(events: list[dict], map_state: str = MAP_STATE) -> dict:
    """What a run's record keeps of an execution's history: the Map state's duration (entered to exited, the
    paper's measure), the Map Run's (started to its end), the execution's, and how it ended."""
    entered = exited = run_started = run_ended = started = ended = None
    out: dict = {"status": None, "map_run_arn": None, "error": None, "cause": None, "items": None}
    for event in sorted(events, key=lambda e: e["id"]):
        kind, stamp = event["type"], _seconds(event["timestamp"])
        if kind == "ExecutionStarted":
            started = stamp
        elif kind == "MapStateEntered" and event.get("stateEnteredEventDetails", {}).get("name") == map_state:
            entered = stamp
        elif kind == "MapStateExited" and event.get("stateExitedEventDetails", {}).get("name") == map_state:
            exited = stamp
        elif kind == "MapStateStarted":
            out["items"] = event.get("mapStateStartedEventDetails", {}).get("length")
        elif kind == "MapRunStarted":
            run_started = stamp
            out["map_run_arn"] = event.get("mapRunStartedEventDetails", {}).get("mapRunArn")
        elif kind in ("MapRunSucceeded", "MapRunFailed", "MapRunAborted"):
            run_ended = stamp
            details = event.get("mapRunFailedEventDetails") or {}
            out["error"], out["cause"] = details.get("error"), details.get("cause")
        elif kind in ("ExecutionSucceeded", "ExecutionFailed", "ExecutionAborted", "ExecutionTimedOut"):
            ended = stamp
            out["status"] = {"ExecutionSucceeded": "SUCCEEDED", "ExecutionFailed": "FAILED",
                             "ExecutionAborted": "ABORTED", "ExecutionTimedOut": "TIMED_OUT"}[kind]  # fmt: skip
            details = next((v for k, v in event.items() if k.endswith("EventDetails")), {}) or {}
            out["error"] = out["error"] or details.get("error")
            out["cause"] = out["cause"] or details.get("cause")
        elif kind == "MapStateFailed" and exited is None:
            # A Map state that failed has no Exited event: it ends with the failure
            exited = stamp
    out["map_state_s"] = None if entered is None or exited is None else exited - entered
    out["map_run_s"] = None if run_started is None or run_ended is None else run_ended - run_started
    out["execution_s"] = None if started is None or ended is None else ended - started
    return out


# ---------------------------------------------------------------------------------------------- the transport


@dataclass
class Execution:
    """One execution, as the record keeps it."""

    name: str
    arn: str | None = None
    items: int = 0
    units: list[int] = field(default_factory=list)
    status: str | None = None
    started_s: float = 0.0  # since the run's first start
    driver_s: float | None = None  # start_execution to the driver seeing it end
    history: dict = field(default_factory=dict)
    invocations: list[dict] = field(default_factory=list)  # per item: request id, the handler's own timing
    comm_replies: list[dict] = field(default_factory=list)  # --comm: what each item's reply said of it


class MapTransport:
    """Executions of the state machine, one at a time, each a worker holding every unit it was given."""

    def __init__(self, client, state_machine_arn: str, event_base: dict, keys: RunKeys, results,
                 per_invocation: int, poll_s: float = 1.0, comm: CommConfig | None = None):  # fmt: skip
        self.client = client
        self.state_machine_arn = state_machine_arn
        self.run_id = keys.run_id
        self.event_base = event_base
        self.keys = keys
        self.results = results  # S3Prefix of this run's unit results (and its items files)
        self.per_invocation = per_invocation
        self.poll_s = poll_s
        self.events: queue.Queue = queue.Queue()
        self.executions: list[Execution] = []
        self.running: dict[str, Execution] = {}
        self.followers: list[threading.Thread] = []
        self.ready: dict[str, dict] = {}  # per execution, what its first invocation chose (weights, precision)
        self.stopping = threading.Event()
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.sealing = keys.sealing  # what the handler seals its objects with
        self.gathered = Gathered(comm, results, self.sealing)

    # -- Transport

    def start(self, dispatcher: Dispatcher) -> None:
        if dispatcher.units:
            self._add(dispatcher)

    def _add(self, dispatcher: Dispatcher) -> None:
        execution = Execution(f"{self.run_id}-{len(self.executions) + 1}")
        self.executions.append(execution)
        self.running[execution.name] = execution
        dispatcher.join(execution.name)
        self.events.put(Event("want", execution.name, count=len(dispatcher.units)))

    def poll(self, timeout_s: float | None):
        return drain(self.events, timeout_s)

    def send(self, worker: str, units: list[Unit], ahead: bool) -> None:
        if units:
            follower = threading.Thread(target=self._follow, args=(self.running[worker], units), daemon=True,
                                        name=worker)  # fmt: skip
            self.followers.append(follower)
            follower.start()

    def after_exit(self, dispatcher: Dispatcher, worker: str) -> None:
        self.running.pop(worker, None)
        if dispatcher.outstanding() and not self.stopping.is_set():
            self._add(dispatcher)

    def abandon(self, worker: str) -> None:
        self._stop_execution(self.running.pop(worker, None), "abandoned")

    def stop(self, finished: bool, wait_s: float = 300.0) -> None:
        if finished:
            # Every result is in; the execution ends once its last items return: its history holds the Map
            # state's time, and its output the handler's timings
            deadline = time.monotonic() + wait_s
            for follower in self.followers:
                follower.join(timeout=max(0.0, deadline - time.monotonic()))
        self.stopping.set()
        if not finished:  # Ctrl-C or an error: stop paying for what is still running
            for execution in list(self.running.values()):
                self._stop_execution(execution, "the run was stopped")

    def _stop_execution(self, execution: Execution | None, why: str) -> None:
        if execution is not None and execution.arn and execution.status in (None, "RUNNING"):
            with contextlib.suppress(Exception):
                self.client.stop_execution(executionArn=execution.arn, error="cai-bench", cause=why)

    # -- one execution

    def _follow(self, execution: Execution, units: list[Unit]) -> None:
        try:
            self._run(execution, units)
        except Exception as exc:
            # The service refused or failed (a permission, a limit): every unit the execution held is charged,
            # so a refusal that lasts ends the run after --retries more executions, not one per unit
            execution.status = execution.status or "NOT_STARTED"
            why = f"execution {execution.name}: {aws.error_code(exc) or type(exc).__name__}: {exc}"
            for unit in units:
                self.events.put(Event("failed", execution.name, unit.position, error=why))
            self.events.put(Event("left", execution.name))

    def _run(self, execution: Execution, units: list[Unit]) -> None:
        groups = [units[i : i + self.per_invocation] for i in range(0, len(units), self.per_invocation)]
        items_name = f"items-{len(self.executions)}.json"
        replies = f"replies/{execution.name}"
        fields = {**self.event_base, "replies": replies, "items": self.results.where(items_name)}
        # --comm: the first execution's items are the ranks (each handler works its own out); a retry runs alone
        together = self.gathered.config is not None and all(u.attempts == 0 for u in units)
        if together:
            fields["comm"] = {**self.gathered.config.public(), "per_invocation": self.per_invocation}
        base = self.keys.base(fields)  # the execution's input: sealed fields and the secret's ARN, no secret
        items = [self.keys.item(base, unit_items(group)) for group in groups]
        self.results.write(items_name, json.dumps(items).encode())
        execution.items, execution.units = len(items), [u.position for u in units]
        payload = {"items": {"Bucket": self.results.bucket, "Key": self.results.key(items_name)}, "base": base}
        began = time.perf_counter()
        self.first_start = began if self.first_start is None else self.first_start
        execution.started_s = began - self.first_start
        execution.arn = self.client.start_execution(stateMachineArn=self.state_machine_arn, name=execution.name,
                                                    input=json.dumps(payload))["executionArn"]  # fmt: skip
        execution.status = "RUNNING"
        waiting = {u.position for u in units}
        while True:
            described = self.client.describe_execution(executionArn=execution.arn)
            finished = described["status"] in DONE_STATUSES
            if not together:  # with --comm the results come in rank 0's aggregate, once the Map is done
                waiting -= self._collect(execution, waiting)  # what landed so far: progress as it runs
            if finished or self.stopping.is_set():
                break
            time.sleep(self.poll_s)
        ended = time.perf_counter()
        self.last_end = ended if self.last_end is None else max(self.last_end, ended)
        execution.driver_s, execution.status = ended - began, described["status"]
        with contextlib.suppress(Exception):
            execution.history = read_history(history_events(self.client, execution.arn))
        errors = self._read_replies(execution, replies)
        errors.update(self._item_errors(described.get("output")))
        if together:
            waiting -= self._from_aggregate(execution, waiting)
            waiting -= self._collect(execution, waiting)  # where the collectives failed: each unit's own result
        ready = next((i["ready"] for i in execution.invocations if i.get("ready")), None)
        if ready:
            self.ready[execution.name] = ready
            self.events.put(Event("ready", execution.name, info=ready))
        for position in sorted(waiting):
            why = errors.get(position) or (f"execution {execution.status}: {described.get('error') or ''} "
                                           f"{described.get('cause') or ''}".strip())  # fmt: skip
            self.events.put(Event("failed", execution.name, position, error=why, fatal=is_forged(why)))
        self.events.put(Event("left", execution.name))

    def _from_aggregate(self, execution: Execution, waiting: set[int]) -> set[int]:
        """Units of ``waiting`` in rank 0's aggregate (read once), reported done; none where there is none."""
        if not any(r.get("aggregate") for r in execution.comm_replies):
            return set()
        aggregate = self.gathered.read_aggregate()
        for position in sorted(waiting & aggregate.keys()):
            self.events.put(Event("done", execution.name, position, result=aggregate[position]))
        return waiting & aggregate.keys()

    def _collect(self, execution: Execution, waiting: set[int]) -> set[int]:
        """Units of ``waiting`` whose result is in S3 now: each read and reported done."""
        present = set(self.results.names())
        landed = set()
        for position in sorted(waiting):
            if result_key(position) not in present:
                continue
            self.gathered.unit_reads += 1
            try:
                result = read_result(self.results, position, *self.sealing)
            except ForgedObject:
                result = None  # not this run's: looked at again (the unit's retry overwrites it), else it fails
            if result is None:  # not whole yet, or unreadable: looked at again next time
                continue
            landed.add(position)
            self.events.put(Event("done", execution.name, position, result=result))
        return landed

    def _read_replies(self, execution: Execution, folder: str) -> dict[int, str]:
        """The handler's replies of this execution, into its record; per unit, why it failed."""
        errors: dict[int, str] = {}
        replies = S3Prefix(self.results.bucket, self.results.key(folder))
        for name in sorted(replies.names()):
            try:  # a reply that is not this run's (ForgedObject) is passed over as an unreadable one is
                reply = json.loads(read_sealed(replies, name, *self.sealing))
            except (UserError, ValueError):
                continue
            execution.invocations.append({k: reply.get(k) for k in ("request_id", "environment", "cold", "timing",
                                                                     "ready")})  # fmt: skip
            if reply.get("comm"):
                execution.comm_replies.append(reply["comm"])
                self.gathered.heard(reply["comm"]["rank"], reply["comm"])
            for failed in reply.get("failed") or []:
                errors[int(failed["position"])] = failed.get("error") or "failed"
        return errors

    @staticmethod
    def _item_errors(output: str | None) -> dict[int, str]:
        """Per unit, why its function failed, from the Map's output (an entry per item that failed)."""
        errors: dict[int, str] = {}
        try:
            entries = json.loads(output or "[]")
        except ValueError:
            return errors
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            if "lost" in entry:
                error = entry.get("error") or {}
                why = f"function error: {error_text(error.get('Cause'), error.get('Error') or 'States.TaskFailed')}"
                for position in entry["lost"] or []:
                    errors[int(position)] = why
        return errors

    @property
    def wall_s(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start


def map_summary(transport) -> dict:
    """What the record keeps of the executions: each one, and the Map state's time in all (the paper's)."""
    executions = [asdict(e) for e in transport.executions]
    map_times = [e["history"].get("map_state_s") for e in executions]
    items = sum(e["items"] for e in executions)
    caught = sum(e["items"] - len(e["invocations"]) for e in executions)  # items with no handler reply
    return {
        "invocations_made": items,
        "executions": executions,
        "map_state_s": sum(map_times) if map_times and None not in map_times else None,
        "driver_wall_s": transport.wall_s,
        # One per item's Task, one more per caught failure, one per execution's Map state (an estimate:
        # retries inside the state machine add theirs)
        "transitions": items + caught + len(executions),
    }
