"""Interactive figures (plotly) of a report: the front, the per-layer heatmap, the search history,
and search against held-out quality of the validated trials.

Every trace has a stable ``name`` (the ``TRACE_*`` constants) and carries the trial numbers of its
points in ``customdata``, so a reader of the page (or a test) can tell which point is which trial.
The front figure draws every feasible trial in the ``feasible`` trace and every infeasible one in the
``infeasible`` trace; the uniform baselines, the front line, the recommended and the selected trials
are drawn again on top, as markers of their own. Trials whose size or quality is not finite cannot be
placed and are left out (the page says how many).

All text taken from the study (uniform names, layer names, labels) is HTML-escaped before it reaches
plotly, whose labels understand a few HTML tags.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

from autocomp._imports import optional
from autocomp.store.records import TrialRecord
from autocomp.reporting.context import HELDOUT_SET, SEARCH_SET, ReportData, finite, wants_log_axis
from autocomp.reporting.layers import layer_grid, merged_axes

TRACE_FEASIBLE = "feasible"
TRACE_INFEASIBLE = "infeasible"
TRACE_UNIFORM = "uniform baselines"
TRACE_FRONT = "Pareto front"
TRACE_RECOMMENDED = "recommended"
TRACE_SELECTED = "selected"
TRACE_DENSE = "dense"
TRACE_HELDOUT = "held-out (validation)"
TRACE_BEST = "best feasible so far"
TRACE_BITS = "bits"
TRACE_SPARSITY = "sparsity"
TRACE_SEARCH_SET = "search set"

COLOR_FEASIBLE = "#1f77b4"
COLOR_INFEASIBLE = "#b0b0b0"
COLOR_FRONT = "#2ca02c"
COLOR_RECOMMENDED = "#d62728"
COLOR_UNIFORM = "#9467bd"
COLOR_HELDOUT = "#ff7f0e"
BIT_TICKS = (2, 3, 4, 5, 6, 8, 16)
TEMPLATE = "plotly_white"


def plotly_modules():
    """``(plotly.graph_objects, plotly.subplots)``; DependencyError when plotly is not installed."""
    install = "pip install 'autocomp[report]' (or pip install plotly)"
    go = optional("plotly.graph_objects", "the HTML report", install)
    make_subplots = optional("plotly.subplots", "the HTML report", install).make_subplots
    return go, make_subplots


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def hover_text(data: ReportData, r: TrialRecord) -> str:
    m = r.metrics
    lines = [f"<b>trial {r.trial}</b>" + (f" ({esc(r.uniform)})" if r.uniform else "")]
    if finite(m.get("size_mb")) is not None:
        lines.append(f"size {m['size_mb']:.4g} MB")
    if finite(m.get("perplexity")) is not None:
        inc = finite(m.get("ppl_increase_pct"))
        lines.append(f"perplexity {m['perplexity']:.4g}" + (f" ({inc:+.2f}%)" if inc is not None else ""))
    if finite(m.get("kl")) is not None:
        lines.append(f"KL {m['kl']:.4g}")
    if finite(m.get("avg_bits")) is not None:
        lines.append(f"avg bits {m['avg_bits']:.3g}, sparsity {m.get('avg_sparsity', 0.0):.3g}")
    lines.append("feasible" if r.feasible else "infeasible")
    if r.trial in data.front_trials:
        lines.append("on the front")
    if data.is_recommended(r):
        lines.append("<b>recommended</b>")
    if data.is_flagged(r.trial):
        lines.append("<b>flagged by validation</b>")
    return "<br>".join(lines)


def _scatter(go, data: ReportData, records: Sequence[TrialRecord], name: str, **style) -> Any:
    return go.Scatter(
        x=[data.size_of(r) for r in records], y=[data.quality_of(r) for r in records],
        customdata=[r.trial for r in records], hovertext=[hover_text(data, r) for r in records],
        hoverinfo="text", name=name, **style)


def front_figure(data: ReportData):
    """Quality objective against size: feasible, infeasible, uniform baselines, the front, the
    recommended point, the dense model, budget lines, and held-out values of validated trials."""
    go, _ = plotly_modules()
    fig = go.Figure()
    fig.add_trace(_scatter(go, data, data.plottable(data.infeasible), TRACE_INFEASIBLE, mode="markers",
                           marker={"color": COLOR_INFEASIBLE, "symbol": "x", "size": 7}))
    fig.add_trace(_scatter(go, data, data.plottable(data.feasible), TRACE_FEASIBLE, mode="markers",
                           marker={"color": COLOR_FEASIBLE, "size": 8, "opacity": 0.8}))
    uniform = data.plottable([r for r in data.records.records if r.uniform])
    fig.add_trace(_scatter(go, data, uniform, TRACE_UNIFORM, mode="markers+text",
                           text=[esc(_short_uniform(r.uniform)) for r in uniform], textposition="top center",
                           textfont={"size": 10, "color": COLOR_UNIFORM},
                           marker={"symbol": "diamond-open", "size": 13, "color": COLOR_UNIFORM, "line": {"width": 2}}))
    front = data.plottable(data.front)
    two_objectives = len(data.records.spec.objectives) == 2
    fig.add_trace(_scatter(go, data, front, TRACE_FRONT, mode="lines+markers" if two_objectives else "markers",
                           line={"color": COLOR_FRONT, "shape": "hv", "width": 2},
                           marker={"color": COLOR_FRONT, "size": 9, "symbol": "circle-open", "line": {"width": 2}}))
    if data.selected:
        fig.add_trace(_scatter(go, data, data.plottable(data.selected), TRACE_SELECTED, mode="markers",
                               marker={"symbol": "square-open", "size": 15, "color": "#17becf", "line": {"width": 2}}))
    recommended = data.plottable([data.recommended] if data.recommended is not None else [])
    fig.add_trace(_scatter(go, data, recommended, TRACE_RECOMMENDED, mode="markers",
                           marker={"symbol": "star", "size": 20, "color": COLOR_RECOMMENDED,
                                   "line": {"color": "black", "width": 1}}))
    dense_size, dense_quality = finite(data.records.dense.get("size_mb")), data.dense_quality
    if dense_size is not None and dense_quality is not None and dense_quality > 0:
        fig.add_trace(go.Scatter(x=[dense_size], y=[dense_quality], customdata=[None], mode="markers", name=TRACE_DENSE,
                                 marker={"symbol": "triangle-up", "size": 12, "color": "black"}, hoverinfo="text",
                                 hovertext=[f"dense model<br>size {dense_size:.4g} MB<br>{esc(data.quality)} {dense_quality:.4g}"]))
    heldout = heldout_points(data)
    if heldout:
        fig.add_trace(go.Scatter(
            x=[p["x"] for p in heldout], y=[p["y"] for p in heldout], customdata=[p["trial"] for p in heldout],
            error_y={"type": "data", "symmetric": False, "array": [p["plus"] for p in heldout],
                     "arrayminus": [p["minus"] for p in heldout], "color": COLOR_HELDOUT},
            mode="markers", name=TRACE_HELDOUT, hoverinfo="text", hovertext=[p["hover"] for p in heldout],
            marker={"symbol": "circle", "size": 9, "color": COLOR_HELDOUT, "line": {"color": "black", "width": 1}}))
    _budget_lines(fig, go, data)
    values = [data.quality_of(r) for r in data.plottable(data.records.records)]
    fig.update_layout(
        template=TEMPLATE, height=560, margin={"l": 70, "r": 30, "t": 60, "b": 60},
        title={"text": f"{esc(data.quality_label)} against size: study {esc(data.study_name)}"},
        xaxis={"title": {"text": "size (MB)"}},
        yaxis={"title": {"text": esc(data.quality_label)}, "type": "log" if wants_log_axis(values) else "linear"},
        legend={"orientation": "h", "y": -0.15}, hovermode="closest",
        meta={"quality": data.quality, "trials": {"feasible": len(data.feasible), "infeasible": len(data.infeasible)}})
    if not values:
        fig.add_annotation(text="no trial has a finite size and quality to plot", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def _short_uniform(name: str | None) -> str:
    text = name or ""
    return text[len("uniform "):] if text.startswith("uniform ") else text


def _budget_lines(fig, go, data: ReportData) -> None:
    """Budgets as line traces (named ``budget: ...``) across the plotted range: traces keep their data
    coordinates on a log axis, where plotly's hline annotations do not."""
    plotted = data.plottable(data.records.records)
    xs = [data.size_of(r) for r in plotted] + [x for x in (finite(data.records.dense.get("size_mb")),) if x is not None]
    ys = [data.quality_of(r) for r in plotted]
    budget = data.quality_budget()
    if budget is not None and budget > 0 and xs:
        fig.add_trace(go.Scatter(x=[min(xs), max(xs)], y=[budget, budget], mode="lines", hoverinfo="skip",
                                 name=esc(f"budget: {data.records.spec.budgets.describe()}"),
                                 line={"dash": "dash", "color": COLOR_RECOMMENDED, "width": 1}))
    size_budget = data.records.spec.budgets.max_size_mb
    if size_budget is not None and ys:
        fig.add_trace(go.Scatter(x=[size_budget, size_budget], y=[min(ys), max(ys)], mode="lines", hoverinfo="skip",
                                 name=f"size budget {size_budget:g} MB",
                                 line={"dash": "dot", "color": COLOR_RECOMMENDED, "width": 1}))


