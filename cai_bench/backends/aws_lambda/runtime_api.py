"""Lambda's Runtime API, served to one emulated execution environment: what the image's runtime interface client
(``python -m awslambdaric``) pulls its invocations from and posts its answers to, as it does on Lambda.

    GET  /2018-06-01/runtime/invocation/next             the next event, held until there is one; headers
                                                         Lambda-Runtime-Aws-Request-Id, -Deadline-Ms,
                                                         -Invoked-Function-Arn, -Trace-Id
    POST /2018-06-01/runtime/invocation/{id}/response    the handler's result (202)
    POST /2018-06-01/runtime/invocation/{id}/error       its error, typed by Lambda-Runtime-Function-Error-Type (202)
    POST /2018-06-01/runtime/init/error                  the init phase failed (202); the runtime then exits

The first ``next`` ends the init phase, as on Lambda. Only the environment's own process is answered: each
connection's peer must be a socket that process holds (AWS's Runtime API lives inside the sandbox; here it is a
loopback port any local process could reach, and an event carries the run's secret). Every request is logged
(method, path, status) for the tests to read.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil

PREFIX = "/2018-06-01/runtime"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # Lambda's limit of a synchronous invocation's response
_INVOCATION = re.compile(rf"{PREFIX}/invocation/(?P<id>[0-9a-f-]{{36}})/(?P<what>response|error)")


def refused_length(header: str | None, limit: int) -> tuple[int, str] | None:
    """Why a request's Content-Length is refused, as (status, message): 400 where it is not a whole number of
    bytes, 413 where it is over ``limit``; None where the body may be read. Both of the emulator's servers ask."""
    text = (header or "0").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 15):
        return 400, "Content-Length must be a whole number of bytes"
    if int(text) > limit:
        return 413, f"a request body of {text} bytes; at most {limit}"
    return None


@dataclass
class Invocation:
    """One event handed to the runtime and, once it answers, its outcome."""

    request_id: str
    body: bytes
    deadline_ms: int
    function_arn: str
    trace_id: str
    answered: threading.Event = field(default_factory=threading.Event)
    payload: bytes = b""
    error_type: str | None = None  # set when the runtime posted an error, not a response
    taken_at: float | None = None  # when the runtime took it (perf_counter)


class RuntimeAPI:
    """The Runtime API of one environment, on a loopback port of its own."""

    def __init__(self) -> None:
        self.pid: int | None = None  # the environment's process, once spawned: the one peer answered
        self.changed = threading.Condition()
        self.pending: Invocation | None = None
        self.current: Invocation | None = None
        self.ready_at: float | None = None  # perf_counter of the first next: the init phase's end
        self.init_error: tuple[str, bytes] | None = None
        self.requests: list[tuple[str, str, int]] = []
        self.closed = False
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.api = self
        threading.Thread(target=self.server.serve_forever, name="cai-lambda-runtime-api", daemon=True).start()

    @property
    def address(self) -> str:
        """What AWS_LAMBDA_RUNTIME_API holds: host:port."""
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def wait_ready(self, deadline: float, alive) -> bool:
        """Until the runtime asks for its first event (True), fails its init or dies (False), or ``deadline``."""
        with self.changed:
            while self.ready_at is None and self.init_error is None and alive() and time.perf_counter() < deadline:
                self.changed.wait(0.05)
            return self.ready_at is not None

    def hand_out(self, invocation: Invocation) -> None:
        with self.changed:
            self.pending = invocation
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- what the handler below calls

    def next_invocation(self) -> Invocation | None:
        with self.changed:
            if self.ready_at is None:
                self.ready_at = time.perf_counter()
            self.changed.notify_all()
            while self.pending is None and not self.closed:
                self.changed.wait(1.0)
            if self.closed:
                return None
            self.current, self.pending = self.pending, None
            self.current.taken_at = time.perf_counter()
            return self.current

    def answer(self, request_id: str, payload: bytes, error_type: str | None) -> bool:
        with self.changed:
            invocation = self.current
            if invocation is None or invocation.request_id != request_id:
                return False
            invocation.payload, invocation.error_type = payload, error_type
            self.current = None
            invocation.answered.set()
            return True

    def failed_init(self, error_type: str, payload: bytes) -> bool:
        with self.changed:
            if self.ready_at is not None:
                return False  # past the init phase: Lambda refuses it too
            self.init_error = (error_type, payload)
            self.changed.notify_all()
            return True

    def is_own(self, peer: tuple) -> bool:
        """Whether ``peer`` (host, port) is a socket the environment's process holds."""
        if self.pid is None:
            return False
        try:
            held = psutil.Process(self.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(tuple(c.laddr[:2]) == tuple(peer[:2]) for c in held if c.laddr)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: RuntimeAPI

    def handle_error(self, request, client_address) -> None:
        # A runtime killed (a fault, a timeout, the end of its environment) mid-request: nothing to tell anyone
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    peer_checked = False

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict | bytes, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.server.api.requests.append((self.command, self.path, status))
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _allowed(self) -> bool:
        if not self.peer_checked:
            if not self.server.api.is_own(self.client_address):
                self.close_connection = True
                self._send(403, {"errorType": "Forbidden", "errorMessage": "not this environment's runtime"})
                return False
            self.peer_checked = True  # once per connection: the client keeps its connection open
        return True

    def _body(self) -> bytes | None:
        refused = refused_length(self.headers.get("Content-Length"), MAX_RESPONSE_BYTES)
        if refused is not None:
            self.close_connection = True  # the body is left unread
            status, message = refused
            kind = "InvalidRequest" if status == 400 else "RequestEntityTooLarge"
            self._send(status, {"errorType": kind, "errorMessage": message})
            return None
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        if not self._allowed():
            return
        if self.path != f"{PREFIX}/invocation/next":
            self._send(404, {"errorType": "NotFound", "errorMessage": f"no such path: GET {self.path}"})
            return
        invocation = self.server.api.next_invocation()
        if invocation is None:
            self.close_connection = True
            self._send(410, {"errorType": "Shutdown", "errorMessage": "the environment is shutting down"})
            return
        self._send(200, invocation.body, {
            "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
            "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": invocation.function_arn,
            "Lambda-Runtime-Trace-Id": invocation.trace_id,
        })  # fmt: skip

    def do_POST(self) -> None:
        if not self._allowed():
            return
        body = self._body()
        if body is None:
            return
        api = self.server.api
        if self.path == f"{PREFIX}/init/error":
            error_type = self.headers.get("Lambda-Runtime-Function-Error-Type") or "Runtime.Unknown"
            if api.failed_init(error_type, body):
                self._send(202, {"status": "OK"})
            else:
                self._send(403, {"errorType": "InvalidStateTransition", "errorMessage": "the init phase is over"})
            return
        match = _INVOCATION.fullmatch(self.path)
        if match is None:
            self._send(404, {"errorType": "NotFound", "errorMessage": f"no such path: POST {self.path}"})
            return
        error_type = None
        if match["what"] == "error":
            error_type = self.headers.get("Lambda-Runtime-Function-Error-Type") or "Unhandled"
        if api.answer(match["id"], body, error_type):
            self._send(202, {"status": "OK"})
        else:
            self._send(400, {"errorType": "InvalidRequestID", "errorMessage": "Invalid request ID"})
