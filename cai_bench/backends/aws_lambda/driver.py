"""The Lambda backend: partitions in S3, one synchronous invocation per group of partitions, results gathered
from S3, every REPORT line and the cost in the record. The dispatcher keeps the queue, the retries and the
exactly-once emission; this module only carries units to invocations (``InvokeTransport``).

Each of ``--max-concurrency`` invokers is a worker to the dispatcher: it asks for
``--partitions-per-invocation`` units, invokes the function with them (``LogType=Tail``), and reports each unit
done (its result read back from S3) or failed. Throttling (429) and the service's 5xx are retried here, with
exponential backoff and full jitter, since no unit ran; a function error (a timeout, an out-of-memory kill, an
environment that died) loses the invoker like a crashed process: the unit it was running is charged, the ones
behind it go back as they were, and a fresh invoker takes its place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cai_bench import aws
from cai_bench.backends.base import BackendOption, BackendRun, Emit, dispatched_run
from cai_bench.backends.cpu import RUNTIME
from cai_bench.backends.dispatch import DEFAULT_RETRIES, Dispatcher, Event, Unit, drain, drive
from cai_bench.choices import CPU_PRECISIONS
from cai_bench.errors import UserError
from cai_bench.metrics import allowed_cpus, percentiles
from cai_bench.plan import PartitionRef, Plan, work_units

DEFAULT_FUNCTION = "cai-bench"
DEFAULT_CONCURRENCY = 1000  # an account's default concurrency limit
THROTTLE_RETRIES = 8
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 20.0
ORCHESTRATORS = ("direct", "stepfunctions")

OPTIONS = (
    BackendOption("function", str, "Name of the Lambda function to invoke.", DEFAULT_FUNCTION, identity=False,
                  sweepable=False, parse=aws.check_function_name),
    BackendOption("memory_mb", int, "The function's memory in MB: on AWS the function is set to it first (one "
                  "configuration per sweep point); sets the emulated function's, and its CPU share.", "the function's",
                  minimum=128),
    BackendOption("orchestrator", str, "Who makes the invocations: the driver itself (direct) or a Step Functions "
                  "Distributed Map over the partitions in S3, as the paper ran them (stepfunctions).", "direct",
                  choices=ORCHESTRATORS),
    BackendOption("state_machine_role_arn", str, "IAM role the state machine runs as (--orchestrator stepfunctions "
                  "on AWS; see deploy/lambda/).", None, identity=False, sweepable=False),
    BackendOption("max_concurrency", int, "Invocations in flight at once.", f"{DEFAULT_CONCURRENCY} (emulated: cores)",
                  minimum=1),
    BackendOption("partitions_per_invocation", int, "Partitions each invocation runs, one after another.", 1,
                  minimum=1),
    BackendOption("retries", int, "Re-invocations of a unit that failed or timed out, before it fails for good.",
                  DEFAULT_RETRIES, minimum=0, identity=False),
    BackendOption("emulate", bool, "Run against the local Lambda emulator and a local S3 (moto) instead of AWS.",
                  False, identity=False, sweepable=False),
    BackendOption("endpoint_url", str, "S3 endpoint, for an S3-compatible store or a running local S3.", None,
                  identity=False, sweepable=False),
    BackendOption("lambda_endpoint_url", str, "Lambda endpoint, for a running `cai-bench lambda emulate`.", None,
                  identity=False, sweepable=False),
    BackendOption("region", str, "AWS region.", "AWS_REGION or the profile's", identity=False, sweepable=False),
    BackendOption("bucket", str, "s3://bucket/prefix for staged local data and the runs' results.",
                  "beside s3:// data; emulated: s3://cai-bench", identity=False, sweepable=False),
    BackendOption("price_file", str, "JSON price table replacing the built-in one (see pricing.py).", None,
                  identity=False, sweepable=False),
    BackendOption("timeout_s", float, "The emulated function's timeout in seconds.", 900.0, minimum=1,
                  identity=False, sweepable=False),
    RUNTIME,
)  # fmt: skip


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

    def __init__(self, client, function: str, event_base: dict, results, invokers: int, per_invocation: int,
                 seed: int = 0):  # fmt: skip
        self.client = client
        self.function = function
        self.event_base = event_base
        self.results = results  # S3Prefix of this run's unit results
        self.count = invokers
        self.per_invocation = per_invocation
        self.events: queue.Queue = queue.Queue()
        self.invokers: dict[str, _Invoker] = {}
        self.invocations: list[Invocation] = []
        self.started = 0
        self.first_sent: float | None = None
        self.last_answer: float | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.rng = random.Random(seed)

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
        from botocore.exceptions import BotoCoreError, ClientError

        from cai_bench.backends.aws_lambda.emulator import SERVICE_TIME_HEADER
        from cai_bench.backends.aws_lambda.handler import error_text
        from cai_bench.backends.aws_lambda.report_log import report_from_tail

        event = {**self.event_base, "units": [{"position": u.position, "ref": asdict(u.item)} for u in units]}
        payload = json.dumps(event).encode()
        sent = time.perf_counter()
        with self.lock:
            self.first_sent = sent if self.first_sent is None else self.first_sent
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
            # What finished before the function died is in S3 under its own key, from this very invocation
            for unit in units:
                result = self._read_result(unit.position, record.request_id)
                if result is not None:
                    self.events.put(Event("done", invoker.name, unit.position, result=result))
            self.events.put(Event("lost", invoker.name, error=f"function error: {error}"))
            return False
        try:
            reply = json.loads(body)
            record.environment, record.cold = reply.get("environment"), reply.get("cold")
            self.events.put(Event("ready", invoker.name, info=reply["ready"]))
            for done in reply["done"]:
                result = self._read_result(int(done["position"]), reply["request_id"])
                if result is None:
                    self.events.put(Event("failed", invoker.name, int(done["position"]),
                                          error=f"its result is missing from {done['key']}"))  # fmt: skip
                else:
                    self.events.put(Event("done", invoker.name, int(done["position"]), result=result))
            for failed in reply["failed"]:
                self.events.put(Event("failed", invoker.name, int(failed["position"]), error=failed["error"]))
        except (KeyError, TypeError, ValueError) as exc:
            self.events.put(Event("lost", invoker.name, error=f"the function's answer is not a handler reply ({exc})"))
            return False
        self.events.put(Event("want", invoker.name, count=self.per_invocation))
        return True

    def _read_result(self, position: int, request_id: str | None):
        """A unit's result from S3, if the invocation ``request_id`` wrote it (not an older attempt)."""
        from cai_bench.backends.aws_lambda.handler import read_result

        result = read_result(self.results, position)
        return result if result is not None and result.record.worker_id == request_id else None

    @property
    def wall_s(self) -> float:
        if self.first_sent is None or self.last_answer is None:
            return 0.0
        return self.last_answer - self.first_sent


