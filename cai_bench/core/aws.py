"""AWS clients for S3 and Lambda, made one way: the user's usual configuration (environment variables, profiles,
``AWS_ENDPOINT_URL_S3`` for an S3-compatible store) or an explicit endpoint, with every error a user can cause
turned into one line that never holds a secret.

boto3 is the ``[aws]`` extra: importing this module does not import it, so the other backends never need it.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from functools import lru_cache

from cai_bench.core.errors import UserError

# What emulated runs send to the loopback services: never the user's own keys
EMULATED_CREDENTIALS = {"aws_access_key_id": "emulated", "aws_secret_access_key": "emulated"}
EMULATED_REGION = "us-east-1"
S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"  # botocore's own name: also set for worker processes and handlers
# botocore's own name too: where an emulated run's Secrets Manager is (moto's server, the same as its S3)
SECRETS_ENDPOINT_ENV = "AWS_ENDPOINT_URL_SECRETS_MANAGER"
EMULATED_ENV = "CAI_BENCH_EMULATED_AWS"  # "1": this process and its children talk to loopback services only

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_FUNCTION = re.compile(r"[A-Za-z0-9_-]{1,64}")
_lock = threading.Lock()  # boto3's session is not safe to build clients from in several threads at once


def check_bucket(bucket: str) -> str:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"[\d.]+", bucket):
        raise UserError(f"{bucket!r}: not a valid S3 bucket name (3-63 lowercase letters, digits, dots and hyphens)")
    return bucket


def check_prefix(prefix: str) -> str:
    """A key prefix a data set or run may live under: relative, no ``..`` step, printable, not too long."""
    parts = prefix.split("/") if prefix else []
    bad = any(p in (".", "..") for p in parts) or prefix.startswith("/") or "//" in prefix
    if bad or len(prefix) > 900 or not prefix.isprintable():
        raise UserError(f"{prefix!r}: not a usable S3 key prefix (relative, no '.' or '..' steps, no '//')")
    return prefix


def check_function_name(name: str) -> str:
    if not _FUNCTION.fullmatch(name):
        raise UserError(f"{name!r}: not a valid Lambda function name (1-64 letters, digits, hyphens, underscores)")
    return name


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` (or ``s3:/bucket/prefix``, as a Path folds it) as (bucket, prefix without a
    trailing slash), both checked."""
    match = re.fullmatch(r"s3:/+([^/]*)/?(.*)", url.strip())
    if not match:
        raise UserError(f"{url!r}: not an S3 location; write s3://bucket/prefix")
    bucket, prefix = match.groups()
    return check_bucket(bucket), check_prefix(prefix.rstrip("/"))


def s3_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def _boto3():
    try:
        import boto3
    except ImportError:
        raise UserError("S3 and Lambda need boto3: pip install 'cai-bench[aws]'") from None
    return boto3


@lru_cache(maxsize=32)
def client(service: str, endpoint_url: str | None = None, region: str | None = None, emulated: bool = False,
           pool: int = 10, read_timeout_s: float = 60.0):  # fmt: skip
    """A boto3 client, made once per process for each set of arguments (clients are safe to share between
    threads). ``emulated``: the loopback services of ``--emulate``, with throwaway credentials.

    Retries are botocore's ``standard`` mode for S3; Lambda invocations are retried by the driver itself
    (``pool`` connections, ``read_timeout_s`` past the function's own timeout)."""
    boto3 = _boto3()
    from botocore.config import Config

    retries = {"total_max_attempts": 1 if service == "lambda" else 5, "mode": "standard"}  # the first try included
    config = Config(max_pool_connections=pool, read_timeout=read_timeout_s, connect_timeout=10, retries=retries)
    with _lock:
        session = boto3.session.Session(**(EMULATED_CREDENTIALS if emulated else {}))
        # botocore reads AWS_DEFAULT_REGION and profiles; AWS_REGION is what the other SDKs and Lambda itself set
        region = region or session.region_name or os.environ.get("AWS_REGION") or (
            EMULATED_REGION if emulated or service == "s3" else None)  # fmt: skip
        if region is None:
            raise UserError(f"no AWS region set for {service}: give --region or set AWS_REGION (or a profile's region)")
        if not emulated and session.get_credentials() is None:
            raise UserError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
                "or run `aws configure` (or use --emulate to run locally)"
            )
        return session.client(service, endpoint_url=endpoint_url, region_name=region, config=config)


@contextmanager
def one_line_errors(what: str):
    """botocore's errors as one UserError line saying what failed; none of them carries a secret key."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code", "error")
            raise UserError(f"{what}: {code}: {error.get('Message') or exc}") from None
        if isinstance(exc, BotoCoreError):
            raise UserError(f"{what}: {exc}") from None
        raise


def error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def s3_client():
    """The S3 client for this process's settings: the endpoint in ``AWS_ENDPOINT_URL_S3`` (or AWS's), emulated
    credentials where ``CAI_BENCH_EMULATED_AWS`` says so (what ``--endpoint-url`` and ``--emulate`` set for a
    run and every process it starts)."""
    endpoint = os.environ.get(S3_ENDPOINT_ENV) or None
    return client("s3", endpoint_url=endpoint, emulated=os.environ.get(EMULATED_ENV) == "1", pool=32)


def secrets_client(region: str | None = None):
    """The Secrets Manager client for this process's settings, as ``s3_client`` (an emulated run's is moto's), in
    ``region`` where given: the function's, whose role reads the run's secret there."""
    endpoint = os.environ.get(SECRETS_ENDPOINT_ENV) or None
    return client("secretsmanager", endpoint_url=endpoint, region=region, emulated=os.environ.get(EMULATED_ENV) == "1")


def use_endpoints(s3_endpoint: str | None, emulated: bool) -> None:
    """Point this process, and every process it starts, at ``s3_endpoint`` (and emulated credentials; emulated,
    its Secrets Manager is the same loopback server's)."""
    if s3_endpoint:
        os.environ[S3_ENDPOINT_ENV] = s3_endpoint
    if emulated:
        os.environ[EMULATED_ENV] = "1"
        if s3_endpoint:
            os.environ[SECRETS_ENDPOINT_ENV] = s3_endpoint
