"""``hpsearch report``: one self-contained HTML page of a search, from its own record.

Built from the trial log (so a running search has a report too), ``job.yaml`` and ``best.yaml``,
with plotly (its JavaScript embedded once: the page opens offline) and Optuna's own plots and
importance evaluator on an in-memory study made from the trials. Sections: a header (job, data,
model, status counts, wall time, trials at once, utilization, the best trial), the optimization
history against wall time and against epochs, every trial's learning curve with ASHA's rungs,
hyperparameter importances, parallel coordinates, slices, and a sortable table of every trial.
What cannot be drawn (one trial, no trial scored yet) is said in its place, never raised.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpsearch import plan, space
from hpsearch.record import outputs, trial_log
from hpsearch.record.location import SearchLocation
from hpsearch.record.trial_log import TrialRecord, TrialStatus, is_finite
from hpsearch.spec import FixedParam, JobSpec, load_job

logger = logging.getLogger(__name__)

REPORT_FILE = outputs.REPORT_FILE
STYLE = {  # how each status's learning curves are drawn
    TrialStatus.COMPLETED: {"dash": "solid", "width": 2},
    TrialStatus.STOPPED_EARLY: {"dash": "dot", "width": 1},
    TrialStatus.INTERRUPTED: {"dash": "dashdot", "width": 1},
    TrialStatus.DIVERGED: {"dash": "dash", "width": 1, "color": "#d62728"},
    TrialStatus.FAILED: {"dash": "dash", "width": 1, "color": "#8c0000"},
    TrialStatus.NOT_RUN: {"dash": "dot", "width": 1},
}


@dataclass
class Search:
    """What a report (and ``hpsearch status``) reads of a search: its job, trials and best record."""

    job: JobSpec
    where: SearchLocation
    records: list[TrialRecord]
    best: outputs.BestRecord | None
    events: list[dict[str, Any]]

    @classmethod
    def read(cls, location: str | Path | SearchLocation) -> Search:
        """The search at ``location`` (its folder, or its URI), read from its files only."""
        where = location if isinstance(location, SearchLocation) else SearchLocation.parse(location)
        where.download(outputs.JOB_FILE, trial_log.LOG_FILE, trial_log.STATE_FILE, outputs.BEST_FILE)
        job = load_job(where.require(outputs.JOB_FILE, "of a search"), of_search=True)
        log = where.local / trial_log.LOG_FILE
        records = trial_log.fold(log, experiment=where.experiment, used=job.hyperparameters)
        best_file = where.local / outputs.BEST_FILE
        best = outputs.read_best(where.local) if best_file.is_file() else None
        return cls(job=job, where=where, records=records, best=best, events=trial_log.read_events(log))

    @property
    def searched(self) -> list[tuple[str, Any]]:
        return [(name, p) for name, p in self.job.space if not isinstance(p, FixedParam)]

    def wall_s(self) -> float:
        times = [e["time"] for e in self.events if isinstance(e.get("time"), (int, float))]
        return max(times) - min(times) if times else 0.0

    def at_once(self) -> int:
        """The most trials that ran at the same time (from their first and last events)."""
        spans: dict[str, list[float]] = {}
        for e in self.events:
            if e.get("trial_id") and isinstance(e.get("time"), (int, float)):
                spans.setdefault(e["trial_id"], []).append(e["time"])
        edges = sorted([(min(t), 1) for t in spans.values()] + [(max(t), -1) for t in spans.values()],
                       key=lambda edge: (edge[0], edge[1]))
        running = most = 0
        for _, step in edges:
            running += step
            most = max(most, running)
        return most

    def utilization(self) -> float | None:
        """The trials' training time over wall time × trials at once (1.0: the slots never idled)."""
        busy = sum(float(e["epoch_time_s"]) for r in self.records for e in r.epochs if is_finite(e.get("epoch_time_s")))
        capacity = self.wall_s() * self.at_once()
        return busy / capacity if capacity > 0 else None


def import_plotting() -> None:
    """Import what :func:`render` draws with: about 2 s (Optuna's importance evaluator brings
    scikit-learn and SciPy). A search does it while its trials run."""
    import optuna.importance  # noqa: F401
    import optuna.visualization  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import plotly.offline  # noqa: F401


def write_report(location: str | Path | SearchLocation, out: Path | None = None) -> Path:
    """Write the report of the search at ``location``; returns its path (``report.html`` in the
    search folder by default; for a URI storage, the local mirror's, uploaded beside the rest)."""
    search = Search.read(location)
    target = out or search.where.local / REPORT_FILE
    page = render(search)
    outputs.atomic_write(target, lambda f: f.write(page), binary=False)
    if out is None:
        search.where.upload(REPORT_FILE)
    return target


