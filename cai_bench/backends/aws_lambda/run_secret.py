"""A run's secrets where its functions read them and nowhere else: one secret in AWS Secrets Manager per run
(``cai-bench/run/<run id>``), made by the driver before the first invocation and deleted, without the recovery
window, when the run ends. It holds what seals the run's objects and events and, with ``--comm``, the channels'
key and URLs; events and Step Functions' execution inputs (kept in the execution history for 90 days) carry only
its ARN. Secrets Manager, not SSM Parameter Store: GetSecretValue's quota (10,000 a second) serves thousands of
cold starts at once, where a SecureString parameter's default throughput (40 a second) would throttle them.
The function role may read ``cai-bench/run/*`` and nothing else (``deploy/lambda/role-policy.json``)."""

from __future__ import annotations

import contextlib
import json

from cai_bench.core import aws

PREFIX = "cai-bench/run/"


def create(run_id: str, value: dict, region: str | None = None) -> str:
    """The run's secret, made in the function's ``region``: its ARN (what events carry, and what names the region
    to the function that reads it)."""
    with aws.one_line_errors(f"AWS Secrets Manager: cannot create the run's secret {PREFIX}{run_id}"):
        made = aws.secrets_client(region).create_secret(Name=f"{PREFIX}{run_id}", SecretString=json.dumps(value),
                                                  Tags=[{"Key": "cai-bench", "Value": "run"}])  # fmt: skip
    return made["ARN"]


def _region(ref: str) -> str | None:
    """The region an ARN names (arn:aws:secretsmanager:REGION:...), None for a bare name."""
    parts = ref.split(":")
    return parts[3] or None if len(parts) > 3 and parts[0] == "arn" else None


def read(ref: str) -> dict:
    """The secret ``ref`` names (the function's side)."""
    return json.loads(aws.secrets_client(_region(ref)).get_secret_value(SecretId=ref)["SecretString"])


def delete(ref: str) -> bool:
    """The run's secret, gone at once (no recovery window). False where it could not be deleted: the run's
    record stands whatever this says, and ``aws secretsmanager list-secrets --filters Key=tag-key,Values=cai-bench``
    finds what is left."""
    with contextlib.suppress(Exception):
        aws.secrets_client(_region(ref)).delete_secret(SecretId=ref, ForceDeleteWithoutRecovery=True)
        return True
    return False
