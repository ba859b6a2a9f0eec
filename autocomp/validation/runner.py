"""Re-score a finished study's front on held-out text, extra domains and lm-eval tasks.

``validate_study`` loads the study's model once, scores the dense model on every evaluation set
(and every task), then rebuilds each chosen trial from its stored plan (calibrated the way the
search calibrated it) and scores it on the same windows. Every figure carries a paired bootstrap
interval over windows (:mod:`autocomp.validation.bootstrap`).

Results are stored in the study itself (user attribute ``autocomp_validation:<digest>``, the digest
naming the sets, tasks and bootstrap settings; ``autocomp_validation`` names the latest), one
trial at a time: an interrupted validation resumes where it stopped when run again with the same
settings, and a validation with other settings is stored beside the earlier one, not over it.

Which trials: by default the non-dominated trials of the whole study (ignoring budgets, so any
later budget's recommendation is among them), the feasible front under the study's budgets, and
the uniform baselines.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from autocomp.errors import StudyError
from autocomp.store.schema import VALIDATION_ATTR, load_existing
from autocomp.front import pareto_front
from autocomp.store.records import StudyRecords, find_trial, load_records
from autocomp.config.objectives import Budgets
from autocomp.config.plan import CompressionPlan
from autocomp.validation.bootstrap import (mean_interval, paired_drop_interval, paired_increase_interval,
                                          perplexity_interval)
from autocomp.validation import SEARCH, VALIDATION_VERSION
from autocomp.validation.sets import EvalSet, study_sets



@dataclass
class ValidationConfig:
    heldout_windows: int | None = None          # default: as many as the search scored
    extra: dict[str, str] = field(default_factory=dict)   # name -> data reference (second domains)
    extra_windows: int | None = None            # default: as many as held out
    tasks: tuple[str, ...] = ()                 # lm-eval task names
    task_paths: tuple[str, ...] = ()            # folders of local lm-eval task YAML files
    task_limit: int | None = None               # examples per task (None: all)
    acc_budgets: dict[str, float] = field(default_factory=dict)   # task -> most accuracy points lost
    trials: tuple[int, ...] | None = None       # None: the default choice (module docstring)
    replicates: int = 1000
    level: float = 0.95
    seed: int = 0

    def digest_inputs(self, sets: Sequence[EvalSet]) -> dict[str, Any]:
        return {"sets": [s.to_dict() for s in sets], "tasks": sorted(self.tasks), "task_paths": list(self.task_paths),
                "task_limit": self.task_limit, "replicates": self.replicates, "level": self.level, "seed": self.seed}


def default_trials(study: StudyRecords) -> list[int]:
    chosen = {r.trial for r in pareto_front(study, Budgets())}
    chosen |= {r.trial for r in pareto_front(study)}
    chosen |= {r.trial for r in study.records if r.uniform}
    return sorted(chosen)


def _study_handle(storage_url: str, study_name: str):
    from autocomp.store.urls import open_storage

    return load_existing(open_storage(storage_url, must_exist=True), study_name)


def load_validation(storage_url: str, study_name: str, digest: str | None = None) -> dict[str, Any] | None:
    """The latest stored validation of a study (or the one of ``digest``); None when there is none."""
    attrs = _study_handle(storage_url, study_name).user_attrs
    digest = digest or attrs.get(VALIDATION_ATTR)
    return attrs.get(f"{VALIDATION_ATTR}:{digest}") if digest else None


def _set_figures(scores, dense_scores, config: ValidationConfig) -> dict[str, Any]:
    ppl = perplexity_interval(scores.nll, scores.tokens, config.level, config.replicates, config.seed)
    inc = paired_increase_interval(scores.nll, dense_scores.nll, scores.tokens, config.level, config.replicates,
                                   config.seed)
    out = {"perplexity": ppl.value, "perplexity_ci": ppl.as_list(), "ppl_increase_pct": inc.value,
           "ppl_increase_ci": inc.as_list(), "windows": int(scores.nll.numel()), "tokens": int(scores.tokens.sum())}
    if scores.kl is not None:
        kl = mean_interval(scores.kl, scores.tokens, config.level, config.replicates, config.seed)
        out.update(kl=kl.value, kl_ci=kl.as_list())
    return out


def reproduction_figures(rebuilt_ppl: float, stored_ppl: Any) -> dict[str, Any]:
    """``search_reproduced_rel`` (the relative difference between the perplexity the rebuilt trial
    scores on the search windows and the one the study stored; nan when either is not a positive
    finite number) and ``search_stored_perplexity``: what
    :func:`autocomp.validation.verdicts.reproduction` judges."""
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (rebuilt_ppl, stored_ppl))
    return {"search_reproduced_rel": abs(rebuilt_ppl / stored_ppl - 1.0) if ok else math.nan,
            "search_stored_perplexity": stored_ppl if isinstance(stored_ppl, (int, float)) else math.nan}


def _finite(value: Any) -> Any:
    """JSON-safe: optuna stores user attributes as JSON, which has no infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def validate_study(storage_url: str, study_name: str, config: ValidationConfig | None = None,
                   budgets: Budgets | None = None, echo: Callable[[str], None] = print, progress: bool = True,
                   evaluator_factory: Callable[[Any], Any] | None = None,
                   trust_remote_code: bool = False) -> dict[str, Any]:
    """Validate (or finish validating) the study's chosen trials; returns the stored validation.
    A study whose model runs its own code is validated only with ``trust_remote_code`` (StudyError
    otherwise, before anything is loaded: the stored spec alone never allows custom code)."""
    from autocomp.study.prepare import check_remote_code

    config = config or ValidationConfig()
    records = load_records(storage_url, study_name)
    spec = records.spec
    if evaluator_factory is None:
        check_remote_code(spec, trust_remote_code, "autocomp validate", study_name)
    sets = study_sets(spec, config.heldout_windows, config.extra, config.extra_windows)
    numbers = list(config.trials) if config.trials is not None else default_trials(records)
    for n in numbers:
        find_trial(records, n)  # a clear error for a number that is not a completed trial
    if not numbers:
        raise StudyError(f"study {study_name!r} has no completed trial to validate")
    inputs = config.digest_inputs(sets)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    study = _study_handle(storage_url, study_name)
    stored = study.user_attrs.get(f"{VALIDATION_ATTR}:{digest}") or {
        "version": VALIDATION_VERSION, "digest": digest, "level": config.level, "replicates": config.replicates,
        "sets": {s.name: s.to_dict() for s in sets}, "dense": {"sets": {}, "tasks": {}}, "trials": {}}
    todo = [n for n in numbers if str(n) not in stored["trials"]]
    dense_done = len(stored["dense"]["sets"]) == len(sets) and set(stored["dense"]["tasks"]) >= set(config.tasks)
    if todo or not dense_done:
        echo(f"validating {len(todo)} trial(s) of {study_name!r} on {', '.join(s.name for s in sets)}"
             + (f" and tasks {', '.join(config.tasks)}" if config.tasks else "")
             + (f" ({len(numbers) - len(todo)} already done)" if len(todo) < len(numbers) else ""))
        _run(records, stored, sets, todo, config, echo, progress, evaluator_factory,
             save=lambda: _save(study, digest, stored))
    stored["acc_budgets"] = dict(config.acc_budgets)
    _store_verdicts(records, stored, budgets or spec.budgets, config.acc_budgets)
    _save(study, digest, stored)
    return stored


