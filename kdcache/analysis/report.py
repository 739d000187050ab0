"""``kdcache report``: one HTML page about a cache, its teacher and the students trained from it.

The page is ``DIR/index.html``: self-contained (inline CSS, no script, nothing fetched from the
network), its figures PNG files beside it referenced by relative paths (``<img src="x.png">``),
so the folder can be copied, zipped or served as it is. ``DIR/report.json`` holds the numbers.
index.html is written last: a page that is there is whole.

What it shows, and where it comes from:

* the teacher on the cache's rows (the student's data and its labels): accuracy, ECE (15 bins),
  a reliability diagram, histograms of entropy and margin split by right / wrong / unlabelled,
  per-class accuracy, the confusion matrix and the most confident disagreements with the labels:
  all from the per-row Parquet table, one part at a time (:mod:`kdcache.analysis.rows`);
* ``--eval-cache``: the same on held-out data, plus temperature scaling fitted there (as
  ``kdcache calibrate`` does: the only part that reads logits, a chunk at a time);
* ``--runs DIR`` (repeatable): the runs' settings and eval accuracy, their learning curves, the
  T × α grid of eval accuracy when they span one, and per-class student accuracy of the
  distilled runs against the labels-only runs (α = 0) among them (:mod:`kdcache.analysis.runs`).

Without labels (all -1) the accuracy parts say so and the confidence parts remain.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import kdcache
from kdcache.analysis import plots
from kdcache.analysis.calibrate import Calibration, LabelledLogits, fit_temperature
from kdcache.analysis.read import (
    BINS,
    labelled_rows,
    open_cache,
    out_dir,
    require_samples,
    require_table,
    write_atomic,
)
from kdcache.analysis.rows import RowStats
from kdcache.analysis.runs import Run, grid, group_means, load_runs, per_class_accuracy
from kdcache.errors import ConfigError, DataError

PLOT_CLASSES_MAX = 50  # per-class bars and the confusion matrix are drawn up to this many classes


@dataclass
class Page:
    """The page being built: HTML sections, the figures written, the numbers for report.json."""

    folder: Path
    sections: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def figure(self, name: str, caption: str) -> str:
        self.figures.append(name)
        return (f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def report(cache_url: str, out: str, eval_cache: str | None = None, runs: list[str] | None = None, top: int = 20,
           progress: bool = True) -> Path:
    """Write DIR/index.html (and its PNGs, report.json); returns the page's path."""
    from kdcache.progress import progress_bar

    plots.require_matplotlib()
    if top < 0:
        raise ConfigError(f"--top must be 0 or more, got {top!r}")
    cache = open_cache(cache_url, "--cache")
    require_samples(cache, "--cache", "the report")
    require_table(cache, "--cache")
    held = None
    if eval_cache:
        held = open_cache(eval_cache, "--eval-cache")
        require_samples(held, "--eval-cache", "the report")
        require_table(held, "--eval-cache")
        if held.manifest.classes != cache.manifest.classes:
            raise DataError(f"--eval-cache {eval_cache}: {held.manifest.classes} classes, but --cache has "
                            f"{cache.manifest.classes}: not the same teacher's outputs")
        if labelled_rows(held) == 0:
            raise DataError(f"--eval-cache {eval_cache}: none of its {held.rows:,} rows has a label (all -1); "
                            "held-out evaluation needs labelled data")
    run_list = load_runs(list(runs or []))
    folder = out_dir(out)  # every input checked: now --out may be created
    page = Page(folder)
    steps = cache.num_chunks + len(run_list)  # the per-row table's parts, then a student evaluation per run
    with progress_bar("steps", progress) as bar:
        task = bar.add_task("report: per-row table", total=steps)
        advance = lambda: bar.advance(task)
        stats = RowStats.of(cache, top, on_part=advance)
        _header(page, cache, stats)
        _teacher(page, stats, cache_url)
        if held is not None:
            bar.update(task, description="report: --eval-cache")
            _held_out(page, held, eval_cache, top)
        if run_list:
            bar.update(task, description="report: runs")
            _runs(page, run_list, cache, advance)
        else:
            page.sections.append(_section("Student runs", "<p class=note>No <code>--runs</code> given: pass the "
                                          "run directories of <code>kdcache train</code> to compare students.</p>"))
    _write(page, cache_url)
    return folder / "index.html"


