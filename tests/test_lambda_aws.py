"""Lambda on a real account, through the services' real APIs on loopback: deploy, status, update and destroy
against moto's server (IAM and Lambda: creation and configuration), the state machine created and started
against moto's Step Functions, the execution-history reader on histories shaped like the service's, and the
paper's orchestration end to end (moto's Step Functions interpreter running the Distributed Map, the
emulator running the invocations). Plus the image: the Dockerfile names a handler that exists."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest

from cai_bench.backends.aws_lambda import provision, stepfunctions
from cai_bench.backends.aws_lambda.driver import run_lambda
from cai_bench.backends.aws_lambda.environments import Faults
from cai_bench.backends.aws_lambda.image import DOCKERFILE, docker_reachable
from cai_bench.backends.aws_lambda.provision import Account, set_memory
from cai_bench.core import aws
from cai_bench.core.errors import UserError
from cai_bench.core.plan import make_plan
from cai_bench.data.partitions import open_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cai-bench:v1"
TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                 "Principal": {"Service": "lambda.amazonaws.com"}}]}  # fmt: skip


@pytest.fixture
def account(local_s3, monkeypatch, request):
    """This process as a user with credentials, pointed at moto's server for every service; a role in its IAM
    and a function name of the test's own."""
    for name in (aws.EMULATED_ENV, aws.S3_ENDPOINT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTEST0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-that-never-shows-0000000000")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    aws.client.cache_clear()
    name = re.sub(r"[^A-Za-z0-9-]", "-", request.node.name)[:40] + f"-{id(request) % 10**6}"
    iam = aws.client("iam", endpoint_url=local_s3)
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]["Arn"]
    yield {"endpoint": local_s3, "name": name, "role": role, "account": Account(endpoint_url=local_s3)}
    aws.client.cache_clear()


def _status(cli, account) -> dict:
    code, out, err = cli("lambda", "status", "--name", account["name"], "--endpoint-url", account["endpoint"], "--json")
    assert code == 0, err
    assert "test-secret-that-never-shows" not in out + err and "AKIATESTTESTTEST" not in out + err
    return json.loads(out)


def test_deploy_status_update_and_destroy_against_moto(cli, account):
    name, endpoint = account["name"], account["endpoint"]
    assert _status(cli, account)["exists"] is False
    code, out, err = cli("lambda", "deploy", "--image-uri", IMAGE, "--role-arn", account["role"], "--name", name,
                         "--endpoint-url", endpoint)  # fmt: skip
    assert code == 0, err
    assert f"function {name} created" in out and "10240 MB" in out and "state Active" in out
    found = _status(cli, account)
    assert found["exists"] and found["state"] == "Active" and found["managed"]
    assert (found["memory_mb"], found["timeout_s"], found["ephemeral_mb"]) == (10240, 900, 10240)
    assert found["image_uri"] == IMAGE and found["architecture"] == "x86_64" and found["role"] == account["role"]

    # The same name again: an update of the image and of the configuration, not a second function
    newer = IMAGE.replace(":v1", ":v2")
    code, out, err = cli("lambda", "deploy", "--image-uri", newer, "--role-arn", account["role"], "--name", name,
                         "--memory-mb", "2048", "--timeout-s", "300", "--ephemeral-mb", "4096",
                         "--endpoint-url", endpoint)  # fmt: skip
    assert code == 0 and f"function {name} updated" in out, err
    found = _status(cli, account)
    # (moto keeps EphemeralStorage from creation only: its update is not checked here)
    assert (found["memory_mb"], found["timeout_s"], found["image_uri"]) == (2048, 300, newer)

    # What the orchestrator makes for it is listed, and removed with it
    sfn = account["account"].client("stepfunctions")
    machine, action = provision.ensure_state_machine(sfn, name, 4, account["role"])
    assert action == "created" and _status(cli, account)["state_machines"] == [machine]
    code, out, err = cli("lambda", "destroy", "--name", name, "--endpoint-url", endpoint)
    assert code == 0, err
    assert f"removed state machine {machine}" in out and "removed function arn:aws:lambda:" in out
    assert _status(cli, account) == {"function": name, "exists": False, "state_machines": []}
    code, out, _ = cli("lambda", "destroy", "--name", name, "--endpoint-url", endpoint)
    assert code == 0 and "nothing to remove" in out