def _save(study, digest: str, stored: dict[str, Any]) -> None:
    study.set_user_attr(f"{VALIDATION_ATTR}:{digest}", _finite(stored))
    study.set_user_attr(VALIDATION_ATTR, digest)


def _store_verdicts(records: StudyRecords, stored: dict[str, Any], budgets: Budgets,
                    acc_budgets: Mapping[str, float]) -> None:
    from autocomp.validation.verdicts import verdicts

    stored["budgets"] = budgets.to_dict()
    for number, v in verdicts(records, stored, budgets, acc_budgets).items():
        stored["trials"][str(number)]["verdict"] = v


def _run(records: StudyRecords, stored: dict[str, Any], sets: Sequence[EvalSet], todo: Sequence[int],
         config: ValidationConfig, echo, progress: bool, evaluator_factory, save: Callable[[], None]) -> None:
    from autocomp.evaluators.quality import score_windows
    from autocomp.study.evaluate import TrialEvaluator

    spec = records.spec
    evaluator = (evaluator_factory or TrialEvaluator)(spec)
    model, tokenizer = evaluator.loaded.model, evaluator.loaded.tokenizer
    windows = {s.name: s.windows(tokenizer, spec.bos) for s in sets}
    evaluator.compress({})
    dense_scores, references = {}, {}
    echo(f"scoring the dense model on {sum(w.input_ids.shape[0] for w in windows.values())} windows"
         + (f" and {len(config.tasks)} task(s)" if config.tasks else ""))
    for s in sets:
        dense_scores[s.name], references[s.name] = score_windows(model, windows[s.name].input_ids, topk=spec.kl_topk)
        figures = _set_figures(dense_scores[s.name], dense_scores[s.name], config)
        stored["dense"]["sets"][s.name] = {k: v for k, v in figures.items() if not k.startswith(("ppl_", "kl"))}
    missing_tasks = [t for t in config.tasks if t not in stored["dense"]["tasks"]]
    if missing_tasks:
        stored["dense"]["tasks"].update(_tasks(model, tokenizer, missing_tasks, config))
    save()
    bar = _bar(progress, len(todo))
    try:
        for number in todo:
            record = find_trial(records, number)
            t0 = time.perf_counter()
            evaluator.compress_plan(CompressionPlan.from_dict(record.plan, where=f"trial {number} plan"))
            model = evaluator.current_model  # the teacher, or the trial's student
            entry: dict[str, Any] = {"size_mb": record.metrics["size_mb"], "sets": {}, "tasks": {}}
            for s in sets:
                scores, _ = score_windows(model, windows[s.name].input_ids, reference=references[s.name])
                entry["sets"][s.name] = _set_figures(scores, dense_scores[s.name], config)
            entry.update(reproduction_figures(entry["sets"][SEARCH]["perplexity"], record.metrics.get("perplexity")))
            for task, result in _tasks(model, tokenizer, config.tasks, config).items():
                dense_task = stored["dense"]["tasks"][task]
                result["drop_points"] = 100.0 * (dense_task["value"] - result["value"])
                if result["per_doc"] and len(result["per_doc"]) == len(dense_task.get("per_doc") or ()):
                    drop = paired_drop_interval(dense_task["per_doc"], result["per_doc"], config.level,
                                                config.replicates, config.seed)
                    result["drop_ci"] = drop.as_list()
                entry["tasks"][task] = result
            entry["seconds"] = time.perf_counter() - t0
            stored["trials"][str(number)] = entry
            save()
            held = entry["sets"]["heldout"]
            message = (f"trial {number}: search {entry['sets'][SEARCH]['ppl_increase_pct']:+.2f}%, held-out "
                       f"{held['ppl_increase_pct']:+.2f}% [{held['ppl_increase_ci'][0]:+.2f}, {held['ppl_increase_ci'][1]:+.2f}]")
            if bar is not None:
                bar.set_postfix_str(message[:70])
                bar.update(1)
            else:
                echo(message)
    finally:
        if bar is not None:
            bar.close()
        evaluator.compress({})


def _tasks(model, tokenizer, tasks: Sequence[str], config: ValidationConfig) -> dict[str, dict[str, Any]]:
    if not tasks:
        return {}
    from autocomp.validation.lmeval import run_tasks

    results = run_tasks(model, tokenizer, list(tasks), include_paths=config.task_paths, limit=config.task_limit,
                        seed=config.seed)
    return {name: r.to_dict() for name, r in results.items()}


def _bar(enabled: bool, total: int):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="validate", unit="trial", dynamic_ncols=True)

