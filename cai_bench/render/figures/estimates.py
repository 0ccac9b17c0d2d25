"""The estimate's figures: time and cost against data size with their intervals, and the decision's
frontier."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from cai_bench.measure.time_kinds import COMPUTE, TIME_KINDS, WALL
from cai_bench.render.figures.common import finish_axes, new_figure, save_figure
from cai_bench.render.figures.reference import REFERENCE_COLOURS

# ---------------------------------------------------------------------------------------------- estimates


def _estimate_series(estimates: list) -> dict[str, list]:
    series: dict[str, list] = {}
    for e in estimates:
        memory = f", {e.memory_mb:,} MB functions" if e.memory_mb else ""
        part = f", {e.partition_mb:g} MB partitions"
        workers = "" if e.backend == "lambda" else f", {e.slots:,} {'GPU' if e.backend == 'gpu' else 'task'}(s)"
        kind = "" if e.time_kind == "wall" else " (compute only)"
        series.setdefault(f"predicted: {e.backend}{part}{memory}{workers}{kind}", []).append(e)
    return {k: sorted(v, key=lambda e: e.gb) for k, v in series.items()}


def estimate_figure(outcome) -> Figure:
    """Predicted time (and cost where priced) against data size per backend: the median as a line, the interval
    with the model's error as a band; the profile's measured points over it. Each kind of time on its own axes."""
    priced = any(e.cost_usd_p50 is not None for e in outcome.estimates)
    kinds = [k for k in (WALL, COMPUTE) if any(e.time_kind == k for e in outcome.estimates)]
    rows = len(kinds) + priced
    fig = Figure(figsize=(12, 1.5 + 3.5 * rows), dpi=100)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    time_axes = dict(zip(kinds, axes, strict=False))
    partitions = {(e.backend, e.partition_mb) for e in outcome.estimates}
    banded = set()
    for label, group in _estimate_series(outcome.estimates).items():
        ax, xs = time_axes[group[0].time_kind], [e.gb for e in group]
        line = ax.plot(xs, [e.time_s_p50 for e in group], marker="o", markersize=3, label=label)[0]
        if all(e.time_s_low is not None for e in group):
            ax.fill_between(
                xs,
                [e.time_s_low for e in group],
                [e.time_s_high for e in group],
                alpha=0.15,
                color=line.get_color(),
                label=None if ax in banded else "80% interval (model error)",
            )
            banded.add(ax)
        if priced and group[0].cost_usd_p50 is not None:
            axes[-1].plot(xs, [e.cost_usd_p50 for e in group], marker="o", markersize=3, color=line.get_color(),
                          label=label)  # fmt: skip
    kind_of = {e.backend: e.time_kind for e in outcome.estimates}
    for index, (what, points) in enumerate(_measured_series(outcome.measured, partitions).items()):
        colour = REFERENCE_COLOURS[index % len(REFERENCE_COLOURS)]
        time_axes[kind_of[points[0]["backend"]]].plot(
            [p["gb"] for p in points], [p["wall_s"] for p in points], linestyle="none", marker="s",
            markerfacecolor="none", color=colour, label=what)  # fmt: skip
    axes[0].set_title(f"estimated from {'; '.join(sorted(outcome.profiles[b]['name'] for b in outcome.profiles))}",
                      fontsize=9, loc="left")  # fmt: skip
    if priced:
        finish_axes(fig, axes[-1], "data size (GB)", "cost (US$, median)")
    for kind, ax in list(time_axes.items())[1:]:
        finish_axes(fig, ax, "data size (GB)", TIME_KINDS[kind].axis)
    return finish_axes(fig, axes[0], "data size (GB)", TIME_KINDS[kinds[0]].axis)


def decision_figure(decision) -> Figure:
    """``estimate --deadline``: each candidate's upper bound of time against its median cost, the frontier
    joined, the deadline and the budget as lines; those that miss hollow."""
    fig, ax = new_figure()
    markers, colours = {"lambda": "o", "hpc": "s", "gpu": "^"}, {"lambda": "C0", "hpc": "C1", "gpu": "C2"}
    for backend in dict.fromkeys(c.estimate.backend for c in decision.candidates):
        for meets in (True, False):
            shown = [c.estimate for c in decision.candidates if c.estimate.backend == backend and c.meets == meets
                     and c.estimate.time_s_high is not None and c.estimate.cost_usd_p50 is not None]  # fmt: skip
            if shown:
                ax.plot([e.time_s_high for e in shown], [e.cost_usd_p50 for e in shown], linestyle="none",
                        marker=markers[backend], color=colours[backend], markerfacecolor=None if meets else "none",
                        label=f"{backend}, {'meets' if meets else 'misses'}")  # fmt: skip
    edge = sorted((c.estimate for c in decision.candidates if c.frontier), key=lambda e: e.time_s_high)
    if edge:
        ax.plot([e.time_s_high for e in edge], [e.cost_usd_p50 for e in edge], color="grey", linewidth=1,
                label="frontier (nothing faster and cheaper)")  # fmt: skip
    if decision.deadline_s is not None:
        ax.axvline(decision.deadline_s, color="red", linestyle="--", linewidth=1, label="deadline")
    if decision.budget_usd is not None:
        ax.axhline(decision.budget_usd, color="red", linestyle=":", linewidth=1, label="budget")
    if decision.chosen:
        chosen = decision.chosen.estimate
        ax.plot([chosen.time_s_high], [chosen.cost_usd_p50], marker="*", markersize=14, color="gold",
                markeredgecolor="black", linestyle="none", label=f"cheapest that meets: {chosen.label}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    gb = decision.candidates[0].estimate.gb if decision.candidates else 0
    sources = "; ".join(f"{b} {'; '.join(f['machines']) if f.get('machines') else f['name']}"
                        for b, f in decision.outcome.profiles.items())  # fmt: skip
    ax.set_title(f"{gb:g} GB: every setting, wall clock upper bound (80% interval) against median cost\n"
                 f"profiles: {sources}\n" + _price_note([c.estimate for c in decision.candidates]), fontsize=8,
                 loc="left")  # fmt: skip
    return finish_axes(fig, ax, "wall time, upper bound of the 80% interval (s)", "cost, median (US$)")


def _price_note(estimates: list) -> str:
    """The prices each backend's costs assume, short enough for a title line."""
    notes = {}
    for e in estimates:
        p = e.prices
        if e.backend == "lambda":
            notes["lambda"] = (f"lambda {p['architecture']} USD {p['gb_second_usd']:.4g}/GB-s, "
                               f"{p['request_usd'] * 1e6:.2g}/M requests, S3, transitions ({p['as_of']})")  # fmt: skip
        elif e.backend == "hpc":
            notes["hpc"] = f"hpc USD {p['core_hour_usd']}/core-hour x {p['cores_per_task']} core(s) per task"
        else:
            notes["gpu"] = f"gpu USD {p['gpu_hour_usd']}/GPU-hour with its host"
    return "prices: " + "; ".join(notes.values())


