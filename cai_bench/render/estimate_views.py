"""What estimate, decide, the estimate's checks and compare print: each estimate with its kind of time,
interval and cost, the decision, the checks against measured runs, the comparison's test."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.table import Table

from cai_bench.analysis.compare import ALPHA, TEST_NAME
from cai_bench.analysis.estimate_checks import by_extrapolation, by_extrapolation_summary
from cai_bench.core.text import visible
from cai_bench.measure.time_kinds import TIME_KINDS
from cai_bench.render.console import say, stdout

# ---------------------------------------------------------------------------------------------- estimates


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:,.4f}" if value < 1 else f"{value:,.2f}"


def estimate_table(outcome) -> Table:
    """``estimate``: per setting, partition size and data size, the units, the workers at once, the kind of time,
    its median and its interval with the model's error, and the cost."""
    names = sorted({e.profile for e in outcome.estimates})
    table = Table(title=f"estimate from {'; '.join(names)}", title_justify="left")
    headers = ("setting", "data GB", "part. MB", "units", "time", "s p50", "80% interval s", "US$ p50", "US$ high",
               "US$/M gal.")  # fmt: skip
    for header in headers:
        table.add_column(header, justify="left" if header in ("setting", "time") else "right")
    for e in outcome.estimates:
        table.add_row(e.label, f"{e.gb:g}", f"{e.partition_mb:g}", f"{e.units:,}", TIME_KINDS[e.time_kind].short,
                      f"{e.time_s_p50:,.1f}", _interval(e), _usd(e.cost_usd_p50), _usd(e.cost_usd_high),
                      _usd(e.cost.get("usd_per_million_galaxies")))  # fmt: skip
    return table


def _interval(e) -> str:
    return "unbounded" if e.time_s_low is None else f"{e.time_s_low:,.1f}-{e.time_s_high:,.1f}"


def _cost_line(e) -> str:
    """The itemised cost of one estimate (its median-cost trial)."""
    c = e.cost
    if e.backend == "lambda":
        return (f"{c['billed_gb_s']:,.0f} GB-s ({e.prices['architecture']}) US$ {_usd(c['duration_usd'])}, "
                f"{c['requests']:,.0f} requests US$ {_usd(c['request_usd'])}, {c['transitions']:,.0f} transitions "
                f"US$ {_usd(c['transitions_usd'])}, S3 {c['s3_gets']:,.0f} GET + {c['s3_puts']:,.0f} PUT "
                f"US$ {_usd(c['s3_usd'])}")  # fmt: skip
    if e.backend == "hpc":
        hours = "cores unknown" if c["core_hours"] is None else f"{c['core_hours']:,.1f} core-hours"
        return f"{hours} at US$ {e.prices['core_hour_usd'] or '-'} per core-hour ({e.prices['billed']})"
    return f"{c['gpu_hours']:,.2f} GPU-hours at US$ {e.prices['gpu_hour_usd'] or '-'} ({e.prices['billed']})"


def _assumption_lines(estimates: list) -> list[str]:
    """One line per backend: the kind of time, how its interval was made, and the prices assumed."""
    lines, seen = [], set()
    for e in estimates:
        if e.backend in seen:
            continue
        seen.add(e.backend)
        prices = ", ".join(f"{k} {_price_text(v)}" for k, v in e.prices.items())
        lines += [f"{e.backend} time: {TIME_KINDS[e.time_kind].text}", f"{e.backend} {e.interval}",
                  f"{e.backend} prices: {prices}"]  # fmt: skip
    return lines


def _price_text(value) -> str:
    return "not given (unpriced)" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


# The terms of a trial's wall (measure/simulate.TERMS), as a line names them
TERM_NAMES = {"waited_for_a_worker_s": "waiting for a worker", "throttled_s": "throttled, backing off",
              "start_rate_s": "start rate", "cold_start_s": "cold start", "compute_s": "compute",
              "straggler_s": "straggler", "read_s": "read", "unit_overhead_s": "unit overhead",
              "results_write_s": "results written", "run_overhead_s": "run overhead",
              "fixed_s": "listing and orchestration"}  # fmt: skip
TERM_LINES = 6  # estimates whose terms are printed (the rest are in --json)


def terms_line(e) -> str:
    """Where one estimate's time goes: its median trial's wall along the path of its last unit, term by term."""
    parts = [f"{TERM_NAMES[k]} {v:,.1f}" for k, v in e.terms.items() if abs(v) >= 0.05]
    return (f"where the time goes, {e.label}, {e.gb:g} GB in {e.partition_mb:g} MB (s, the last unit's path in "
            f"the median trial): " + ", ".join(parts))  # fmt: skip