def heldout_points(data: ReportData) -> list[dict[str, Any]]:
    """Held-out quality of every validated trial, on the quality axis. For perplexity the held-out
    *relative increase* is applied to the search's dense perplexity (the two texts have different
    perplexities; their increases are comparable); for KL the held-out KL is used as it is."""
    out = []
    dense_ppl = finite(data.records.dense.get("perplexity"))
    for trial, result in data.validated.items():
        record = data.record_of(trial)
        values = (result.get("sets") or {}).get(HELDOUT_SET) or {}
        size = data.size_of(record) if record is not None else None
        if size is None or not values:
            continue
        if data.quality == "perplexity":
            inc, ci = finite(values.get("ppl_increase_pct")), _interval(values.get("ppl_increase_ci"))
            if inc is None or dense_ppl is None:
                continue
            y = dense_ppl * (1 + inc / 100)
            lo, hi = (dense_ppl * (1 + ci[0] / 100), dense_ppl * (1 + ci[1] / 100)) if ci else (y, y)
            shown = f"held-out perplexity {fmt_or(values.get('perplexity'))} ({inc:+.2f}%"
            shown += f", {data.level_pct} CI [{ci[0]:+.2f}, {ci[1]:+.2f}]%)" if ci else ")"
        else:
            y, ci = finite(values.get(data.quality)), _interval(values.get(f"{data.quality}_ci"))
            if y is None:
                continue
            lo, hi = ci if ci else (y, y)
            shown = f"held-out {esc(data.quality)} {y:.4g}" + (f" ({data.level_pct} CI [{lo:.4g}, {hi:.4g}])" if ci else "")
        hover = f"<b>trial {trial}</b>: {esc(data.set_label(HELDOUT_SET))}<br>{shown}<br>size {size:.4g} MB"
        if data.is_flagged(trial):
            hover += "<br><b>flagged</b>: " + esc("; ".join(str(x) for x in data.verdict(trial).get("reasons") or ()))
        out.append({"trial": trial, "x": size, "y": y, "plus": max(hi - y, 0.0), "minus": max(y - lo, 0.0), "hover": hover})
    return out


