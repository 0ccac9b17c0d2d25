"""What the housekeeping commands print: the results store's records, model conversion and export, data
sets, and the Lambda function's deployment and cost."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from rich.table import Table

from cai_bench.core.errors import UserError
from cai_bench.render.console import key_value_table, say, stdout, tell

# ---------------------------------------------------------------------------------------------- results


_LIST_HEADERS = ["run id", "kind", "status", "backend", "rep", "data GB", "part. MB", "batch", "prec.", "wall s",
                 "samples/s"]  # fmt: skip


def _figure(value, spec: str) -> str:
    """A figure as the table shows it; "null" where the record stored one that was not a finite number."""
    return "null" if value is None else format(value, spec)


def show_record_list(rows: list[dict], total: int, store_path: Path) -> None:
    """``results list``: one row per record, the machine in the title where all share one."""
    several_machines = len({r["machine"] for r in rows}) > 1
    table = Table(title=f"{store_path}: {len(rows)} of {total} records", title_justify="left")
    for header in _LIST_HEADERS + (["machine"] if several_machines else []):
        table.add_column(header, justify="right" if header in ("rep", "data GB", "wall s", "samples/s") else "left")
    for r in rows:
        cells = [r["run_id"], r["kind"] or "run", r["status"], r["backend"], f"{r['repeat']}/{r['repeats']}",
                 f"{r['data_gb']:.3g}", f"{r['partition_mb']:g}", str(r["batch_size"]), r["precision_ran"],
                 _figure(r["wall_s"], ".2f"), _figure(r["samples_per_s"], ",.1f")]  # fmt: skip
        table.add_row(*cells, *([r["machine"]] if several_machines else []))
    if not several_machines and rows:
        table.title += f" · {rows[0]['machine']}"
    stdout.print(table)
    nulled = sum(r["wall_s"] is None or r["samples_per_s"] is None for r in rows)
    if nulled:
        say(f"{nulled} record(s) hold figures that were not finite numbers (null): left out of report and estimate")


def show_record(record: dict, row: dict, as_json: bool) -> None:
    """``results show``: the record's flat row, or the whole record."""
    if as_json:
        print(json.dumps(record, indent=1))
        return
    rows = [(k, "-" if v is None else f"{v:,.6g}" if isinstance(v, float) else str(v)) for k, v in row.items()]
    rows.append(("partitions run", str(len(record.get("workers", [])))))
    stdout.print(key_value_table(record["run_id"], rows))


# ---------------------------------------------------------------------------------------------- model


def show_model_info(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=1))
        return
    flops, total, frozen = info["flops_per_sample"], info["parameters"], info["frozen_parameters"]
    named = f" (sha256 {info['sha256'][:16]}...)" if info.get("sha256") else f" (seed {info.get('seed')})"
    rows = [
        ("parameters", f"{total:,}"),
        ("  frozen (encoder)", f"{frozen:,}"),
        ("  learnable (heads)", f"{total - frozen:,}"),
        ("state dict keys", str(info["state_dict_keys"])),
        ("FLOPs per sample", f"{flops / 1e9:.3f} GFLOP ({flops / 2e6:.1f} M multiply-adds)"),
        ("weights", info["weights"] + named),
    ]
    stdout.print(key_value_table("pcm-AstroMAE", rows))


def show_conversion(done) -> None:
    say(
        f"{done.out}: {done.keys} tensors from the {done.source_kind} {done.source} "
        f"(sha256 {done.source_sha256[:16]}...); they load strictly into pcm-AstroMAE: "
        f"cai-bench run --weights {done.out}"
    )


def show_model_export(export, seconds: float, as_json: bool) -> None:
    if as_json:
        print(json.dumps(export.meta, indent=1))
        return
    size = sum((Path(export.directory) / name).stat().st_size for name in export.files)
    w = export.weights
    named = w.source + (f" (sha256 {w.sha256[:16]}...)" if w.sha256 else f" (seed {w.seed})")
    runtime = "openvino" if export.format == "openvino" else "onnxruntime"
    say(
        f"{export.directory}: {export.format} export of {named}, {size / 2**20:,.1f} MB in {seconds:.1f} s; "
        f"max |dz| against torch fp32 on {export.check['batch']} galaxies: {export.check['max_abs_dz']:.2g} "
        f"({export.check['runtime']}). Run it: cai-bench run --runtime {runtime} --weights {export.directory}"
    )


# ---------------------------------------------------------------------------------------------- data


def show_synthesized(out: Path, manifest, seconds: float) -> None:
    written = sum(p.bytes for p in manifest.partitions)
    stdout.print(
        f"{out}: {manifest.samples:,} samples in {len(manifest.partitions)} partitions, "
        f"{written / 2**20:,.1f} MB in {seconds:.1f} s ({written / 2**20 / seconds:,.1f} MB/s)"
    )


def show_split(out: Path, manifest, partition_mb: float) -> None:
    stdout.print(f"{out}: {manifest.samples:,} samples in {len(manifest.partitions)} partitions of {partition_mb:g} MB")