def warning_lines(e) -> list[str]:
    """What an estimate must say beside its figures: far beyond its profile, or a setting that fails on AWS."""
    lines = []
    if e.extrapolation > 10:
        lines.append(f"{e.gb:g} GB is {e.extrapolation:,.0f}x the largest size its profile was calibrated on "
                     f"({e.gb / e.extrapolation:.3g} GB): beyond 10x the interval is the model's error stretched to "
                     "it, not measured there")  # fmt: skip
    if e.map_retries_exhausted:
        lines.append(f"{e.label}: {e.map_retries_exhausted:,.0f} children of the Map stay throttled past their "
                     "last retry, and on AWS they fail: keep --map-concurrency at most --concurrency")  # fmt: skip
    return lines


def show_estimates(outcome, figure: Path | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**outcome.to_dict(), "figure": str(figure) if figure else None}, indent=1))
        return
    stdout.print(estimate_table(outcome))
    for e in outcome.estimates:
        for line in warning_lines(e):
            say(line)
    for e in outcome.estimates[:TERM_LINES]:
        say(terms_line(e))
    for line in _assumption_lines(outcome.estimates):
        say(line)
    if len(outcome.estimates) == 1:
        say(f"cost: {_cost_line(outcome.estimates[0])}")
    for backend, facts in outcome.profiles.items():
        shown = {k: v for k, v in facts.items() if k not in ("name", "model_error") and v is not None}
        say(f"{backend} profile {facts['name']}: " + ", ".join(f"{k} {_fact(v)}" for k, v in shown.items()))
    took = sum(e.simulated_s for e in outcome.estimates)
    units = sum(e.units for e in outcome.estimates)
    trials = outcome.estimates[0].trials
    say(f"simulated {units:,} units x {trials} trials (seed {outcome.estimates[0].seed}) in {took:.2f} s")
    if figure:
        say(f"figure: {figure}")


def show_decision(decision, figure: Path | None, as_json: bool) -> None:
    """``estimate --deadline/--budget``: the settings ranked, what each costs item by item, and the choice."""
    if as_json:
        print(json.dumps({**decision.to_dict(), "figure": str(figure) if figure else None}, indent=1))
        return
    goal = " and ".join(
        x
        for x in (
            decision.deadline_s is not None and f"deadline {decision.deadline_s:,.0f} s",
            decision.budget_usd is not None and f"budget US$ {decision.budget_usd:,.2f}",
        )
        if x
    )
    gb = decision.candidates[0].estimate.gb
    table = Table(title=f"{gb:g} GB, {goal}: cheapest first among those that meet it, then the rest, fastest first",
                  title_justify="left")  # fmt: skip
    for header in ("#", "setting", "part. MB", "wall s p50", "upper s", "US$ p50", "US$/M gal.", "frontier", "verdict"):
        table.add_column(header, justify="left" if header in ("setting", "verdict") else "right")
    for rank, c in enumerate(decision.candidates[:25], 1):
        e = c.estimate
        table.add_row(str(rank), e.label, f"{e.partition_mb:g}", f"{e.time_s_p50:,.0f}",
                      "-" if e.time_s_high is None else f"{e.time_s_high:,.0f}", _usd(e.cost_usd_p50),
                      _usd(e.cost.get("usd_per_million_galaxies")), "yes" if c.frontier else "",
                      "meets" if c.meets else c.why_not)  # fmt: skip
    stdout.print(table)
    if len(decision.candidates) > 25:
        say(f"{len(decision.candidates) - 25} more in --json")
    chosen = decision.chosen
    if chosen:
        say(f"cheapest that meets it: {chosen.estimate.label}, {chosen.estimate.partition_mb:g} MB partitions; "
            f"cost: {_cost_line(chosen.estimate)}")  # fmt: skip
    else:
        say("nothing meets it: the fastest are first in the table")
    for line in _assumption_lines([c.estimate for c in decision.candidates]) + decision.left_out:
        say(line)
    say(f"every time is wall clock; each setting simulated {decision.trials} times")
    if figure:
        say(f"figure: {figure}")


