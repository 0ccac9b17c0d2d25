"""S3 on loopback for the emulator and the tests: moto's server in a process of its own, on a free port."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
from dataclasses import dataclass

from cai_bench.core.errors import UserError

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
