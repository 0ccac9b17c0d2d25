"""A local service that speaks Lambda's Invoke HTTP API, with the real handler running behind it in execution
environments of its own (separate processes), and S3 as moto's server on loopback.

The driver's boto3 client changes only its endpoint. What the emulator does as the service does:
    Invoke            POST /2015-03-31/functions/{name}/invocations (RequestResponse), the result as the body;
                      a handler error, a timeout or an out-of-memory kill as a 200 with X-Amz-Function-Error
                      and Lambda's error JSON; with X-Amz-Log-Type: Tail, the last 4 KB of the log in
                      X-Amz-Log-Result, ending in a REPORT line in the service's format
    configuration     GET /2015-03-31/functions/{name}/configuration (and GetFunction)
    environments      a process each, the image's own runtime (python -m awslambdaric HANDLER) on the image's
                      dependency set (image_python.py), pulling invocations from a Runtime API of its own
                      (runtime_api.py); a cold start's Init Duration is the time from spawn to its first
                      next; reused while warm, one invocation at a time; a timed-out or killed environment is
                      replaced by a cold one
    memory            each environment's resident memory watched; past the function's memory it is killed and
                      the invocation fails with Runtime.OutOfMemory, as on Lambda
    timeout           "Task timed out after N.00 seconds" (Sandbox.Timedout), and the environment is dropped
    CPU               Lambda's share for the memory (one vCPU per 1,769 MB, at most 6), capped by this
                      machine's cores: pinned to as many cores as the share rounds up to (sched_setaffinity),
                      and a fraction of them by stopping and continuing the environment in 20 ms slices
                      while it runs an invocation (1,024 MB: 58% of one core), as Lambda's CPU quota does;
                      the init phase runs unthrottled
    concurrency       calls beyond the limit get 429 TooManyRequestsException
    other APIs        with ``upstream`` (moto's server), every other request is passed on to it: Step
                      Functions' interpreter in moto calls Lambda and S3 at one endpoint, this one, so a
                      Distributed Map's invocations run here

``Faults`` lets tests (only) throttle the first calls and make chosen partitions run out of memory, hang, or
lose their environment mid-unit, a given number of times, all from outside the environment (its code is the
image's): out of memory lowers that invocation's limit below what the environment holds, so the watcher kills
it as it kills one that grew; a hang stops the process (SIGSTOP) once it has taken the event.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psutil

from cai_bench.backends.aws_lambda.image_python import ImagePython, image_python
from cai_bench.backends.aws_lambda.report_log import Report, format_report
from cai_bench.backends.aws_lambda.runtime_api import Invocation, RuntimeAPI, refused_length
from cai_bench.core import aws
from cai_bench.core.errors import UserError

HANDLER = "cai_bench.backends.aws_lambda.handler.handler"
MB_PER_VCPU = 1769  # Lambda: one vCPU's worth at 1,769 MB, up to 6 vCPUs at 10,240 MB
MAX_VCPUS = 6
INIT_TIMEOUT_S = 10.0  # Lambda's limit on the init phase
LOG_TAIL_BYTES = 4096
SERVICE_TIME_HEADER = "X-Cai-Bench-Service-Ms"
_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)
_API = re.compile(r"/2015-03-31/functions/(?P<name>[^/?]+)(?P<rest>/invocations|/configuration)?/?(?:\?.*)?$")


def emulated_function_env(s3_endpoint: str) -> dict:
    """What an emulated function's environment adds: the loopback S3 and throwaway credentials."""
    return {aws.S3_ENDPOINT_ENV: s3_endpoint, aws.EMULATED_ENV: "1", "AWS_ACCESS_KEY_ID": "emulated",
            "AWS_SECRET_ACCESS_KEY": "emulated", "AWS_DEFAULT_REGION": aws.EMULATED_REGION}  # fmt: skip


def vcpus_for(memory_mb: int) -> int:
    return max(1, min(MAX_VCPUS, math.ceil(memory_mb / MB_PER_VCPU)))


def cpu_share(memory_mb: int, cores: int) -> float:
    """The vCPUs' worth Lambda gives ``memory_mb``, as far as ``cores`` of this machine go."""
    return min(memory_mb / MB_PER_VCPU, MAX_VCPUS, cores)