def test_destroy_leaves_a_function_cai_bench_did_not_make(cli, account):
    client = account["account"].client("lambda")
    client.create_function(FunctionName=account["name"], PackageType="Image", Code={"ImageUri": IMAGE},
                           Role=account["role"])  # fmt: skip
    code, _, err = cli("lambda", "destroy", "--name", account["name"], "--endpoint-url", account["endpoint"])
    assert code == 2 and "was not deployed by cai-bench" in err and err.count("\n") == 1
    code, _, err = cli("lambda", "deploy", "--image-uri", IMAGE, "--role-arn", account["role"], "--name",
                       account["name"], "--endpoint-url", account["endpoint"])  # fmt: skip
    assert code == 2 and "exists and was not deployed by cai-bench" in err  # nor overwritten
    assert client.get_function(FunctionName=account["name"])["Configuration"]["FunctionName"] == account["name"]
    sfn = account["account"].client("stepfunctions")
    sfn.create_state_machine(
        name=provision.state_machine_name(account["name"]),
        roleArn=account["role"],
        definition=json.dumps({"StartAt": "A", "States": {"A": {"Type": "Pass", "End": True}}}),
    )
    with pytest.raises(UserError, match="exists and was not made by cai-bench"):
        provision.ensure_state_machine(sfn, account["name"], 4, account["role"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-uri", "cai-bench:latest"], "not an ECR image URI"),
        (["--role-arn", "my-role"], "not an IAM role ARN"),
        (["--memory-mb", "20000"], "--memory-mb 20000: Lambda allows 128 to 10240"),
        (["--ephemeral-mb", "100"], "--ephemeral-mb 100: Lambda allows 512 to 10240"),
        (["--arch", "riscv"], "--arch 'riscv': one of x86_64, arm64"),
    ],
)
def test_bad_deploy_options_are_one_line_before_any_call(cli, args, message):
    given = {"--image-uri": IMAGE, "--role-arn": "arn:aws:iam::123456789012:role/r"}
    given.update(dict(zip(args[::2], args[1::2], strict=True)))
    code, _, err = cli("lambda", "deploy", *[x for pair in given.items() for x in pair])
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_memory_sweep_point_sets_the_functions_memory(account):
    client = account["account"].client("lambda")
    client.create_function(FunctionName=account["name"], PackageType="Image", Code={"ImageUri": IMAGE},
                           Role=account["role"], MemorySize=10240)  # fmt: skip
    assert set_memory(client, account["name"], 2048, delay_s=0.1) is True
    assert client.get_function_configuration(FunctionName=account["name"])["MemorySize"] == 2048
    assert set_memory(client, account["name"], 2048, delay_s=0.1) is False  # already so: no update made


def test_the_state_machine_is_created_reused_updated_and_started_against_moto(account):
    sfn = account["account"].client("stepfunctions")
    arn, action = provision.ensure_state_machine(sfn, account["name"], 8, account["role"])
    assert action == "created"
    assert provision.ensure_state_machine(sfn, account["name"], 8, account["role"]) == (arn, "reused")
    assert provision.ensure_state_machine(sfn, account["name"], 64, account["role"]) == (arn, "updated")
    described = sfn.describe_state_machine(stateMachineArn=arn)
    definition = json.loads(described["definition"])
    assert definition == provision.definition(account["name"], 64)
    mapped = definition["States"][provision.MAP_STATE]
    assert mapped["MaxConcurrency"] == 64 and mapped["ItemProcessor"]["ProcessorConfig"]["Mode"] == "DISTRIBUTED"
    assert mapped["ItemReader"]["Resource"] == "arn:aws:states:::s3:getObject"
    invoke = mapped["ItemProcessor"]["States"]["Invoke"]
    assert invoke["Parameters"]["FunctionName"] == account["name"] and "Lambda.TooManyRequestsException" in (
        invoke["Retry"][0]["ErrorEquals"])  # fmt: skip
    started = sfn.start_execution(stateMachineArn=arn, name="first", input=json.dumps({"items": {}, "base": {}}))
    assert sfn.describe_execution(executionArn=started["executionArn"])["status"] in ("RUNNING", "SUCCEEDED")
    assert stepfunctions.history_events(sfn, started["executionArn"])[0]["type"] == "ExecutionStarted"


