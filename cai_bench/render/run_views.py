"""What run, predict, bench, sweep and report print: the summary, its accuracy, validity and runtime lines,
what a failed or interrupted run kept, the catalogue and its photo-z metrics. ``as_json`` prints the same
as JSON, nothing else."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from cai_bench.analysis.report import export_row, memory_lines, to_json, to_markdown
from cai_bench.analysis.results import to_csv
from cai_bench.analysis.validity import MIN_DURATION_S, MIN_SAMPLES, Rules, verdict_line
from cai_bench.core.records import RunRecord
from cai_bench.core.text import visible
from cai_bench.render.console import console, print_fitted, say, stdout, tell
from cai_bench.render.labels import UPSTREAM_LABEL, point_metrics_text, upstream_paper_text
from cai_bench.render.tables import bench_table, comm_table, report_table, run_summary_table

# ---------------------------------------------------------------------------------------------- runs


def accuracy_line(metrics: dict | None, where: str = "") -> str | None:
    if not metrics:
        return None
    line = f"accuracy over {metrics['samples']:,} objects{where} ({UPSTREAM_LABEL}): {upstream_paper_text(metrics)}"
    if not metrics.get("meaningful", True):
        line = "MEANINGLESS " + line
    return line + (f" ({metrics['note']})" if metrics.get("note") else "")


def show_runs(records: list[RunRecord], store_path: Path, as_json: bool) -> None:
    """The records a command appended: the summary table with what the last repeat cost and reached."""
    if as_json:
        print(json.dumps([asdict(r) for r in records], indent=1))
        return
    stdout.print(run_summary_table(records))
    last = records[-1].summary
    stdout.print(
        f"sum over {last.workers} worker(s) of each one's bits / own compute s (the paper's throughput measure): "
        f"{last.sum_worker_throughput_bps / 1e6:,.1f} Mbps in the last repeat"
    )
    billed = records[-1].backend_info.get("cost")
    if billed:
        stdout.print(
            f"cost: {billed['requests']:,} requests, {billed['billed_gb_s']:,.1f} billed GB-s "
            f"({billed['architecture']}, prices as of {billed['prices_as_of']}): ${billed['cost_usd']:.4f} "
            "in the last repeat"
        )
    chose = runtime_choice_line(records[0].plan.get("runtime_choice"))
    if chose:
        say(chose)
    weights = records[0].weights.get("weights")
    if weights == "random-init":
        weights += " (the timings are real; the predicted redshifts are not)"
    stdout.print(f"weights: {weights}")
    line = accuracy_line(records[-1].accuracy, " in the last repeat")
    if line:
        say(line)
    line = comm_line(records[-1].backend_info.get("comm"))
    if line:
        say(line)
    for record in records:
        if record.non_finite:
            noted = ", ".join(f"{path} ({value})" for path, value in record.non_finite.items())
            say(f"repeat {record.repeat}: not finite numbers, stored as null (the record notes them): {noted}")
    verdicts = {validity_line(r) for r in records}
    for record in records if len(verdicts) > 1 else records[-1:]:
        say(("" if len(verdicts) == 1 else f"repeat {record.repeat}: ") + validity_line(record))
    stdout.print(f"{len(records)} record(s) appended to {store_path}")
    say(f"run id{'s' if len(records) > 1 else ''}: {', '.join(r.run_id for r in records)} (results show and plot "
        f"--timeline take the id, or the start of its last part)")  # fmt: skip


def comm_line(comm: dict | None) -> str | None:
    """What the run's closing collectives (--comm) came to, in the last repeat: done, or failed and why."""
    if not comm:
        return None
    # The channels as URLs, or (where rank 0's aggregate was read) as what each channel recorded of itself
    schemes = [c.get("scheme") if isinstance(c, dict) else str(c).split("://")[0] for c in comm.get("channels") or []]
    channels = ", ".join(str(s) for s in schemes)
    dropped = comm.get("dropped_frames") or 0
    dropped_text = f"; dropped {dropped} frame(s) that failed the seal (not this run's)" if dropped else ""
    head = f"collectives over {channels}, {comm.get('world_size')} rank(s)"
    if comm.get("collectives") != "failed":
        return f"{head}: done{dropped_text}"
    failed = comm.get("failed_ranks") or []
    why = f"rank {failed[0]['rank']}: {failed[0]['error']}" if failed else "no aggregate was read"
    return f"{head}: FAILED ({why}); each unit's own result was read instead{dropped_text}"