def fmt_or(value: Any) -> str:
    v = finite(value)
    return "?" if v is None else f"{v:.4g}"


def _interval(ci: Any) -> tuple[float, float] | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and finite(ci[0]) is not None and finite(ci[1]) is not None:
        return float(ci[0]), float(ci[1])
    return None


def config_label(data: ReportData, r: TrialRecord) -> str:
    parts = [f"trial {r.trial}"]
    if data.size_of(r) is not None:
        parts.append(f"{r.metrics['size_mb']:.4g} MB")
    if data.quality_of(r) is not None:
        parts.append(f"{data.quality} {r.metrics[data.quality]:.4g}")
    if data.is_recommended(r):
        parts.append("recommended")
    if r.uniform:
        parts.append(r.uniform)
    return " · ".join(parts)


def heatmap_figure(data: ReportData):
    """Bits and sparsity of every layer (rows: layer types, columns: blocks) of the recommended
    configuration, with a dropdown over :meth:`ReportData.heatmap_configs`. None when there is none."""
    go, make_subplots = plotly_modules()
    configs = data.heatmap_configs()
    initial = data.heatmap_initial()
    if not configs or initial is None:
        return None
    grids = [layer_grid(r.plan) for r in configs]
    rows, columns = merged_axes(grids)
    if not rows:
        return None

    def panels(grid) -> dict[str, list]:
        bits = grid.values("bits", rows, columns)
        texts = [[esc(t) for t in line] for line in grid.texts(rows, columns)]
        return {
            "z": [[None if b is None else math.log2(b) for b in line] for line in bits],
            "text": [[("" if b is None else f"{b:g}") for b in line] for line in bits],
            "z_sparsity": grid.values("sparsity", rows, columns),
            "text_sparsity": [[("" if s is None else f"{s:.2g}") for s in line]
                              for line in grid.values("sparsity", rows, columns)],
            "hover": texts,
        }

    per_config = [panels(g) for g in grids]
    active = next(i for i, r in enumerate(configs) if r.trial == initial.trial)
    first = per_config[active]
    fig = make_subplots(rows=2, cols=1, subplot_titles=("bits per weight", "sparsity"), vertical_spacing=0.14)
    fig.add_trace(go.Heatmap(
        z=first["z"], text=first["text"], customdata=first["hover"], x=list(columns), y=list(rows), name=TRACE_BITS,
        texttemplate="%{text}", hovertemplate="%{customdata}<extra></extra>", colorscale="Viridis", reversescale=True,
        zmin=1.0, zmax=4.0, xgap=1, ygap=1,
        colorbar={"title": {"text": "bits"}, "y": 0.79, "len": 0.42, "tickvals": [math.log2(b) for b in BIT_TICKS],
                  "ticktext": [str(b) for b in BIT_TICKS]}), row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=first["z_sparsity"], text=first["text_sparsity"], customdata=first["hover"], x=list(columns), y=list(rows),
        name=TRACE_SPARSITY, texttemplate="%{text}", hovertemplate="%{customdata}<extra></extra>", colorscale="Reds",
        zmin=0.0, zmax=1.0, xgap=1, ygap=1, colorbar={"title": {"text": "sparsity"}, "y": 0.21, "len": 0.42}),
        row=2, col=1)
    buttons = []
    for r, panel in zip(configs, per_config):
        buttons.append({
            "label": esc(config_label(data, r)), "method": "update",
            "args": [{"z": [panel["z"], panel["z_sparsity"]], "text": [panel["text"], panel["text_sparsity"]],
                      "customdata": [panel["hover"], panel["hover"]]},
                     {"title.text": esc(f"per-layer plan: {config_label(data, r)}")}, [0, 1]],
        })
    fig.update_layout(
        template=TEMPLATE, height=max(480, 2 * 26 * len(rows) + 260), margin={"l": 160, "r": 30, "t": 120, "b": 50},
        title={"text": esc(f"per-layer plan: {config_label(data, initial)}"), "y": 0.98},
        updatemenus=[{"type": "dropdown", "buttons": buttons, "active": active, "x": 0.0, "xanchor": "left",
                      "y": 1.0, "yanchor": "bottom", "pad": {"b": 30}, "showactive": True}],
        meta={"configs": [r.trial for r in configs]})
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    fig.update_xaxes(title={"text": "block"}, row=2, col=1)
    return fig


