"""Opening a study for work: create it (spec, dense figures, baselines) or check that it is the same one.

Every backend (local, ``autocomp worker``, Ray) goes through :func:`prepare_study` once, in the process
that has the model loaded, and then runs :func:`autocomp.study.loop.trial_loop` in each worker.
"""

from __future__ import annotations

from typing import Any, Callable

from autocomp._version import __version__
from autocomp.errors import AutocompError, BudgetError, ModelLoadError, NonFiniteScoreError, StudyError
from autocomp.config.spec import StudySpec, spec_differences
from autocomp.inputs.data import check_window_lengths
from autocomp.samplers import make_sampler
from autocomp.store.schema import (BASELINES_ATTR, DENSE_ATTR, HASH_ATTR, PINNED_ATTR, SENSITIVITY_ATTR, SPEC_ATTR,
                                   TARGET_ATTR, optuna_quiet, write_header)
from autocomp.store.urls import check_study_name, mask_url


def check_dense_finite(perplexity: float, model: str) -> None:
    """ModelLoadError unless the dense model's perplexity is a finite number."""
    import math

    if not isinstance(perplexity, (int, float)) or not math.isfinite(perplexity):
        raise ModelLoadError(f"the dense model {model!r} scores perplexity {perplexity} on the evaluation windows: "
                             "its weights or activations are not finite (NaN/inf), so no configuration can be "
                             "compared with it; check or re-download the model")


def check_spec(study, spec: StudySpec) -> None:
    stored_hash = study.user_attrs.get(HASH_ATTR)
    if stored_hash is None:
        raise StudyError(f"study {study.study_name!r} exists but was not created by autocomp; choose another --study-name")
    if stored_hash != spec.digest():
        raw = study.user_attrs.get(SPEC_ATTR, {})
        try:  # normalise: options added since the study was stored take their defaults
            stored = StudySpec.from_dict(raw).to_dict()
        except (KeyError, TypeError, AutocompError):  # a spec from an incompatible version: compare raw
            stored = raw
        diffs = spec_differences(stored, spec.to_dict())
        raise StudyError(
            f"study {study.study_name!r} exists with a different specification ({'; '.join(diffs[:4]) or 'hash differs'}); "
            "re-run with the same options to resume, or pick a new --study-name"
        )


def check_remote_code(spec: StudySpec, allowed: bool, command: str, study_name: str) -> None:
    """StudyError when ``spec`` (read from a storage) loads its model with custom code but the command
    about to load it was not itself given ``--trust-remote-code`` (``allowed``): custom code runs only
    on the word of the person running the command, never on the word of the storage."""
    if spec.trust_remote_code and not allowed:
        raise StudyError(f"study {study_name!r} loads model {spec.model!r} with its own code (it was created with "
                         f"--trust-remote-code); {command} runs that code only when given the flag itself: pass "
                         "--trust-remote-code if you trust the model and the study storage")


def stored_spec(study) -> StudySpec:
    """The spec a study was created with (for workers that join it without the search's options)."""
    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise StudyError(f"study {study.study_name!r} was not created by autocomp; nothing to work on")
    try:
        return StudySpec.from_dict(raw)
    except (KeyError, TypeError, AutocompError) as exc:
        raise StudyError(f"study {study.study_name!r} was stored by an incompatible autocomp version "
                         f"({study.user_attrs.get('autocomp_version', '?')}): {exc}") from None


def prepare_study(spec: StudySpec, storage, storage_url: str, study_name: str, evaluator, n_trials: int,
                  echo: Callable[[str], None] = print, progress: bool = True):
    """Create the study (or check the stored one), record the dense figures and the target, and queue
    the initial trials once. ``evaluator`` has the model loaded. Returns the study.
    Raises, before anything is stored, DataError for a window longer than the model's positions and
    ModelLoadError when the dense model scores a non-finite perplexity (non-finite weights or
    activations: no trial could be compared with it)."""
    check_study_name(study_name)
    loaded = getattr(evaluator, "loaded", None)
    if loaded is not None:
        check_window_lengths(spec.sequence_lengths(), loaded.model.config, f"model {spec.model!r}")
    check_dense_finite(evaluator.dense.perplexity, spec.model)
    optuna = optuna_quiet()
    if spec.budgets.max_size_mb is not None:
        floor = evaluator.min_size_mb()
        if floor > spec.budgets.max_size_mb:
            raise BudgetError(
                f"--max-size-mb {spec.budgets.max_size_mb:g} cannot be met: the smallest configuration of space "
                f"{spec.space.name!r} is {floor:.1f} MB (dense {evaluator.dense.size_mb:.1f} MB); raise the budget "
                "or search a space with fewer bits / more sparsity (e.g. include the embedding)"
            )
    latency = evaluator.latency.dense_metrics() if getattr(evaluator, "latency", None) is not None else {}
    speed = (f", {latency['latency_ms']:.4g} ms ({spec.latency.metric}), {latency['memory_mb']:.0f} MB peak"
             if latency else "")
    echo(f"study {study_name!r} in {mask_url(storage_url)} (spec {spec.digest()}); {spec.budgets.describe()}; "
         f"dense perplexity {evaluator.dense.perplexity:.4g}, {evaluator.dense.size_mb:.1f} MB{speed}")
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=make_sampler(spec),
                                directions=["minimize"] * len(spec.objectives), load_if_exists=True)
    if HASH_ATTR in study.user_attrs:  # resumed, or another process created it a moment ago
        check_spec(study, spec)
    else:
        write_header(study, spec.to_dict(), spec.digest(), __version__)
    study.set_user_attr(DENSE_ATTR, {"perplexity": evaluator.dense.perplexity, "size_mb": evaluator.dense.size_mb,
                                     "size_bytes": evaluator.dense.size_bytes, **latency})
    study.set_user_attr(TARGET_ATTR, n_trials)
    if not study.user_attrs.get(BASELINES_ATTR):
        enqueue_initial(study, spec, evaluator, echo, progress)
    return study