def runtime_choice_line(choice: dict | None) -> str | None:
    """What --runtime auto chose and why, with the probe's time of each candidate (None: it was not asked)."""
    if not choice:
        return None
    timed = [
        f"{c['runtime']} {c['precision']} " + (f"{c['seconds']:.3f} s" if c.get("seconds") is not None else
                                               f"skipped: {c['skipped']}")
        for c in choice.get("candidates") or []
    ]  # fmt: skip
    batch = f" in batches of {choice['batch']}" if choice.get("batch") else ""
    checked = f", checked against {choice['checked_against']}" if choice.get("checked_against") else ""
    probe = (f"; probe ({choice['samples']} galaxies{batch}{checked}, best of the timed passes): {', '.join(timed)}"
             if timed else "")  # fmt: skip
    return f"runtime auto ran as {choice['chose']} {choice['precision']} ({choice['why']}){probe}"


def validity_line(record) -> str:
    """A record's VALID or INVALID line, from the verdict it carries."""
    found = record.validity or {}
    rules = found.get("rules") or {}
    return verdict_line(
        found.get("failed") or [],
        Rules(rules.get("min_duration_s", MIN_DURATION_S), rules.get("min_samples", MIN_SAMPLES)),
    )


def show_run(done, as_json: bool) -> None:
    """What ``run`` did: its records, or the job it submitted and the command that records it."""
    if done.submitted is None:
        show_runs(done.records, done.store.path, as_json)
        return
    job_id, collect = done.submitted
    if as_json:
        print(json.dumps({"submitted": job_id, "collect": collect}))
        return
    stdout.print(f"job {job_id} is submitted; when it has run, record it with:")
    say(f"  {collect}")


def show_partitions_failed(exc, store_path: Path, again: str = "") -> None:
    """Partitions that failed for good: each, its attempts and their errors, and where the rest was kept."""
    tell(f"error: {exc}")
    for failure in exc.failed:
        errors = " | ".join(failure["errors"])
        tell(f"  partition {failure['partition']} (unit {failure['unit']}), {failure['attempts']} attempt(s): {errors}")
    console.print(f"the partitions that finished are kept in a 'failed' record in {store_path}{again}")
    if exc.kind in FAILURE_ADVICE:
        tell(f"to finish: {FAILURE_ADVICE[exc.kind]}")


# What a command that failed for want of memory or time can lower (the line under the failures)
FAILURE_ADVICE = {
    "memory": "lower --batch-size or --partition-mb (on Lambda, or raise --memory-mb)",
    "time": "lower --partition-mb (each unit's time), or the workers or --max-concurrency sharing the machine",
}


def show_interrupted(exc, store_path: Path, interrupted: str | None = None) -> None:
    if hasattr(exc, "collect"):
        console.print("interrupted; the job keeps running. When it has run, record it with:")
        tell(f"  {exc.collect}")
    else:
        console.print(
            interrupted or f"interrupted; finished repeats and the partitions done so far are in {store_path}"
        )


def show_predict(outcome, as_json: bool) -> None:
    if as_json:
        figures = {"out": str(outcome.out), "objects": outcome.objects, "partitions_run": outcome.partitions_run,
                   "partitions_reused": outcome.partitions_reused, "accuracy": outcome.accuracy,
                   "run_ids": [r.run_id for r in outcome.records], "provenance": outcome.provenance}  # fmt: skip
        print(json.dumps(figures, indent=1))
        return
    if outcome.records:
        stdout.print(run_summary_table(outcome.records))
    reused = f" ({outcome.partitions_reused} partitions from an earlier run)" if outcome.partitions_reused else ""
    stdout.print(f"{outcome.out}: {outcome.objects:,} objects{reused}")
    for line in catalogue_lines(outcome.provenance):
        say(line)
    if outcome.accuracy is not None and not outcome.accuracy.get("meaningful", True):
        say("weights: random-init (the timings are real; the predicted redshifts are not)")
    line = accuracy_line(outcome.accuracy)
    if line:
        say(line)
    for line in photoz_lines(outcome.accuracy):
        say(line)
    if outcome.records:
        say(f"run id: {', '.join(r.run_id for r in outcome.records)}")