def _history(name: str) -> list[dict]:
    """A fixture read as boto3 reads the service's answer: through botocore's own parser for the operation."""
    import botocore.parsers
    import botocore.session

    body = (DATA / name).read_bytes()
    model = botocore.session.get_session().get_service_model("stepfunctions").operation_model("GetExecutionHistory")
    parsed = botocore.parsers.create_parser("json").parse(
        {"body": body, "headers": {}, "status_code": 200}, model.output_shape
    )
    return parsed["events"]


def test_the_map_states_duration_is_read_from_a_history_shaped_like_the_services():
    events = _history("stepfunctions-history-map-succeeded.json")
    assert type(events[0]["timestamp"]).__name__ == "datetime"  # as boto3 hands them over
    read = stepfunctions.read_history(events)
    assert read["status"] == "SUCCEEDED" and read["items"] == 517
    assert read["map_state_s"] == pytest.approx(1733097628.207 - 1733097600.145, abs=1e-3)
    assert read["map_run_s"] == pytest.approx(1733097627.902 - 1733097600.402, abs=1e-3)
    assert read["execution_s"] == pytest.approx(1733097628.230 - 1733097600.123, abs=1e-3)
    assert read["map_run_arn"].startswith("arn:aws:states:us-east-1:123456789012:mapRun:")
    # Events in any order (reverseOrder=True pages) give the same reading
    assert stepfunctions.read_history(list(reversed(events))) == read


def test_a_failed_map_is_read_with_its_error_and_its_time_to_the_failure():
    read = stepfunctions.read_history(_history("stepfunctions-history-map-failed.json"))
    assert read["status"] == "FAILED" and read["error"] == "States.ExceedToleratedFailureThreshold"
    assert "tolerated failure threshold" in read["cause"]
    assert read["map_state_s"] == pytest.approx(1733097712.720 - 1733097700.010, abs=1e-3)


def _sfn_plan(data, **options):
    _, summary, refs = open_dataset(data)
    backend_options = {"emulate": True, "orchestrator": "stepfunctions", "max_concurrency": 2, "memory_mb": 512,
                       **options}  # fmt: skip
    return make_plan("lambda", summary, refs, precision="fp32", backend_options=backend_options)


def test_the_paper_orchestration_runs_a_distributed_map_and_keeps_both_times(cli, tiny_data, tmp_path):
    code, out, err = cli("run", "--backend", "lambda", "--emulate", "--orchestrator", "stepfunctions", "--data",
                         tiny_data, "--precision", "fp32", "--max-concurrency", "2", "--memory-mb", "3538",
                         "--results", tmp_path / "r")  # fmt: skip
    assert code == 0, err
    (record,) = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    info, summary = record["backend_info"], record["summary"]
    assert record["status"] == "ok" and summary["partitions"] == 4
    assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 2, 3]
    assert info["orchestrator"] == "stepfunctions" and info["state_machine_action"] == "created"
    (execution,) = info["executions"]
    assert execution["status"] == "SUCCEEDED" and execution["items"] == 4 and len(execution["invocations"]) == 4
    # Both times: the Map state's from the history, and the driver's own, which holds it
    assert 0 < info["map_state_s"] <= summary["wall_s"] + 0.5 and info["driver_wall_s"] == summary["wall_s"]
    assert info["billed_from"] == "the emulator's REPORTs" and info["cost"]["requests"] == 4
    assert info["invocations_made"] == 4 and 1 <= info["cold_starts"] <= 2 and info["max_memory_used_mb"] > 0
    assert 1 <= info["workers"] <= 2  # execution environments, as for direct runs (the Map's concurrency is 2)
    assert info["cost"]["transitions"] == 4 + 1 and info["cost"]["transitions_usd"] > 0
    assert summary["cost_usd"] == pytest.approx(info["cost"]["cost_usd"])
    assert info["precisions"] == ["fp32"]  # what the functions chose reaches the record
    code, out, _ = cli("report", "--results", tmp_path / "r", "--format", "markdown")
    assert code == 0 and "stepfunctions" in out and "Map s" in out


