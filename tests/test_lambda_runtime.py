"""The emulated function runs as the image runs it: AWS's runtime interface client (``python -m awslambdaric``)
pulling invocations from a Runtime API, on an interpreter that holds only what the Dockerfile installs; and the
function's role policy allows what its handler and collectives do in S3."""

from __future__ import annotations

import ast
import base64
import http.client
import json
import subprocess
from pathlib import Path

import psutil
import pytest

from cai_bench.backends.aws_lambda.driver import run_lambda
from cai_bench.backends.aws_lambda.emulator import Emulator
from cai_bench.backends.aws_lambda.environments import HANDLER, Faults, FunctionConfig, emulated_function_env
from cai_bench.backends.aws_lambda.image_python import DOCKERFILE, image_python, image_requirements, package_lists
from cai_bench.backends.aws_lambda.report_log import report_from_tail
from cai_bench.core.errors import UserError
from tests.test_lambda import ALL, lambda_plan

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "deploy" / "lambda" / "role-policy.json"


def _log_tail(reply) -> str:
    return base64.b64decode(reply.headers["X-Amz-Log-Result"]).decode()


def test_an_emulated_run_is_awslambdaric_processes_talking_to_the_runtime_api(s3, tiny_data, local_s3):
    emulator = Emulator(FunctionConfig(memory_mb=512), concurrency=2, extra_env=emulated_function_env(local_s3))
    url = emulator.serve()
    seen = []
    try:
        plan = lambda_plan(tiny_data, s3, local_s3, emulate=False, lambda_endpoint_url=url, max_concurrency=2)
        plan.backend_options.pop("emulate")
        emitted = []
        run_lambda(plan, emitted.append, mode="no-model")
        for environment in emulator.every:  # read while they are alive, warm
            seen.append((psutil.Process(environment.process.pid).cmdline(), list(environment.api.requests)))
    finally:
        emulator.stop()
    assert sorted(r.record.partition for r in emitted) == ALL
    assert seen and emulator.image is not None
    for command, requests in seen:
        # the image's ENTRYPOINT and CMD, on the image's interpreter
        assert command == [emulator.image.python, "-m", "awslambdaric", HANDLER]
        paths = [(method, path.split("/")[-1], status) for method, path, status in requests]
        assert paths[0] == ("GET", "next", 200)  # the first next ends the init phase
        # each event taken, then answered; the log holds answered requests (the last next is still waiting)
        assert paths == [("GET", "next", 200), ("POST", "response", 202)] * (len(paths) // 2)
        assert paths
    # every environment is gone with the emulator
    assert not any(e.alive for e in emulator.every)


def test_a_handler_error_and_a_stranger_on_the_runtime_api(tmp_path):
    """An unhandled exception comes back in awslambdaric's error shape through POST .../error, with its log; a
    process other than the environment's own gets 403 from its Runtime API, and takes no event."""
    emulator = Emulator(FunctionConfig(name="f", memory_mb=512, image="none"), concurrency=1)
    try:
        reply = emulator.invoke("f", b"{}", tail=True)
        (environment,) = emulator.every
        assert reply.headers["X-Amz-Function-Error"] == "Unhandled"
        error = json.loads(reply.body)
        assert error["errorType"] == "KeyError" and error["errorMessage"] == "'base'"
        assert error["requestId"] == reply.headers["x-amzn-RequestId"] and error["stackTrace"]
        assert "KeyError" in _log_tail(reply) and "REPORT RequestId" in _log_tail(reply)
        answered = [(m, p.split("/")[-1], s) for m, p, s in environment.api.requests]
        assert answered == [("GET", "next", 200), ("POST", "error", 202)]
        host, port = environment.api.address.split(":")
        stranger = http.client.HTTPConnection(host, int(port), timeout=5)
        stranger.request("GET", "/2018-06-01/runtime/invocation/next")
        answer = stranger.getresponse()
        assert answer.status == 403 and b"not this environment's runtime" in answer.read()
        stranger.close()
        again = emulator.invoke("f", b'{"base": 1, "item": 1}', tail=False)  # the environment still serves its own
        assert json.loads(again.body)["errorType"] in ("AttributeError", "TypeError", "ValueError", "UserError")
    finally:
        emulator.stop()


def _dockerfile_without(tmp_path: Path, package: str) -> Path:
    text = DOCKERFILE.read_text()
    line = next(line for line in text.splitlines() if line.startswith("ARG HANDLER_PACKAGES="))
    assert package in line.split('"')[1].split()
    copy = tmp_path / "Dockerfile"
    copy.write_text(text.replace(line, line.replace(f" {package}", "").replace(f"{package} ", "")))
    return copy


def test_a_dependency_missing_from_the_dockerfile_fails_the_torch_free_function_at_init(tmp_path):
    """The onnxruntime image's handler imports psutil: taken out of the Dockerfile's list (a copy), the emulated
    function's init fails as it would on AWS. The Dockerfile itself passes (the control)."""
    broken = _dockerfile_without(tmp_path, "psutil>=5.9")
    assert "psutil>=5.9" not in image_requirements(broken, "onnxruntime")
    for dockerfile, fails in ((broken, True), (DOCKERFILE, False)):
        emulator = Emulator(FunctionConfig(name="f", memory_mb=1024, image="onnxruntime"), concurrency=1,
                            dockerfile=dockerfile)  # fmt: skip
        try:
            reply = emulator.invoke("f", b"{}", tail=True)
            error = json.loads(reply.body)
            packages = {p.split("==")[0].lower() for p in emulator.image.packages}
            assert "torch" not in packages and "onnxruntime" in packages
            (environment,) = emulator.every
            init_errors = [r for r in environment.api.requests if r[1].endswith("/init/error")]
            if fails:
                assert error["errorType"] == "Runtime.ImportModuleError"
                assert "No module named 'psutil'" in error["errorMessage"]
                assert init_errors == [("POST", "/2018-06-01/runtime/init/error", 202)]
                assert not environment.alive and emulator.reports[-1].init_duration_ms is not None
            else:
                assert error["errorType"] == "KeyError" and not init_errors  # the handler ran
        finally:
            emulator.stop()


def test_the_torch_free_image_cannot_import_torch_and_holds_only_its_own_packages():
    image = image_python("onnxruntime")
    probe = "import importlib.util as u; print([m for m in ('torch', 'typer', 'rich', 'moto') if u.find_spec(m)])"
    found = subprocess.run([image.python, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"
    names = {p.split("==")[0].lower() for p in image.packages}
    assert {"awslambdaric", "boto3", "onnxruntime", "numpy", "redis"} <= names


def test_the_dockerfile_lists_are_read_and_bad_ones_are_one_line(tmp_path):
    lists = package_lists(DOCKERFILE)
    assert {"HANDLER", "TORCH", "ONNXRUNTIME", "OPENVINO"} <= set(lists)
    assert "awslambdaric" in lists["HANDLER"]
    bare = tmp_path / "Dockerfile"
    bare.write_text("FROM python:3.11-slim\nRUN pip install boto3\n")
    with pytest.raises(UserError, match="no ARG HANDLER_PACKAGES"):
        package_lists(bare)
    unknown = tmp_path / "Dockerfile2"
    unknown.write_text('ARG HANDLER_PACKAGES="no-such-package-cai-bench>=1"\n')
    with pytest.raises(UserError, match="which this Python lacks"):
        image_python("none", unknown)


# ---------------------------------------------------------------------------------------------- role policy

# boto3's S3 client calls -> the IAM action each needs (HeadObject is authorised as GetObject; a listing as
# ListBucket, on the bucket, with the prefix as its condition)
S3_ACTIONS = {"get_object": "s3:GetObject", "head_object": "s3:GetObject", "put_object": "s3:PutObject",
              "delete_object": "s3:DeleteObject", "delete_objects": "s3:DeleteObject",
              "list_objects_v2": "s3:ListBucket", "head_bucket": "s3:ListBucket"}  # fmt: skip
# What the function touches, by the run's key layout (wire.py, staging, the comm channel): prefix -> actions
FUNCTION_PREFIXES = {
    "datasets/": {"s3:GetObject"},  # partitions the driver staged
    "weights/": {"s3:GetObject"},  # weights and exports the driver staged
    "runs/": {"s3:PutObject"},  # unit results, rank 0's aggregate, Step Functions replies (sealed)
    "comm/": {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"},  # --comm s3://BUCKET/PREFIX/comm
}


def _calls_in(module: Path) -> set[str]:
    """The S3 client methods a module calls (``x.get_object(...)``, ``get_paginator("list_objects_v2")``)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in S3_ACTIONS:
                found.add(node.func.attr)
            if node.func.attr == "get_paginator" and node.args and isinstance(node.args[0], ast.Constant):
                found.add(node.args[0].value)
    return found


def _handler_modules() -> list[Path]:
    """cai_bench's modules the handler imports in a torch-free image, read from the image's own interpreter."""
    image = image_python("onnxruntime")
    probe = ("import sys, cai_bench.backends.aws_lambda.handler, cai_bench.comm.s3_channel, cai_bench.data.s3; "
             "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('cai_bench') and "
             "getattr(m, '__file__', None)))")  # fmt: skip
    out = subprocess.run([image.python, "-c", probe], capture_output=True, text=True, check=True).stdout
    return [Path(line) for line in out.split()]


def _allowed(policy: dict) -> dict[str, set[str]]:
    """Key prefix under BUCKET/PREFIX/ -> the S3 actions the policy allows there (ListBucket by its condition)."""
    allowed: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        if statement.get("Effect") != "Allow":
            continue
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for action in actions:
            if action == "s3:ListBucket":
                prefixes = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix", [])
                for prefix in [prefixes] if isinstance(prefixes, str) else prefixes:
                    allowed.setdefault(prefix.removeprefix("PREFIX/").rstrip("*"), set()).add(action)
                continue
            for resource in resources:
                if resource.startswith("arn:aws:s3:::BUCKET/PREFIX/") and resource.endswith("/*"):
                    prefix = resource.removeprefix("arn:aws:s3:::BUCKET/PREFIX/").removesuffix("*")
                    allowed.setdefault(prefix, set()).add(action)
    return allowed


def _missing(policy: dict) -> list[str]:
    allowed = _allowed(policy)
    return [f"{action} on PREFIX/{prefix}" for prefix, actions in FUNCTION_PREFIXES.items()
            for action in sorted(actions) if action not in allowed.get(prefix, set())]  # fmt: skip


def test_the_role_policy_allows_every_s3_action_the_handler_and_its_collectives_use(tmp_path):
    used = set().union(*(_calls_in(module) for module in _handler_modules()))
    assert {"get_object", "put_object", "list_objects_v2", "delete_objects"} <= used  # the scan found the calls
    needed = {S3_ACTIONS[call] for call in used}
    named = set().union(*FUNCTION_PREFIXES.values())
    assert needed <= named, f"the handler calls S3 for {needed - named}, which no prefix here names"
    policy = json.loads(POLICY.read_text())
    assert _missing(policy) == []
    # The same check on a copy without the comm prefix's statements fails, naming what is missing
    cut = {**policy, "Statement": [s for s in policy["Statement"] if "comm" not in json.dumps(s)]}
    assert any("PREFIX/comm/" in line for line in _missing(cut))


def test_the_runtime_api_refuses_a_wrong_request_id_a_bad_length_and_a_late_init_error():
    """The API on its own, with this test's process as the environment (its peer check then passes)."""
    import os
    import threading

    from cai_bench.backends.aws_lambda.runtime_api import MAX_RESPONSE_BYTES, Invocation, RuntimeAPI

    api = RuntimeAPI()
    api.pid = os.getpid()
    host, port = api.address.split(":")

    def call(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            answer = connection.getresponse()
            return answer.status, {**dict(answer.getheaders()), "body": answer.read()}
        finally:
            connection.close()

    try:
        invocation = Invocation("0" * 8 + "-0000-0000-0000-" + "0" * 12, b'{"x": 1}', 123, "arn:f", "Root=1-a-b")
        threading.Timer(0.2, api.hand_out, (invocation,)).start()
        status, got = call("GET", "/2018-06-01/runtime/invocation/next")  # held until the event is handed out
        assert status == 200 and got["body"] == b'{"x": 1}'
        assert got["Lambda-Runtime-Aws-Request-Id"] == invocation.request_id
        assert got["Lambda-Runtime-Deadline-Ms"] == "123" and got["Lambda-Runtime-Invoked-Function-Arn"] == "arn:f"
        other = "1" * 8 + "-0000-0000-0000-" + "1" * 12
        assert call("POST", f"/2018-06-01/runtime/invocation/{other}/response", b"{}")[0] == 400
        assert not invocation.answered.is_set()
        late = call("POST", "/2018-06-01/runtime/init/error", b"{}", {"Lambda-Runtime-Function-Error-Type": "X"})
        assert late[0] == 403  # the init phase ended with the first next
        bad = call("POST", f"/2018-06-01/runtime/invocation/{invocation.request_id}/response", b"{}",
                   {"Content-Length": "12x"})  # fmt: skip
        assert bad[0] == 400
        big = call("POST", f"/2018-06-01/runtime/invocation/{invocation.request_id}/response", b"",
                   {"Content-Length": str(MAX_RESPONSE_BYTES + 1)})  # fmt: skip
        assert big[0] == 413 and not invocation.answered.is_set()
        path = f"/2018-06-01/runtime/invocation/{invocation.request_id}/error"
        done = call("POST", path, b'{"errorType": "E"}', {"Lambda-Runtime-Function-Error-Type": "Unhandled"})
        assert done[0] == 202 and invocation.answered.is_set() and invocation.error_type == "Unhandled"
        assert call("POST", path, b"{}")[0] == 400  # answered once: the id is no longer current
    finally:
        api.close()


def test_an_init_past_the_init_limit_runs_again_inside_the_invocation_under_the_functions_timeout():
    """As on Lambda: an init that overruns its limit (here lowered to 10 ms, so that a real init overruns it) is
    no error. The environment is dropped and the init runs again in a fresh one inside the first invocation,
    whose Duration then holds it (no Init Duration); the log says so in an INIT_REPORT line. A re-run that
    overruns the function's own timeout too (30 ms here) ends the invocation as a timeout that never reached the
    handler."""
    for timeout_s, reached in ((60.0, True), (0.03, False)):
        config = FunctionConfig(name="f", memory_mb=512, image="none", timeout_s=timeout_s)
        emulator = Emulator(config, concurrency=1, faults=Faults(init_limit_s=0.01))
        try:
            reply = emulator.invoke("f", b"{}", tail=True)
            tail, error = _log_tail(reply), json.loads(reply.body)
            report = report_from_tail(reply.headers["X-Amz-Log-Result"])
            first, second = emulator.every
            assert not first.alive and first.killed_for == "init_timeout"
            assert "INIT_REPORT Init Duration: 10.00 ms\tPhase: init\tStatus: timeout" in tail
            assert report.init_duration_ms is None and report.init_timeouts == (1 if reached else 2)
            if reached:  # the handler ran, on the second environment, which stays warm
                assert error["errorType"] == "KeyError" and not report.init_failed and second.alive
                assert report.duration_ms >= (second.api.ready_at - second.spawned) * 1000
                again = report_from_tail(emulator.invoke("f", b"{}", tail=True).headers["X-Amz-Log-Result"])
                assert again.init_timeouts == 0 and len(emulator.every) == 2
            else:
                assert error["errorType"] == "Sandbox.Timedout" and report.init_failed and not second.alive
                assert "Phase: invoke\tStatus: timeout" in tail and report.duration_ms == 30.0
        finally:
            emulator.stop()
