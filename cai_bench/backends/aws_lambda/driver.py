"""The ``lambda`` backend: partitions in S3, the function invoked once per group of partitions (directly, or by a
Step Functions Distributed Map as the paper ran it), results gathered from S3, every REPORT line and the cost in
the record. The dispatcher keeps the queue, the retries and the exactly-once emission; the transports
(``invoke.py``, ``stepfunctions.py``) only carry units to invocations.

A run starts the services it needs (``--emulate``: the emulator and a local S3), reads the function's
configuration (and on AWS sets its memory first, for a memory sweep), stages data and model in S3
(``staging.py``), drives the dispatcher through the transport, and prices what was billed (``pricing.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field, replace

from cai_bench.backends.aws_lambda import emulator, environments, local_s3, pricing, run_secret
from cai_bench.backends.aws_lambda.image import IMAGE_EXPORT_DIR
from cai_bench.backends.aws_lambda.invoke import InvokeTransport, invocation_summary, report_summary
from cai_bench.backends.aws_lambda.provision import emulated_role, ensure_state_machine, set_memory
from cai_bench.backends.aws_lambda.staging import create_bucket, stage, stage_export, stage_weights
from cai_bench.backends.aws_lambda.stepfunctions import MapTransport, map_summary
from cai_bench.backends.aws_lambda.wire import RunKeys, new_secret
from cai_bench.backends.base import BackendOption, BackendRun, Emit, dispatched_run
from cai_bench.backends.dispatch import DEFAULT_RETRIES, Dispatcher, drive
from cai_bench.backends.options import COMM_OPTIONS, RETRIES, RUNTIME
from cai_bench.comm import check_urls, split_urls
from cai_bench.core import aws
from cai_bench.core.choices import CPU_PRECISIONS
from cai_bench.core.errors import UserError
from cai_bench.core.machine import allowed_cpus, machine_id, this_machine
from cai_bench.core.plan import Plan, work_units
from cai_bench.core.records import new_run_id
from cai_bench.data.s3 import S3Prefix
from cai_bench.inference.gathering import CommConfig, config_for_run
from cai_bench.inference.loop import prepare_model
from cai_bench.model.export_format import read_export

DEFAULT_FUNCTION = "cai-bench"
DEFAULT_CONCURRENCY = 1000  # an account's default concurrency limit
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
    RETRIES,
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
    BackendOption("export_in_image", bool, "onnxruntime, openvino: the function reads its export from its image "
                  f"({IMAGE_EXPORT_DIR}, where `cai-bench lambda build --export DIR` puts it) instead of fetching it "
                  "from S3 at each cold start; it checks that the export was made from the run's weights. Emulated, "
                  "the image is this machine: the run's own export.", False, sweepable=False),
    *COMM_OPTIONS,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- services


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
    s3_endpoint = options.get("endpoint_url")
    lambda_endpoint = options.get("lambda_endpoint_url")
    emulated = bool(options.get("emulate")) or lambda_endpoint is not None
    state_machines = emulated and options.get("orchestrator") == "stepfunctions"
    services = Services(lambda_endpoint, emulated)
    saved = {name: os.environ.get(name) for name in (aws.S3_ENDPOINT_ENV, aws.SECRETS_ENDPOINT_ENV, aws.EMULATED_ENV)}
    services.stop.append(lambda: _restore(saved))  # the process is as it was after the run
    try:
        front = local_s3.free_port() if state_machines else 0
        if state_machines or (emulated and s3_endpoint is None and not os.environ.get(aws.S3_ENDPOINT_ENV)):
            local = local_s3.start_local_s3(state_machines_via=front if state_machines else None)
            services.stop.append(local.stop)
            s3_endpoint = services.upstream = local.url
        aws.use_endpoints(s3_endpoint, emulated)
        if emulated and lambda_endpoint is None:
            config = environments.FunctionConfig(name=function, memory_mb=memory_mb or 10240,
                                              timeout_s=float(options.get("timeout_s") or 900.0),
                                              image=options.get("runtime") or "torch")  # fmt: skip
            extra = environments.emulated_function_env(os.environ[aws.S3_ENDPOINT_ENV])
            services.emulator = emulator.Emulator(config, concurrency=concurrency, faults=faults, extra_env=extra,
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


# ---------------------------------------------------------------------------------------------- a run


@dataclass(frozen=True)
class _Function:
    """The function a run invokes, as its configuration says after any change of memory."""

    name: str
    client: object
    region: str | None  # as given (or the emulator's); the client's own is in the record
    memory_mb: int
    architecture: str
    memory_set: bool  # whether this run changed the function's memory first


def _function(options: dict, services: Services, concurrency: int) -> _Function:
    name = options.get("function") or DEFAULT_FUNCTION
    region = options.get("region") or (aws.EMULATED_REGION if services.emulated else None)
    client = aws.client("lambda", endpoint_url=services.lambda_endpoint, region=region, emulated=services.emulated,
                        pool=concurrency + 2, read_timeout_s=float(options.get("timeout_s") or 900.0) + 60)  # fmt: skip
    with aws.one_line_errors(f"Lambda function {name}"):
        configuration = client.get_function_configuration(FunctionName=name)
    memory_set = False
    if options.get("memory_mb") and not services.emulated and options["memory_mb"] != configuration["MemorySize"]:
        memory_set = set_memory(client, name, int(options["memory_mb"]))
        configuration = client.get_function_configuration(FunctionName=name)
    architecture = (configuration.get("Architectures") or ["x86_64"])[0]
    return _Function(name, client, region, int(configuration["MemorySize"]), architecture, memory_set)


@dataclass(frozen=True)
class _Staged:
    """The run's data and model in S3, and where its results go."""

    plan: Plan  # its partitions named by their S3 keys
    data: str  # the S3 prefix that holds them
    staging_s: float
    weights: str | None  # what the functions load
    prepared: dict  # whether an export was made for them, and where the functions read it
    run_id: str
    results: S3Prefix
    export_weights: dict | None = None  # --export-in-image: the weights the image's export must be made from
    staged: dict = field(default_factory=dict)  # {object name: sha256} of the weights or export staged in S3