@dataclass
class FunctionConfig:
    name: str = "cai-bench"
    memory_mb: int = 10240
    timeout_s: float = 900.0
    handler: str = HANDLER
    architecture: str = "x86_64"
    environment: dict = field(default_factory=dict)  # the function's environment variables
    image: str = "torch"  # the image's flavour (deploy/lambda/Dockerfile): torch, onnxruntime, openvino

    def to_api(self, region: str = "us-east-1") -> dict:
        return {
            "FunctionName": self.name,
            "FunctionArn": f"arn:aws:lambda:{region}:000000000000:function:{self.name}",
            "MemorySize": self.memory_mb,
            "Timeout": math.ceil(self.timeout_s),
            "Handler": self.handler,
            "Architectures": [self.architecture],
            "PackageType": "Image",
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "Version": "$LATEST",
        }


@dataclass
class Faults:
    """Faults to inject, for tests: partition -> how many more invocations that run it suffer the fault."""

    throttle_first: int = 0  # the first K calls get 429
    oom: dict = field(default_factory=dict)  # its limit drops below what it holds once it takes the event
    hang: dict = field(default_factory=dict)  # it is stopped once it takes the event, and so runs past the timeout
    kill: dict = field(default_factory=dict)  # it is SIGKILLed ``kill_after_s`` into the invocation
    kill_after_s: float = 0.2

    def take(self, partitions: list[int]) -> str | None:
        for kind in ("oom", "hang", "kill"):
            table = getattr(self, kind)
            for p in partitions:
                if table.get(p, 0) > 0:
                    table[p] -= 1
                    return kind
        return None


class EnvironmentGone(Exception):
    def __init__(self, why: str, init_error: tuple[str, bytes] | None = None):
        super().__init__(why)
        self.why = why  # "oom", "timeout", "exit", "init" (the runtime posted an init error)
        self.init_error = init_error


@dataclass
class Outcome:
    """What one invocation's runtime answered: its payload, typed as an error or not, and its log."""

    payload: bytes
    error_type: str | None
    log: str


def _function_environment(config: FunctionConfig, extra_env: dict, api: str, region: str, threads: int,
                          image: ImagePython | None) -> dict:  # fmt: skip
    """The variables an environment starts with: Lambda's own, the function's, the emulator's."""
    # Never the user's own credentials or profile: the emulated function gets the throwaway ones it is given
    env = {k: v for k, v in os.environ.items() if k not in _CREDENTIAL_ENV}
    if image is not None:  # the image's interpreter sees its own site-packages, nothing of this one's
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE"):
            env.pop(name, None)
    env.update({**extra_env, **config.environment})
    env.update(
        AWS_LAMBDA_RUNTIME_API=api, _HANDLER=config.handler, AWS_LAMBDA_FUNCTION_NAME=config.name,
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE=str(config.memory_mb), AWS_LAMBDA_FUNCTION_VERSION="$LATEST",
        AWS_LAMBDA_LOG_GROUP_NAME=f"/aws/lambda/{config.name}",
        AWS_LAMBDA_LOG_STREAM_NAME=time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex,
        AWS_LAMBDA_INITIALIZATION_TYPE="on-demand", AWS_REGION=region, AWS_DEFAULT_REGION=region,
        LAMBDA_TASK_ROOT=os.getcwd(), TZ=":UTC", PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
    )  # fmt: skip
    return env


