"""``cai-bench report --html OUT.html``: one self-contained page of a results store, as asv's published pages are:
the report table with each point's validity, the scaling figures, the machines, the timeline of each backend's
last run, and the commands that made the runs. Figures are PNGs inside the page (data URIs), so the file can be
mailed or archived alone.

The page checks itself once loaded: a line at its foot says how many images decoded, and any script error is
shown there too (the HTML test in headless Chromium reads that line).
"""

from __future__ import annotations

import base64
import html
import io
import shlex
from pathlib import Path

from cai_bench.analysis.report import display_columns, notes_for, summarize_points
from cai_bench.analysis.results import measured_only, read_records
from cai_bench.analysis.validity import DEFAULT_RULES, Rules
from cai_bench.backends.base import BackendOption
from cai_bench.backends.registry import declared_options
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_label
from cai_bench.core.text import visible
from cai_bench.render.figures.scaling import build_figures
from cai_bench.render.figures.timelines import timeline_figures
from cai_bench.store.jsonl import ResultsStore


def _text(data: str) -> str:
    """A string for the page: HTML's special characters as entities, control characters as visible escapes."""
    return html.escape(visible(data))


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
tr.invalid td { color: #a00; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f6f6f6; padding: 1px 4px; }
.note { font-size: 12px; color: #555; }
"""

# Once loaded, the page says whether every image decoded and whether any script failed: at its foot
_SELF_CHECK = """
window.addEventListener("error", function (e) {
  document.getElementById("page-check").textContent += " script error: " + e.message;
});
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.getElementById("page-check").textContent =
    "page check: " + decoded + " of " + images.length + " images decoded";
});
"""


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def command_of(record: dict) -> str:
    """The command line that makes a run of this record's point (its plan as ``run`` takes it)."""
    plan, data = record["plan"], record["plan"]["data"]
    parts = ["cai-bench", "run", "--backend", record["backend"]]
    source = data.get("source") or {}
    if source.get("kind") == "synthetic":
        parts += ["--gb", f"{data['data_gb']:.3g}", "--partition-mb", f"{data['partition_mb']:g}"]
    else:
        parts += ["--data", str(data.get("directory") or data.get("dataset_id") or "DATA")]
    parts += ["--batch-size", str(plan["batch_size"]), "--precision", str(plan["precision"])]
    declared = {option.name: option for option in declared_options(record["backend"]) or ()}
    for name, value in sorted((plan.get("backend_options") or {}).items()):
        if value in (None, False, "", {}) or name == "endpoint_url":
            continue
        option = declared.get(name) or BackendOption(name, type(value), "")  # not this cai-bench's: as named
        parts += option.as_typed(value)
    return shlex.join([*parts, "--repeats", str(record.get("repeats", 1))])


def _table(points: list) -> str:
    columns = display_columns(points)
    head = "".join(f'<th class="{"text" if h in ("backend", "runtime", "machine", "valid") else ""}">'
                   f"{_text(h)}</th>" for h, _ in columns)  # fmt: skip
    rows = []
    for p in points:
        cells = "".join(f'<td class="{"text" if h in ("backend", "runtime", "machine", "valid") else ""}">'
                        f"{_text(cell(p))}</td>" for h, cell in columns)  # fmt: skip
        rows.append(f'<tr class="{"" if p.valid else "invalid"}">{cells}</tr>')
    invalid = "".join(f"<li>INVALID {_text(p.label())}: {_text('; '.join(p.invalid))}</li>"
                      for p in points if not p.valid)  # fmt: skip
    return (f"<table><tr>{head}</tr>{''.join(rows)}</table>" + (f"<ul>{invalid}</ul>" if invalid else "")
            + f'<p class="note">{_text(notes_for(points, [h for h, _ in columns]))}</p>')  # fmt: skip


def _machines(records: list[dict]) -> str:
    seen = {}
    for record in records:
        env = record.get("environment") or {}
        seen.setdefault(machine_label(env), env)
    items = []
    for label, env in seen.items():
        gpus = ", ".join(env.get("gpus") or []) or "none"
        facts = [f"CPU {env.get('cpu_model')}", f"{env.get('cpu_logical_cores')} logical cores",
                 f"{(env.get('memory_total_bytes') or 0) / 2**30:.0f} GiB", f"GPUs: {gpus}",
                 f"Python {env.get('python')}", f"torch {(env.get('packages') or {}).get('torch')}"]  # fmt: skip
        items.append(f"<li><b>{_text(label)}</b>: {_text('; '.join(facts))}</li>")
    return f"<ul>{''.join(items)}</ul>"


def page(records: list[dict], title: str, rules: Rules = DEFAULT_RULES) -> str:
    """The whole page, from the store's records."""
    points = summarize_points(records, rules)
    if not points:
        raise UserError(f"{title}: no finished runs to report")
    figures = build_figures(points)
    runs = [r for r in records if r.get("kind") == "run"]
    last = {r["backend"]: r for r in runs}
    timelines = timeline_figures(list(last.values()))
    commands = sorted({command_of(r) for r in runs if r.get("status") == "ok"})
    sections = [
        f"<h1>{_text(title)}</h1>",
        f"<p>{len(points)} points from {len(runs)} runs. {sum(p.valid for p in points)} of the points are VALID.</p>",
        "<h2>Report</h2>", _table(points), "<h2>Figures</h2>",
        *(f'<h3>{_text(name)}</h3><img alt="{_text(name)}" src="{_png(fig)}">'
          for name, fig in figures.items()),
        "<h2>Machines</h2>", _machines(runs),
        "<h2>Each backend's last run</h2>",
        *(f'<h3>{_text(name)}</h3><img alt="{_text(name)}" src="{_png(fig)}">'
          for name, fig in timelines.items()),
        "<h2>The commands that made these runs</h2>",
        "<ul>" + "".join(f"<li><code>{_text(c)}</code></li>" for c in commands) + "</ul>",
        '<p class="note" id="page-check">page check: not run (scripts off)</p>',
    ]  # fmt: skip
    head = f'<meta charset="utf-8"><title>{_text(title)}</title><style>{_STYLE}</style>'
    return (f'<!DOCTYPE html><html lang="en"><head>{head}<script>{_SELF_CHECK}</script></head>'
            f"<body>{''.join(sections)}</body></html>")  # fmt: skip


def write_html(results: str | Path, out: str | Path, rules: Rules = DEFAULT_RULES, warn=None) -> Path:
    """``report --html``: the page of ``results`` written to ``out``."""
    store = ResultsStore(results)
    records = measured_only(read_records(store, warn), warn)
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"{out}: --html names an .html file to write")
    text = page(records, f"cai-bench report: {store.path}", rules)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{out}: cannot write the page ({exc.strerror})") from None
    return out
