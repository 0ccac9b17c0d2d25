"""``lambda emulate``, ``build``, ``deploy``, ``status``, ``destroy`` and ``cost``: the Lambda backend's tools."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench.backends.aws_lambda import pricing, provision
from cai_bench.backends.aws_lambda.emulator import serve_standalone
from cai_bench.backends.aws_lambda.environments import FunctionConfig
from cai_bench.backends.aws_lambda.image import ImageBuild, build_where_docker_is
from cai_bench.cli import options as o
from cai_bench.cli.app import lambda_app
from cai_bench.core import aws
from cai_bench.render import console, tool_views

Port = Annotated[int, typer.Option(min=0, max=65535, help="Loopback port of the Invoke API (0: any free one).")]
Function = Annotated[str, typer.Option("--function", help="The emulated function's name.")]
EmulatedMemory = Annotated[int, typer.Option(min=128, max=10240, help="Its memory (sets its CPU share too).")]
EmulatedTimeout = Annotated[float, typer.Option(min=1, max=900, help="Its timeout in seconds.")]
Concurrency = Annotated[int, typer.Option(min=1, help="Invocations at once; more get 429.")]
FunctionS3 = Annotated[
    str | None, typer.Option(help="S3 endpoint the function reads and writes; default: a local S3 (moto).")
]
Region = Annotated[str | None, typer.Option(help="AWS region (default: AWS_REGION or the profile's).")]
Endpoint = Annotated[
    str | None, typer.Option(help="One endpoint for every AWS service (an AWS-compatible service, e.g. moto's).")
]
Name = Annotated[str, typer.Option("--name", help="The function's name.")]
Repository = Annotated[str, typer.Option(help="Image name, and the ECR repository pushed to.")]
Tag = Annotated[str, typer.Option(help="Image tag.")]
Arch = Annotated[str, typer.Option(help="x86_64 or arm64: the function's architecture.")]
Push = Annotated[bool, typer.Option(help="Push to this account's ECR (the repository made if missing).")]
Context = Annotated[Path, typer.Option(help="The cai-bench source tree to build from.")]
ImageRuntime = Annotated[
    str, typer.Option(help="torch, or onnxruntime / openvino: the image without torch, for an exported model.")
]
ImageExport = Annotated[
    Path | None,
    typer.Option(help="An export (cai-bench model export) to bake into the image, for runs with --export-in-image."),
]
ImageUri = Annotated[str, typer.Option(help="The image in ECR (from `cai-bench lambda build`).")]
RoleArn = Annotated[str, typer.Option(help="The function's execution role (deploy/lambda/role-policy.json).")]
Memory = Annotated[int, typer.Option(help="Memory in MB (128-10240; sets the CPU share too).")]
Timeout = Annotated[int, typer.Option(help="Timeout in seconds (1-900).")]
Ephemeral = Annotated[int, typer.Option(help="/tmp size in MB (512-10240).")]
Workers = Annotated[
    Path | None, typer.Option(help="Per-function records (JSON list with 'total_cpu_time (seconds)' each).")
]
Log = Annotated[Path | None, typer.Option(help="A Lambda log: every REPORT line's billed duration.")]
Invocations = Annotated[
    int | None, typer.Option(min=1, help="Before a run: so many invocations (with --seconds-each, --memory-mb).")
]
SecondsEach = Annotated[float | None, typer.Option(min=0, help="Billed seconds of each invocation.")]
Transitions = Annotated[
    int, typer.Option(min=0, help="Step Functions state transitions to add (one per item, one per Map).")
]
CostMemory = Annotated[
    int | None, typer.Option("--memory-mb", min=128, help="Memory of each function (default: the log's).")
]
PriceFile = Annotated[Path | None, typer.Option(help="JSON price table replacing the built-in one.")]


@lambda_app.command("emulate")
def lambda_emulate(
    port: Port = 9001, function: Function = "cai-bench", memory_mb: EmulatedMemory = 10240,
    timeout_s: EmulatedTimeout = 900.0, concurrency: Concurrency = 4, endpoint_url: FunctionS3 = None,
) -> None:  # fmt: skip
    """Serve Lambda's Invoke API on loopback, the real handler behind it, until Ctrl-C; point runs at it with
    --lambda-endpoint-url and --endpoint-url."""
    config = FunctionConfig(name=aws.check_function_name(function), memory_mb=memory_mb, timeout_s=timeout_s)
    serve_standalone(config, concurrency, endpoint_url, port, announce=tool_views.show_emulator)


@lambda_app.command("build")
def lambda_build(
    repository: Repository = "cai-bench", tag: Tag = "latest", arch: Arch = "x86_64", push: Push = True,
    context: Context = Path("."), runtime: ImageRuntime = "torch", export: ImageExport = None, region: Region = None,
    endpoint_url: Endpoint = None,
) -> None:  # fmt: skip
    """Build the function's container image (deploy/lambda/Dockerfile) and push it to ECR; where Docker is not
    reachable, print the exact commands instead."""
    image = ImageBuild(repository, tag, arch, context, runtime, export).check()
    uri = build_where_docker_is(image, push, region, endpoint_url, console.say)
    if uri is None:
        tool_views.show_build_commands(image, region, push)
    else:
        tool_views.show_built(uri, push)


@lambda_app.command("deploy")
def lambda_deploy(
    image_uri: ImageUri, role_arn: RoleArn, memory_mb: Memory = 10240, timeout_s: Timeout = 900,
    ephemeral_mb: Ephemeral = 10240, arch: Arch = "x86_64", name: Name = "cai-bench", region: Region = None,
    endpoint_url: Endpoint = None,
) -> None:  # fmt: skip
    """Create the function from the image, or update it (image, then configuration), and wait until it is active."""
    spec = provision.FunctionSpec(name, image_uri, role_arn, memory_mb, timeout_s, ephemeral_mb, arch).check()
    tool_views.show_deployed(provision.deploy(provision.Account(region=region, endpoint_url=endpoint_url), spec))


@lambda_app.command("status")
def lambda_status(
    name: Name = "cai-bench", region: Region = None, endpoint_url: Endpoint = None, as_json: o.AsJson = False
) -> None:
    """The function's state and configuration, and the state machines cai-bench made for it."""
    account = provision.Account(region=region, endpoint_url=endpoint_url)
    tool_views.show_function_status(provision.status(account, aws.check_function_name(name)), as_json)


@lambda_app.command("destroy")
def lambda_destroy(name: Name = "cai-bench", region: Region = None, endpoint_url: Endpoint = None) -> None:
    """Delete the function and what cai-bench made for it (state machines, log group); only what carries
    cai-bench's tag. Data and results in S3 stay: remove them with the aws CLI when you no longer need them."""
    account = provision.Account(region=region, endpoint_url=endpoint_url)
    tool_views.show_destroyed(provision.destroy(account, aws.check_function_name(name)), name)


@lambda_app.command("cost")
def lambda_cost(
    workers: Workers = None, log: Log = None, invocations: Invocations = None, seconds_each: SecondsEach = None,
    transitions: Transitions = 0, memory_mb: CostMemory = None, arch: Arch = "x86_64", price_file: PriceFile = None,
) -> None:  # fmt: skip
    """What invocations cost: from per-function records (each one's time, rounded up to the millisecond, as its
    billed duration), from the REPORT lines of a log, or before a run from so many invocations of so long each."""
    billed = pricing.billed_from(workers, log, invocations, seconds_each, memory_mb)
    tool_views.show_cost(pricing.price(billed, arch, price_file, transitions), billed, arch)