class Environment:
    """One execution environment: the image's runtime interface client (``python -m awslambdaric HANDLER``, the
    image's ENTRYPOINT and CMD) in a process, and the Runtime API it pulls its invocations from."""

    def __init__(self, config: FunctionConfig, cores: list[int], log_dir: str, extra_env: dict, share: float,
                 region: str = "us-east-1", image: ImagePython | None = None):  # fmt: skip
        self.id = uuid.uuid4().hex[:8]
        self.config = config
        self.region = region
        self.cores = cores
        self.duty = min(1.0, share / len(cores))  # the part of its cores' time it may run
        self.peak_rss_mb = 0
        self.killed_for: str | None = None
        self.api = RuntimeAPI()
        env = _function_environment(config, extra_env, self.api.address, region, len(cores), image)
        self.spawned = time.perf_counter()
        self.log_path = os.path.join(log_dir, f"environment-{self.id}.log")
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        python = image.python if image is not None else sys.executable
        self.command = [python, "-m", "awslambdaric", config.handler]
        # Its own session: a Ctrl-C at the driver's terminal is the driver's, not the function's
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                        env=env, start_new_session=True,
                                        preexec_fn=self._pin if hasattr(os, "sched_setaffinity") else None)  # fmt: skip
        self.api.pid = self.process.pid

    def _pin(self) -> None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, self.cores)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self) -> float:
        """Block until the runtime asks for its first event (its init phase done); the init duration in ms."""
        if not self.api.wait_ready(time.perf_counter() + INIT_TIMEOUT_S, lambda: self.alive):
            why = "init" if self.api.init_error is not None else "exit"
            self.kill(why)
            raise EnvironmentGone(why, self.api.init_error)
        return (self.api.ready_at - self.spawned) * 1000

    def invoke(self, invocation: Invocation, timeout_s: float, fault: str | None, kill_after_s: float) -> Outcome:
        """Run one invocation; what the runtime answered, or EnvironmentGone (the process is then dead)."""
        log_from = os.path.getsize(self.log_path)
        watching = threading.Event()
        watch = threading.Thread(target=self._watch, args=(watching, invocation, fault, kill_after_s), daemon=True)
        threads = [watch]
        if self.duty < 1.0 and fault != "hang":
            threads.append(threading.Thread(target=self._throttle, args=(watching,), daemon=True))
        for thread in threads:
            thread.start()
        began = time.perf_counter()
        self.api.hand_out(invocation)
        try:
            while not invocation.answered.wait(0.05):
                if not self.alive or self.killed_for or time.perf_counter() - began >= timeout_s:
                    break
        finally:
            watching.set()
            for thread in threads:
                thread.join()
        if not invocation.answered.is_set():
            overran = time.perf_counter() - began >= timeout_s
            self.kill(self.killed_for or ("timeout" if overran else "exit"))
            raise EnvironmentGone(self.killed_for)
        self.peak_rss_mb = max(self.peak_rss_mb, _high_water_mb(self.process.pid))
        return Outcome(invocation.payload, invocation.error_type, self._log_since(log_from))

    def _log_since(self, offset: int) -> str:
        """What the environment printed since ``offset`` of its log (stdout and stderr, unbuffered)."""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read()[-3000:].decode(errors="replace")

    def _watch(self, stop: threading.Event, invocation: Invocation, fault: str | None, kill_after_s: float) -> None:
        """Kill the environment once it holds more than its memory (or, as a test's fault, after a while)."""
        try:
            process = psutil.Process(self.process.pid)
        except psutil.Error:
            return
        began = time.perf_counter()
        limit = self.config.memory_mb << 20
        while not stop.wait(0.01):
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                return
            self.peak_rss_mb = max(self.peak_rss_mb, rss >> 20)
            if fault == "oom" and invocation.taken_at is not None:
                limit = 0  # the fault: this invocation's limit is below what the environment holds
            if fault == "hang" and invocation.taken_at is not None:
                with contextlib.suppress(ProcessLookupError, OSError):
                    self.process.send_signal(signal.SIGSTOP)  # silent from here on, as a handler that hangs
                fault = None
            if rss > limit:
                self.kill("oom")
                return
            if fault == "kill" and time.perf_counter() - began > kill_after_s:
                self.kill("exit")
                return

    def _throttle(self, stop: threading.Event, slice_s: float = 0.02) -> None:
        """Let the environment run ``duty`` of each slice, stopped for the rest; running again at the end."""
        running_s, stopped_s = slice_s * self.duty, slice_s * (1.0 - self.duty)
        try:
            while not stop.wait(running_s):
                self.process.send_signal(signal.SIGSTOP)
                stop.wait(stopped_s)
                self.process.send_signal(signal.SIGCONT)
        except (ProcessLookupError, OSError):
            pass
        finally:
            with contextlib.suppress(ProcessLookupError, OSError):
                self.process.send_signal(signal.SIGCONT)

    def kill(self, why: str) -> None:
        if self.killed_for is None:
            self.killed_for = why
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._release()

    def close(self, wait_s: float = 5.0) -> None:
        """End a warm environment: SIGTERM, as Lambda ends one; killed if it has not exited ``wait_s`` later
        (``wait_s=0``: only tell it)."""
        with contextlib.suppress(ProcessLookupError, OSError):
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
        if wait_s <= 0 and self.process.poll() is None:
            return
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.kill("exit")
        self._release()

    def _release(self) -> None:
        with contextlib.suppress(OSError):
            self.log.close()
        if not self.api.closed:
            self.api.close()