def _stage(plan: Plan, options: dict, services: Services, runtime: str, mode: str) -> _Staged:
    in_s3 = all(r.path.startswith("s3://") for r in plan.partitions)
    target = options.get("bucket") or ("s3://cai-bench" if services.emulated and not in_s3 else None)
    if target and services.emulated:
        create_bucket(target)
    refs, data_prefix, staging_s = stage(plan.partitions, plan, target)
    # An export the functions need is made here, where torch is, then staged like weights
    model, prepared = (
        prepare_model(plan.weights, runtime, plan.seed, plan.precision) if mode == "model" else (plan.weights, {})
    )
    exported, expects, digests = runtime != "torch" and mode == "model", None, {}
    if exported and options.get("export_in_image"):
        # In the image: no fetch at a cold start. Emulated, the image is this machine, so the export is local
        weights, expects = (model if services.emulated else IMAGE_EXPORT_DIR), asdict(read_export(model).weights)
    else:
        weights, digests = (stage_export if exported else stage_weights)(model, target or data_prefix)
    if exported:
        prepared = {**prepared, "export_from": "image" if expects else "s3"}
    run_id = new_run_id()
    base = S3Prefix.parse(target or data_prefix)
    results = S3Prefix(base.bucket, base.key(f"runs/{run_id}"))
    return _Staged(replace(plan, partitions=refs), data_prefix, staging_s, weights, prepared, run_id, results, expects,
                   digests)  # fmt: skip


def _event_base(plan: Plan, staged: _Staged, runtime: str, mode: str, hold_s: float) -> dict:
    """What every invocation of the run is sent beside its units (``wire.py``)."""
    options = {"batch_size": plan.batch_size, "precision": plan.precision, "engine": plan.engine,
               "verify_checksums": plan.verify_checksums, "compile": plan.compile, "runtime": runtime}  # fmt: skip
    return {"run_id": staged.run_id, "results": staged.results.location, "options": options,
            "weights": staged.weights, "staged": staged.staged, "seed": plan.seed, "mode": mode, "hold_s": hold_s,
            **({"export_weights": staged.export_weights} if staged.export_weights else {})}  # fmt: skip


@dataclass
class _Driven:
    """What a transport did: its wall clock, the invocations it saw, what the orchestration adds, the bill."""

    wall_s: float
    invocations: list
    orchestration: dict
    billed_ms: list[int]
    billed_from: str


def _direct(dispatcher: Dispatcher, fn: _Function, staged: _Staged, event: dict, keys: RunKeys, concurrency: int,
            per_invocation: int, comm: CommConfig | None) -> _Driven:  # fmt: skip
    transport = InvokeTransport(fn.client, fn.name, event, keys, staged.results, concurrency, per_invocation,
                                staged.plan.seed, comm)  # fmt: skip
    drive(dispatcher, transport)
    billed = [i.report["billed_duration_ms"] for i in transport.invocations if i.report]
    gathered = transport.gathered.summary_for_record()
    orchestration = {"first_invoke_epoch_s": transport.first_sent_epoch, **({"comm": gathered} if gathered else {})}
    return _Driven(transport.wall_s, transport.invocations, orchestration, billed, "REPORT lines")