# --- sections -------------------------------------------------------------------------------------
def _header(page: Page, cache, stats: RowStats) -> None:
    m = cache.manifest
    kinds = ", ".join(f"{c.kind} {json.dumps(c.settings)}" if c.settings else c.kind for c in m.capture)
    rows = [("rows", f"{m.rows:,}"), ("labelled rows", f"{stats.labelled:,}"), ("classes", f"{m.classes:,}"),
            ("teacher", m.teacher.spec + (f" (checkpoint {m.teacher.checkpoint})" if m.teacher.checkpoint else "")),
            ("data", m.data.spec), ("capture", kinds), ("chunks", f"{m.num_chunks:,} of {m.chunk_rows:,} rows"),
            ("teacher digest", m.teacher.digest[:16])]
    page.sections.append(_section("The cache", _kv(rows)))
    page.numbers["cache"] = {"path": cache.url, "rows": m.rows, "classes": m.classes, "generation": m.generation}


def _teacher(page: Page, stats: RowStats, title: str) -> None:
    page.numbers["teacher"] = stats.summary()
    parts = []
    if stats.labelled:
        parts.append(_kv([("accuracy", f"{stats.accuracy:.4f}"),
                          (f"ECE ({BINS} bins)", f"{stats.ece:.4f}"),
                          ("mean confidence", f"{stats.reliability.mean_confidence:.4f} (labelled rows)")]))
        plots.reliability(stats.reliability, page.folder / "reliability.png", "teacher on the cache's labels")
        parts.append(page.figure("reliability.png", "Reliability: accuracy of the teacher's top-1 per confidence "
                                 "bin; bars below the diagonal are over-confident."))
    else:
        parts.append("<p class=note>No row of the cache has a label (all -1): accuracy, ECE, per-class accuracy and "
                     "disagreements need labels. The confidence plots below use every row.</p>")
    parts.append(_kv([("mean top-1 probability", f"{stats.mean('teacher_prob'):.4f}"),
                      ("mean entropy (nats)", f"{stats.mean('entropy'):.4f}"),
                      ("mean margin (top-1 − top-2)", f"{stats.mean('margin'):.4f}")]))
    plots.stacked_histograms([("entropy (nats)", stats.entropy_edges, stats.entropy_hist),
                              ("margin (top-1 − top-2 probability)", stats.margin_edges, stats.margin_hist)],
                             page.folder / "entropy_margin.png", "the teacher's soft targets")
    parts.append(page.figure("entropy_margin.png", "Entropy and margin of the teacher's softmax (T = 1) over every "
                             "row, stacked by whether its top-1 class is the label."))
    page.sections.append(_section("The teacher on the cache's data", "".join(parts)))
    if stats.labelled:
        _per_class(page, stats)
        _disagreements(page, stats)


def _per_class(page: Page, stats: RowStats) -> None:
    acc = stats.class_accuracy()
    page.numbers["teacher"]["class_accuracy"] = [None if not np.isfinite(a) else float(a) for a in acc]
    parts = []
    if stats.classes <= PLOT_CLASSES_MAX:
        plots.per_class_bars({"teacher": acc}, page.folder / "per_class.png", "teacher accuracy per class",
                             "accuracy", overall=stats.accuracy)
        parts.append(page.figure("per_class.png", "Teacher accuracy per class (labelled rows of each class)."))
        if stats.confusion is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                norm = stats.confusion / stats.confusion.sum(axis=1, keepdims=True)
            plots.matrix(norm, page.folder / "confusion.png", "confusion matrix (rows sum to 1)",
                         "teacher top-1", "label", colorbar="share of the label's rows", skip_zeros=True)
            parts.append(page.figure("confusion.png", "Confusion matrix: row = label, column = the teacher's top-1, "
                                     "each row normalized over that label's rows."))
    else:
        order = np.argsort(np.nan_to_num(acc, nan=np.inf), kind="stable")[:20]
        parts.append(f"<p>{stats.classes:,} classes: too many to draw one bar each. The 20 classes the teacher "
                     "gets wrong most often:</p>")
        parts.append(_table(["class", "labelled rows", "teacher accuracy"],
                            [[int(c), f"{stats.class_rows[c]:,}", _fmt(acc[c])] for c in order]))
    pairs = stats.confused_pairs()
    if pairs:
        parts.append("<h3>Most frequent confusions</h3>")
        parts.append(_table(["label", "teacher top-1", "rows", "share of the label"],
                            [[p["label"], p["teacher_top1"], f"{p['rows']:,}", f"{p['share_of_label']:.3f}"]
                             for p in pairs]))
    page.sections.append(_section("Per class", "".join(parts)))


