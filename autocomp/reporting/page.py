"""The report page: one self-contained HTML file (plotly.js inlined, no network) that works offline.

Sections, in order: the study and its budgets, the recommendation (with its validation verdict),
the Pareto front figure, the validation table and figure (when there are validation results), the
front table, the per-layer heatmap with a dropdown over the front, the search history. Every text
taken from the study is escaped; figures are embedded as plotly JSON (which escapes ``<``).

Figure divs have fixed ids (``FRONT_DIV`` ...) so a reader of the page can find them.
"""

from __future__ import annotations

import html
from typing import Any

from autocomp._version import __version__
from autocomp.reporting.context import HELDOUT_SET, ReportData, finite
from autocomp.reporting.tables import Table, fmt, fmt_interval, fmt_pct, front_table, validation_table, verdict_text

FRONT_DIV = "front-plot"
HEATMAP_DIV = "heatmap-plot"
HISTORY_DIV = "history-plot"
VALIDATION_DIV = "validation-plot"
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 1em 2em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.facts { color: #444; margin: 0.2em 0; }
.box { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em 1.2em; background: #f8f9fb; }
.box.warn { border-color: #d62728; background: #fff3f2; }
.box.none { border-color: #999; background: #f4f4f4; }
.note { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; vertical-align: top; white-space: pre-line; }
th { background: #f0f2f5; text-align: center; }
td:first-child, th:first-child { text-align: left; }
tr.recommended td { background: #eef7ee; }
tr.flagged td { background: #fde8e6; }
tr.flagged td:last-child { color: #b71c1c; font-weight: 600; }
tr.dense td { color: #555; font-style: italic; }
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_table(table: Table, table_id: str) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in table.headers)
    body = []
    for row in table.rows:
        attrs = "".join(f' {esc(k)}="{esc(v)}"' for k, v in row.attrs.items())
        body.append(f"<tr{attrs}>" + "".join(f"<td>{esc(c)}</td>" for c in row.cells) + "</tr>")
    return f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def figure_html(fig, div_id: str) -> str:
    """A figure as a div and the script that draws it; plotly.js itself is in the page head."""
    import plotly.io as pio

    height = fig.layout.height or 500
    return pio.to_html(fig, config=PLOT_CONFIG, include_plotlyjs=False, full_html=False, div_id=div_id,
                       default_height=f"{height}px", default_width="100%")


def plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _facts(data: ReportData) -> str:
    spec = data.records.spec
    dense = data.records.dense
    dense_bits = []
    if finite(dense.get("perplexity")) is not None:
        dense_bits.append(f"perplexity {dense['perplexity']:.4g}")
    if finite(dense.get("size_mb")) is not None:
        dense_bits.append(f"{dense['size_mb']:.4g} MB")
    lines = [
        f"model {spec.model}; search space {spec.space.name}; data {spec.data} "
        f"({spec.eval_windows.count} windows of {spec.eval_windows.seq_len} tokens); sampler {spec.sampler}",
        f"objectives: {', '.join(spec.objectives)}; budgets: {spec.budgets.describe()}",
        f"dense model: {', '.join(dense_bits) or 'not recorded'}",
        f"{len(data.records.records)} completed trials ({len(data.feasible)} feasible, {len(data.infeasible)} infeasible), "
        f"{data.records.n_failed} failed, {data.records.n_running} running; {len(data.front)} on the feasible front",
    ]
    return "".join(f'<p class="facts">{esc(line)}</p>' for line in lines)


def _recommendation(data: ReportData) -> str:
    r = data.recommended
    if r is None:
        if not data.feasible:
            why = ("No completed trial meets the budgets, so there is no recommendation and no front. "
                   "Relax the budgets, widen the search space, or run more trials.")
        else:
            why = "No configuration was recommended."
        return f'<div class="box none" id="recommendation"><p><b>{esc(why)}</b></p></div>'
    m = r.metrics
    parts = [f"size {fmt(m.get('size_mb'))} MB"]
    if finite(m.get("compression_ratio")) is not None:
        parts.append(f"{m['compression_ratio']:.2f}x smaller than dense")
    if finite(m.get("perplexity")) is not None:
        parts.append(f"perplexity {fmt(m.get('perplexity'))} ({fmt_pct(m.get('ppl_increase_pct'))})")
    if finite(m.get("kl")) is not None:
        parts.append(f"KL {fmt(m.get('kl'))}")
    if finite(m.get("avg_bits")) is not None:
        parts.append(f"avg bits {fmt(m.get('avg_bits'), 3)}, avg sparsity {fmt(m.get('avg_sparsity'), 3)}")
    title = f"Recommended: trial {r.trial}" + (f" ({r.uniform})" if r.uniform else "")
    lines = [f"<p><b>{esc(title)}</b></p>", f"<p>{esc('; '.join(parts))}</p>"]
    css = "box"
    if data.validation is not None:
        result = data.validated.get(r.trial)
        if result is None:
            lines.append(f'<p class="note">{esc("This trial was not validated on held-out data.")}</p>')
        else:
            held = (result.get("sets") or {}).get(HELDOUT_SET) or {}
            if held:
                text = (f"{data.set_label(HELDOUT_SET)}: perplexity increase {fmt_pct(held.get('ppl_increase_pct'))} "
                        f"{fmt_interval(held.get('ppl_increase_ci'), pct=True)} ({data.level_pct} CI)")
                lines.append(f"<p>{esc(text)}</p>")
            verdict = data.verdict(r.trial)
            if verdict:
                lines.append(f'<p id="recommendation-verdict">{esc("Validation: " + verdict_text(verdict))}</p>')
            if data.is_flagged(r.trial):
                css = "box warn"
    else:
        lines.append(f'<p class="note">{esc("No validation results: the numbers above are measured on the search windows only.")}</p>')
    return f'<div class="{css}" id="recommendation">{"".join(lines)}</div>'


def render_page(data: ReportData, front_fig, heatmap_fig, history_fig, validation_fig,
                files: dict[str, str] | None = None) -> str:
    """The whole page as a string."""
    sections = [f"<h1>Compression study {esc(data.study_name)}</h1>", _facts(data), _recommendation(data)]

    sections.append("<h2>Pareto front</h2>")
    sections.append(figure_html(front_fig, FRONT_DIV))
    missing = data.unplottable()
    if missing:
        numbers = ", ".join(str(r.trial) for r in missing[:20]) + (" ..." if len(missing) > 20 else "")
        sections.append(f'<p class="note" id="unplotted">{esc(f"{len(missing)} trial(s) with a non-finite size or {data.quality} are not plotted: {numbers}")}</p>')
    if data.validated:
        sections.append('<p class="note">' + esc(
            f"Orange points: held-out results of validated trials ({data.set_label(HELDOUT_SET)}); for perplexity, "
            "the held-out relative increase applied to the search's dense perplexity, with its "
            f"{data.level_pct} confidence interval.") + "</p>")

    if data.validation is not None:
        sections.append("<h2>Validation</h2>")
        flagged = [t for t in data.validated if data.is_flagged(t)]
        if flagged:
            sections.append('<div class="box warn" id="validation-flags"><p>' + esc(
                f"{len(flagged)} validated trial(s) flagged: {', '.join(str(t) for t in flagged)}. Their search result "
                "does not hold on the held-out data; see the verdict column.") + "</p></div>")
        sections.append(render_table(validation_table(data), "validation-table"))
        if validation_fig is not None:
            sections.append(figure_html(validation_fig, VALIDATION_DIV))

    sections.append("<h2>Front configurations</h2>")
    if data.front:
        sections.append(render_table(front_table(data), "front-table"))
    else:
        sections.append(f'<p id="front-empty">{esc("The study has no feasible trial: the front is empty.")}</p>')

    sections.append("<h2>Per-layer plan</h2>")
    if heatmap_fig is not None:
        sections.append('<p class="note">' + esc(
            "Rows: layer types; columns: decoder blocks (layers outside the blocks in the last column). "
            "Use the menu to switch between the front configurations.") + "</p>")
        sections.append(figure_html(heatmap_fig, HEATMAP_DIV))
    else:
        sections.append(f'<p id="heatmap-empty">{esc("No configuration to show: the front is empty.")}</p>')

    sections.append("<h2>Search history</h2>")
    sections.append(figure_html(history_fig, HISTORY_DIV))

    if files:
        listing = ", ".join(f"{name}" for name in sorted(files))
        sections.append(f'<p class="note">{esc(f"Files next to this page: {listing}.")}</p>')
    sections.append(f'<p class="note">{esc(f"Generated by autocomp {__version__} from the study storage.")}</p>')

    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(f'autocomp report: {data.study_name}')}</title>\n<style>{STYLE}</style>\n"
            f"<script type=\"text/javascript\">{plotly_js()}</script>\n</head>\n<body>\n"
            + "\n".join(sections) + "\n</body>\n</html>\n")