def _high_water_mb(pid: int) -> int:
    """The process's resident high-water mark (VmHWM), read from outside: what Lambda reports as Max Memory
    Used. Not ru_maxrss of the emulator's children: that would carry the emulator's own size across exec."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError):
        pass
    try:
        return psutil.Process(pid).memory_info().rss >> 20
    except psutil.Error:
        return 0


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes


# Lambda's own limit of a synchronous invocation's payload; what the emulator passes on to moto (S3, Step
# Functions under --orchestrator stepfunctions) may be a partition, hence the larger one
MAX_INVOKE_BYTES = 6 * 1024 * 1024
MAX_PASSED_ON_BYTES = 1 << 30


def _partitions_named(event) -> list[int]:
    """The partitions an event's units name (what injected faults are keyed by); -1 or none where it is not shaped
    as the driver's events are."""
    units = event.get("units") if isinstance(event, dict) else None
    if not isinstance(units, list):
        return []
    found = []
    for unit in units:
        ref = unit.get("ref") if isinstance(unit, dict) else None
        index = ref.get("index") if isinstance(ref, dict) else None
        found.append(index if type(index) is int else -1)
    return found


def _error(status: int, kind: str, message: str, **extra) -> Reply:
    body = json.dumps({"Type": "User", "message": message, **extra}).encode()
    return Reply(status, {"x-amzn-ErrorType": kind, "Content-Type": "application/json"}, body)