def _disagreements(page: Page, stats: RowStats) -> None:
    rows = stats.disagreements()
    page.numbers["teacher"]["disagreements"] = rows
    if not rows:
        body = "<p class=note>The teacher's top-1 class is the label on every labelled row.</p>"
    else:
        body = ("<p>Labelled rows where the teacher's top-1 class is not the label, most confident first: a wrong "
                "label, an ambiguous item, or a teacher error. <em>index</em> is the dataset item.</p>" +
                _table(["index", "label", "teacher top-1", "teacher prob", "entropy", "margin"],
                       [[r["index"], r["label"], r["teacher_top1"], f"{r['teacher_prob']:.4f}", f"{r['entropy']:.3f}",
                         f"{r['margin']:.3f}"] for r in rows]))
    page.sections.append(_section("Most confident disagreements with the labels", body))


def _held_out(page: Page, held, url: str, top: int) -> None:
    stats = RowStats.of(held, top)
    page.numbers["eval_cache"] = {"path": held.url, **stats.summary()}
    parts = [_kv([("rows", f"{stats.rows:,} ({stats.labelled:,} labelled)"), ("accuracy", f"{stats.accuracy:.4f}"),
                  (f"ECE ({BINS} bins)", f"{stats.ece:.4f}")])]
    kinds = [c.kind for c in held.manifest.capture]
    fitted, why = None, ""
    if "logits" in kinds and "logits" in held.arrays:
        try:
            fitted = fit_temperature(LabelledLogits(held))
        except DataError as e:  # a diagnosis for the page, not a reason to stop it
            why = f"No temperature fit: {e}."
    else:
        why = (f"No temperature fit: it needs every logit, and this cache holds {', '.join(kinds)} targets (dump the "
               "held-out data with --logits full).")
    if fitted is not None:
        first, best, passes, at_bound = fitted
        temperature = 1 / best.beta
        page.numbers["eval_cache"]["calibration"] = {
            "temperature": temperature, "ece_before": first.reliability.ece, "ece_after": best.reliability.ece,
            "nll_before": first.nll, "nll_after": best.nll, "at_bound": at_bound}
        result = Calibration(temperature, first.reliability.ece, best.reliability.ece, first.nll, best.nll,
                             first.reliability.accuracy, stats.labelled, passes, at_bound, first.reliability,
                             best.reliability)
        plots.reliability_pair(result, page.folder / "eval_calibration.png", f"teacher on {url}")
        bound = " (at the bound of the search: the optimum lies beyond)" if at_bound else ""
        parts.append(_kv([("fitted temperature", f"{temperature:.4f}{bound}"),
                          ("NLL before → after", f"{first.nll:.4f} → {best.nll:.4f}"),
                          ("ECE before → after", f"{first.reliability.ece:.4f} → {best.reliability.ece:.4f}")]))
        parts.append(page.figure("eval_calibration.png", "Held-out reliability before and after temperature "
                                 "scaling (probabilities = softmax(logits / T)); `kdcache calibrate` writes the same "
                                 "fit to calibration.json."))
    else:
        plots.reliability(stats.reliability, page.folder / "eval_reliability.png", "teacher on --eval-cache")
        parts.append(page.figure("eval_reliability.png", "Held-out reliability (from the per-row table)."))
        parts.append(f"<p class=note>{html.escape(why)}</p>")
        page.numbers["eval_cache"]["calibration"] = None
    page.sections.append(_section(f"Held-out data: {url}", "".join(parts)))