# ---------------------------------------------------------------------------------------------- the backend


@dataclass
class Services:
    """Where a run's S3 and Lambda are, and what to stop at its end (the emulator and local S3 it started)."""

    lambda_endpoint: str | None
    emulated: bool
    stop: list = field(default_factory=list)
    emulator: object = None
    upstream: str | None = None  # the local moto server this run started (S3, IAM, Step Functions)

    def close(self) -> None:
        for stop in reversed(self.stop):
            with contextlib.suppress(Exception):
                stop()


def start_services(options: dict, function: str, memory_mb: int | None, concurrency: int, faults=None) -> Services:
    """The emulator and local S3 that ``--emulate`` asks for (unless endpoints are given), or AWS itself.

    Emulated Step Functions: moto's server runs the state machine, and the emulator stands in front of it on one
    port, answering Lambda's calls itself and passing on the rest (S3, Step Functions)."""
    from cai_bench.backends.aws_lambda import emulator as emulation

    s3_endpoint = options.get("endpoint_url")
    lambda_endpoint = options.get("lambda_endpoint_url")
    emulated = bool(options.get("emulate")) or lambda_endpoint is not None
    state_machines = emulated and options.get("orchestrator") == "stepfunctions"
    services = Services(lambda_endpoint, emulated)
    saved = {name: os.environ.get(name) for name in (aws.S3_ENDPOINT_ENV, aws.EMULATED_ENV)}
    services.stop.append(lambda: _restore(saved))  # the process is as it was after the run
    try:
        front = emulation.free_port() if state_machines else 0
        if state_machines or (emulated and s3_endpoint is None and not os.environ.get(aws.S3_ENDPOINT_ENV)):
            local = emulation.start_local_s3(state_machines_via=front if state_machines else None)
            services.stop.append(local.stop)
            s3_endpoint = services.upstream = local.url
        aws.use_endpoints(s3_endpoint, emulated)
        if emulated and lambda_endpoint is None:
            config = emulation.FunctionConfig(name=function, memory_mb=memory_mb or 10240,
                                              timeout_s=float(options.get("timeout_s") or 900.0))  # fmt: skip
            extra = emulation.emulated_function_env(os.environ[aws.S3_ENDPOINT_ENV])
            services.emulator = emulation.Emulator(config, concurrency=concurrency, faults=faults, extra_env=extra,
                                                   upstream=services.upstream if state_machines else None)  # fmt: skip
            services.stop.append(services.emulator.stop)
            services.lambda_endpoint = services.emulator.serve(port=front)
    except BaseException:
        services.close()
        raise
    return services


