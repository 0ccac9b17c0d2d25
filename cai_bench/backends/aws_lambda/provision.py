"""The function and its state machine on a real account: made (``deploy``, ``ensure_state_machine``), shown
(``status``) and removed with everything cai-bench made for it (``destroy``). The transports that use them are
``invoke.py`` and ``stepfunctions.py``; the image the function runs is ``image.py``.

Everything cai-bench creates carries the tag ``managed-by=cai-bench``; ``destroy`` removes only what carries it,
so it never deletes a function or state machine a user made by hand under the same name. The state machine is a
Distributed Map that reads the run's invocations from S3 and invokes the function once per item.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

from cai_bench.core import aws
from cai_bench.core.errors import UserError

MANAGED_TAG = ("managed-by", "cai-bench")
ARCHITECTURES = ("x86_64", "arm64")
_IMAGE_URI = re.compile(
    r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+(:[\w.-]{1,128}|@sha256:[0-9a-f]{64})"
)
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")


@dataclass(frozen=True)
class FunctionSpec:
    """What ``lambda deploy`` makes: a container-image function."""

    name: str
    image_uri: str
    role_arn: str
    memory_mb: int = 10240
    timeout_s: int = 900
    ephemeral_mb: int = 10240
    arch: str = "x86_64"

    def check(self) -> FunctionSpec:
        aws.check_function_name(self.name)
        if not _IMAGE_URI.fullmatch(self.image_uri):
            raise UserError(f"--image-uri {self.image_uri!r}: not an ECR image URI "
                            "(ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY:TAG or @sha256:DIGEST)")  # fmt: skip
        if not _ROLE_ARN.fullmatch(self.role_arn):
            raise UserError(f"--role-arn {self.role_arn!r}: not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
        for option, value, low, high in (("--memory-mb", self.memory_mb, 128, 10240),
                                         ("--timeout-s", self.timeout_s, 1, 900),
                                         ("--ephemeral-mb", self.ephemeral_mb, 512, 10240)):  # fmt: skip
            if not low <= value <= high:
                raise UserError(f"{option} {value}: Lambda allows {low} to {high}")
        if self.arch not in ARCHITECTURES:
            raise UserError(f"--arch {self.arch!r}: one of {', '.join(ARCHITECTURES)}")
        return self


@dataclass
class Account:
    """The clients of one account and region (``endpoint_url``: one endpoint for every service, as moto's
    server or another AWS-compatible service has)."""

    region: str | None = None
    endpoint_url: str | None = None
    clients: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client("lambda")  # credentials and region first, in one line, before anything is done

    def client(self, service: str):
        if service not in self.clients:
            self.clients[service] = aws.client(service, endpoint_url=self.endpoint_url, region=self.region)
        return self.clients[service]


def _missing(exc: Exception) -> bool:
    return aws.error_code(exc) in ("ResourceNotFoundException", "StateMachineDoesNotExist", "NoSuchEntity")


def _wait(account: Account, name: str, waiter: str, timeout_s: float) -> None:
    delay = 2 if account.endpoint_url is None else 0.2
    config = {"Delay": delay, "MaxAttempts": max(1, int(timeout_s / delay))}
    with aws.one_line_errors(f"Lambda function {name}: did not become ready"):
        account.client("lambda").get_waiter(waiter).wait(FunctionName=name, WaiterConfig=config)


def get_function(account: Account, name: str) -> dict | None:
    """The function's GetFunction answer, or None when there is none of that name."""
    try:
        return account.client("lambda").get_function(FunctionName=name)
    except Exception as exc:
        if _missing(exc):
            return None
        with aws.one_line_errors(f"Lambda function {name}"):
            raise


def is_managed(tags: dict | None) -> bool:
    return (tags or {}).get(MANAGED_TAG[0]) == MANAGED_TAG[1]