def _runs(page: Page, runs: list[Run], cache, advance) -> None:
    fps = {"teacher": cache.manifest.teacher.digest, "data": cache.manifest.data.fingerprint}
    per_class = per_class_accuracy(runs, on_run=advance)
    rows = []
    for r in runs:
        theirs = r.summary.get("fingerprints") or {}
        same = all(theirs.get(k) == v for k, v in fps.items()) if theirs else None
        temperature = "—" if r.labels_only else f"{r.temperature:g}"  # α = 0: T plays no part
        rows.append([r.name, r.summary.get("mode", ""), temperature, f"{r.alpha:g}", r.config.get("seed", ""),
                     r.summary.get("epochs", ""), _fmt(r.eval_accuracy), _fmt(per_class.overall.get(r.name)),
                     "yes" if same else ("no" if same is False else "—")])
    header = ["run", "mode", "T", "α", "seed", "epochs", "eval accuracy", "recomputed", "this cache's teacher and data"]
    parts = [_table(header, rows)]
    page.numbers["runs"] = [{"name": r.name, "path": str(r.path), "temperature": r.temperature, "alpha": r.alpha,
                             "seed": r.config.get("seed"), "eval_accuracy": r.eval_accuracy,
                             "recomputed_eval_accuracy": per_class.overall.get(r.name),
                             "class_accuracy": _list(per_class.accuracy.get(r.name))} for r in runs]
    _curves(page, runs, parts)
    _grid(page, runs, parts)
    _per_class_runs(page, runs, per_class, parts)
    page.sections.append(_section("Student runs", "".join(parts)))


def _curves(page: Page, runs: list[Run], parts: list[str]) -> None:
    key = "eval_accuracy" if all(any("eval_accuracy" in m for m in r.metrics) for r in runs) else "train_loss"
    series = {}
    for r in runs:
        points = [(m["epoch"], m[key]) for m in r.metrics if isinstance(m.get(key), (int, float))]
        if points:
            series[r.name] = ([p[0] for p in points], [p[1] for p in points])
    if series:
        label = "eval accuracy" if key == "eval_accuracy" else "training loss"
        plots.curves(series, page.folder / "curves.png", f"{label} per epoch", label)
        parts.append(page.figure("curves.png", f"{label.capitalize()} after each epoch (metrics.jsonl)."))


def _grid(page: Page, runs: list[Run], parts: list[str]) -> None:
    g = grid(runs)
    if g is None:
        parts.append("<p class=note>No T × α grid: the runs with an eval accuracy span fewer than two temperatures "
                     "(among α &gt; 0) or fewer than two α values.</p>")
        return
    page.numbers["grid"] = {"temperatures": g.temperatures, "alphas": g.alphas, "eval_accuracy": _list(g.accuracy)}
    plots.matrix(g.accuracy, page.folder / "grid.png", "eval accuracy over T × α (mean over seeds)", "α",
                 "temperature T", xticks=[f"{a:g}" for a in g.alphas], yticks=[f"{t:g}" for t in g.temperatures],
                 cmap="viridis", fmt="{:.3f}", colorbar="eval accuracy")
    parts.append(page.figure("grid.png", "Eval accuracy for each temperature and α (blank: no run). α = 0 trains on "
                             "labels alone, which T does not change: its runs fill that column in every row."))


