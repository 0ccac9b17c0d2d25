"""The emulator's execution environments: a process each, AWS's own runtime client (``python -m awslambdaric``)
on the image's dependency set, pulling from a Runtime API of its own; Lambda's CPU share for the memory, its
memory limit watched, its timeout, and the faults tests ask for. The service in front of them is
``emulator.py``."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import psutil

from cai_bench.backends.aws_lambda.image_python import ImagePython
from cai_bench.backends.aws_lambda.runtime_api import Invocation, RuntimeAPI
from cai_bench.core import aws

HANDLER = "cai_bench.backends.aws_lambda.handler.handler"


MB_PER_VCPU = 1769  # Lambda: one vCPU's worth at 1,769 MB, up to 6 vCPUs at 10,240 MB


MAX_VCPUS = 6


# Lambda's limit on the init phase of an on-demand function. An init that overruns it is not an error: Lambda
# starts the init again inside the first invocation, in a fresh environment, under the function's own timeout
INIT_TIMEOUT_S = 10.0


LOG_TAIL_BYTES = 4096


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


def emulated_function_env(s3_endpoint: str) -> dict:
    """What an emulated function's environment adds: the loopback S3 (whose server holds the run's secret too)
    and throwaway credentials."""
    return {aws.S3_ENDPOINT_ENV: s3_endpoint, aws.SECRETS_ENDPOINT_ENV: s3_endpoint, aws.EMULATED_ENV: "1",
            "AWS_ACCESS_KEY_ID": "emulated",
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
    init_limit_s: float = INIT_TIMEOUT_S  # a test lowers it, so that a real init overruns it

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
        # "oom", "timeout", "exit", "init" (the runtime posted an init error), "init_timeout" (its init overran)
        self.why = why
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

    def wait_ready(self, limit_s: float) -> float:
        """Block until the runtime asks for its first event (its init phase done), at most ``limit_s`` from its
        spawn; the init duration in ms."""
        if not self.api.wait_ready(self.spawned + limit_s, lambda: self.alive):
            why = "init" if self.api.init_error is not None else "exit" if not self.alive else "init_timeout"
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