def enqueue_initial(study, spec: StudySpec, evaluator, echo: Callable[[str], None], progress: bool) -> None:
    """First run of a study: the sensitivity pass (if asked), the uniform baselines, the seeded allocations."""
    from autocomp.sensitivity.table import choice_label, pinned_groups, seeded_params, sensitivity_table

    pinned: dict[str, dict[str, Any]] = {}
    table = None
    if spec.sensitivity:
        echo("sensitivity pass: error of every group at every choice ...")
        probe = evaluator.kl_probe() if spec.sensitivity in ("kl", "fisher") else None
        fisher = evaluator.fisher_factors() if spec.sensitivity == "fisher" else None
        table = sensitivity_table(spec.space, evaluator.targets, evaluator.stitcher, probe, fisher, progress=progress)
        pinned = pinned_groups(table, spec.pin_sensitive)
        study.set_user_attr(SENSITIVITY_ATTR, table)
        study.set_user_attr(PINNED_ATTR, pinned)
    if spec.space.presets:
        add_preset_baselines(study, spec, evaluator, echo)
    baselines = spec.space.baseline_params(evaluator.targets, pinned)
    for params in baselines:  # all of them, even beyond n_trials: a later, longer run picks them up
        study.enqueue_trial(params, user_attrs={"baseline": True})
    for params in spec.space.student_sweep_params(evaluator.targets):  # every student size, cheaply, next
        study.enqueue_trial(params, user_attrs={"seeded": "student"})
    if table is not None:
        groups = list(spec.space.groups(evaluator.targets))
        dims = [d for d, _ in spec.space.dimensions()]
        compressing, sizes = [], []
        dense_total = sum(max(r["bytes"] for r in table[g].values()) for g in groups)
        for params in baselines:
            values = {g: {d: params[f"{g}:{d}"] for d in dims} for g in groups}
            total = sum(table[g][choice_label(values[g])]["bytes"] for g in groups)
            if total < dense_total:
                compressing.append(params)
                sizes.append(total)
        seeded = seeded_params(spec.space, evaluator.targets, table, compressing, sizes, pinned)
        for params in seeded:
            study.enqueue_trial(params, user_attrs={"seeded": "sensitivity"})
    study.set_user_attr(BASELINES_ATTR, True)




def add_preset_baselines(study, spec: StudySpec, evaluator, echo: Callable[[str], None]) -> None:
    """Each llama.cpp preset the space names, evaluated as a finished baseline trial (once: a preset
    already in the study is skipped, so an interrupted first run resumes here)
    (:mod:`autocomp.llamacpp.presets`)."""
    import time

    from autocomp.exporters.gguf_file import GGUFLayout
    from autocomp.llamacpp.commands import reference_gguf
    from autocomp.llamacpp.presets import preset_plan, preset_types
    from autocomp.config.objectives import objective_values
    from autocomp.study.loop import check_finite_scores, trial_plan

    optuna = optuna_quiet()
    done = {t.user_attrs.get("preset") for t in study.get_trials(deepcopy=False)}
    reference = reference_gguf(evaluator.loaded)
    layout = GGUFLayout.of(evaluator.loaded.model)
    for preset in spec.space.presets:
        if preset in done:
            continue
        per_layer = preset_plan(preset_types(reference, preset), evaluator.targets, layout.gguf_name, spec.space)
        if isinstance(per_layer, str):
            echo(f"llama.cpp preset {preset} is not a baseline of this space: {per_layer}")
            continue
        start = time.perf_counter()
        metrics = evaluator.evaluate(per_layer)
        metrics["seconds"] = time.perf_counter() - start
        try:
            check_finite_scores(metrics, spec.objectives)
        except NonFiniteScoreError as exc:
            echo(f"llama.cpp preset {preset} is left out: {exc}")
            continue
        # a finished trial with no sampled parameters: the sampler leaves it aside, the front does not
        study.add_trial(optuna.trial.create_trial(
            values=objective_values(metrics, spec.objectives), params={}, distributions={},
            constraints=spec.budgets.constraints(metrics, evaluator.dense.perplexity),
            user_attrs={"baseline": True, "preset": preset, "uniform": f"llama.cpp preset {preset}",
                        "plan": trial_plan(evaluator, per_layer).to_dict(), "metrics": metrics}))
        echo(f"llama.cpp preset {preset}: perplexity {metrics['perplexity']:.4g}, {metrics['size_mb']:.1f} MB")