def save_decision_figure(decision, path: str | Path) -> Path:
    return save_figure(decision_figure(decision), path)


def _measured_series(measured: list[dict], partitions: set) -> dict[str, list[dict]]:
    """The measured points of the estimated backends and partition sizes (any partition size off Lambda)."""
    series: dict[str, list[dict]] = {}
    for point in measured:
        lambda_point = point["backend"] == "lambda"
        if lambda_point and (point["backend"], point["partition_mb"]) not in partitions:
            continue
        if not any(b == point["backend"] for b, _ in partitions):
            continue
        source = point["run_id"] if str(point["run_id"]).startswith("paper") else "measured"
        part = f", {point['partition_mb']:g} MB" if lambda_point else ""
        series.setdefault(f"{source}: {point['backend']}{part}", []).append(point)
    return series


def save_estimate_figure(outcome, path: str | Path) -> Path:
    return save_figure(estimate_figure(outcome), path)


# ---------------------------------------------------------------------------------------------- validation


def validation_figure(checks: list, source: str) -> Figure:
    """``estimate --validate``: each point's error against how far its prediction extrapolated (its data size
    over the largest its profile was calibrated on), one marker per way it was held out, per group of runs."""
    fig, ax = new_figure()
    for index, group in enumerate(dict.fromkeys(c.group or c.backend for c in checks)):
        for c in (c for c in checks if (c.group or c.backend) == group and not c.calibration):
            way = "from the smaller sizes only" if c.held_out.startswith("from") else "its size or point left out"
            label = f"{group}, {way}"
            held = way.startswith("its")
            ax.plot([c.extrapolation], [c.error * 100], linestyle="none", color=f"C{index}", marker="o" if held
                    else "s", markerfacecolor=None if held else "none",
                    label=label if label not in ax.get_legend_handles_labels()[1] else None)  # fmt: skip
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axvline(1, color="grey", linewidth=0.8, linestyle=":")
    ax.set_title(f"{source}: each published or measured point predicted without it; right of the dotted line the "
                 "model extrapolates", fontsize=9, loc="left")  # fmt: skip
    return finish_axes(fig, ax, "extrapolation factor: data size over the largest calibrated on",
                       "error of the predicted median (%)", log_y=False)  # fmt: skip


def save_validation_figure(checks: list, source: str, path: str | Path) -> Path:
    return save_figure(validation_figure(checks, source), path)
