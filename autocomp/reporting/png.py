"""Static figures (matplotlib, Agg canvas, no pyplot state): ``front.png``, ``heatmap.png``, ``history.png``.

They show what the interactive figures of :mod:`autocomp.reporting.figures` show, for papers and for
places where a page cannot run scripts. ``heatmap.png`` is the recommended configuration's plan (or
the first front point's); it is not written when the front is empty.
"""

from __future__ import annotations

import math
from pathlib import Path

from autocomp._imports import optional
from autocomp.reporting.context import ReportData, wants_log_axis
from autocomp.reporting.figures import BIT_TICKS, COLOR_FEASIBLE, COLOR_FRONT, COLOR_HELDOUT, COLOR_INFEASIBLE, \
    COLOR_RECOMMENDED, COLOR_UNIFORM, heldout_points
from autocomp.reporting.layers import layer_grid

DPI = 130


def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas; DependencyError when matplotlib is not installed."""
    install = "pip install 'autocomp[report]' (or pip install matplotlib)"
    FigureCanvasAgg = optional("matplotlib.backends.backend_agg", "PNG figures", install).FigureCanvasAgg
    Figure = optional("matplotlib.figure", "PNG figures", install).Figure
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def plain(text: object) -> str:
    """``text`` as matplotlib shows it literally (a ``$`` would start math mode)."""
    return str(text).replace("$", r"\$")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def write_front_png(data: ReportData, path: Path) -> Path:
    fig = _figure(8, 5.5)
    ax = fig.add_subplot()
    for records, label, style in (
        (data.plottable(data.infeasible), "infeasible", {"color": COLOR_INFEASIBLE, "marker": "x", "s": 22}),
        (data.plottable(data.feasible), "feasible", {"color": COLOR_FEASIBLE, "marker": "o", "s": 22, "alpha": 0.8}),
    ):
        if records:
            ax.scatter([data.size_of(r) for r in records], [data.quality_of(r) for r in records], label=label, **style)
    front = data.plottable(data.front)
    if front:
        xs, ys = [data.size_of(r) for r in front], [data.quality_of(r) for r in front]
        style = "-" if len(data.records.spec.objectives) == 2 else "none"
        ax.step(xs, ys, where="post", color=COLOR_FRONT, linestyle=style, marker="o", markerfacecolor="none",
                label="Pareto front")
    uniform = data.plottable([r for r in data.records.records if r.uniform])
    if uniform:
        ax.scatter([data.size_of(r) for r in uniform], [data.quality_of(r) for r in uniform], marker="D",
                   facecolors="none", edgecolors=COLOR_UNIFORM, s=60, label="uniform baselines")
        for r in uniform:
            name = (r.uniform or "").removeprefix("uniform ")
            ax.annotate(plain(name), (data.size_of(r), data.quality_of(r)), textcoords="offset points", xytext=(4, 6),
                        fontsize=7, color=COLOR_UNIFORM)
    heldout = heldout_points(data)
    if heldout:
        ax.errorbar([p["x"] for p in heldout], [p["y"] for p in heldout],
                    yerr=[[p["minus"] for p in heldout], [p["plus"] for p in heldout]], fmt="o", color=COLOR_HELDOUT,
                    markeredgecolor="black", capsize=3, label="held-out (validation)")
    if data.recommended is not None and data.plottable([data.recommended]):
        r = data.recommended
        ax.scatter([data.size_of(r)], [data.quality_of(r)], marker="*", s=260, color=COLOR_RECOMMENDED,
                   edgecolors="black", zorder=5, label=f"recommended (trial {r.trial})")
    dense_size, dense_quality = data.records.dense.get("size_mb"), data.dense_quality
    if isinstance(dense_size, (int, float)) and math.isfinite(dense_size) and dense_quality:
        ax.scatter([dense_size], [dense_quality], marker="^", s=70, color="black", label="dense")
    budget = data.quality_budget()
    if budget is not None and budget > 0:
        ax.axhline(budget, linestyle="--", color=COLOR_RECOMMENDED, linewidth=1, label="quality budget")
    if data.records.spec.budgets.max_size_mb is not None:
        ax.axvline(data.records.spec.budgets.max_size_mb, linestyle=":", color=COLOR_RECOMMENDED, linewidth=1,
                   label="size budget")
    values = [data.quality_of(r) for r in data.plottable(data.records.records)]
    if wants_log_axis(values):
        ax.set_yscale("log")
    if not values:
        ax.text(0.5, 0.5, "no trial has a finite size and quality to plot", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("size (MB)")
    ax.set_ylabel(data.quality_label)
    ax.set_title(f"{data.quality_label} against size: study {plain(data.study_name)}"
                 + ("" if data.front else " (no feasible trial)"))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def write_heatmap_png(data: ReportData, path: Path) -> Path | None:
    record = data.heatmap_initial()
    if record is None:
        return None
    grid = layer_grid(record.plan)
    if grid.empty:
        return None
    import numpy as np

    bits = np.array([[math.nan if v is None else math.log2(v) for v in row] for row in grid.values("bits")])
    sparsity = np.array([[math.nan if v is None else v for v in row] for row in grid.values("sparsity")])
    width = min(4 + 0.45 * len(grid.columns), 24)
    fig = _figure(width, 2 * (0.8 + 0.3 * len(grid.rows)) + 1.2)
    axes = fig.subplots(2, 1)
    annotate = len(grid.columns) * len(grid.rows) <= 600   # the numbers stay readable
    panels = ((axes[0], bits, grid.values("bits"), "bits per weight", "viridis_r", 1.0, 4.0, "{:g}"),
              (axes[1], sparsity, grid.values("sparsity"), "sparsity", "Reds", 0.0, 1.0, "{:.2g}"))
    for ax, values, raw, title, cmap, vmin, vmax, form in panels:
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(grid.columns)), list(grid.columns), fontsize=7)
        ax.set_yticks(range(len(grid.rows)), [plain(r) for r in grid.rows], fontsize=7)
        ax.set_xlabel("block", fontsize=8)
        ax.set_title(title, fontsize=9)
        if annotate:
            for i, line in enumerate(raw):
                for j, v in enumerate(line):
                    if v is not None:
                        red, green, blue, _ = image.cmap(image.norm(values[i][j]))
                        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                        ax.text(j, i, form.format(v), ha="center", va="center", fontsize=6,
                                color="white" if dark else "black")
        bar = fig.colorbar(image, ax=ax, fraction=0.03)
        if title.startswith("bits"):
            bar.set_ticks([math.log2(b) for b in BIT_TICKS], labels=[str(b) for b in BIT_TICKS])
    fig.subplots_adjust(hspace=0.45)
    label = f"trial {record.trial}" + (" (recommended)" if data.is_recommended(record) else " (first front point)")
    fig.suptitle(f"per-layer plan of {label}: study {plain(data.study_name)}", fontsize=10)
    return _save(fig, path)


def write_history_png(data: ReportData, path: Path) -> Path:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    records = sorted(data.plottable(data.records.records), key=lambda r: r.trial)
    for subset, label, style in (([r for r in records if not r.feasible], "infeasible",
                                  {"color": COLOR_INFEASIBLE, "marker": "x", "s": 22}),
                                 ([r for r in records if r.feasible], "feasible",
                                  {"color": COLOR_FEASIBLE, "marker": "o", "s": 22})):
        if subset:
            ax.scatter([r.trial for r in subset], [data.quality_of(r) for r in subset], label=label, **style)
    best_x, best_y = data.best_so_far(records)
    if best_x:
        ax.step(best_x, best_y, where="post", color=COLOR_FRONT, label="best feasible so far")
    if wants_log_axis([data.quality_of(r) for r in records]):
        ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel(data.quality_label)
    ax.set_title(f"search history: study {plain(data.study_name)}")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)
