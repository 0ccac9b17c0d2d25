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
    init limit        an init past 10 s is dropped and run again in a fresh environment inside the first
                      invocation, under the function's timeout, with an INIT_REPORT line in the log (Status:
                      timeout); its time is then part of the invocation's Duration
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

The execution environments are ``environments.py``; S3 on loopback is ``local_s3.py``.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cai_bench.backends.aws_lambda.environments import (
    LOG_TAIL_BYTES,
    Environment,
    EnvironmentGone,
    Faults,
    FunctionConfig,
    cpu_share,
    emulated_function_env,
    vcpus_for,
)
from cai_bench.backends.aws_lambda.image_python import image_python
from cai_bench.backends.aws_lambda.local_s3 import start_local_s3
from cai_bench.backends.aws_lambda.report_log import Report, format_init_report, format_report, init_outcome
from cai_bench.backends.aws_lambda.runtime_api import Invocation, refused_length

SERVICE_TIME_HEADER = "X-Cai-Bench-Service-Ms"


_API = re.compile(r"/2015-03-31/functions/(?P<name>[^/?]+)(?P<rest>/invocations|/configuration)?/?(?:\?.*)?$")


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
    item = event.get("item") if isinstance(event, dict) else None
    units = item.get("units") if isinstance(item, dict) else None
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
        init_ms, started, init_lines = None, time.perf_counter(), ""
        if environment is None:
            cold = self._cold_start(request_id, tail)
            if isinstance(cold, Reply):
                return cold
            environment, init_ms, started, init_lines = cold
        with self.lock:
            fault = self.faults.take(partitions)
        arn = self.config.to_api(self.region)["FunctionArn"]
        left_s = self.config.timeout_s - (time.perf_counter() - started)  # a re-run init took its share
        invocation = Invocation(request_id, payload or b"{}", int((time.time() + left_s) * 1000), arn,
                                f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};Sampled=0")  # fmt: skip
        try:
            outcome = environment.invoke(invocation, left_s, fault, self.faults.kill_after_s)
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
            return self._function_error(request_id, *what, duration_ms, init_ms, environment, tail, init_lines)
        duration_ms = (time.perf_counter() - started) * 1000
        with self.lock:
            self.idle.append(environment)
        report = self._report(request_id, duration_ms, init_ms, environment.peak_rss_mb, init_lines)
        error = "Unhandled" if outcome.error_type is not None else None
        return self._reply(outcome.payload, request_id, outcome.log, report, tail, error, init_lines)

    def _spawn(self) -> Environment:
        environment = Environment(self.config, self._next_cores(), self.log_dir, self.extra_env, self.cpu_share,
                                  self.region, self.image)  # fmt: skip
        with self.lock:
            self.every.append(environment)
            self.cold_starts += 1
        return environment

    def _cold_start(self, request_id: str, tail: bool) -> tuple[Environment, float | None, float, str] | Reply:
        """A new environment through its init phase: (it, its Init Duration, when this invocation's Duration
        starts, the INIT_REPORT lines of its log), or the reply of an init that failed.

        As on Lambda: an init past the init limit is not an error; the environment is dropped and the init runs
        again in a fresh one inside this invocation, under the function's timeout. Its time is then part of the
        invocation's Duration (there is no Init Duration), and the log says so in an INIT_REPORT line."""
        environment = self._spawn()
        try:
            return environment, environment.wait_ready(self.faults.init_limit_s), time.perf_counter(), ""
        except EnvironmentGone as gone:
            if gone.why != "init_timeout":
                return self._init_failed(request_id, gone, environment, tail)
        lines = format_init_report(self.faults.init_limit_s * 1000, "init", "timeout")
        started = time.perf_counter()
        environment = self._spawn()
        try:
            environment.wait_ready(self.config.timeout_s)
        except EnvironmentGone as gone:
            if gone.why != "init_timeout":
                return self._init_failed(request_id, gone, environment, tail, lines, phase="invoke")
            lines += format_init_report(self.config.timeout_s * 1000, "invoke", "timeout")
            message = f"RequestId: {request_id} Error: Task timed out after {self.config.timeout_s:.2f} seconds"
            return self._function_error(request_id, "Sandbox.Timedout", message, self.config.timeout_s * 1000, None,
                                        environment, tail, lines)  # fmt: skip
        return environment, None, started, lines

    def _init_failed(self, request_id: str, gone: EnvironmentGone, environment: Environment, tail: bool,
                     init_lines: str = "", phase: str = "init") -> Reply:  # fmt: skip
        """The runtime failed its init phase (Lambda's error as the runtime posted it) or exited without a word."""
        init_ms = (time.perf_counter() - environment.spawned) * 1000
        if gone.init_error is None:
            kind, message = "Runtime.ExitError", "Runtime exited without providing a reason"
        else:
            kind, body = gone.init_error
            try:
                message = str(json.loads(body).get("errorMessage") or "")
            except (ValueError, AttributeError, RecursionError):
                message = body[:1000].decode(errors="replace")
        init_lines += format_init_report(init_ms, phase, "error", kind)
        if phase == "invoke":  # a re-run init is part of the invocation's Duration
            duration_ms, reported_init = init_ms, None
        else:  # a runtime that died in its init phase reported none
            duration_ms, reported_init = 0.0, (None if gone.init_error is None else init_ms)
        return self._function_error(request_id, kind, message, duration_ms, reported_init, environment, tail,
                                    init_lines)  # fmt: skip

    def _function_error(self, request_id: str, kind: str, message: str, duration_ms: float, init_ms: float | None,
                        environment: Environment, tail: bool, init_lines: str = "") -> Reply:  # fmt: skip
        used = self.config.memory_mb if kind == "Runtime.OutOfMemory" else environment.peak_rss_mb
        report = self._report(request_id, duration_ms, init_ms, used, init_lines)
        body = json.dumps({"errorType": kind, "errorMessage": message}).encode()
        return self._reply(body, request_id, f"{message}\n", report, tail, "Unhandled", init_lines)

    def _report(self, request_id: str, duration_ms: float, init_ms: float | None, used_mb: int,
                init_lines: str = "") -> Report:  # fmt: skip
        billed = math.ceil(duration_ms + (init_ms or 0.0))  # an image's init phase is billed, as on Lambda
        init = None if init_ms is None else round(init_ms, 2)
        used = min(int(used_mb), self.config.memory_mb)
        report = Report(request_id, round(duration_ms, 2), billed, self.config.memory_mb, used, init,
                        *init_outcome(init_lines))  # fmt: skip
        with self.lock:
            self.reports.append(report)
        return report

    def _reply(self, body: bytes, request_id: str, log: str, report: Report, tail: bool, error: str | None,
               init_lines: str = "") -> Reply:  # fmt: skip
        headers = {"Content-Type": "application/json", "X-Amz-Executed-Version": "$LATEST",
                   "x-amzn-RequestId": request_id}  # fmt: skip
        if error:
            headers["X-Amz-Function-Error"] = error
        if tail:
            text = f"{init_lines}START RequestId: {request_id} Version: $LATEST\n{log}END RequestId: {request_id}\n"
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
