"""Budget verdicts on validated figures, and the recommendation by held-out figures.

Reads only stored data (the study's trials and its validation entry): no model is loaded, so a
user can ask "what if the budget were 10%" of a validated study in a second.

A trial's verdict under budgets ``B`` and accuracy budgets ``A`` (task -> most points of accuracy
lost):

* ``search_feasible``: the search figures meet ``B`` (what the search believed);
* ``heldout_feasible``: the held-out figures meet ``B`` (perplexity increase against the dense
  model on the same held-out windows, KL on them, the size; latency and memory as re-measured after
  the search) and every task of ``A`` lost at most its points;
* ``flagged``: the search figures met ``B`` but the held-out ones do not;
* ``uncertain``: held-out feasible, but the upper end of a bootstrap interval breaks a budget;
* ``reproduced``: the trial rebuilt from its stored plan scores on the search windows what the study
  stored for it (relative difference ``search_reproduced_rel`` at most :data:`REPRODUCE_TOLERANCE`).
  A trial that is not reproduced (its stored figures came from a different model than its plan
  builds: a corrupted variant cache, a changed model file) is never held-out feasible, so never
  recommended, whatever its figures; its reasons say so first.

Held-out figures that are missing or not finite (a broken rebuilt model) break every budget.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from autocomp.front import choose, objective_vector, quality_objective
from autocomp.multiobjective import non_dominated
from autocomp.store.records import StudyRecords, TrialRecord
from autocomp.config.objectives import Budgets
from autocomp.validation import HELDOUT, SEARCH

REPRODUCE_TOLERANCE = 1e-3   # relative: the rebuilt model is the same computation on the same windows


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def reproduction(entry: Mapping[str, Any]) -> tuple[bool, str | None]:
    """(reproduced, reason when not) of a validated trial's entry (module docstring). An entry
    stored before the check existed carries no ``search_reproduced_rel`` and counts as reproduced."""
    if "search_reproduced_rel" not in entry:
        return True, None
    rel = _finite(entry.get("search_reproduced_rel"))
    if rel is not None and rel <= REPRODUCE_TOLERANCE:
        return True, None
    rebuilt = _finite(entry.get("sets", {}).get(SEARCH, {}).get("perplexity"))
    stored = _finite(entry.get("search_stored_perplexity"))
    scores = (f": rebuilt from its plan it scores perplexity {rebuilt:.6g} on the search windows"
              + (f", the study stored {stored:.6g}" if stored is not None else "")
              if rebuilt is not None else ": its rebuilt model does not score a finite perplexity")
    apart = f" ({100 * rel:.3g}% apart)" if rel is not None else ""
    return False, (f"search score not reproduced{scores}{apart}; its stored figures are not trustworthy "
                   "(a corrupted variant cache or a changed model?)")


def heldout_metrics(record: TrialRecord, entry: Mapping[str, Any], set_name: str = HELDOUT) -> dict[str, float]:
    """The trial's metrics with perplexity and KL replaced by their figures on ``set_name``."""
    figures = entry["sets"][set_name]
    metrics = dict(record.metrics)
    nan = math.nan
    metrics.update(perplexity=_finite(figures.get("perplexity")) or nan, kl=_finite(figures.get("kl")),
                   ppl_increase_pct=_finite(figures.get("ppl_increase_pct")) or nan)
    if metrics["kl"] is None and figures.get("kl", None) is not None:   # stored but not finite
        metrics["kl"] = nan
    return metrics