def _restore(saved: dict) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def stage(refs: tuple[PartitionRef, ...], plan: Plan, target: str | None) -> tuple[tuple[PartitionRef, ...], str,
                                                                                   float]:  # fmt: skip
    """Partitions in S3 for the functions to read: ``refs`` themselves when they are there, else the local data
    set uploaded (once: identical objects are skipped) under ``target``/datasets/<dataset id>. Returns the refs,
    the S3 prefix that holds them, and the seconds the upload took."""
    from cai_bench.data.s3 import S3Prefix, upload_dataset

    if all(r.path.startswith("s3://") for r in refs):
        return refs, refs[0].path.rsplit("/", 1)[0], 0.0
    if target is None:
        raise UserError("local data needs --bucket s3://bucket/prefix to be staged in S3 for Lambda")
    base = S3Prefix.parse(target)
    destination = S3Prefix(base.bucket, base.key(f"datasets/{plan.data.dataset_id}"))
    started = time.perf_counter()
    upload_dataset(plan.data.path, destination.location)
    staged = tuple(replace(r, path=destination.where(r.path.replace("\\", "/").rsplit("/", 1)[-1])) for r in refs)
    return staged, destination.location, time.perf_counter() - started


def stage_weights(weights: str | None, target: str) -> str | None:
    """Weights where a function can read them: an s3:// key as given; a local file copied (once: it is named by
    its sha256) to ``target``/weights/."""
    if not weights or weights.startswith("s3:/"):
        return weights
    import hashlib

    from cai_bench.data.s3 import S3Prefix

    path = Path(weights)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{weights}: cannot read the weights ({exc.strerror})") from None
    base = S3Prefix.parse(target)
    folder = S3Prefix(base.bucket, base.key("weights"))
    name = f"{hashlib.sha256(data).hexdigest()[:16]}-{path.name}"
    if folder.size(name) != len(data):
        folder.write(name, data)
    return folder.where(name)


def stage_export(directory: str, target: str) -> str:
    """An export where a function can read it: its files copied (once: the folder is named by the export's
    metadata, which names the weights and the check) to ``target``/weights/export-<sha>/."""
    import hashlib

    from cai_bench.data.s3 import S3Prefix
    from cai_bench.runtimes import EXPORT_META, read_export

    export = read_export(directory)
    meta = (Path(directory) / EXPORT_META).read_bytes()
    base = S3Prefix.parse(target)
    folder = S3Prefix(base.bucket, base.key(f"weights/export-{hashlib.sha256(meta).hexdigest()[:16]}"))
    for name in export.files:
        path = Path(directory) / name
        if folder.size(name) != path.stat().st_size:
            folder.write(name, path.read_bytes())
    folder.write(EXPORT_META, meta)  # last: the handler reads the files it names
    return folder.location


def _create_bucket(url: str) -> None:
    from cai_bench.data.s3 import S3Prefix

    bucket = S3Prefix.parse(url).bucket
    with aws.one_line_errors(f"s3://{bucket}: cannot create the bucket"):
        client = aws.s3_client()
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as exc:
            if aws.error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=bucket)


