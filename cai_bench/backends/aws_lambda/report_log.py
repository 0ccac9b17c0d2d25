"""Lambda's REPORT log line: what each invocation took and was billed, as the service reports it.

    REPORT RequestId: <id>\tDuration: 40243.33 ms\tBilled Duration: 40908 ms\tMemory Size: 10240 MB\t
    Max Memory Used: 5948 MB\tInit Duration: 663.81 ms

``Init Duration`` is there only when the invocation started a new execution environment (a cold start). The
fields are separated by tabs in the service's output and by runs of spaces once a log viewer has copied them;
both read the same. The emulator writes the same line, so one parser serves both.

An init that did not end well has a line of its own before the invocation's:

    INIT_REPORT Init Duration: 10000.00 ms\tPhase: init\tStatus: timeout
    INIT_REPORT Init Duration: 812.40 ms\tPhase: invoke\tStatus: error\tError Type: Runtime.ExitError

Phase ``init`` is the init phase itself; an init past its limit (10 s) runs again in phase ``invoke``, inside the
first invocation and its Duration. An invocation whose init failed (an error in either phase, or a timeout in
phase invoke) never ran the handler.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import asdict, dataclass, replace

_REPORT = re.compile(r"REPORT RequestId:\s*(?P<request_id>[0-9A-Za-z-]+)(?P<fields>.*)")
_FIELD = re.compile(r"(?P<name>[A-Z][A-Za-z ]*?):\s*(?P<value>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>ms|MB)")
_INIT = re.compile(r"INIT_REPORT\b.*?Phase:\s*(?P<phase>\w+)\s+Status:\s*(?P<status>\w+)")
_NAMES = {
    "Duration": "duration_ms",
    "Billed Duration": "billed_duration_ms",
    "Memory Size": "memory_size_mb",
    "Max Memory Used": "max_memory_used_mb",
    "Init Duration": "init_duration_ms",
}


@dataclass(frozen=True)
class Report:
    request_id: str
    duration_ms: float
    billed_duration_ms: float
    memory_size_mb: int
    max_memory_used_mb: int
    init_duration_ms: float | None = None  # present: this invocation was a cold start
    init_timeouts: int = 0  # INIT_REPORT lines of a timed-out init: it ran again inside this invocation
    init_failed: bool = False  # its environment's init failed: the handler never took this event

    @property
    def cold_start(self) -> bool:
        return self.init_duration_ms is not None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_report(line: str) -> Report | None:
    """The REPORT line in ``line`` (a line of a log, with or without a timestamp before it); None when there is
    none, or when it lacks one of the four fields every REPORT line has."""
    match = _REPORT.search(line)
    if not match:
        return None
    values = {}
    for field in _FIELD.finditer(match["fields"]):
        name = _NAMES.get(field["name"].strip())
        if name:
            values[name] = float(field["value"])
    required = ("duration_ms", "billed_duration_ms", "memory_size_mb", "max_memory_used_mb")
    if any(name not in values for name in required):
        return None
    return Report(
        request_id=match["request_id"],
        duration_ms=values["duration_ms"],
        billed_duration_ms=values["billed_duration_ms"],
        memory_size_mb=int(values["memory_size_mb"]),
        max_memory_used_mb=int(values["max_memory_used_mb"]),
        init_duration_ms=values.get("init_duration_ms"),
    )


def parse_reports(text: str) -> list[Report]:
    """Every REPORT line of a log, in order."""
    return [r for r in map(parse_report, text.splitlines()) if r is not None]


def report_from_tail(log_result: str | None) -> Report | None:
    """The REPORT line of an invocation's log tail (Invoke's ``LogResult``: base64 of the last 4 KB)."""
    if not log_result:
        return None
    try:
        text = base64.b64decode(log_result).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None
    found = parse_reports(text)
    if not found:
        return None
    timeouts, failed = init_outcome(text)
    return replace(found[-1], init_timeouts=timeouts, init_failed=failed)


def init_outcome(text: str) -> tuple[int, bool]:
    """What the INIT_REPORT lines of one invocation's log say: how many inits timed out, and whether the last
    one failed (so that the handler never ran)."""
    inits = [(m["phase"], m["status"]) for m in _INIT.finditer(text)]
    failed = any(status == "error" or (phase == "invoke" and status != "success") for phase, status in inits)
    return sum(status == "timeout" for _, status in inits), failed


def format_report(report: Report) -> str:
    """The REPORT line as the service writes it (tab-separated, a tab at the end)."""
    fields = [
        f"REPORT RequestId: {report.request_id}",
        f"Duration: {report.duration_ms:.2f} ms",
        f"Billed Duration: {report.billed_duration_ms:.0f} ms",
        f"Memory Size: {report.memory_size_mb} MB",
        f"Max Memory Used: {report.max_memory_used_mb} MB",
    ]
    if report.init_duration_ms is not None:
        fields.append(f"Init Duration: {report.init_duration_ms:.2f} ms")
    return "\t".join(fields) + "\t"


def format_init_report(duration_ms: float, phase: str, status: str, error_type: str | None = None) -> str:
    """An INIT_REPORT line as the service writes it, with its newline."""
    error = f"\tError Type: {error_type}" if error_type else ""
    return f"INIT_REPORT Init Duration: {duration_ms:.2f} ms\tPhase: {phase}\tStatus: {status}{error}\n"