def history_figure(data: ReportData):
    """The quality objective of every completed trial against its number, feasible or not, with the
    best feasible value so far as a step line."""
    go, _ = plotly_modules()
    records = sorted(data.plottable(data.records.records), key=lambda r: r.trial)

    def trace(subset, name, **style):
        return go.Scatter(x=[r.trial for r in subset], y=[data.quality_of(r) for r in subset],
                          customdata=[r.trial for r in subset], hovertext=[hover_text(data, r) for r in subset],
                          hoverinfo="text", mode="markers", name=name, **style)

    fig = go.Figure()
    fig.add_trace(trace([r for r in records if not r.feasible], TRACE_INFEASIBLE,
                        marker={"color": COLOR_INFEASIBLE, "symbol": "x", "size": 7}))
    fig.add_trace(trace([r for r in records if r.feasible], TRACE_FEASIBLE, marker={"color": COLOR_FEASIBLE, "size": 8}))
    best_x, best_y = data.best_so_far(records)
    fig.add_trace(go.Scatter(x=best_x, y=best_y, customdata=best_x, mode="lines", name=TRACE_BEST,
                             line={"color": COLOR_FRONT, "shape": "hv", "width": 2}, hoverinfo="skip"))
    values = [data.quality_of(r) for r in records]
    fig.update_layout(
        template=TEMPLATE, height=420, margin={"l": 70, "r": 30, "t": 60, "b": 50},
        title={"text": f"search history: {esc(data.quality_label)} by trial"},
        xaxis={"title": {"text": "trial"}, "tick0": 0,
               "dtick": max(1, math.ceil(max((r.trial for r in records), default=0) / 12))},
        yaxis={"title": {"text": esc(data.quality_label)}, "type": "log" if wants_log_axis(values) else "linear"},
        legend={"orientation": "h", "y": -0.2})
    return fig