def catalogue_lines(provenance: dict) -> list[str]:
    """Where the true redshifts came from and how many objects carry each flag."""
    lines = []
    joined = provenance.get("z_true")
    if isinstance(joined, dict):
        lines.append(f"z_true: {joined['matched']:,} of {joined['objects']:,} ids found in {joined['catalogue']} "
                     f"(column {joined['z_column']}, joined on {joined['on']})")  # fmt: skip
        if "used" in joined:  # catalogues written before these counts have none
            low, high = joined["z_range"]
            lines.append(f"z_true: {joined['used']:,} redshifts used; {joined['missing']:,} missing "
                         f"({joined['missing_values']}), {joined['out_of_range']:,} outside {low:g} < z <= {high:g}: "
                         "not used")  # fmt: skip
        if joined.get("not_whole"):
            lines.append(f"z_true: {joined['not_whole']:,} ids of the catalogue are not whole numbers and match none")
    meanings = provenance.get("flags", {})
    for bit, count in provenance.get("flag_counts", {}).items():
        if count:
            lines.append(f"flag {bit}: {count:,} objects: {meanings.get(bit, '')}")
    return lines


def photoz_lines(metrics: dict | None) -> list[str]:
    """The photo-z point metrics of dz/(1+z), overall and per bin of true redshift, labelled as the accuracy is."""
    if not metrics or "photoz" not in metrics:
        return []
    label = "" if metrics.get("meaningful", True) else "MEANINGLESS "

    def text(m: dict) -> str:
        return f"{point_metrics_text(m)}, {m['objects']:,} objects"

    lines = [f"{label}photo-z point metrics (RAIL's) of dz/(1+z): {text(metrics['photoz'])}"]
    lines += [f"  z {row['z_low']:g}-{row['z_high']:g}: {text(row)}" for row in metrics.get("photoz_by_z") or []]
    lines += [f"  r {row['r_low']:g}-{row['r_high']:g} mag: {text(row)}" for row in metrics.get("photoz_by_r") or []]
    return lines


def show_bench(done, as_json: bool) -> None:
    if as_json:
        print(json.dumps(done.figures, indent=1))
        return
    outcome, others = done.outcome, done.outcome.arms[1:]
    stdout.print(bench_table(done))
    forward = ", ".join(f"{arm} {outcome.median_ratio(arm, 'compute_samples_per_s'):.2f}" for arm in others)
    stdout.print(
        "samples/s = samples / wall s of the whole run (start-up and loading included). "
        f"Forward passes only, median ratio to the reference: {forward}."
    )
    rss = ", ".join(f"{arm} {outcome.peak_rss_bytes(arm) / 2**20:,.0f} MB" for arm in outcome.arms)
    stdout.print(f"peak RSS: {rss} (the reference holds the whole data set)")
    stdout.print(efficiency_line(done.figures))
    for arm in others:
        chose = dict(done.figures["arms"][arm]["choices"])
        default = runtime_choice_line(chose.pop("runtime_choice", None))
        say(f"{arm}: {json.dumps(chose)}")
        if default:
            say(f"{arm} (what `cai-bench run` runs without flags): {default}")
    stdout.print(f"CPU flags: {' '.join(done.figures['cpu_flags']) or 'none read'}")
    stdout.print(f"{sum(len(r) for r in outcome.records.values())} record(s) appended to {done.store.path}")