def run_lambda(plan: Plan, emit: Emit, mode: str = "model", hold_s: float = 0.0, emulator_faults=None) -> BackendRun:
    """Run ``plan`` on Lambda (or the emulator). ``mode="no-model"`` runs the handler without the model (it reads
    and verifies each partition, holding it ``hold_s``): the fan-out machinery on its own, for benches and tests;
    ``emulator_faults`` (tests) are the started emulator's."""
    from cai_bench.backends.aws_lambda import pricing
    from cai_bench.data.s3 import S3Prefix
    from cai_bench.records import new_run_id

    if plan.engine == "reference":
        raise UserError("--engine reference is the one-process upstream loop: run it with --backend cpu")
    from cai_bench.runtimes import model_for_workers

    options = plan.backend_options
    runtime = options.get("runtime") or "torch"
    function = options.get("function") or DEFAULT_FUNCTION
    emulated = bool(options.get("emulate") or options.get("lambda_endpoint_url"))
    concurrency = options.get("max_concurrency") or (allowed_cpus() if emulated else DEFAULT_CONCURRENCY)
    per_invocation = options.get("partitions_per_invocation") or 1
    retries = options.get("retries")
    prices = pricing.load_prices(options.get("price_file"))
    services = start_services(options, function, options.get("memory_mb"), concurrency, emulator_faults)
    try:
        region = options.get("region") or (aws.EMULATED_REGION if services.emulated else None)
        in_s3 = all(r.path.startswith("s3://") for r in plan.partitions)
        target = options.get("bucket") or ("s3://cai-bench" if services.emulated and not in_s3 else None)
        if target and services.emulated:
            _create_bucket(target)
        client = aws.client("lambda", endpoint_url=services.lambda_endpoint, region=region,
                            emulated=services.emulated, pool=concurrency + 2,
                            read_timeout_s=float(options.get("timeout_s") or 900.0) + 60)  # fmt: skip
        with aws.one_line_errors(f"Lambda function {function}"):
            configuration = client.get_function_configuration(FunctionName=function)
        memory_set = False
        if options.get("memory_mb") and not services.emulated and options["memory_mb"] != configuration["MemorySize"]:
            from cai_bench.backends.aws_lambda.deploy import set_memory

            memory_set = set_memory(client, function, int(options["memory_mb"]))
            configuration = client.get_function_configuration(FunctionName=function)
        memory_mb = int(configuration["MemorySize"])
        architecture = (configuration.get("Architectures") or ["x86_64"])[0]
        refs, data_prefix, staging_s = stage(plan.partitions, plan, target)
        staged = replace(plan, partitions=refs)
        # An export the functions need is made here, where torch is, then staged like weights
        model, prepared = model_for_workers(plan.weights, runtime, plan.seed) if mode == "model" else (plan.weights, {})
        stage_model = stage_weights if runtime == "torch" or mode != "model" else stage_export
        weights = stage_model(model, target or data_prefix)
        run_id = new_run_id()
        base = S3Prefix.parse(target or data_prefix)
        results = S3Prefix(base.bucket, base.key(f"runs/{run_id}"))
        event_base = {
            "run_id": run_id,
            "results": results.location,
            "options": {"batch_size": plan.batch_size, "precision": plan.precision, "engine": plan.engine,
                        "verify_checksums": plan.verify_checksums, "compile": plan.compile, "runtime": runtime},
            "weights": weights,
            "seed": plan.seed,
            "mode": mode,
            "hold_s": hold_s,
        }  # fmt: skip
        dispatcher = Dispatcher(work_units(staged), emit, DEFAULT_RETRIES if retries is None else retries)
        orchestrator = options.get("orchestrator") or "direct"
        if orchestrator == "stepfunctions":
            transport, orchestration = _map_transport(options, services, region, function, concurrency, run_id,
                                                      event_base, results, per_invocation)  # fmt: skip
            drive(dispatcher, transport)
            for name, ready in transport.ready.items():  # an execution's output comes after its results
                dispatcher.on_ready(name, ready)
            invocations, orchestration = [], {**orchestration, **map_summary(transport)}
            billed, billed_from = _map_billed(transport, services)
            spent = pricing.cost(billed, memory_mb, architecture, prices, transitions=orchestration["transitions"])
        else:
            transport = InvokeTransport(client, function, event_base, results, concurrency, per_invocation, plan.seed)
            drive(dispatcher, transport)
            invocations, orchestration = transport.invocations, {}
            billed, billed_from = [i.report["billed_duration_ms"] for i in invocations if i.report], "REPORT lines"
            spent = pricing.cost(billed, memory_mb, architecture, prices)
        info = {
            **invocation_summary(invocations),
            "orchestrator": orchestrator,
            **orchestration,
            "billed_from": billed_from,
            "memory_set": memory_set,
            "function": function,
            "memory_mb": memory_mb,
            "architecture": architecture,
            "max_concurrency": concurrency,
            "partitions_per_invocation": per_invocation,
            "emulated": services.emulated,
            "region": region or getattr(client.meta, "region_name", None),
            "data": data_prefix,
            "results": results.location,
            "staging_s": staging_s,
            **prepared,
            **({"staged_export": weights} if runtime != "torch" and mode == "model" else {}),
            "cost": spent.to_dict(),
            "prices": {k: prices[k] for k in ("as_of", "region") if k in prices},
            "invocations": [asdict(i) for i in invocations],
        }
        if services.emulator is not None:
            info["emulator"] = services.emulator.stats()
            if orchestrator == "stepfunctions":  # no REPORT line reached the driver; the emulator has them all
                info.update(report_summary([r.to_dict() for r in services.emulator.reports]))
            info["cpu_share"] = info["emulator"]["cpu_share"]
        threads = services.emulator.threads if services.emulator is not None else None
        environments = {i.environment for i in invocations} | {i.get("environment") for e in info.get(
            "executions", []) for i in e["invocations"]}  # fmt: skip
        return dispatched_run(plan, dispatcher, transport.wall_s, info, workers=len(environments - {None}) or None,
                              threads=threads, cost_usd=spent.usd)  # fmt: skip
    finally:
        services.close()