def _comm_config(plan: Plan, concurrency: int, per_invocation: int) -> CommConfig | None:
    """--comm's configuration, refused where its ranks could not all be alive at once (every invocation of the
    run waits for all the others in its collectives)."""
    if not plan.backend_options.get("comm"):
        return None
    world = math.ceil(len(work_units(plan)) / per_invocation)
    if world > concurrency:
        raise UserError(f"--comm needs all {world} invocations ({per_invocation} partition(s) each) alive at once, "
                        f"but --max-concurrency is {concurrency}: raise it or --partitions-per-invocation")  # fmt: skip
    return config_for_run(plan.backend_options, world, plan.work_dir)


def _through_a_map(dispatcher: Dispatcher, fn: _Function, staged: _Staged, event: dict, keys: RunKeys,
                   concurrency: int, per_invocation: int, options: dict, services: Services,
                   comm: CommConfig | None) -> _Driven:  # fmt: skip
    """The state machine (created, updated or reused), and executions of it as the transport."""
    role = options.get("state_machine_role_arn")
    endpoint = services.upstream if services.emulated else None
    client = aws.client("stepfunctions", endpoint_url=endpoint, region=fn.region, emulated=services.emulated)
    if services.emulated and role is None:
        role = emulated_role(endpoint, fn.region)
    arn, action = ensure_state_machine(client, fn.name, concurrency, role)
    transport = MapTransport(client, arn, event, keys, staged.results, per_invocation,
                             poll_s=0.25 if services.emulated else 1.0, comm=comm)  # fmt: skip
    drive(dispatcher, transport)
    for name, ready in transport.ready.items():  # an execution's output comes after its results
        dispatcher.on_ready(name, ready)
    orchestration = {"state_machine": arn, "state_machine_action": action, **map_summary(transport)}
    if comm is not None:
        orchestration["comm"] = transport.gathered.summary_for_record()
    if services.emulator is not None:
        billed = [r.billed_duration_ms for r in services.emulator.reports]
        return _Driven(transport.wall_s, [], orchestration, billed, "the emulator's REPORTs")
    # On AWS the REPORT lines are in CloudWatch Logs, not in the Map's output: the handler's own times
    timings = [i["timing"] for e in transport.executions for i in e.invocations if i.get("timing")]
    billed = [math.ceil(t["duration_ms"]) for t in timings]
    return _Driven(transport.wall_s, [], orchestration, billed, "the handler's own times (an estimate: no init phase)")


def _run_info(driven: _Driven, fn: _Function, staged: _Staged, services: Services, spent, prices: dict,
              concurrency: int, per_invocation: int, orchestrator: str) -> dict:  # fmt: skip
    info = {
        **invocation_summary(driven.invocations), "orchestrator": orchestrator, **driven.orchestration,
        "billed_from": driven.billed_from, "memory_set": fn.memory_set, "function": fn.name,
        "memory_mb": fn.memory_mb, "architecture": fn.architecture, "max_concurrency": concurrency,
        "partitions_per_invocation": per_invocation, "emulated": services.emulated,
        "region": fn.region or getattr(fn.client.meta, "region_name", None), "data": staged.data,
        "results": staged.results.location, "staging_s": staged.staging_s, **staged.prepared,
        **({"staged_export": staged.weights} if staged.prepared.get("export_from") == "s3" else {}),
        "cost": spent.to_dict(), "prices": {k: prices[k] for k in ("as_of", "region") if k in prices},
        "invocations": [asdict(i) for i in driven.invocations],
    }  # fmt: skip
    if services.emulator is not None:
        info["emulator"] = services.emulator.stats()
        if orchestrator == "stepfunctions":  # no REPORT line reached the driver; the emulator has them all
            info.update(report_summary([r.to_dict() for r in services.emulator.reports]))
        info["cpu_share"] = info["emulator"]["cpu_share"]
    return info