def verdict(record: TrialRecord, entry: Mapping[str, Any], dense: Mapping[str, Any], budgets: Budgets,
            acc_budgets: Mapping[str, float] | None = None, dense_search_ppl: float = math.nan) -> dict[str, Any]:
    search_ok = budgets.feasible(record.metrics, dense_search_ppl)
    held = entry["sets"][HELDOUT]
    reproduced, not_reproduced = reproduction(entry)
    reasons: list[str] = [not_reproduced] if not_reproduced else []
    doubts: list[str] = []
    met = " that the search met" if search_ok else ""
    search_fig = entry["sets"].get(SEARCH, {})
    held_inc, held_kl = _finite(held.get("ppl_increase_pct")), _finite(held.get("kl"))
    if _finite(held.get("perplexity")) is None:
        reasons.append("held-out perplexity is not finite: the rebuilt model is broken")
    if budgets.max_ppl_increase_pct is not None and held_inc is not None:
        limit = budgets.max_ppl_increase_pct
        search_inc = _finite(search_fig.get("ppl_increase_pct"))
        high = _finite((held.get("ppl_increase_ci") or [None, None])[1])
        if held_inc > limit:
            was = f" ({search_inc:+.2f}% on the search windows)" if search_inc is not None else ""
            reasons.append(f"held-out perplexity {held_inc:+.2f}% breaks the +{limit:g}% budget{met}{was}")
        elif high is None or high > limit:
            doubts.append(f"held-out perplexity increase CI reaches {'an unknown bound' if high is None else f'{high:+.2f}%'}"
                          f" (budget +{limit:g}%)")
    if budgets.max_kl is not None and held.get("kl") is not None:
        high = _finite((held.get("kl_ci") or [None, None])[1])
        if held_kl is None:
            reasons.append(f"held-out KL is not finite: it breaks the {budgets.max_kl:g} budget{met}")
        elif held_kl > budgets.max_kl:
            reasons.append(f"held-out KL {held_kl:.4f} breaks the {budgets.max_kl:g} budget{met}")
        elif high is None or high > budgets.max_kl:
            doubts.append(f"held-out KL CI reaches {'an unknown bound' if high is None else f'{high:.4f}'} "
                          f"(budget {budgets.max_kl:g})")
    if budgets.max_size_mb is not None and not record.metrics.get("size_mb", math.inf) <= budgets.max_size_mb:
        reasons.append(f"size {record.metrics['size_mb']:.1f} MB is over the {budgets.max_size_mb:g} MB budget")
    measured = " (re-measured)" if record.metrics.get("latency_remeasured") else " (as searched)"
    for name, limit, unit in (("latency_ms", budgets.max_latency_ms, "ms"), ("memory_mb", budgets.max_memory_mb, "MB")):
        if limit is not None and not record.metrics.get(name, math.inf) <= limit:
            reasons.append(f"{name.split('_')[0]} {record.metrics.get(name, math.inf):.4g} {unit}{measured} is over "
                           f"the {limit:g} {unit} budget")
    for task, most in (acc_budgets or {}).items():
        result = entry.get("tasks", {}).get(task)
        if result is None or task not in dense.get("tasks", {}):
            reasons.append(f"task {task} was not evaluated (run autocomp validate --tasks {task})")
            continue
        if result["drop_points"] > most:
            reasons.append(f"{task} accuracy dropped {result['drop_points']:.2f} points (budget {most:g})")
        elif "drop_ci" in result:  # paired bootstrap over documents
            if result["drop_ci"][1] > most:
                doubts.append(f"{task} accuracy drop CI reaches {result['drop_ci'][1]:.2f} points (budget {most:g})")
        elif result["drop_points"] + 1.96 * 100 * math.hypot(result.get("stderr") or 0.0,
                                                            dense["tasks"][task].get("stderr") or 0.0) > most:
            doubts.append(f"{task} accuracy drop could reach the {most:g}-point budget within its standard error")
    held_ok = not reasons
    return {"search_feasible": search_ok, "heldout_feasible": held_ok,
            "flagged": search_ok and not held_ok and reproduced, "uncertain": held_ok and bool(doubts),
            "reproduced": reproduced, "reasons": reasons + doubts}


def verdicts(study: StudyRecords, validation: Mapping[str, Any], budgets: Budgets | None = None,
             acc_budgets: Mapping[str, float] | None = None) -> dict[int, dict[str, Any]]:
    """Verdicts of every validated trial under ``budgets`` (default: the study's)."""
    budgets = study.spec.budgets if budgets is None else budgets
    dense_ppl = study.dense.get("perplexity", math.nan)
    by_number = {r.trial: r for r in study.records}
    out = {}
    for key, entry in validation["trials"].items():
        record = by_number.get(int(key))
        if record is not None and HELDOUT in entry.get("sets", {}):
            out[record.trial] = verdict(record, entry, validation["dense"], budgets, acc_budgets, dense_ppl)
    return out


def recommend_validated(study: StudyRecords, validation: Mapping[str, Any], budgets: Budgets | None = None,
                        acc_budgets: Mapping[str, float] | None = None, prefer: str = "auto"
                        ) -> tuple[TrialRecord | None, dict[int, dict[str, Any]]]:
    """The recommendation chosen by held-out figures, and every validated trial's verdict.

    Candidates are the validated trials whose held-out figures meet the budgets; among them the
    non-dominated ones (held-out quality, size) form the held-out front, and the usual rule
    (:func:`autocomp.front.choose`) picks one. None when no validated trial holds on held-out data.
    ``budgets`` None: the study's; ``acc_budgets`` None: those stored with the validation.
    """
    budgets = study.spec.budgets if budgets is None else budgets
    acc_budgets = validation.get("acc_budgets", {}) if acc_budgets is None else acc_budgets
    judged = verdicts(study, validation, budgets, acc_budgets)
    quality = quality_objective(study.spec.objectives)
    by_number = {r.trial: r for r in study.records}
    held: list[TrialRecord] = []
    for number, v in judged.items():
        if v["heldout_feasible"]:
            r = by_number[number]
            held.append(TrialRecord(r.trial, heldout_metrics(r, validation["trials"][str(number)]), r.plan, r.params,
                                    r.uniform))
    if not held:
        return None, judged
    front = non_dominated([(objective_vector(r, (quality, "size_mb")), r) for r in held])
    pick = choose(front, budgets, quality, prefer)
    return by_number[pick.trial], judged