def deploy(account: Account, spec: FunctionSpec, wait_s: float = 600.0) -> dict:
    """Create the function, or update the one of that name (its image, then its configuration), and wait until
    it is active and its update is done. Returns {"action": "created"|"updated", "configuration": ..., "seconds"}."""
    started = time.perf_counter()
    spec.check()
    client = account.client("lambda")
    existing = get_function(account, spec.name)
    settings = {"Role": spec.role_arn, "MemorySize": spec.memory_mb, "Timeout": spec.timeout_s,
                "EphemeralStorage": {"Size": spec.ephemeral_mb}}  # fmt: skip
    with aws.one_line_errors(f"Lambda function {spec.name}: cannot deploy"):
        if existing is None:
            client.create_function(FunctionName=spec.name, PackageType="Image", Code={"ImageUri": spec.image_uri},
                                   Architectures=[spec.arch], Tags=dict([MANAGED_TAG]),
                                   Description="cai-bench: pcm-AstroMAE inference", **settings)  # fmt: skip
            _wait(account, spec.name, "function_active_v2", wait_s)
            action = "created"
        else:
            if not is_managed(existing.get("Tags")) or existing["Configuration"].get("PackageType") != "Image":
                raise UserError(f"Lambda function {spec.name} exists and was not deployed by cai-bench: choose "
                                "another --name")  # fmt: skip
            _wait(account, spec.name, "function_updated_v2", wait_s)  # no update may be in progress
            client.update_function_code(FunctionName=spec.name, ImageUri=spec.image_uri, Architectures=[spec.arch])
            _wait(account, spec.name, "function_updated_v2", wait_s)
            client.update_function_configuration(FunctionName=spec.name, **settings)
            _wait(account, spec.name, "function_updated_v2", wait_s)
            action = "updated"
        configuration = client.get_function_configuration(FunctionName=spec.name)
    return {"action": action, "configuration": configuration, "seconds": time.perf_counter() - started}


def set_memory(client, name: str, memory_mb: int, wait_s: float = 300.0, delay_s: float = 2.0) -> bool:
    """Give the function ``memory_mb`` (a memory sweep's point: one function configuration per value) and wait
    for the update; False when it already had it."""
    with aws.one_line_errors(f"Lambda function {name}: cannot set its memory to {memory_mb} MB"):
        if client.get_function_configuration(FunctionName=name)["MemorySize"] == memory_mb:
            return False
        config = {"Delay": delay_s, "MaxAttempts": max(1, int(wait_s / delay_s))}
        client.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig=config)
        client.update_function_configuration(FunctionName=name, MemorySize=memory_mb)
        client.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig=config)
    return True


def status(account: Account, name: str) -> dict:
    """What there is of the function and of what cai-bench made for it."""
    found = get_function(account, name)
    out: dict = {"function": name, "exists": found is not None}
    if found is not None:
        c = found["Configuration"]
        out.update(
            state=c.get("State"), last_update=c.get("LastUpdateStatus"), memory_mb=c.get("MemorySize"),
            timeout_s=c.get("Timeout"), ephemeral_mb=(c.get("EphemeralStorage") or {}).get("Size"),
            architecture=(c.get("Architectures") or ["x86_64"])[0], image_uri=(found.get("Code") or {}).get("ImageUri"),
            role=c.get("Role"), last_modified=c.get("LastModified"), managed=is_managed(found.get("Tags")),
        )  # fmt: skip
    out["state_machines"] = managed_state_machines(account, name)
    return out


def destroy(account: Account, name: str) -> list[str]:
    """Remove the function and what cai-bench made for it (its state machines, its log group); only what
    carries cai-bench's tag. What was removed, one line each."""
    removed = []
    for arn in managed_state_machines(account, name):
        with aws.one_line_errors(f"state machine {arn}: cannot delete it"):
            account.client("stepfunctions").delete_state_machine(stateMachineArn=arn)
        removed.append(f"state machine {arn}")
    found = get_function(account, name)
    if found is not None:
        if not is_managed(found.get("Tags")):
            raise UserError(f"Lambda function {name} was not deployed by cai-bench (no {'='.join(MANAGED_TAG)} "
                            "tag): not deleted")  # fmt: skip
        with aws.one_line_errors(f"Lambda function {name}: cannot delete it"):
            account.client("lambda").delete_function(FunctionName=name)
        removed.append(f"function {found['Configuration']['FunctionArn']}")
        group = f"/aws/lambda/{name}"
        try:
            account.client("logs").delete_log_group(logGroupName=group)
            removed.append(f"log group {group}")
        except Exception as exc:
            if not _missing(exc):
                with aws.one_line_errors(f"log group {group}: cannot delete it"):
                    raise
    return removed


# ---------------------------------------------------------------------------------------------- the state machine

MAP_STATE = "Partitions"
# Errors of the Lambda service itself (nothing ran): retried inside the state machine, as AWS advises
SERVICE_ERRORS = ["Lambda.ServiceException", "Lambda.AWSLambdaException", "Lambda.SdkClientException",
                  "Lambda.TooManyRequestsException"]  # fmt: skip