def run_lambda(plan: Plan, emit: Emit, mode: str = "model", hold_s: float = 0.0, emulator_faults=None) -> BackendRun:
    """Run ``plan`` on Lambda (or the emulator). ``mode="no-model"`` runs the handler without the model (it reads
    and verifies each partition, holding it ``hold_s``): the fan-out machinery on its own, for benches and tests;
    ``emulator_faults`` (tests) are the started emulator's."""
    if plan.engine == "reference":
        raise UserError("--engine reference is the one-process upstream loop: run it with --backend cpu")
    options = plan.backend_options
    runtime = options.get("runtime") or "torch"
    emulated = bool(options.get("emulate") or options.get("lambda_endpoint_url"))
    concurrency = options.get("max_concurrency") or (allowed_cpus() if emulated else DEFAULT_CONCURRENCY)
    per_invocation = options.get("partitions_per_invocation") or 1
    retries = options.get("retries")
    orchestrator = options.get("orchestrator") or "direct"
    prices = pricing.load_prices(options.get("price_file"))
    function = options.get("function") or DEFAULT_FUNCTION
    comm = _comm_config(plan, concurrency, per_invocation)
    services = start_services(options, function, options.get("memory_mb"), concurrency, emulator_faults)
    try:
        fn = _function(options, services, concurrency)
        staged = _stage(plan, options, services, runtime, mode)
        event = _event_base(plan, staged, runtime, mode, hold_s)
        secret = new_secret()
        value = {"seal": secret, "comm": comm and comm.secret()}
        keys = RunKeys(secret, run_secret.create(staged.run_id, value, fn.region), staged.run_id)
        services.stop.append(lambda: run_secret.delete(keys.secret_ref))  # stopped last in, first out
        dispatcher = Dispatcher(work_units(staged.plan), emit, DEFAULT_RETRIES if retries is None else retries)
        if orchestrator == "stepfunctions":
            driven = _through_a_map(dispatcher, fn, staged, event, keys, concurrency, per_invocation, options,
                                    services, comm)  # fmt: skip
        else:
            driven = _direct(dispatcher, fn, staged, event, keys, concurrency, per_invocation, comm)
        transitions = driven.orchestration.get("transitions", 0)
        spent = pricing.cost(driven.billed_ms, fn.memory_mb, fn.architecture, prices, transitions=transitions)
        info = _run_info(driven, fn, staged, services, spent, prices, concurrency, per_invocation, orchestrator)
        threads = services.emulator.threads if services.emulator is not None else None
        environments = {i.environment for i in driven.invocations} | {i.get("environment") for e in info.get(
            "executions", []) for i in e["invocations"]}  # fmt: skip
        return dispatched_run(plan, dispatcher, driven.wall_s, info, workers=len(environments - {None}) or None,
                              threads=threads, cost_usd=spent.usd)  # fmt: skip
    finally:
        services.close()


# ---------------------------------------------------------------------------------------------- the backend


@dataclass
class LambdaBackend:
    name: str = "lambda"
    options: tuple[BackendOption, ...] = OPTIONS
    precisions: tuple[str, ...] = CPU_PRECISIONS
    default_batch_size: int = 512

    def check(self, options: dict) -> None:
        if options.get("export_in_image") and options.get("runtime") in (None, "torch"):
            raise UserError("--export-in-image is for an exported model: add --runtime onnxruntime or openvino")
        if options.get("runtime") == "auto":
            raise UserError("--runtime auto probes this machine; a Lambda function runs what its image holds: give "
                            "torch (the default), onnxruntime or openvino")  # fmt: skip
        if options.get("bucket"):
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
        if options.get("comm"):
            check_urls(split_urls(options["comm"]))
        if options.get("price_file"):  # read now, so that a bad one costs a line, not a measured run
            pricing.load_prices(options["price_file"])
        if "timeout_s" in options and not options.get("emulate"):
            raise UserError("--timeout-s sets the emulated function's timeout: add --emulate (on AWS it is the "
                            "function's configuration)")  # fmt: skip
        if not (options.get("emulate") or options.get("lambda_endpoint_url")):
            # Credentials and region, before any data is made: building a client makes no call yet
            aws.client("lambda", region=options.get("region"))
            aws.client("s3", endpoint_url=options.get("endpoint_url"), region=options.get("region"))
        if options.get("endpoint_url"):
            # Every S3 request of the run goes there, from here on: the data's manifest and partitions, which the
            # driver reads before the backend runs, included (they would otherwise go to AWS itself)
            aws.use_endpoints(options["endpoint_url"], bool(options.get("emulate")))

    def machine(self, plan: Plan) -> str | None:
        options = plan.backend_options
        if options.get("emulate") or options.get("lambda_endpoint_url"):
            return f"lambda-emulator | {machine_id(this_machine())}"
        region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return f"aws-lambda | {region or 'default region'} | {options.get('function') or DEFAULT_FUNCTION}"

    def run(self, plan: Plan, emit: Emit) -> BackendRun:
        return run_lambda(plan, emit)


def create() -> LambdaBackend:
    return LambdaBackend()
