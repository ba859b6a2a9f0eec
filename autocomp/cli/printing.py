"""How the commands print what the API returns: fronts, metrics, validation tables, recommendations.

Tables and summaries go to stdout; progress notes and "nothing feasible" go to stderr. Nothing here
reads a study or decides anything: every function formats a value it is given.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from autocomp.jsonsafe import dumps


def stderr(message: str) -> None:
    """The ``echo`` the commands hand to the API: progress notes on stderr."""
    print(message, file=sys.stderr)


def num(value: Any, spec: str = "") -> str:
    """``format(value, spec)`` for a finite number; ``nan`` / ``inf`` / ``-inf`` (padded to the spec's
    width) for a non-finite or missing (None) one, so a stored broken trial never breaks a printout."""
    value = math.nan if value is None else float(value)
    if math.isfinite(value):
        return format(value, spec)
    align, width = re.match(r"([<>^]?)[+\- ]?(\d*)", spec).groups()
    return format(str(value), f"{align or '>'}{width}")


def fmt_metrics(m: dict[str, Any]) -> str:
    """One line of a trial's metrics (perplexity, KL, size, bits, sparsity, latency)."""
    kl = m.get("kl")
    return (f"ppl {num(m.get('perplexity'), '.3f')} ({num(m.get('ppl_increase_pct', 0), '+.2f')}%)  "
            + (f"kl {num(kl, '.4f')}  " if kl is not None else "")
            + f"size {num(m.get('size_mb'), '.2f')} MB (x{num(m.get('compression_ratio', 1), '.2f')})  "
            f"bits {num(m.get('avg_bits', 16), '.2f')}  sparsity {num(m.get('avg_sparsity', 0), '.3f')}"
            + (f"  latency {num(m['latency_ms'], '.3g')} ms{'' if m.get('latency_remeasured') else ' (search)'}  "
               f"memory {num(m.get('memory_mb', 0), '.4g')} MB" if "latency_ms" in m else ""))


def print_front(front: Sequence[Any], json_out: bool) -> None:
    """The feasible Pareto set as a table (or a JSON list of trial records)."""
    from autocomp.students.spec import describe_student

    if json_out:
        print(dumps([r.to_dict() for r in front], indent=2))
        return
    print(f"feasible Pareto set: {len(front)} configuration(s)")
    speed = any("latency_ms" in r.metrics for r in front)
    print(f"{'trial':>5}  {'perplexity':>10}  {'+ppl%':>7}  {'kl':>7}  {'size MB':>8}  {'ratio':>5}  {'bits':>5}  {'sparsity':>8}  "
          + (f"{'ms':>8}  {'mem MB':>7}  " if speed else "") + "note")
    for r in front:
        m = r.metrics
        kl = m.get("kl")
        latency = (f"{num(m.get('latency_ms'), '>8.3g')}{'' if m.get('latency_remeasured') else '*'}"
                   f"{' ' if m.get('latency_remeasured') else ''} {num(m.get('memory_mb'), '>7.0f')}  " if speed else "")
        print(f"{r.trial:>5}  {num(m.get('perplexity'), '>10.3f')}  {num(m.get('ppl_increase_pct', 0), '>7.2f')}  "
              f"{(num(kl, '.4f') if kl is not None else '-'):>7}  {num(m.get('size_mb'), '>8.2f')}  "
              f"{num(m.get('compression_ratio', 1), '>5.2f')}  "
              f"{num(m.get('avg_bits', 16), '>5.2f')}  {num(m.get('avg_sparsity', 0), '>8.3f')}  " + latency
              + "; ".join(x for x in (describe_student(r.plan), r.uniform or "") if x))
    if speed and not all(r.metrics.get("latency_remeasured") for r in front):
        print("* latency from the search, not re-measured yet (autocomp measure re-measures the front)")


def print_outcome(outcome) -> None:
    """The trial counts of a :class:`~autocomp.study.local.SearchOutcome`, on stderr."""
    reused = f", {outcome.reused} reused an identical configuration's figures" if outcome.reused else ""
    print(f"{outcome.completed} completed trials ({outcome.ran} run now, {outcome.pruned} of them stopped early, "
          f"{outcome.failed} failed now{reused})", file=sys.stderr)


def _ci(figures: dict[str, Any]) -> str:
    low, high = figures.get("ppl_increase_ci") or (None, None)
    return f"{num(figures.get('ppl_increase_pct'), '+.2f')}% [{num(low, '+.2f')}, {num(high, '+.2f')}]"


