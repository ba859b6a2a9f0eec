"""``write_report``: every file of a report, written into one folder.

Files (names are the keys of the returned dict):

* ``report.html``: the self-contained page (:mod:`autocomp.reporting.page`);
* ``front.png``, ``history.png`` and, when there is a configuration to show, ``heatmap.png``
  (:mod:`autocomp.reporting.png`);
* ``trials.csv``, ``front.json`` and, with validation results, ``validation.csv`` and
  ``validation.json`` (:mod:`autocomp.reporting.tables`).

A study without any feasible trial still gets a page (that says so), the front and history figures
and the data files; only ``heatmap.png`` is missing then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.errors import ReportError
from autocomp.store.records import StudyRecords, TrialRecord
from autocomp.reporting.context import build_report_data

REPORT_HTML = "report.html"
FRONT_PNG = "front.png"
HEATMAP_PNG = "heatmap.png"
HISTORY_PNG = "history.png"
TRIALS_CSV = "trials.csv"
FRONT_JSON = "front.json"
VALIDATION_CSV = "validation.csv"
VALIDATION_JSON = "validation.json"


def write_report(records: StudyRecords, front: Sequence[TrialRecord], recommended: TrialRecord | None,
                 validation: Mapping[str, Any] | None, out_dir: Path,
                 selected: Sequence[int] | None = None) -> dict[str, Path]:
    """Write the report of a study into ``out_dir`` (created if needed); return the files by name.

    ``records`` must already be marked feasible (:func:`autocomp.front.pareto_front` does it);
    ``front`` and ``recommended`` are what :mod:`autocomp.front` returned for the same budgets.
    ``validation`` is a validation dict (version 1, see :mod:`autocomp.reporting.context`) or None.
    ``selected``: trial numbers to highlight on the front figure and add to the heatmap menu.

    Raises TrialNotFoundError for a selected trial that is not a completed trial, DependencyError
    when plotly or matplotlib is missing, ReportError when ``out_dir`` cannot be written.
    """
    from autocomp.reporting import figures, page, png, tables

    data = build_report_data(records, front, recommended, validation, selected)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file, not a folder; give a folder for the report (new or existing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    front_fig = figures.front_figure(data)
    heatmap_fig = figures.heatmap_figure(data)
    history_fig = figures.history_figure(data)
    validation_fig = figures.validation_figure(data) if data.validation is not None else None
    try:
        written: dict[str, Path] = {
            TRIALS_CSV: tables.write_trials_csv(data, out / TRIALS_CSV),
            FRONT_JSON: tables.write_front_json(data, out / FRONT_JSON),
        }
        if data.validation is not None:
            written[VALIDATION_CSV] = tables.write_validation_csv(data, out / VALIDATION_CSV)
            written[VALIDATION_JSON] = tables.write_validation_json(data, out / VALIDATION_JSON)
        written[FRONT_PNG] = png.write_front_png(data, out / FRONT_PNG)
        heatmap = png.write_heatmap_png(data, out / HEATMAP_PNG)
        if heatmap is not None:
            written[HEATMAP_PNG] = heatmap
        written[HISTORY_PNG] = png.write_history_png(data, out / HISTORY_PNG)
        text = page.render_page(data, front_fig, heatmap_fig, history_fig, validation_fig,
                                files={name: str(path) for name, path in written.items()})
        (out / REPORT_HTML).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    written[REPORT_HTML] = out / REPORT_HTML
    return written
