"""A report's tables: the CSV/JSON files, and the rows the HTML page shows (as plain text).

Files:

* ``trials.csv``: one row per completed trial: ``trial, feasible, on_front, recommended, uniform`` and
  every metric any trial has (known metrics first); non-finite numbers are written ``inf``/``nan``.
* ``front.json``: the study, the budgets, the recommended trial and the front points with metrics and plans.
* ``validation.csv``: one row per validated trial, the validation flattened into columns
  (``<set>_ppl_increase_pct``, ``<set>_ppl_increase_ci_low``, ``<task>_drop_points``, ``flagged``...).
* ``validation.json``: the validation dict as given (trial keys as strings).

JSON files are strict JSON: non-finite numbers become ``null``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.jsonsafe import dumps, json_safe
from autocomp.store.records import TrialRecord
from autocomp.reporting.context import HELDOUT_SET, SEARCH_SET, ReportData, finite

METRIC_ORDER = ("perplexity", "ppl_increase_pct", "kl", "nll", "size_mb", "size_bytes", "compression_ratio",
                "avg_bits", "avg_sparsity", "eval_tokens", "seconds", "seconds_compress", "seconds_eval")
SET_FIELDS = ("perplexity", "ppl_increase_pct", "ppl_increase_ci", "kl", "kl_ci", "windows", "tokens")
TASK_FIELDS = ("metric", "value", "stderr", "n", "drop_points")


@dataclass
class TableRow:
    cells: list[str]
    attrs: dict[str, str] = field(default_factory=dict)   # data-* attributes and a CSS class, for the page


@dataclass
class Table:
    headers: list[str]
    rows: list[TableRow]


# ---- number formatting -------------------------------------------------------------------------


def fmt(value: Any, digits: int = 4) -> str:
    v = finite(value)
    if v is None:
        return "" if value is None else str(value)
    return f"{v:.{digits}g}"


def fmt_pct(value: Any) -> str:
    v = finite(value)
    if v is None:
        return ""
    return f"{v:+.1f}%" if abs(v) < 1e4 else f"{v:+.3g}%"


def fmt_interval(ci: Any, pct: bool) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return ""
    lo, hi = finite(ci[0]), finite(ci[1])
    if lo is None or hi is None:
        return ""
    return f"[{lo:+.1f}, {hi:+.1f}]" if pct else f"[{lo:.3g}, {hi:.3g}]"


# ---- files -------------------------------------------------------------------------------------


def metric_columns(records: Sequence[TrialRecord]) -> list[str]:
    seen: set[str] = set()
    for r in records:
        seen.update(r.metrics)
    return [m for m in METRIC_ORDER if m in seen] + sorted(seen - set(METRIC_ORDER))


def write_trials_csv(data: ReportData, path: Path) -> Path:
    records = data.records.records
    metrics = metric_columns(records)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "feasible", "on_front", "recommended", "uniform", *metrics])
        for r in records:
            writer.writerow([r.trial, r.feasible, r.trial in data.front_trials, data.is_recommended(r), r.uniform or "",
                             *(_csv_value(r.metrics.get(m)) for m in metrics)])
    return path


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def front_document(data: ReportData) -> dict[str, Any]:
    spec = data.records.spec
    return json_safe({
        "study": data.study_name,
        "model": spec.model,
        "space": spec.space.name,
        "objectives": list(spec.objectives),
        "budgets": spec.budgets.to_dict(),
        "dense": dict(data.records.dense),
        "recommended": data.recommended.trial if data.recommended is not None else None,
        "completed": len(data.records.records),
        "feasible": len(data.feasible),
        "failed": data.records.n_failed,
        "front": [{**r.to_dict(), "recommended": data.is_recommended(r)} for r in data.front],
    })


def write_front_json(data: ReportData, path: Path) -> Path:
    path.write_text(dumps(front_document(data), indent=2) + "\n")
    return path


def write_validation_json(data: ReportData, path: Path) -> Path:
    path.write_text(dumps(data.validation or {}, indent=2) + "\n")
    return path


def validation_columns(data: ReportData) -> list[str]:
    columns = ["trial", "size_mb", "recommended", "on_front", "search_feasible", "heldout_feasible", "flagged", "reproduced",
               "reasons"]
    for name in data.set_names():
        for f in SET_FIELDS:
            columns.extend([f"{name}_{f}_low", f"{name}_{f}_high"] if f.endswith("_ci") else [f"{name}_{f}"])
    for task in data.task_names():
        columns.extend(f"{task}_{f}" for f in TASK_FIELDS)
    return columns


def validation_csv_row(data: ReportData, trial: int, result: Mapping[str, Any]) -> dict[str, Any]:
    record = data.record_of(trial)
    verdict = result.get("verdict") or {}
    row: dict[str, Any] = {
        "trial": trial,
        "size_mb": record.metrics.get("size_mb") if record is not None else None,
        "recommended": record is not None and data.is_recommended(record),
        "on_front": trial in data.front_trials,
        "search_feasible": verdict.get("search_feasible"),
        "heldout_feasible": verdict.get("heldout_feasible"),
        "flagged": bool(verdict.get("flagged")),
        "reproduced": verdict.get("reproduced"),
        "reasons": "; ".join(str(x) for x in verdict.get("reasons") or ()),
    }
    for name, values in (result.get("sets") or {}).items():
        for f in SET_FIELDS:
            v = (values or {}).get(f)
            if f.endswith("_ci"):
                lo, hi = (v if isinstance(v, (list, tuple)) and len(v) == 2 else (None, None))
                row[f"{name}_{f}_low"], row[f"{name}_{f}_high"] = lo, hi
            else:
                row[f"{name}_{f}"] = v
    for task, values in (result.get("tasks") or {}).items():
        for f in TASK_FIELDS:
            row[f"{task}_{f}"] = (values or {}).get(f)
    return row


def write_validation_csv(data: ReportData, path: Path) -> Path:
    columns = validation_columns(data)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for trial, result in data.validated.items():
            row = validation_csv_row(data, trial, result)
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


# ---- tables shown on the page ------------------------------------------------------------------


def front_table(data: ReportData) -> Table:
    headers = ["trial", "size (MB)", "perplexity", "ppl increase", "KL", "avg bits", "avg sparsity", "uniform", "note"]
    rows = []
    for r in data.front:
        m = r.metrics
        notes = []
        if data.is_recommended(r):
            notes.append("recommended")
        if data.is_flagged(r.trial):
            notes.append("flagged by validation")
        rows.append(TableRow(
            [str(r.trial), fmt(m.get("size_mb")), fmt(m.get("perplexity")), fmt_pct(m.get("ppl_increase_pct")),
             fmt(m.get("kl")), fmt(m.get("avg_bits"), 3), fmt(m.get("avg_sparsity"), 3), r.uniform or "", ", ".join(notes)],
            _row_attrs(data, r.trial)))
    return Table(headers, rows)


def _row_attrs(data: ReportData, trial: int) -> dict[str, str]:
    record = data.record_of(trial)
    classes = []
    if record is not None and data.is_recommended(record):
        classes.append("recommended")
    if data.is_flagged(trial):
        classes.append("flagged")
    attrs = {"data-trial": str(trial), "data-flagged": "true" if data.is_flagged(trial) else "false"}
    if classes:
        attrs["class"] = " ".join(classes)
    return attrs


def _set_cell(values: Mapping[str, Any] | None) -> str:
    if not values:
        return ""
    lines = []
    if values.get("ppl_increase_pct") is not None:
        lines.append(" ".join(x for x in (fmt_pct(values.get("ppl_increase_pct")),
                                          fmt_interval(values.get("ppl_increase_ci"), pct=True)) if x))
    elif values.get("perplexity") is not None:
        lines.append(f"ppl {fmt(values.get('perplexity'))}")
    if values.get("kl") is not None:
        lines.append(" ".join(x for x in (f"KL {fmt(values.get('kl'), 3)}", fmt_interval(values.get("kl_ci"), pct=False)) if x))
    return "\n".join(lines)


def _task_cell(values: Mapping[str, Any] | None) -> str:
    if not values:
        return ""
    text = f"{values.get('metric', 'value')} {fmt(values.get('value'), 3)}"
    if finite(values.get("stderr")) is not None:
        text += f" ± {fmt(values.get('stderr'), 2)}"
    drop = finite(values.get("drop_points"))
    if drop is not None:
        text += f" ({-drop:+.1f} pts)"
    return text


def verdict_text(verdict: Mapping[str, Any]) -> str:
    reasons = "; ".join(str(x) for x in verdict.get("reasons") or ())
    if verdict.get("reproduced") is False:
        return "NOT REPRODUCED" + (f": {reasons}" if reasons else "")
    if verdict.get("flagged"):
        return "FLAGGED" + (f": {reasons}" if reasons else "")
    if verdict.get("heldout_feasible") is False:
        return "infeasible on held-out data" + (f": {reasons}" if reasons else "")
    if not verdict:
        return ""
    return "ok" + (f": {reasons}" if reasons else "")


def validation_table(data: ReportData) -> Table:
    """Dense first, then every validated trial; set and task columns in :meth:`ReportData.set_names` order."""
    sets = data.set_names()
    if SEARCH_SET not in sets:   # the search's own numbers still make the first column
        sets.insert(0, SEARCH_SET)
    tasks = data.task_names()
    level = data.level_pct
    headers = ["trial", "size (MB)"]
    for name in sets:
        kind = "search set" if name == SEARCH_SET else "held-out" if name == HELDOUT_SET else "extra set"
        headers.append(f"{data.set_label(name)}\n{kind}: ppl increase ({level} CI)")
    headers.extend(tasks)
    headers.append("verdict")
    rows = []
    dense = (data.validation or {}).get("dense") or {}
    if dense:
        dense_sets = dense.get("sets") or {}
        dense_tasks = dense.get("tasks") or {}
        rows.append(TableRow(
            ["dense", fmt(data.records.dense.get("size_mb"))]
            + [f"ppl {fmt((dense_sets.get(n) or {}).get('perplexity'))}" if n in dense_sets else "" for n in sets]
            + [_task_cell(dense_tasks.get(t)) for t in tasks] + ["reference"],
            {"data-trial": "dense", "data-flagged": "false", "class": "dense"}))
    for trial, result in data.validated.items():
        record = data.record_of(trial)
        trial_sets = dict(result.get("sets") or {})
        if SEARCH_SET not in trial_sets and record is not None:   # the search's own numbers, without a CI
            trial_sets[SEARCH_SET] = {"ppl_increase_pct": record.metrics.get("ppl_increase_pct"),
                                      "kl": record.metrics.get("kl")}
        label = str(trial) + (" (recommended)" if record is not None and data.is_recommended(record) else "")
        rows.append(TableRow(
            [label, fmt(record.metrics.get("size_mb")) if record is not None else ""]
            + [_set_cell(trial_sets.get(n)) if n in (result.get("sets") or {}) or n == SEARCH_SET else "" for n in sets]
            + [_task_cell((result.get("tasks") or {}).get(t)) for t in tasks]
            + [verdict_text(result.get("verdict") or {})],
            _row_attrs(data, trial)))
    return Table(headers, rows)
