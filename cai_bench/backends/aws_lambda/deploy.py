"""The function on a real account: the container image (``build``), the function made from it (``deploy``),
what it is now (``status``) and its removal with everything cai-bench made for it (``destroy``).

Everything cai-bench creates carries the tag ``managed-by=cai-bench``; ``destroy`` removes only what carries it,
so it never deletes a function or state machine a user made by hand under the same name.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cai_bench import aws
from cai_bench.choices import RUNTIMES
from cai_bench.errors import UserError

MANAGED_TAG = ("managed-by", "cai-bench")
ARCHITECTURES = ("x86_64", "arm64")
DOCKERFILE = Path("deploy/lambda/Dockerfile")
PLATFORMS = {"x86_64": "linux/amd64", "arm64": "linux/arm64"}
_IMAGE_URI = re.compile(
    r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+(:[\w.-]{1,128}|@sha256:[0-9a-f]{64})"
)
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_REPOSITORY = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")


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
    it is active and its update is done. Returns {"action": "created"|"updated", "configuration": ...}."""
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
    return {"action": action, "configuration": configuration}


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
    from cai_bench.backends.aws_lambda.stepfunctions import managed_state_machines

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
    from cai_bench.backends.aws_lambda.stepfunctions import managed_state_machines

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


# ---------------------------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class ImageBuild:
    repository: str = "cai-bench"
    tag: str = "latest"
    arch: str = "x86_64"
    context: Path = Path(".")
    runtime: str = "torch"  # torch: the Dockerfile's torch target; onnxruntime, openvino: its torch-free target

    def check(self) -> ImageBuild:
        if self.runtime not in RUNTIMES:
            raise UserError(f"--runtime {self.runtime!r}: one of {', '.join(RUNTIMES)}")
        if not _REPOSITORY.fullmatch(self.repository) or len(self.repository) > 256:
            raise UserError(f"--repository {self.repository!r}: not an ECR repository name (lowercase, digits, "
                            "'.', '_', '-', '/')")  # fmt: skip
        if not re.fullmatch(r"[\w][\w.-]{0,127}", self.tag):
            raise UserError(f"--tag {self.tag!r}: not an image tag")
        if self.arch not in ARCHITECTURES:
            raise UserError(f"--arch {self.arch!r}: one of {', '.join(ARCHITECTURES)}")
        if not (self.context / DOCKERFILE).is_file():
            raise UserError(f"{self.context / DOCKERFILE}: no Dockerfile there; run from a cai-bench checkout or "
                            "give --context")  # fmt: skip
        return self

    @property
    def local(self) -> str:
        return f"{self.repository}:{self.tag}"

    def registry(self, account_id: str, region: str) -> str:
        return f"{account_id}.dkr.ecr.{region}.amazonaws.com"

    def uri(self, account_id: str, region: str) -> str:
        return f"{self.registry(account_id, region)}/{self.local}"

    def build_command(self) -> list[str]:
        target = ["--target", "torch"] if self.runtime == "torch" else [
            "--target", "exported", "--build-arg", f"RUNTIME={self.runtime}"]  # fmt: skip
        return ["docker", "build", "--platform", PLATFORMS[self.arch], "--provenance=false", "-f",
                str(self.context / DOCKERFILE), *target, "-t", self.local, str(self.context)]  # fmt: skip

    def push_commands(self, account_id: str, region: str) -> list[str]:
        """Shell lines, with the aws CLI: what ``lambda build --push`` does through boto3 and docker."""
        registry, uri = self.registry(account_id, region), self.uri(account_id, region)
        return [
            f"aws ecr create-repository --repository-name {self.repository} --region {region}",
            f"aws ecr get-login-password --region {region} | docker login --username AWS --password-stdin {registry}",
            f"docker tag {self.local} {uri}",
            f"docker push {uri}",
        ]


def docker_reachable() -> bool:
    """A docker client on PATH whose daemon answers."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _docker(command: list[str], secret: str | None = None) -> None:
    done = subprocess.run(command, input=secret, text=True, capture_output=secret is not None)
    if done.returncode != 0:
        raise UserError(f"`{' '.join(command[:3])} ...` failed (exit {done.returncode})")


def build_image(image: ImageBuild, account: Account | None, say) -> str:
    """``docker build`` the image, and with ``account`` push it to that account's ECR (repository created when
    missing): the URI to deploy. ``say`` prints progress."""
    say(" ".join(image.build_command()))
    _docker(image.build_command())
    if account is None:
        return image.local
    with aws.one_line_errors("cannot reach ECR"):
        account_id = account.client("sts").get_caller_identity()["Account"]
        ecr = account.client("ecr")
        region = ecr.meta.region_name
        try:
            ecr.create_repository(repositoryName=image.repository, tags=[{"Key": MANAGED_TAG[0],
                                                                          "Value": MANAGED_TAG[1]}])  # fmt: skip
        except Exception as exc:
            if aws.error_code(exc) != "RepositoryAlreadyExistsException":
                raise
        token = ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    password = base64.b64decode(token).decode().split(":", 1)[1]
    registry, uri = image.registry(account_id, region), image.uri(account_id, region)
    say(f"docker login {registry}")
    _docker(["docker", "login", "--username", "AWS", "--password-stdin", registry], secret=password)
    for command in (["docker", "tag", image.local, uri], ["docker", "push", uri]):
        say(" ".join(command))
        _docker(command)
    return uri