def _per_class_runs(page: Page, runs: list[Run], per_class, parts: list[str]) -> None:
    parts.append("<h3>Per-class student accuracy</h3>")
    if per_class.skipped:
        parts.append(_table(["run", "no per-class accuracy because"],
                            [[name, why] for name, why in per_class.skipped.items()]))
    groups = group_means(per_class, runs)
    if not groups:
        return
    base_name = "labels only (α=0)"
    base = groups.get(base_name)
    specs = set(per_class.eval_data.values())
    if len(specs) > 1:
        parts.append(f"<p class=note>The runs were evaluated on different --eval-data ({html.escape(', '.join(sorted(specs)))}): "
                     "per-class numbers of different data are not comparable.</p>")
    n = max(len(v) for v in groups.values())
    if base is None:
        parts.append("<p class=note>No labels-only run (α = 0) among --runs: per-class accuracy is shown without a "
                     "baseline to compare with.</p>")
        if n <= PLOT_CLASSES_MAX:
            plots.per_class_bars(groups, page.folder / "runs_per_class.png", "student accuracy per class",
                                 "accuracy")
            parts.append(page.figure("runs_per_class.png", "Student accuracy per class on --eval-data (mean over "
                                     "seeds)."))
        return
    deltas = {name: v - base for name, v in groups.items() if name != base_name}
    if not deltas:
        parts.append("<p class=note>Only labels-only runs: no distilled run to compare with.</p>")
        return
    page.numbers["per_class_change"] = {name: _list(d) for name, d in deltas.items()}
    if n <= PLOT_CLASSES_MAX and len(deltas) <= 3:
        plots.per_class_bars(deltas, page.folder / "runs_per_class.png", "KD − labels-only accuracy per class",
                             "accuracy change", diverging=True)
    else:
        names = list(deltas)
        plots.matrix(np.stack([deltas[k] for k in names]), page.folder / "runs_per_class.png",
                     "KD − labels-only accuracy per class", "class", "run group", yticks=names, cmap="RdBu",
                     center=True, fmt="{:+.2f}", colorbar="accuracy change")
    parts.append(page.figure("runs_per_class.png", "Per-class accuracy of each distilled configuration minus the "
                             "labels-only runs' (means over seeds, on --eval-data): above 0, distillation helped "
                             "that class."))
    best = max(deltas, key=lambda k: np.nanmean(groups[k]))
    d = deltas[best]
    order = np.argsort(np.nan_to_num(d, nan=0.0), kind="stable")
    helped = [int(c) for c in order[::-1] if np.isfinite(d[c]) and d[c] > 0][:5]
    hurt = [int(c) for c in order if np.isfinite(d[c]) and d[c] < 0][:5]
    parts.append(_table(["class", "labels only", best, "change"],
                        [[c, _fmt(base[c]), _fmt(groups[best][c]), f"{d[c]:+.4f}"] for c in helped + hurt]))
    parts.append(f"<p>The table compares <b>{html.escape(best)}</b> (the distilled configuration with the best mean "
                 f"per-class accuracy) with the labels-only runs. Classes it helped most: "
                 f"{', '.join(map(str, helped)) or 'none'}; hurt most: {', '.join(map(str, hurt)) or 'none'}.</p>")


# --- HTML -----------------------------------------------------------------------------------------
CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } .note { color: #6a5d00; background: #fffbe6; padding: 0.4em 0.7em; }
.meta { color: #666; } code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _write(page: Page, cache_url: str) -> None:
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>kdcache report: "
           f"{html.escape(cache_url)}</title><style>{CSS}</style></head><body>\n"
           f"<h1>kdcache report</h1><p class=meta>{html.escape(cache_url)} · kdcache {kdcache.__version__} · {when}</p>\n"
           + "\n".join(page.sections) + "\n</body></html>\n")
    page.numbers["figures"] = page.figures
    write_atomic(page.folder / "report.json", (json.dumps(page.numbers, indent=2, allow_nan=False) + "\n").encode())
    write_atomic(page.folder / "index.html", doc.encode())  # last: a page that is there is whole


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}</section>"


def _kv(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v: Any) -> str:
    text = html.escape(str(v))
    numeric = isinstance(v, (int, float)) or text.replace(".", "", 1).replace(",", "").lstrip("+-").isdigit()
    return f"<td class=num>{text}</td>" if numeric else f"<td>{text}</td>"


def _fmt(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _list(values) -> list | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=float)
    return [_list(v) for v in arr] if arr.ndim > 1 else [None if not np.isfinite(v) else float(v) for v in arr]