def render(search: Search) -> str:
    """The report as one HTML page."""
    import plotly.offline

    sections = [_header(search)]
    try:
        study = _study(search)
    except Exception:  # the plots that need it say so
        logger.debug("report: no study", exc_info=True)
        study = None
    for title, make in (("Optimization history", _history), ("Learning curves", _curves),
                        ("Hyperparameter importances", _importances), ("Parallel coordinates", _parallel),
                        ("Slices", _slices)):
        try:
            body = make(search, study)
        except Exception as e:  # a plot that cannot be drawn says why; the report is still written
            logger.debug("report: %s failed", title, exc_info=True)
            body = _note(f"not drawn: {type(e).__name__}: {e}")
        sections.append(f"<section><h2>{title}</h2>{body}</section>")
    sections.append(f"<section><h2>Trials</h2>{_table(search)}</section>")
    return _PAGE.format(title=html.escape(f"hpsearch: {search.job.name}"), plotly=plotly.offline.get_plotlyjs(),
                        body="\n".join(sections), script=_SORT_SCRIPT)


# --------------------------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------------------------


def _header(search: Search) -> str:
    job, best = search.job, search.best
    counts = trial_log.count_statuses(search.records)
    util = search.utilization()
    facts = [
        ("search", job.name), ("data", job.data.factory or job.data.dataset),
        ("model", job.model.factory or job.model.kind),
        ("trials", f"{len(search.records)} of {job.search.num_samples}: "
                   + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none started yet")),
        ("wall time", f"{search.wall_s():.0f} s"), ("trials at once", str(search.at_once())),
        ("utilization", f"{util:.0%}" if util is not None else "—"),
        ("sampler / scheduler", f"{job.search.searcher.sampler} / {job.search.scheduler.name}"),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    if best:
        metric = best["metric"]
        final = best.get("retrained") or {}
        score = f"{metric} {_num(best['validation'].get(metric))}, test accuracy {_num(best.get('test_accuracy'))}"
        if final:
            score += (f"; retrained on train + validation: {_num(final.get('mean'))} ± {_num(final.get('std'))} "
                      f"({len(final.get('test_accuracy') or [])} seeds, {final.get('epochs')} epochs)")
        hps = ", ".join(f"{k}={_short(v)}" for k, v in best["hyperparameters"].items())
        rows += (f"<tr><th>best trial</th><td>{html.escape(best['trial_id'])} (epoch {best['epoch']}): "
                 f"{html.escape(score)}<br><small>{html.escape(hps)}</small></td></tr>")
    else:
        rows += "<tr><th>best trial</th><td>none yet (no trial has a scored epoch)</td></tr>"
    return f"<h1>{html.escape(job.name)}</h1><table class='facts'>{rows}</table>"


def _history(search: Search, study: Any = None) -> str:
    import plotly.graph_objects as go

    metric, mode = search.job.search.metric, search.job.search.mode
    results = sorted((e for e in search.events if e["event"] == "result" and is_finite(e.get(metric))),
                     key=lambda e: e["time"])
    if not results:
        return _note("no epoch reported yet")
    start = min(e["time"] for e in search.events)
    best, xs_t, xs_e, ys = None, [], [], []
    for i, e in enumerate(results, 1):
        v = float(e[metric])
        best = v if best is None else (max(best, v) if mode == "max" else min(best, v))
        xs_t.append((e["time"] - start) / 60)
        xs_e.append(i)
        ys.append(best)
    out = []
    for xs, label in ((xs_t, "wall time (minutes)"), (xs_e, "epochs consumed (all trials)")):
        fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line={"shape": "hv"}, name=f"best {metric}"))
        fig.update_layout(xaxis_title=label, yaxis_title=f"best {metric} so far", **_LAYOUT)
        out.append(_fig(fig))
    return "<div class='pair'>" + "".join(out) + "</div>"