def efficiency_line(figures: dict) -> str:
    """Each arm's GFLOP/s (forward passes), MFU and largest |dz| from the reference, with the peak they are of."""
    peak = figures.get("fp32_peak") or {}

    def arm_text(arm: str, f: dict) -> str:
        share = "" if f.get("compute_mfu") is None else f" ({f['compute_mfu']:.0%} MFU)"
        dz = "" if "max_abs_dz" not in f else f", max |dz| {f['max_abs_dz']:.1e}"
        return f"{arm} {f['compute_gflops']:,.1f}{share}{dz}"

    arms = "; ".join(arm_text(arm, f) for arm, f in figures["arms"].items())
    of = (f"of a measured fp32 peak of {peak['gflops']:,.1f} GFLOP/s ({peak['how']}, {peak['threads']} threads)"
          if peak else "no fp32 peak measured")  # fmt: skip
    flops = figures.get("flops_per_sample") or 0
    return (f"GFLOP/s over the forward passes, at {flops / 1e9:.3f} GFLOP a galaxy, {of}; max |dz| from the "
            f"reference loop's predictions over every galaxy: {arms}")  # fmt: skip


def show_sweep(done, as_json: bool) -> None:
    if as_json:
        print(to_json(done.points))
        return
    outcome, spec = done.outcome, done.spec
    skipped = sum(1 for s in outcome.points if s.todo == 0)
    print_fitted(report_table(done.points, f"sweep {spec.name}: {len(outcome.points)} points on {spec.backend}"))
    stdout.print(
        f"{len(outcome.records)} record(s) appended to {done.store.path}"
        + (f"; {skipped} point(s) were already complete (--force reruns them)" if skipped else "")
    )
    for runtime, probe in (outcome.auto_precisions or {"torch": outcome.auto_precision or {}}).items():
        if not probe:
            continue
        on = f" on {runtime}" if len(outcome.auto_precisions) > 1 else ""
        stdout.print(
            f"precision auto ran as {probe['chose']}{on} ({probe['why']}): probed once on this machine for the "
            "whole sweep, so every repeat of a point runs the same precision"
        )
    for choice in outcome.runtime_choices:
        say(f"{runtime_choice_line(choice)}; asked once for the sweep's points of one batch size")
    for state in outcome.points:
        if state.reused:
            say(reused_line(state))


def reused_line(state) -> str:
    """A point whose repeats this sweep took from the store: how many, when and by which command they were
    measured (under whatever load the machine had then)."""
    when = sorted(r["created_utc"] or "?" for r in state.reused)
    span = when[0] if when[0] == when[-1] else f"{when[0]} to {when[-1]}"
    commands = sorted({f"cai-bench {r['command']}" if r["command"] else "an earlier cai-bench" for r in state.reused})
    ids = ", ".join(str(r["run_id"]).rpartition("-")[2] for r in state.reused)
    return (f"REUSED {state.point.label()}: {len(state.reused)} repeat(s) from the store, measured {span} by "
            f"{' and '.join(commands)}, not by this sweep (runs {ids})")  # fmt: skip


def waiting_for(store_directory: Path):
    """What a sweep says when another process holds a point's lock."""
    return lambda point: console.print(
        f"{point.label()}: another process is measuring this point into {store_directory}; waiting for it"
    )


def show_report(points: list, store_path: Path, fmt: str, comm_points: list | None = None) -> None:
    if fmt == "table":
        if points:
            print_fitted(report_table(points, f"{store_path}: {len(points)} points"))
        for p in points:
            if not p.valid:
                say(f"INVALID {p.label()} · {p.precision} · {p.engine}: {'; '.join(p.invalid)}")
        for line in memory_lines(points):
            say(f"memory: {line}")
        if comm_points:
            stdout.print(comm_table(comm_points, f"{store_path.parent / 'comm.jsonl'}: {len(comm_points)} points"))
    elif fmt == "markdown":  # text for people: control characters from the records written as escapes
        print(visible(to_markdown(points)), end="")
    elif fmt == "csv":
        print(visible(to_csv([export_row(p) for p in points])), end="")
    else:
        print(to_json(points))


def show_comm_points(points, results: Path) -> None:
    """``comm bench``: each point as it is stored, then the table of them."""
    done = []
    for record in points:
        done.append(record)
        tell(f"{record['channel']} {record['op']} x{record['world_size']} {record['nbytes']} B: "
             f"{record['median_s'] * 1000:.3g} ms")  # fmt: skip
    stdout.print(comm_table(done, f"{results / 'comm.jsonl'}: {len(done)} points"))