def _map_transport(options, services, region, function, concurrency, run_id, event_base, results, per_invocation):
    """The state machine (created, updated or reused) and a transport that runs executions of it."""
    from cai_bench.backends.aws_lambda import stepfunctions

    role = options.get("state_machine_role_arn")
    endpoint = services.upstream if services.emulated else None
    client = aws.client("stepfunctions", endpoint_url=endpoint, region=region, emulated=services.emulated)
    if services.emulated and role is None:
        role = _emulated_role(endpoint, region)
    arn, action = stepfunctions.ensure_state_machine(client, function, concurrency, role)
    transport = stepfunctions.MapTransport(client, arn, run_id, event_base, results, per_invocation,
                                           poll_s=0.25 if services.emulated else 1.0)  # fmt: skip
    return transport, {"state_machine": arn, "state_machine_action": action}


def _emulated_role(endpoint: str, region: str) -> str:
    iam = aws.client("iam", endpoint_url=endpoint, region=region, emulated=True)
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                     "Principal": {"Service": "states.amazonaws.com"}}]}  # fmt: skip
    try:
        return iam.get_role(RoleName="cai-bench-states")["Role"]["Arn"]
    except Exception as exc:
        if aws.error_code(exc) != "NoSuchEntity":
            raise
        return iam.create_role(RoleName="cai-bench-states", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


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


def _map_billed(transport, services) -> tuple[list[int], str]:
    """Billed durations: the emulator's REPORTs; on AWS, the handler's own times (the REPORT lines are in
    CloudWatch Logs, not in the Map's output), rounded up to the millisecond."""
    if services.emulator is not None:
        return [r.billed_duration_ms for r in services.emulator.reports], "the emulator's REPORTs"
    timings = [i["timing"] for e in transport.executions for i in e.invocations if i.get("timing")]
    return [math.ceil(t["duration_ms"]) for t in timings], "the handler's own times (an estimate: no init phase)"


def report_summary(reports: list[dict]) -> dict:
    """What REPORT lines (parsed) say in all: cold starts, their init time, the most memory used, billed time."""
    inits = [r["init_duration_ms"] for r in reports if r["init_duration_ms"] is not None]
    return {
        "cold_starts": len(inits),
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


@dataclass
class LambdaBackend:
    name: str = "lambda"
    options: tuple[BackendOption, ...] = OPTIONS
    precisions: tuple[str, ...] = CPU_PRECISIONS
    default_batch_size: int = 512

    def check(self, options: dict) -> None:
        if options.get("bucket"):
            from cai_bench.data.s3 import S3Prefix

            S3Prefix.parse(options["bucket"])
        if options.get("lambda_endpoint_url") and options.get("emulate"):
            raise UserError("--lambda-endpoint-url names a running emulator: leave --emulate out")
        if options.get("orchestrator") == "stepfunctions":
            if options.get("lambda_endpoint_url") or (options.get("emulate") and options.get("endpoint_url")):
                raise UserError("--orchestrator stepfunctions --emulate runs its own local S3 and Step Functions: "
                                "leave --endpoint-url and --lambda-endpoint-url out")  # fmt: skip
            if not options.get("emulate") and not options.get("state_machine_role_arn"):
                raise UserError("--orchestrator stepfunctions on AWS needs --state-machine-role-arn (a role Step "
                                "Functions can assume: see deploy/lambda/stepfunctions-policy.json)")  # fmt: skip
        if "timeout_s" in options and not options.get("emulate"):
            raise UserError("--timeout-s sets the emulated function's timeout: add --emulate (on AWS it is the "
                            "function's configuration)")  # fmt: skip
        if not (options.get("emulate") or options.get("lambda_endpoint_url")):
            # Credentials and region, before any data is made: building a client makes no call yet
            aws.client("lambda", region=options.get("region"))
            aws.client("s3", endpoint_url=options.get("endpoint_url"), region=options.get("region"))

    def machine(self, plan: Plan) -> str | None:
        options = plan.backend_options
        if options.get("emulate") or options.get("lambda_endpoint_url"):
            from cai_bench.results import machine_id, this_machine

            return f"lambda-emulator | {machine_id(this_machine())}"
        region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return f"aws-lambda | {region or 'default region'} | {options.get('function') or DEFAULT_FUNCTION}"

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        return run_lambda(plan, emit)