def _curves(search: Search, study: Any = None) -> str:
    import plotly.graph_objects as go

    metric = search.job.search.metric
    fig = go.Figure()
    for r in search.records:
        points = [(int(e["epoch"]), float(e[metric])) for e in r.epochs if is_finite(e.get(metric))]
        if not points:
            continue
        style = STYLE.get(r.status, {})
        fig.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
            name=f"{r.trial_id} ({r.status.value})", line={k: v for k, v in style.items() if k != "marker"},
            marker={"size": 4}, opacity=1.0 if r.status is TrialStatus.COMPLETED else 0.6))
    if not fig.data:
        return _note("no epoch reported yet")
    sched = search.job.search.scheduler
    if sched.name == "asha":
        for rung in plan.asha_rungs(grace_period=sched.grace_period, reduction_factor=sched.reduction_factor,
                                    max_t=search.job.max_t):
            fig.add_vline(x=rung, line={"dash": "dot", "color": "#888", "width": 1},
                          annotation_text=f"rung {rung:g}", annotation_position="top")
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric, height=480, **_LAYOUT)
    return _fig(fig) + _note("solid: completed; dotted: stopped early by ASHA; dash-dot: interrupted; "
                             "red dashed: diverged or failed. Vertical lines: ASHA's rungs.")


def _importances(search: Search, study: Any) -> str:
    import optuna

    if study is None:
        return _note("needs at least two scored trials and a searched hyperparameter")
    importances = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    import plotly.graph_objects as go

    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(xaxis_title="importance (fANOVA, normalized)", height=120 + 28 * len(names), **_LAYOUT)
    return _fig(fig) + _note(_VALUE_NOTE)


def _parallel(search: Search, study: Any) -> str:
    import optuna.visualization as vis

    if study is None:
        return _note("needs at least two scored trials and a searched hyperparameter")
    fig = vis.plot_parallel_coordinate(study, target_name=search.job.search.metric)
    fig.update_layout(title=None, **_LAYOUT)
    return _fig(fig) + _note(_VALUE_NOTE)


def _slices(search: Search, study: Any) -> str:
    import optuna.visualization as vis

    if study is None:
        return _note("needs at least two scored trials and a searched hyperparameter")
    fig = vis.plot_slice(study, target_name=search.job.search.metric)
    fig.update_layout(title=None, width=None, autosize=True, **{**_LAYOUT, "height": 380})
    return _fig(fig)


def _table(search: Search) -> str:
    metric, mode = search.job.search.metric, search.job.search.mode
    if not search.records:
        return _note("no trial has started yet")
    rows = outputs.trial_rows(search.records, metric=metric, mode=mode)
    columns = (["trial_id", "status"] + [name for name, _ in search.searched]
               + [f"best_{metric}", f"last_{metric}", "best_epoch", "epochs_run", "time_total_s", "error"])
    head = "".join(f"<th onclick='sortTable(this)'>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_short(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return (f"<div class='scroll'><table id='trials' class='trials'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>"
            + _note("click a column's name to sort by it"))


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


_VALUE_NOTE = ("Each trial's value is its best validation value, stopped-early trials included (so the "
               "epochs a trial planned look more important than they would if every trial ran to its end).")
_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 30, "b": 50}}


def _study(search: Search) -> Any:
    """An in-memory Optuna study of the scored trials (value: each one's best validation value), for
    Optuna's importance evaluator and plots; None when there is too little to analyse."""
    import optuna

    metric, mode = search.job.search.metric, search.job.search.mode
    distributions = space.distributions(search.job)
    trials = []
    for r in search.records:
        best = r.best_epoch(metric, mode)
        if best is None or not distributions:
            continue
        params = {n: r.config[n] for n in distributions if n in r.config}
        trials.append(optuna.trial.create_trial(
            params=params, distributions={n: distributions[n] for n in params}, value=float(best[metric])))
    varied = [n for n in distributions if len({json.dumps(t.params.get(n)) for t in trials}) > 1]
    if len(trials) < 2 or not varied:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    study.add_trials(trials)
    return study


def _fig(fig: Any) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "—"


def _short(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_SORT_SCRIPT = """
function sortTable(th) {
  const table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
  const asc = th.dataset.order !== 'asc';
  th.dataset.order = asc ? 'asc' : 'desc';
  const key = (row) => { const t = row.cells[i].textContent; const n = parseFloat(t);
                         return t !== '' && !isNaN(n) && isFinite(t) ? n : t; };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (typeof x === typeof y) return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    return (typeof x === 'number' ? -1 : 1);
  });
  rows.forEach((row) => body.appendChild(row));
}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
table.facts th {{ text-align: left; padding-right: 1.5em; vertical-align: top; }}
table.trials {{ border-collapse: collapse; font-size: 0.85em; }}
table.trials th, table.trials td {{ border: 1px solid #ddd; padding: 2px 6px; }}
table.trials th {{ cursor: pointer; background: #f4f4f4; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }}
.note {{ color: #666; font-size: 0.85em; }}
.scroll {{ overflow-x: auto; }}
</style>
<script type="text/javascript">{plotly}</script>
</head><body>
{body}
<script>{script}</script>
</body></html>
"""