class Emulator:
    """The function and its environments; ``serve`` puts the Invoke API in front of it."""

    def __init__(self, config: FunctionConfig, concurrency: int = 10, faults: Faults | None = None,
                 extra_env: dict | None = None, region: str = "us-east-1", upstream: str | None = None,
                 dockerfile: Path | None = None):  # fmt: skip
        self.config = config
        self.concurrency = concurrency
        self.faults = faults or Faults()
        self.extra_env = dict(extra_env or {})
        self.region = region
        self.lock = threading.Lock()
        self.idle: list[Environment] = []
        self.every: list[Environment] = []
        self.in_flight = 0
        self.calls = 0
        self.throttled = 0
        self.cold_starts = 0
        self.upstream = upstream
        self.reports: list[Report] = []  # every invocation's REPORT: the bill, when no REPORT line reaches the driver
        self.log_dir = tempfile.mkdtemp(prefix="cai-bench-lambda-")
        try:
            cores = sorted(os.sched_getaffinity(0))
        except AttributeError:
            cores = list(range(os.cpu_count() or 1))
        self.threads = min(vcpus_for(config.memory_mb), len(cores))
        self.cpu_share = cpu_share(config.memory_mb, len(cores))
        self._cores = itertools.cycle(cores)
        self.server: ThreadingHTTPServer | None = None
        # The image's own dependency set for its environments (None where there is no Dockerfile to read)
        self.image = image_python(config.image, dockerfile)

    def _next_cores(self) -> list[int]:
        return sorted({next(self._cores) for _ in range(self.threads)})

    # -- the Invoke API

    def invoke(self, name: str, payload: bytes, tail: bool) -> Reply:
        if name != self.config.name:
            return self._not_found(name)
        with self.lock:
            self.calls += 1
            if self.calls <= self.faults.throttle_first or self.in_flight >= self.concurrency:
                self.throttled += 1
                return _error(429, "TooManyRequestsException", "Rate Exceeded.",
                              Reason="ReservedFunctionConcurrentInvocationLimitExceeded")  # fmt: skip
            self.in_flight += 1
            environment = self.idle.pop() if self.idle else None
        try:
            return self._run(environment, payload, tail)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _run(self, environment: Environment | None, payload: bytes, tail: bool) -> Reply:
        request_id = str(uuid.uuid4())
        try:
            event = json.loads(payload or b"{}")
        except (ValueError, RecursionError):  # not JSON, an integer past the digit limit, nested too deep
            return _error(400, "InvalidRequestContentException", "Could not parse request body into json")
        partitions = _partitions_named(event)
        init_ms = None
        if environment is None:
            environment = Environment(self.config, self._next_cores(), self.log_dir, self.extra_env, self.cpu_share,
                                      self.region, self.image)  # fmt: skip
            with self.lock:
                self.every.append(environment)
                self.cold_starts += 1
            try:
                init_ms = environment.wait_ready()
            except EnvironmentGone as gone:
                return self._init_failed(request_id, gone, environment, tail)
        with self.lock:
            fault = self.faults.take(partitions)
        arn = self.config.to_api(self.region)["FunctionArn"]
        invocation = Invocation(request_id, payload or b"{}", int((time.time() + self.config.timeout_s) * 1000), arn,
                                f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};Sampled=0")  # fmt: skip
        started = time.perf_counter()
        try:
            outcome = environment.invoke(invocation, self.config.timeout_s, fault, self.faults.kill_after_s)
        except EnvironmentGone as gone:
            duration_ms = (time.perf_counter() - started) * 1000
            if gone.why == "timeout":
                what = ("Sandbox.Timedout", f"RequestId: {request_id} Error: Task timed out after "
                        f"{self.config.timeout_s:.2f} seconds")  # fmt: skip
                duration_ms = self.config.timeout_s * 1000
            elif gone.why == "oom":
                what = ("Runtime.OutOfMemory", f"RequestId: {request_id} Error: Runtime exited with error: "
                        "signal: killed")  # fmt: skip
            else:
                what = ("Runtime.ExitError", f"RequestId: {request_id} Error: Runtime exited with error: "
                        "signal: killed")  # fmt: skip
            return self._function_error(request_id, *what, duration_ms, init_ms, environment, tail)
        duration_ms = (time.perf_counter() - started) * 1000
        with self.lock:
            self.idle.append(environment)
        report = self._report(request_id, duration_ms, init_ms, environment.peak_rss_mb)
        error = "Unhandled" if outcome.error_type is not None else None
        return self._reply(outcome.payload, request_id, outcome.log, report, tail, error)

    def _init_failed(self, request_id: str, gone: EnvironmentGone, environment: Environment, tail: bool) -> Reply:
        """The runtime failed its init phase (Lambda's error as the runtime posted it) or exited without a word."""
        if gone.init_error is None:
            return self._function_error(request_id, "Runtime.ExitError", "Runtime exited without providing a "
                                        "reason", 0.0, None, environment, tail)  # fmt: skip
        kind, body = gone.init_error
        try:
            message = str(json.loads(body).get("errorMessage") or "")
        except (ValueError, AttributeError, RecursionError):
            message = body[:1000].decode(errors="replace")
        init_ms = (time.perf_counter() - environment.spawned) * 1000
        return self._function_error(request_id, kind, message, 0.0, init_ms, environment, tail)

    def _function_error(self, request_id: str, kind: str, message: str, duration_ms: float, init_ms: float | None,
                        environment: Environment, tail: bool) -> Reply:  # fmt: skip
        used = self.config.memory_mb if kind == "Runtime.OutOfMemory" else environment.peak_rss_mb
        report = self._report(request_id, duration_ms, init_ms, used)
        body = json.dumps({"errorType": kind, "errorMessage": message}).encode()
        return self._reply(body, request_id, f"{message}\n", report, tail, "Unhandled")

    def _report(self, request_id: str, duration_ms: float, init_ms: float | None, used_mb: int) -> Report:
        billed = math.ceil(duration_ms + (init_ms or 0.0))  # an image's init phase is billed, as on Lambda
        init = None if init_ms is None else round(init_ms, 2)
        used = min(int(used_mb), self.config.memory_mb)
        report = Report(request_id, round(duration_ms, 2), billed, self.config.memory_mb, used, init)
        with self.lock:
            self.reports.append(report)
        return report

    def _reply(self, body: bytes, request_id: str, log: str, report: Report, tail: bool, error: str | None) -> Reply:
        headers = {"Content-Type": "application/json", "X-Amz-Executed-Version": "$LATEST",
                   "x-amzn-RequestId": request_id}  # fmt: skip
        if error:
            headers["X-Amz-Function-Error"] = error
        if tail:
            text = f"START RequestId: {request_id} Version: $LATEST\n{log}END RequestId: {request_id}\n"
            text += format_report(report) + "\n"
            headers["X-Amz-Log-Result"] = base64.b64encode(text.encode()[-LOG_TAIL_BYTES:]).decode()
        return Reply(200, headers, body)

    def _not_found(self, name: str) -> Reply:
        arn = f"arn:aws:lambda:{self.region}:000000000000:function:{name}"
        return _error(404, "ResourceNotFoundException", f"Function not found: {arn}")

    def configuration(self, name: str) -> Reply:
        if name != self.config.name:
            return self._not_found(name)
        return Reply(200, {"Content-Type": "application/json"}, json.dumps(self.config.to_api(self.region)).encode())

    # -- serving

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the HTTP API in a background thread; its endpoint URL."""
        self.server = _Server((host, port), _InvokeAPI)
        self.server.emulator = self
        threading.Thread(target=self.server.serve_forever, name="cai-lambda-emulator", daemon=True).start()
        return f"http://{host}:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self.lock:
            environments, self.idle = [e for e in self.every if e.alive], []
        for environment in environments:  # all told at once, then waited for: not 5 s each in turn
            environment.close(wait_s=0)
        deadline = time.monotonic() + 5
        for environment in environments:
            environment.close(wait_s=max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict:
        image = self.image.describe() if self.image else {"flavour": None, "python": sys.executable}
        return {"calls": self.calls, "throttled": self.throttled, "cold_starts": self.cold_starts,
                "image": image["flavour"], "image_packages": image.get("packages"),
                "threads_per_environment": self.threads, "cpu_share": round(self.cpu_share, 3),
                "concurrency": self.concurrency,
                "memory_mb": self.config.memory_mb, "timeout_s": self.config.timeout_s}  # fmt: skip


class _InvokeAPI(BaseHTTPRequestHandler):
    """Lambda's Invoke API (and GetFunction), answered by ``server.emulator``; with an upstream, whatever is not
    Lambda's is passed on to it."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def _route(self) -> tuple[str, str] | None:
        match = _API.match(self.path)
        if not match:
            return None
        name = unquote(match["name"]).rsplit(":function:", 1)[-1].split(":")[0]
        return name, match["rest"] or ""

    def _body(self, limit: int) -> bytes | None:
        """The request's body, or None once a 400 or 413 has answered a Content-Length that is not a whole number
        of bytes, or is over ``limit`` (the body is then left unread, and the connection closed)."""
        refused = refused_length(self.headers.get("Content-Length"), limit)
        if refused is not None:
            self.close_connection = True
            status, message = refused
            kind = "InvalidRequestContentException" if status == 400 else "RequestTooLargeException"
            self._send(_error(status, kind, message))
            return None
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _pass_on(self, body: bytes | None = None) -> None:
        if body is None:
            body = self._body(MAX_PASSED_ON_BYTES)
            if body is None:
                return
        where = urlsplit(self.server.emulator.upstream)
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=300)
        try:
            connection.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            answer = connection.getresponse()
            data = answer.read()
        finally:
            connection.close()
        skip = ("content-length", "transfer-encoding", "connection")
        headers = {k: v for k, v in answer.getheaders() if k.lower() not in skip}
        self._send(Reply(answer.status, headers, b"" if self.command == "HEAD" else data))

    def do_PUT(self) -> None:
        if self.server.emulator.upstream:
            self._pass_on()
        else:
            self._send(_error(404, "UnknownOperationException", f"no such operation: {self.command}"))

    do_DELETE = do_HEAD = do_PUT

    def do_POST(self) -> None:
        received = time.perf_counter()
        route = self._route()
        payload = self._body(MAX_PASSED_ON_BYTES if route is None else MAX_INVOKE_BYTES)
        if payload is None:
            return
        if route is None and self.server.emulator.upstream:
            self._pass_on(payload)
            return
        if route is None or route[1] != "/invocations":
            self._send(_error(404, "UnknownOperationException", f"no such operation: POST {self.path}"))
            return
        if self.headers.get("X-Amz-Invocation-Type", "RequestResponse") != "RequestResponse":
            self._send(_error(400, "InvalidParameterValueException",
                              "the emulator runs RequestResponse invocations only"))  # fmt: skip
            return
        reply = self.server.emulator.invoke(route[0], payload, self.headers.get("X-Amz-Log-Type") == "Tail")
        # Not Lambda's: how long the service itself held the call, so that the driver's own overhead
        # can be told from the emulator's (they share this machine)
        reply.headers[SERVICE_TIME_HEADER] = f"{(time.perf_counter() - received) * 1000:.3f}"
        self._send(reply)

    def do_GET(self) -> None:
        route = self._route()
        if route is None and self.server.emulator.upstream:
            self._pass_on()
            return
        if route is None or route[1] == "/invocations":
            self._send(_error(404, "UnknownOperationException", f"no such operation: GET {self.path}"))
            return
        reply = self.server.emulator.configuration(route[0])
        if route[1] == "" and reply.status == 200:
            reply = Reply(200, reply.headers, json.dumps({"Configuration": json.loads(reply.body)}).encode())
        self._send(reply)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    emulator: Emulator


