"""The function's container image (``deploy/lambda/Dockerfile``): ``docker build`` and the push to this account's
ECR (``cai-bench lambda build``), or the exact commands where Docker is not reachable."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cai_bench.backends.aws_lambda.provision import ARCHITECTURES, MANAGED_TAG, Account
from cai_bench.core import aws
from cai_bench.core.choices import RUNTIMES
from cai_bench.core.errors import UserError
from cai_bench.model.export_format import read_export

DOCKERFILE = Path("deploy/lambda/Dockerfile")
# Where the image's own export sits (``lambda build --export DIR``), read by --export-in-image runs
IMAGE_EXPORT_DIR = "/opt/cai-bench/model"
PLATFORMS = {"x86_64": "linux/amd64", "arm64": "linux/arm64"}
_REPOSITORY = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")


@dataclass(frozen=True)
class ImageBuild:
    repository: str = "cai-bench"
    tag: str = "latest"
    arch: str = "x86_64"
    context: Path = Path(".")
    runtime: str = "torch"  # torch: the Dockerfile's torch target; onnxruntime, openvino: its torch-free target
    export: Path | None = None  # an export to bake in at IMAGE_EXPORT_DIR (the "baked" target), inside the context

    def check(self) -> ImageBuild:
        if self.runtime not in RUNTIMES:
            raise UserError(f"--runtime {self.runtime!r}: one of {', '.join(RUNTIMES)}")
        if self.export is not None:
            self._check_export()
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

    def _check_export(self) -> None:
        if self.runtime == "torch":
            raise UserError("--export bakes an exported model in: add --runtime onnxruntime or openvino")
        read_export(self.export, self.runtime)
        try:
            self.export.resolve().relative_to(self.context.resolve())
        except ValueError:
            raise UserError(f"--export {self.export}: docker copies only from inside --context "
                            f"{self.context}; export into it (cai-bench model export --out ...)") from None  # fmt: skip

    @property
    def local(self) -> str:
        return f"{self.repository}:{self.tag}"

    def registry(self, account_id: str, region: str) -> str:
        return f"{account_id}.dkr.ecr.{region}.amazonaws.com"

    def uri(self, account_id: str, region: str) -> str:
        return f"{self.registry(account_id, region)}/{self.local}"

    def build_command(self) -> list[str]:
        flavour = "exported" if self.export is None else "baked"
        target = ["--target", "torch"] if self.runtime == "torch" else [
            "--target", flavour, "--build-arg", f"RUNTIME={self.runtime}"]  # fmt: skip
        if self.export is not None:
            inside = self.export.resolve().relative_to(self.context.resolve())
            target += ["--build-arg", f"EXPORT_DIR={inside.as_posix()}"]
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


def build_where_docker_is(image: ImageBuild, push: bool, region: str | None, endpoint_url: str | None,
                          say) -> str | None:  # fmt: skip
    """``lambda build``: build (and push) where a Docker daemon answers, the URI to deploy; None where none
    does, for the caller to print the commands that do it elsewhere."""
    if not docker_reachable():
        return None
    account = Account(region=region, endpoint_url=endpoint_url) if push else None
    return build_image(image, account, say)