def validation_figure(data: ReportData):
    """Perplexity increase (or KL) on the search set and on the held-out set of every validated trial,
    with confidence intervals and the budget. None without validation or held-out results."""
    go, _ = plotly_modules()
    key, ci_key = ("kl", "kl_ci") if data.quality == "kl" else ("ppl_increase_pct", "ppl_increase_ci")
    series: dict[str, list[tuple[int, float, float, float]]] = {SEARCH_SET: [], HELDOUT_SET: []}
    for trial, result in data.validated.items():
        sets = result.get("sets") or {}
        for name in series:
            values = sets.get(name) or {}
            if name == SEARCH_SET and not values and (record := data.record_of(trial)) is not None:
                values = {key: record.metrics.get(key)}
            y = finite(values.get(key))
            if y is None:
                continue
            ci = _interval(values.get(ci_key)) or (y, y)
            series[name].append((trial, y, max(ci[1] - y, 0.0), max(y - ci[0], 0.0)))
    if not series[HELDOUT_SET]:
        return None
    fig = go.Figure()
    for name, color, trace_name in ((SEARCH_SET, COLOR_FEASIBLE, TRACE_SEARCH_SET), (HELDOUT_SET, COLOR_HELDOUT, TRACE_HELDOUT)):
        points = series[name]
        fig.add_trace(go.Scatter(
            x=[str(p[0]) for p in points], y=[p[1] for p in points], customdata=[p[0] for p in points],
            error_y={"type": "data", "symmetric": False, "array": [p[2] for p in points], "arrayminus": [p[3] for p in points]},
            mode="markers", name=f"{trace_name}: {esc(data.set_label(name))}", marker={"color": color, "size": 10},
            hovertemplate="trial %{customdata}: %{y:.4g}<extra>" + esc(data.set_label(name)) + "</extra>"))
    budgets = data.records.spec.budgets
    budget = budgets.max_kl if data.quality == "kl" else budgets.max_ppl_increase_pct
    if budget is not None:
        fig.add_hline(y=budget, line={"dash": "dash", "color": COLOR_RECOMMENDED, "width": 1},   # a linear axis
                      annotation_text=esc(f"budget {budget:g}" + ("" if data.quality == "kl" else "%")))
    flagged = [str(t) for t in data.validated if data.is_flagged(t)]
    fig.update_layout(
        template=TEMPLATE, height=420, margin={"l": 70, "r": 30, "t": 60, "b": 50},
        title={"text": esc(f"search against held-out ({data.level_pct} CI)"
                           + (f"; flagged: trial {', '.join(flagged)}" if flagged else ""))},
        xaxis={"title": {"text": "trial"}, "type": "category"},
        yaxis={"title": {"text": "KL to dense" if data.quality == "kl" else "perplexity increase (%)"}},
        legend={"orientation": "h", "y": -0.2})
    return fig