def show_imported(out: Path, manifest, files: int, partition_mb: float) -> None:
    stdout.print(
        f"{out}: {manifest.samples:,} samples from {files} file(s) in {len(manifest.partitions)} partitions "
        f"of {partition_mb:g} MB; labels: {'yes' if manifest.has_labels else 'no'}"
    )
    ids = manifest.objects
    if ids is not None:
        say(f"ids: {ids.id_type}, from column {ids.id_column}{', with ra and dec' if ids.has_position else ''}; "
            f"kept in {out / ids.file}")  # fmt: skip
    else:
        say(f"ids: {manifest.source.get('ids', 'row numbers 0..N-1 in the order written')}")


def show_data_info(directory: Path, info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=1))
        return
    low, high = info["partition_samples_min"], info["partition_samples_max"]
    rows = [
        ("dataset id", info["dataset_id"]),
        ("source", json.dumps(info["source"])),
        ("samples", f"{info['samples']:,}"),
        ("data size", f"{info['data_gb']:.4g} GB"),
        ("partitions", f"{info['partitions']} x {info['partition_mb']:g} MB ({low:,}-{high:,} samples)"),
        ("on disk", f"{info['bytes_on_disk'] / 2**20:,.1f} MB"),
        ("labels", "yes" if info["has_labels"] else "no"),
        ("ids", info["ids"]),
        ("created", info["created_utc"]),
    ]
    stdout.print(key_value_table(str(directory), rows))


def show_verified(directory: Path, manifest, problems: list[str]) -> None:
    """Every partition that failed verification on stderr, then the one error line; or that all match."""
    if problems:
        for problem in problems:
            tell(problem)
        raise UserError(f"{directory}: {len(problems)} of {len(manifest.partitions)} partitions failed verification")
    stdout.print(
        f"{directory}: all {len(manifest.partitions)} partitions match the manifest ({manifest.samples:,} samples)"
    )


def show_upload(done) -> None:
    stdout.print(
        f"{done.location}: {len(done.uploaded)} object(s) uploaded ({done.bytes_uploaded / 2**20:,.1f} MB), "
        f"{len(done.skipped)} already there, in {done.seconds:.1f} s"
    )


# ---------------------------------------------------------------------------------------------- lambda


def show_emulator(emulator, url: str, s3_url: str) -> None:
    config = emulator.config
    say(
        f"Lambda Invoke API at {url}, function {config.name} ({config.memory_mb} MB, {emulator.cpu_share:.2f} vCPUs' "
        f"worth each, timeout {config.timeout_s:g} s, {emulator.concurrency} at once); S3 at {s3_url}\n"
        f"run against it: cai-bench run --backend lambda --lambda-endpoint-url {url} --endpoint-url "
        f"{s3_url} --bucket s3://cai-bench --memory-mb {config.memory_mb}"
    )


def show_build_commands(image, region: str | None, push: bool) -> None:
    """Where Docker is not reachable: the commands that build and push the image elsewhere."""
    say("Docker is not reachable here; on a machine with Docker and the aws CLI, run (ACCOUNT: your account id, "
        "from `aws sts get-caller-identity`):")  # fmt: skip
    account, where = "ACCOUNT", region or "REGION"
    for line in [shlex.join(image.build_command()), *(image.push_commands(account, where) if push else [])]:
        say("  " + line)
    say(f"then: cai-bench lambda deploy --image-uri {image.uri(account, where)} --role-arn ROLE_ARN")


def show_built(uri: str, push: bool) -> None:
    say(f"image {uri}" + (f"\nnext: cai-bench lambda deploy --image-uri {uri} --role-arn ROLE_ARN" if push else ""))


def show_deployed(done: dict) -> None:
    c = done["configuration"]
    say(
        f"function {c['FunctionName']} {done['action']} in {done['seconds']:.1f} s: {c['MemorySize']} MB, "
        f"timeout {c['Timeout']} s, /tmp {(c.get('EphemeralStorage') or {}).get('Size')} MB, "
        f"{(c.get('Architectures') or ['x86_64'])[0]}, state {c.get('State')}\nrun it: cai-bench run --backend lambda "
        f"--function {c['FunctionName']} --bucket s3://BUCKET/cai-bench"
    )


def show_function_status(found: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(found, indent=2, default=str))
        return
    name = found["function"]
    if not found["exists"]:
        say(f"function {name}: not deployed")
    else:
        say(
            f"function {name}: {found['state']} (last update {found['last_update']}), {found['memory_mb']} MB, "
            f"timeout {found['timeout_s']} s, /tmp {found['ephemeral_mb']} MB, {found['architecture']}, image "
            f"{found['image_uri']}{'' if found['managed'] else ' (not deployed by cai-bench)'}"
        )
    for arn in found["state_machines"]:
        say(f"state machine {arn}")


def show_destroyed(removed: list[str], name: str) -> None:
    for line in removed or [f"nothing to remove for function {name}"]:
        say(("removed " if removed else "") + line)


def show_cost(spent, billed, arch: str) -> None:
    steps = f" + ${spent.transitions_usd:.6f} for {spent.transitions:,} state transitions" if spent.transitions else ""
    say(
        f"{spent.requests:,} invocations, {sum(billed.billed_ms) / 1000:,.2f} billed s at {billed.memory_mb:,} MB = "
        f"{spent.billed_gb_s:,.1f} GB-s: ${spent.duration_usd:.4f} duration + ${spent.request_usd:.6f} requests"
        f"{steps} = ${spent.usd:.4f} ({arch}, prices as of {spent.prices_as_of})"
    )