def print_validation(validation: dict[str, Any], judged: dict[int, dict[str, Any]], records) -> None:
    """The validation table: per validated trial (of ``records``) its size, perplexity increase with
    interval on every set, task accuracies and its verdict."""
    sets = list(validation["sets"])
    level = round(100 * validation["level"])
    print("\nvalidated on: " + "; ".join(f"{n} = {validation['sets'][n]['label']}" for n in sets))
    tasks = sorted(validation["dense"].get("tasks", {}))
    head = f"{'trial':>5}  {'size MB':>8}  " + "  ".join(f"{n + ' +ppl% [' + str(level) + '% CI]':>30}" for n in sets)
    head += "".join(f"  {t + ' acc (drop)':>24}" for t in tasks) + "  verdict"
    print(head)
    by_number = {r.trial: r for r in records.records}
    for key in sorted(validation["trials"], key=int):
        entry, number = validation["trials"][key], int(key)
        if number not in by_number:
            continue
        v = judged.get(number, {})
        status = "NOT REPRODUCED" if v.get("reproduced") is False else "FLAGGED" if v.get("flagged") else "uncertain" if v.get("uncertain") else \
            "ok" if v.get("heldout_feasible") else "infeasible"
        if v.get("heldout_feasible") and not v.get("search_feasible"):
            status += " held out (the search figures broke the budgets)"
        verdict = status + (": " + "; ".join(v["reasons"]) if v.get("reasons") else "")
        line = f"{number:>5}  {num(entry.get('size_mb'), '>8.2f')}  " + "  ".join(f"{_ci(entry['sets'][n]):>30}" for n in sets)
        for t in tasks:
            r = entry.get("tasks", {}).get(t)
            cell = "-" if r is None else f"{num(None if r['value'] is None else 100 * r['value'], '.1f')} ({num(r['drop_points'], '+.1f')})"
            line += f"  {cell:>24}"
        print(line + "  " + verdict)


def recommendation_json(rec) -> dict[str, Any] | None:
    """An :class:`~autocomp.api.Recommendation` as ``recommend --json`` prints it: the trial record (None
    when nothing is feasible); by held-out figures also its validation, ``by`` and every verdict."""
    best, validation = rec.best, rec.validation
    out = None if best is None else best.to_dict()
    if validation is not None:
        out = out or {"trial": None}
        if best is not None:
            out["validation"] = validation["trials"][str(best.trial)]
        out.update(by="heldout", verdicts={str(k): v for k, v in rec.verdicts.items()})
    return out


def export_hint(storage: str, study_name: str, trial: int) -> str:
    from autocomp.store.urls import mask_url

    import shlex

    return (f"  export it: autocomp export --storage {shlex.quote(mask_url(storage))} --study-name "
            f"{shlex.quote(study_name)} --trial {trial} --out OUT_DIR")


def print_recommendation(rec, storage: str, study_name: str, with_export_hint: bool = False) -> None:
    """An :class:`~autocomp.api.Recommendation` as text: by held-out figures the validation table and
    the flagged trials first, then the chosen trial with its held-out figures (or, when nothing is
    feasible, one line on stderr)."""
    best, validation, judged = rec.best, rec.validation, rec.verdicts
    if validation is not None:
        print_validation(validation, judged, rec.records)
        flagged = [n for n, v in judged.items() if v["flagged"]]
        if flagged:
            print(f"\nFLAGGED: trial(s) {', '.join(map(str, flagged))} met the budgets on the search windows but not "
                  f"on held-out data; they are not recommended")
        broken = [n for n, v in judged.items() if v.get("reproduced") is False]
        if broken:
            print(f"\nNOT REPRODUCED: trial(s) {', '.join(map(str, broken))} rebuilt from their plans do not score what "
                  "the study stored (a corrupted cache or a changed model); they are not recommended")
    if best is None:
        where = " on held-out data" if validation is not None else ""
        named = rec.budgets.describe() if rec.budgets is not None else "the study's budgets"
        named += "".join(f", {task} accuracy -{pts:g} points at most" for task, pts in sorted(rec.acc_budgets.items()))
        print(f"autocomp: no stored configuration meets the budgets ({named}){where}; relax them or run more trials",
              file=sys.stderr)
        return
    print(f"\nrecommended: trial {best.trial}  {fmt_metrics(best.metrics)}" + ("  (search figures)" if validation else ""))
    if validation is not None:
        entry = validation["trials"][str(best.trial)]
        level = round(100 * validation["level"])
        for name, figures in entry["sets"].items():
            print(f"  {name:>8}: perplexity {figures['perplexity']:.3f}, {_ci(figures)} vs dense ({level}% CI)"
                  + (f", KL {figures['kl']:.4f} [{figures['kl_ci'][0]:.4f}, {figures['kl_ci'][1]:.4f}]"
                     if figures.get("kl") is not None else ""))
        for task, r in entry.get("tasks", {}).items():
            dense = validation["dense"]["tasks"][task]
            spread = (f"[{r['drop_ci'][0]:+.2f}, {r['drop_ci'][1]:+.2f}] ({level}% CI)" if "drop_ci" in r
                      else f"(stderr {100 * (r.get('stderr') or 0):.2f})")
            print(f"  {task}: {r['metric']} {100 * r['value']:.2f} (dense {100 * dense['value']:.2f}, "
                  f"{r['drop_points']:+.2f} points lost {spread})")
        if judged[best.trial]["uncertain"]:
            print("  note: " + "; ".join(judged[best.trial]["reasons"]))
    if with_export_hint:
        print(export_hint(storage, study_name, best.trial))


def print_saved(out: Path) -> None:
    """What an export folder holds, from the ``autocomp.json`` that compress/export wrote into it."""
    info = json.loads((Path(out) / "autocomp.json").read_text())
    print(f"saved {out} ({info['format']}: {info['bytes_on_disk'] / 1e6:.2f} MB on disk, accounted "
          f"{info['accounted_size_mb']:.2f} MB, x{info['compression_ratio']:.2f} smaller than the original)")
    if info.get("note"):
        print(f"note: {info['note']}")