def _fact(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return str(value)


def show_checks(checks: list, skipped: list[str], errors: dict, source: str, as_json: bool,
                figure: Path | None = None) -> None:  # fmt: skip
    """``estimate --validate``: each measured run against its prediction (how it was held out, how far it
    extrapolated), per backend the median absolute error and how often the 80% interval covered the points held
    out, and both again by extrapolation factor."""
    groups = {g: [c for c in checks if (c.group or c.backend) == g] for g in errors}
    bands = {g: by_extrapolation(group) for g, group in groups.items()}
    if as_json:
        print(json.dumps({"source": source, "checks": [c.to_dict() for c in checks], "skipped": skipped,
                          "by_backend": {b: e.to_dict() for b, e in errors.items()},
                          "by_extrapolation": bands, "figure": str(figure) if figure else None}, indent=1))  # fmt: skip
        return
    table = Table(title=f"{source}: predicted vs measured", title_justify="left")
    for header in ("run", "runs of", "held out", "time", "data GB", "part. MB", "x", "at once", "measured s",
                   "predicted s p50", "p90", "error"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("run", "runs of", "held out", "time") else "right")
    for c in checks:
        error = "calibration" if c.calibration else f"{c.error * 100:+.0f}%"
        table.add_row(c.what, c.group or c.backend, c.held_out, TIME_KINDS[c.time_kind].short, f"{c.gb:.3g}",
                      "-" if c.partition_mb is None else f"{c.partition_mb:g}", f"{c.extrapolation:.2g}",
                      str(c.slots), f"{c.measured_s:,.2f}", f"{c.predicted_s_p50:,.2f}", f"{c.predicted_s_p90:,.2f}",
                      error)  # fmt: skip
    stdout.print(table)
    for line in skipped:
        say(f"not predicted: {line}")
    for backend, error in errors.items():
        if not error.points:
            continue
        covered, bounded = error.coverage()
        coverage = f"{covered} of {bounded} ({covered / bounded:.0%})" if bounded else "none bounded (too few points)"
        say(f"{backend}: median absolute error {error.median_abs_error * 100:.1f}% over {len(error.points)} points "
            f"held out; the {error.coverage_target:.0%} interval, made from the others (their errors divided by "
            f"1 + ln x, x the extrapolation factor), covered {coverage}")  # fmt: skip
        for band in bands[backend]:
            say(f"  {backend} extrapolated {band['extrapolation']}: {band['checks']} point(s), median absolute "
                f"error {band['median_abs_error'] * 100:.1f}%, the interval covered {band['covered']} of "
                f"{band['bounded']}")  # fmt: skip
        for how in sorted({c.held_out for c in groups[backend] if c.held_out.startswith("from")}):
            (alone,) = by_extrapolation_summary([c for c in groups[backend] if c.held_out == how])
            covered = (f"covered {alone['covered']} of {alone['bounded']}" if alone["bounded"] else
                       "cannot be bounded from so few")  # fmt: skip
            say(f"  {backend} calibrated {how} only, the larger sizes predicted: {alone['checks']} point(s), median "
                f"absolute error {alone['median_abs_error'] * 100:.1f}%, the interval (from these points' errors "
                f"alone) {covered}")  # fmt: skip
    if figure:
        say(f"figure: {figure}")


# ---------------------------------------------------------------------------------------------- compare


def _comparison_rows(done) -> list[list[str]]:
    rows = []
    for p in done.points:
        verdict = "WORSE" if p.regressed else ("worse, within noise" if p.worse_by > done.factor else "ok")
        if not p.can_fail:
            verdict = f"cannot fail: needs {p.needs}"
        if not p.comparable:
            verdict = "INVALID: not compared"
        shown_p = f"{p.p_value:.3g}" + (f" (Holm {p.p_holm:.3g})" if p.p_holm is not None else "")
        rows.append([p.label, f"{statistics.median(p.baseline):,.4g} ({len(p.baseline)})",
                     f"{statistics.median(p.candidate):,.4g} ({len(p.candidate)})", f"{p.ratio:.3f}",
                     shown_p, verdict])  # fmt: skip
    return rows


def show_comparison(done, fmt: str) -> None:
    """``compare``: a row per matched point (medians with their repeats, ratio, p-value, verdict), then the points
    one side lacks, and one line of what failed."""
    if fmt == "json":
        print(json.dumps(done.to_dict(), indent=1, allow_nan=False))
        return
    columns = ["point", f"baseline {done.metric}", f"candidate {done.metric}", "ratio", "p", "verdict"]
    rows = _comparison_rows(done)
    if fmt == "markdown":
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            print(visible("| " + " | ".join(row) + " |"))
    else:
        table = Table(title=f"{done.candidate} against {done.baseline}: {done.metric}, factor {done.factor:g}",
                      title_justify="left")  # fmt: skip
        for name in columns:
            table.add_column(name, justify="left" if name in ("point", "verdict") else "right")
        for row in rows:
            table.add_row(*row, style="bold red" if row[-1] == "WORSE" else None)
        stdout.print(table)
    _comparison_notes(done)


def _comparison_notes(done) -> None:
    """What was not compared and why, then one line of the verdict."""
    for label in done.only_baseline:
        say(
            f"only in the baseline: {label}"
            + ("" if done.allow_missing else ": MISSING from the candidate (fails; --allow-missing lets it pass)")
        )
    for label in done.only_candidate:
        say(f"only in the candidate: {label}")
    for p in done.points:
        for why in p.invalid:
            say(f"INVALID {p.label}: {why}: not compared")
    if done.duplicates:
        say(f"{done.duplicates} record(s) appeared twice (the same run id, e.g. merged stores): counted once")
    blind = sum(not p.can_fail for p in done.points if p.comparable)
    if blind:
        say(f"{blind} matched point(s) with too few repeats for the test to fail: not counted as passes")
    failed, family = len(done.regressions), len(done.family)
    test = f"{TEST_NAME}, p <= {ALPHA:g} after Holm's correction over {family} point(s)"
    if failed:
        say(f"{failed} of {len(done.points)} matched point(s) worse than {done.factor:g}x beyond the noise ({test})")
    else:
        say(
            f"no matched point worse than {done.factor:g}x beyond the noise ({family} compared that could fail; {test})"
        )