def test_a_unit_lost_under_step_functions_is_retried_in_a_fresh_execution(tiny_data):
    emitted = []
    run = run_lambda(_sfn_plan(tiny_data), emitted.append, mode="no-model", hold_s=0.5,
                     emulator_faults=Faults(kill={1: 1}, kill_after_s=0.2))  # fmt: skip
    assert sorted(r.record.partition for r in emitted) == [0, 1, 2, 3]  # each once
    first, second = run.info["executions"]
    assert sorted(first["units"]) == [0, 1, 2, 3] and second["units"] == [1]
    assert first["status"] == second["status"] == "SUCCEEDED"  # the Map caught the function error
    (retried,) = run.info["retried"]
    assert retried["partition"] == 1 and "Runtime.ExitError" in retried["errors"][0]


def test_a_partition_that_fails_in_the_handler_is_retried_by_fresh_executions_then_fails_for_good(data_copy):
    from cai_bench.backends.base import PartitionsFailed

    _, _, refs = open_dataset(data_copy)
    path = Path(refs[2].path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, same header: only the checksum can tell, in the function
    path.write_bytes(bytes(data))
    emitted = []
    with pytest.raises(PartitionsFailed) as failed:
        run_lambda(_sfn_plan(data_copy, retries=1), emitted.append, mode="no-model")
    assert sorted(r.record.partition for r in emitted) == [0, 1, 3]
    (unit,) = failed.value.failed
    assert unit["partition"] == 2 and unit["attempts"] == 2
    # The handler's reply said why (from S3: the Map carries none), on each of the two executions
    assert all("sha256 does not match the manifest" in error for error in unit["errors"])
    executions = failed.value.run.info["executions"]
    assert [e["units"] for e in executions] == [[0, 1, 2, 3], [2]]
    assert all(len(e["invocations"]) == e["items"] for e in executions)  # every invocation replied


def test_step_functions_on_aws_needs_a_role_for_the_state_machine(cli, monkeypatch, tiny_data):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTEST0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-that-never-shows-0000000000")
    code, _, err = cli("run", "--backend", "lambda", "--orchestrator", "stepfunctions", "--data", tiny_data,
                       "--region", "us-east-1", "--bucket", "s3://b-u-c/x")  # fmt: skip
    assert code == 2 and "--state-machine-role-arn" in err and err.count("\n") == 1


def test_without_credentials_every_command_that_needs_aws_says_so_in_one_line(no_credentials, cli, tiny_data):
    commands = [
        ["lambda", "deploy", "--image-uri", IMAGE, "--role-arn", "arn:aws:iam::123456789012:role/r",
         "--region", "us-east-1"],
        ["lambda", "status", "--region", "us-east-1"],
        ["lambda", "destroy", "--region", "us-east-1"],
        ["run", "--backend", "lambda", "--data", tiny_data, "--bucket", "s3://b-u-c/x", "--region", "us-east-1"],
        ["sweep", "--backend", "lambda", "--memory-mb", "2048,4096", "--gb", "0.01", "--bucket", "s3://b-u-c/x",
         "--region", "us-east-1"],
        ["run", "--backend", "lambda", "--orchestrator", "stepfunctions", "--state-machine-role-arn",
         "arn:aws:iam::123456789012:role/s", "--data", tiny_data, "--bucket", "s3://b-u-c/x", "--region", "us-east-1"],
        ["data", "upload", tiny_data, "s3://b-u-c/x"],
    ]  # fmt: skip
    for command in commands:
        code, out, err = cli(*command)
        assert code == 2 and err.startswith("error: no AWS credentials found") and err.count("\n") == 1, command
        assert "Traceback" not in err + out


def test_the_dockerfile_names_the_handler_that_exists_and_copies_what_is_there():
    text = (ROOT / DOCKERFILE).read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    (cmd,) = [json.loads(line.split(None, 1)[1]) for line in instructions if line.startswith("CMD ")]
    (entry,) = [json.loads(line.split(None, 1)[1]) for line in instructions if line.startswith("ENTRYPOINT ")]
    assert entry == ["python", "-m", "awslambdaric"]  # AWS's runtime interface client serves the handler
    module_name, function_name = cmd[0].rsplit(".", 1)
    handler = getattr(importlib.import_module(module_name), function_name)
    assert callable(handler) and list(inspect.signature(handler).parameters) == ["event", "context"]
    for line in instructions:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            # a build argument (the baked target's EXPORT_DIR) is declared; the rest exist in the tree
            assert all(f"ARG {s[2:-1]}" in instructions if s.startswith("${") else (ROOT / s).exists()
                       for s in sources), line  # fmt: skip
    assert "download.pytorch.org/whl/cpu" in text  # CPU-only torch: no CUDA libraries in the image
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "results" in ignored


def test_build_prints_the_exact_commands_where_docker_is_not_reachable(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker here at all
    monkeypatch.chdir(ROOT)
    code, out, err = cli("lambda", "build", "--tag", "v3", "--region", "eu-west-1")
    assert code == 0, err
    assert "Docker is not reachable here" in out
    assert (
        f"docker build --platform linux/amd64 --provenance=false -f {DOCKERFILE} --target torch -t cai-bench:v3 ."
        in out
    )
    assert "aws ecr get-login-password --region eu-west-1 | docker login" in out
    assert "docker push ACCOUNT.dkr.ecr.eu-west-1.amazonaws.com/cai-bench:v3" in out
    code, _, err = cli("lambda", "build", "--context", tmp_path)
    assert code == 2 and "no Dockerfile there" in err
    code, out, err = cli("lambda", "build", "--tag", "ov", "--runtime", "openvino", "--region", "eu-west-1")
    assert code == 0, err
    assert f"-f {DOCKERFILE} --target exported --build-arg RUNTIME=openvino -t cai-bench:ov ." in out
    code, _, err = cli("lambda", "build", "--runtime", "tensorrt")
    assert code == 2 and "--runtime 'tensorrt': one of torch, onnxruntime, openvino" in err


def test_build_bakes_an_export_from_inside_the_context(cli, monkeypatch, tmp_path, exports):
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker here
    context = tmp_path / "tree"
    (context / DOCKERFILE).parent.mkdir(parents=True)
    (context / DOCKERFILE).write_text((ROOT / DOCKERFILE).read_text())
    shutil.copytree(exports["onnx"], context / "exports" / "onnx")
    code, out, err = cli("lambda", "build", "--context", context, "--runtime", "onnxruntime", "--export",
                         context / "exports" / "onnx", "--region", "eu-west-1")  # fmt: skip
    assert code == 0, err
    assert "--target baked --build-arg RUNTIME=onnxruntime --build-arg EXPORT_DIR=exports/onnx" in " ".join(out.split())
    for bad, says in ((exports["onnx"], "inside --context"), (context / "exports", "not a model export")):
        code, _, err = cli("lambda", "build", "--context", context, "--runtime", "onnxruntime", "--export", bad)
        assert code == 2 and says in err
    code, _, err = cli("lambda", "build", "--context", context, "--export", context / "exports" / "onnx")
    assert code == 2 and "add --runtime onnxruntime or openvino" in err
    code, _, err = cli("lambda", "build", "--context", context, "--runtime", "openvino", "--export",
                       context / "exports" / "onnx")  # fmt: skip
    assert code == 0, err  # openvino reads an onnx export too


def test_the_torch_free_image_target_installs_no_torch():
    """The Dockerfile's stages: the exported one builds on the base (no torch) and checks its handler imports
    none; only the torch stage installs torch."""
    stages: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / DOCKERFILE).read_text().splitlines():
        if line.startswith("FROM "):
            current = line.split()[-1]
            stages[current] = [line]
        elif current and line and not line.startswith("#"):
            stages[current].append(line)
    assert list(stages) == ["base", "exported", "baked", "torch"]  # torch last: the default target, as before
    assert (
        stages["baked"][0] == "FROM exported AS baked" and "COPY ${EXPORT_DIR} /opt/cai-bench/model" in stages["baked"]
    )
    assert stages["exported"][0] == "FROM base AS exported" and stages["torch"][0] == "FROM base AS torch"
    assert not any("torch" in line.split("#")[0] for line in stages["base"] if "pip install" in line)
    exported = "\n".join(stages["exported"])
    assert "pip install" in exported and "torch " not in exported and "'torch' not in sys.modules" in exported


@pytest.mark.skipif(not (shutil.which("docker") and docker_reachable()), reason="needs a Docker daemon (and the "
                    "network, for the base image and the wheels)")  # fmt: skip
def test_the_image_builds_where_docker_is_reachable(cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli("lambda", "build", "--no-push", "--tag", "test")
    assert code == 0, err
    assert "image cai-bench:test" in out


def _memory_record(memory_mb: int, wall_s: float, cost_usd: float, created: str) -> dict:
    from tests.conftest import hand_record

    record = hand_record("lambda", wall_s, gb=0.01, partition_mb=1, cost_usd=cost_usd, created=created)
    record["plan"]["backend_options"] = {"emulate": True, "memory_mb": memory_mb}
    record["backend_info"].update(memory_mb=memory_mb, orchestrator="direct")
    return record


def test_report_names_the_fastest_and_the_cheapest_memory_and_plot_draws_both_axes(cli, tmp_path):
    from tests.conftest import write_store

    figures = {1024: (20.0, 0.0004), 2048: (9.0, 0.0003), 4096: (6.0, 0.0005), 10240: (5.5, 0.0011)}
    records = [_memory_record(m, wall * f, usd * f, f"2026-12-02T00:0{i}:0{j}Z")
               for i, (m, (wall, usd)) in enumerate(figures.items()) for j, f in enumerate((1.0, 1.04))]  # fmt: skip
    write_store(tmp_path / "r", records)
    code, out, err = cli("report", "--results", tmp_path / "r")
    assert code == 0, err
    assert "fastest at 10,240 MB (5.61 s, $0.0011)" in out and "cheapest at 2,048 MB ($0.0003, 9.18 s)" in out
    code, out, err = cli("report", "--results", tmp_path / "r", "--format", "markdown")
    assert code == 0 and "Memory:" in out and "of 4 memory sizes" in out
    code, out, err = cli("plot", "--results", tmp_path / "r", "--out-dir", tmp_path / "f")
    assert code == 0, err
    assert (tmp_path / "f" / "time-and-cost-vs-memory.png").stat().st_size > 10_000


def test_one_memory_size_draws_no_memory_figure(cli, tmp_path):
    from tests.conftest import write_store

    write_store(tmp_path / "r", [_memory_record(2048, 9.0, 0.0003, "2026-12-02T00:00:00Z")])
    code, _, err = cli("plot", "--results", tmp_path / "r", "--out-dir", tmp_path / "f")
    assert code == 0, err
    assert not (tmp_path / "f" / "time-and-cost-vs-memory.png").exists()


def test_the_emulated_cpu_share_follows_memory_as_lambdas_does():
    from cai_bench.backends.aws_lambda.environments import cpu_share

    # In proportion to memory: one vCPU's worth at 1,769 MB, 5.8 at the largest (spread over 6 vCPUs)
    assert cpu_share(1769, 64) == pytest.approx(1.0) and cpu_share(10240, 64) == pytest.approx(10240 / 1769)
    assert cpu_share(1024, 64) == pytest.approx(1024 / 1769) and cpu_share(10240, 2) == 2  # this machine's cores


def test_a_throttled_environment_gets_its_share_of_cpu_time():
    """The throttle itself, on a busy process: at a duty of 0.3 it gets at most about 0.3 of the wall."""
    import subprocess
    import sys
    import threading
    import time

    import psutil

    from cai_bench.backends.aws_lambda.environments import Environment

    def cpu_seconds(duty: float) -> float:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            environment = object.__new__(Environment)  # just what the throttle uses: the process, its duty
            environment.process, environment.duty = busy, duty
            stop = threading.Event()
            throttle = threading.Thread(target=environment._throttle, args=(stop,))
            before = sum(psutil.Process(busy.pid).cpu_times()[:2])
            throttle.start()
            time.sleep(1.5)
            stop.set()
            throttle.join()
            return sum(psutil.Process(busy.pid).cpu_times()[:2]) - before
        finally:
            busy.kill()
            busy.wait()

    throttled, free = cpu_seconds(0.3), cpu_seconds(1.0)
    assert throttled <= 0.3 * 1.5 + 0.15  # never more than its share (plus a slice's slack)
    assert throttled < 0.6 * free
