"""One emulated execution environment: a process that imports the handler once (its init phase) and then runs
invocations one at a time, as long as the emulator keeps it warm.

It speaks to the emulator over its stdin and stdout in length-prefixed JSON messages; what the handler prints
goes to the invocation's log, not into the protocol.

    emulator -> runtime   {"request_id", "event", "deadline_epoch_s", "fault"}
    runtime -> emulator   {"ready": true}                      once, after the handler module imported
                          {"result": ...} or {"error": {...}}, "logs", "max_rss_mb"    per invocation

``fault`` (tests of the emulator's limits only): "oom" allocates past the memory limit before the handler runs;
"hang" sleeps past the timeout. The limits themselves are enforced by the emulator, from outside.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import struct
import sys
import time
import traceback
from dataclasses import dataclass

from cai_bench.metrics import peak_rss_bytes

FRAME = struct.Struct("<I")  # the length before each message, both ways


def write_message(stream, message: dict) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    stream.write(FRAME.pack(len(data)) + data)
    stream.flush()


def read_message(stream) -> dict | None:
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    (length,) = FRAME.unpack(head)
    data = stream.read(length)
    if len(data) < length:
        return None
    return json.loads(data)


@dataclass
class Context:
    """The parts of Lambda's context object the handler reads."""

    aws_request_id: str
    function_name: str
    memory_limit_in_mb: int
    deadline_epoch_s: float
    log_stream_name: str = ""
    function_version: str = "$LATEST"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline_epoch_s - time.time()) * 1000))


def _fault(kind: str | None, memory_mb: int) -> None:
    if kind == "oom":
        hog = bytearray((memory_mb + 256) << 20)
        for i in range(0, len(hog), 4096):
            hog[i] = 1  # touch every page, so it is resident and counted
        time.sleep(60)
    elif kind == "hang":
        time.sleep(3600)


def main() -> int:
    handler_spec, function_name, memory_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    protocol_in = os.fdopen(os.dup(0), "rb")
    protocol_out = os.fdopen(os.dup(1), "wb")
    # The handler's own prints must never land in the protocol stream
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    module_name, function = handler_spec.rsplit(".", 1)  # Lambda's "module.function"
    handle = getattr(importlib.import_module(module_name), function)
    write_message(protocol_out, {"ready": True})
    while True:
        message = read_message(protocol_in)
        if message is None:
            return 0
        context = Context(message["request_id"], function_name, memory_mb, message["deadline_epoch_s"])
        _fault(message.get("fault"), memory_mb)
        logs = io.StringIO()
        reply: dict
        with contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs):
            try:
                reply = {"result": handle(message["event"], context)}
            except Exception as exc:
                trace = traceback.format_exception(type(exc), exc, exc.__traceback__)
                reply = {"error": {"errorMessage": str(exc), "errorType": type(exc).__name__,
                                   "stackTrace": [line.rstrip() for line in trace[-8:]]}}  # fmt: skip
                print(f"[ERROR] {type(exc).__name__}: {exc}")
        reply["logs"] = logs.getvalue()[-3000:]
        # The environment's own high-water mark (VmHWM): ru_maxrss would carry the emulator's resident size at
        # the spawn across exec, and report the driver's memory as the function's
        reply["max_rss_mb"] = peak_rss_bytes() >> 20
        write_message(protocol_out, reply)


if __name__ == "__main__":
    sys.exit(main())