def state_machine_name(function: str) -> str:
    return f"cai-bench-{function}"[:80]


def definition(function: str, max_concurrency: int) -> dict:
    """The state machine: a Distributed Map over the items file named in the execution's input
    (``{"items": {"Bucket", "Key"}, "base": the sealed fields shared by every invocation}``); each invocation's
    event is ``{"base", "item"}`` (``wire.py``)."""
    invoke = {
        "Type": "Task",
        "Resource": "arn:aws:states:::lambda:invoke",
        "Parameters": {"FunctionName": function, "Payload.$": "$"},
        "ResultSelector": {"ok": True},  # the reply itself is in S3
        "Retry": [{"ErrorEquals": SERVICE_ERRORS, "IntervalSeconds": 1, "BackoffRate": 2.0, "MaxAttempts": 8}],
        "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Lost"}],
        "End": True,
    }
    lost = {"Type": "Pass", "Parameters": {"lost.$": "$.item.units[*].position", "error.$": "$.error"}, "End": True}
    return {
        "Comment": "cai-bench: one invocation of the function per item of the run's items file",
        "StartAt": MAP_STATE,
        "States": {
            MAP_STATE: {
                "Type": "Map",
                "MaxConcurrency": max_concurrency,
                "ItemReader": {
                    "Resource": "arn:aws:states:::s3:getObject",
                    "ReaderConfig": {"InputType": "JSON"},
                    "Parameters": {"Bucket.$": "$.items.Bucket", "Key.$": "$.items.Key"},
                },
                "ItemSelector": {"base.$": "$.base", "item.$": "$$.Map.Item.Value"},
                "ItemProcessor": {
                    "ProcessorConfig": {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"},
                    "StartAt": "Invoke",
                    "States": {"Invoke": invoke, "Lost": lost},
                },
                "End": True,
            }
        },
    }


def _named(client, function: str) -> list[tuple[str, bool]]:
    """The state machines named for ``function``: (ARN, whether it carries cai-bench's tag)."""
    name, tag = state_machine_name(function), {"key": MANAGED_TAG[0], "value": MANAGED_TAG[1]}
    found = []
    for page in client.get_paginator("list_state_machines").paginate():
        for machine in page["stateMachines"]:
            if machine["name"] == name:
                arn = machine["stateMachineArn"]
                found.append((arn, tag in client.list_tags_for_resource(resourceArn=arn).get("tags", [])))
    return found


def managed_state_machines(account, function: str) -> list[str]:
    """The ARNs of the state machines cai-bench made for ``function`` (its name, and cai-bench's tag)."""
    with aws.one_line_errors("Step Functions: cannot list state machines"):
        return [arn for arn, managed in _named(account.client("stepfunctions"), function) if managed]


def ensure_state_machine(client, function: str, max_concurrency: int, role_arn: str) -> tuple[str, str]:
    """The state machine for ``function`` at this concurrency: created, updated when its definition differs,
    or reused as it is. Returns (its ARN, "created" | "updated" | "reused")."""
    name = state_machine_name(function)
    wanted = definition(function, max_concurrency)
    with aws.one_line_errors(f"state machine {name}"):
        for arn, managed in _named(client, function):
            if not managed:
                raise UserError(f"state machine {name} exists and was not made by cai-bench: rename it, "
                                "or run with another --function")  # fmt: skip
            described = client.describe_state_machine(stateMachineArn=arn)
            if json.loads(described["definition"]) == wanted and described["roleArn"] == role_arn:
                return arn, "reused"
            client.update_state_machine(stateMachineArn=arn, definition=json.dumps(wanted), roleArn=role_arn)
            return arn, "updated"
        made = client.create_state_machine(name=name, definition=json.dumps(wanted), roleArn=role_arn, type="STANDARD",
                                           tags=[{"key": MANAGED_TAG[0], "value": MANAGED_TAG[1]}])  # fmt: skip
    return made["stateMachineArn"], "created"


def emulated_role(endpoint: str, region: str) -> str:
    """The role an emulated state machine runs as (moto checks that one is named, not what it may do)."""
    iam = aws.client("iam", endpoint_url=endpoint, region=region, emulated=True)
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                     "Principal": {"Service": "states.amazonaws.com"}}]}  # fmt: skip
    try:
        return iam.get_role(RoleName="cai-bench-states")["Role"]["Arn"]
    except Exception as exc:
        if aws.error_code(exc) != "NoSuchEntity":
            raise
        return iam.create_role(RoleName="cai-bench-states", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