# ---------------------------------------------------------------------------------------------- local S3


@dataclass
class LocalS3:
    """moto's S3 server in a process of its own on loopback (what --emulate uses when no endpoint is given)."""

    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_S3_SERVER = """
import sys
if sys.argv[2] == "1":  # run state machines: moto's interpreter, calling Lambda and S3 at MOTO_PORT
    from moto.core.config import default_user_config
    default_user_config.setdefault("stepfunctions", {})["execute_state_machine"] = True
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()  # until the parent closes it, or dies
server.stop()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_s3(timeout_s: float = 30.0, state_machines_via: int | None = None) -> LocalS3:
    """Start moto's server on a free loopback port and wait until it answers. With ``state_machines_via`` (the
    emulator's port, passing on to this server what is not Lambda's), Step Functions executions really run the
    state machine, its Lambda and S3 calls going to that port."""
    try:
        import moto.server  # noqa: F401 (the [aws] extra: only whether it is there; it runs in its own process)
    except ImportError:
        raise UserError("--emulate needs moto's server for S3: pip install 'cai-bench[aws]'") from None
    port = free_port()
    env = dict(os.environ)
    if state_machines_via is not None:
        env["MOTO_PORT"] = str(state_machines_via)
    process = subprocess.Popen([sys.executable, "-c", _S3_SERVER, str(port), "1" if state_machines_via else "0"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env)  # fmt: skip
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready or process.stdout.readline().strip() != "ready":
        process.kill()
        raise UserError("the local S3 server (moto) did not start")
    return LocalS3(process, f"http://127.0.0.1:{port}")


def serve_standalone(config: FunctionConfig, concurrency: int, endpoint_url: str | None, port: int, announce) -> None:
    """``cai-bench lambda emulate``: the emulator on its own, on ``port``, with a local S3 unless ``endpoint_url``
    names one; ``announce(emulator, url, s3_url)`` once it serves, then until Ctrl-C, then everything stopped."""
    stops = []
    try:
        if endpoint_url is None:
            local = start_local_s3()
            stops.append(local.stop)
            endpoint_url = local.url
        emulator = Emulator(config, concurrency=concurrency, extra_env=emulated_function_env(endpoint_url))
        stops.append(emulator.stop)
        announce(emulator, emulator.serve(port=port), endpoint_url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for stop in reversed(stops):
            stop()
