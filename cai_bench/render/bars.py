"""Progress bars of runs, sweeps and counted work, and the one line per finished run that a log or a pipe
gets instead of a bar."""

from __future__ import annotations

import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cai_bench.core.records import WorkerRecord
from cai_bench.render.console import console, tell


def _bar(*extra) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        # In a log or a pipe a bar cannot redraw, and each stop would print every bar again: RichRunProgress
        # writes one line per finished run there instead
        disable=not console.is_terminal,
    )


class RichRunProgress:
    """Partitions done / total, samples/s so far and ETA, one bar per repeat; before them, a bar while synthetic
    data is generated (``synthesizing``). The rate is the summary's: samples over the wall clock since the run
    began. Where stderr is no terminal, one line per finished run instead of the bars."""

    def __init__(self):
        self._progress = _bar(TextColumn("{task.fields[rate]}"))
        self._task = None
        self._samples = 0
        self._began = time.perf_counter()
        self._done = (0, 0, "")  # partitions done, partitions in all, the run's label
        self._synth = None

    def note(self, text: str) -> None:
        """A line of what happens before the clock starts (the runtime probe), so that no minute is silent."""
        tell(text)

    def synthesizing(self, done: int, total: int) -> None:
        if self._synth is None:
            self._synth = RichCountProgress("synthesizing", "samples")
        self._synth(done, total)
        if done >= total:
            self._synth.__exit__()
            self._synth = None

    def begin(self, label: str, partitions: int, samples: int) -> None:
        if self._synth is not None:
            self._synth.__exit__()
            self._synth = None
        self._restart(label, partitions)
        self._progress.start()
        self._task = self._progress.add_task(label, total=partitions, rate="")

    def _restart(self, label: str, partitions: int) -> None:
        self._samples, self._began, self._done = 0, time.perf_counter(), (0, partitions, label)

    def _rate(self) -> str:
        elapsed = time.perf_counter() - self._began
        # a live estimate on this line's own clock (the workers' start-up included): the table's figures are the
        # run's, measured once; the bar never prints a second, different figure for the same repeat
        return f"~{self._samples / elapsed:,.0f} samples/s so far" if elapsed > 0 and self._samples else ""

    def advance(self, record: WorkerRecord) -> None:
        self._samples += record.samples
        self._done = (self._done[0] + 1, *self._done[1:])
        self._progress.update(self._task, advance=1, rate=self._rate())

    def _log_line(self) -> None:
        done, total, label = self._done
        if not console.is_terminal and total:  # the figures are the table's: one figure per measurement
            console.print(f"{label}: {done}/{total} partitions done", markup=False, highlight=False)

    def end(self) -> None:
        self._progress.stop()
        self._log_line()


class RichSweepProgress(RichRunProgress):
    """Two bars: the whole sweep (samples of all points, with points done / total and ETA), and the current run."""

    def __init__(self):
        super().__init__()
        self._overall = None
        self._points = 0
        self._points_done = 0
        self._skipped = 0
        self._label = ""
        self._synth = None

    def sweep_begin(self, points: int, samples: int) -> None:
        self._points = points
        self._progress.start()
        self._overall = self._progress.add_task("sweep", total=max(samples, 1), rate=self._points_text())

    def _points_text(self) -> str:
        skipped = f", {self._skipped} already in the store" if self._skipped else ""
        return f"points {self._points_done}/{self._points}{skipped}"

    def point_begin(self, number: int, label: str) -> None:
        self._label = label

    def point_end(self, skipped: bool) -> None:
        self._points_done += 1
        self._skipped += skipped
        self._progress.update(self._overall, rate=self._points_text())

    def sweep_end(self) -> None:
        self._progress.stop()

    def synthesizing(self, done: int, total: int) -> None:
        """Data generation for a point, as a third bar while it lasts (one live display at a time)."""
        if self._synth is None:
            self._synth = self._progress.add_task(f"{self._label}: generating data", total=total, rate="samples")
        self._progress.update(self._synth, completed=done, total=total)
        if done >= total:
            self._progress.remove_task(self._synth)
            self._synth = None

    def begin(self, label: str, partitions: int, samples: int) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._restart(f"{self._label}: {label}", partitions)
        self._task = self._progress.add_task(f"{self._label}: {label}", total=partitions, rate="")

    def advance(self, record: WorkerRecord) -> None:
        super().advance(record)
        self._progress.update(self._overall, advance=record.samples)

    def end(self) -> None:
        self._log_line()  # the bars stay up for the sweep's next run


class RichCountProgress:
    """A plain bar over a count (samples written); nothing is drawn unless it is called."""

    def __init__(self, label: str, unit: str):
        self._progress = _bar(TaskProgressColumn(), TextColumn(unit))
        self._label = label
        self._task = None

    def __enter__(self) -> RichCountProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._task is not None:
            self._progress.stop()

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=total)
        self._progress.update(self._task, completed=done, total=total)


def run_progress(quiet: bool) -> RichRunProgress | None:
    """A run's progress bars, or none (``--quiet``, ``--json``)."""
    return None if quiet else RichRunProgress()


def sweep_progress(quiet: bool) -> RichSweepProgress | None:
    return None if quiet else RichSweepProgress()


def count_progress(label: str, unit: str, quiet: bool):
    """A bar over a count for a block (``with``), drawn only when called and not ``quiet``."""
    return RichCountProgress(label, unit) if not quiet else _NoCount()


class _NoCount:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        pass
