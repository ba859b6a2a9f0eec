"""What autocomp writes into an Optuna study: attribute names, the study header, the re-measured overlay.

Both the writers (:mod:`autocomp.study.prepare`, :mod:`autocomp.study.remeasure`,
:mod:`autocomp.validation.runner`) and the readers (:mod:`autocomp.store.records`, reports, exports)
import these names from here, so the layout of a stored study is defined once.

Study-level user attributes:

* ``autocomp_spec`` / ``autocomp_spec_hash``: the :class:`~autocomp.config.spec.StudySpec` and its digest;
* ``autocomp_version``: the autocomp version that created the study;
* ``autocomp_dense``: the dense model's figures (perplexity, size, latency when measured);
* ``autocomp_baselines_enqueued``: the initial trials were queued (once per study);
* ``autocomp_sensitivity`` / ``autocomp_pinned``: the sensitivity table and the pinned groups;
* ``autocomp_n_trials``: the finished-trial count the latest search asked for (workers' default);
* ``autocomp_remeasured``: per trial, the end-to-end latency figures re-measured after the search;
* ``autocomp_validation`` (+ ``:<digest>``): the latest validation and each stored validation.

Per trial: ``metrics``, ``plan``, ``uniform`` (a baseline's label), ``baseline`` / ``seeded`` (queued).
"""

from __future__ import annotations

from typing import Any

SPEC_ATTR = "autocomp_spec"
HASH_ATTR = "autocomp_spec_hash"
VERSION_ATTR = "autocomp_version"
DENSE_ATTR = "autocomp_dense"
BASELINES_ATTR = "autocomp_baselines_enqueued"
SENSITIVITY_ATTR = "autocomp_sensitivity"
PINNED_ATTR = "autocomp_pinned"
TARGET_ATTR = "autocomp_n_trials"
REMEASURED_ATTR = "autocomp_remeasured"
VALIDATION_ATTR = "autocomp_validation"

# the figures a re-measurement replaces (the search's are kept as ``<name>_search``)
OVERLAID = ("latency_ms", "prefill_ms", "decode_ms", "memory_mb", "model_mb", "decode_ms_iqr_pct",
            "prefill_ms_iqr_pct", "kernel_layers", "no_kernel_layers")


def optuna_quiet():
    """Optuna, with its per-trial INFO logging turned down (autocomp prints its own progress)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def load_existing(storage, study_name: str):
    """The Optuna study ``study_name`` in ``storage`` if it exists, else None. Any name is read (a
    storage may hold studies other tools named); only creating one checks the name
    (:func:`autocomp.store.urls.check_study_name`)."""
    optuna = optuna_quiet()
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def write_header(study, spec_dict: dict[str, Any], digest: str, version: str) -> None:
    """Record a new study's spec, its digest and the autocomp version (once, at creation)."""
    study.set_user_attr(SPEC_ATTR, spec_dict)
    study.set_user_attr(HASH_ATTR, digest)
    study.set_user_attr(VERSION_ATTR, version)


def overlay(metrics: dict, entry: dict) -> dict:
    """A trial's metrics with its re-measured figures in place of the search's (kept as ``*_search``)."""
    out = dict(metrics)
    for name in OVERLAID:
        if name in entry:
            if name in out:
                out[f"{name}_search"] = out[name]
            out[name] = entry[name]
    out["latency_remeasured"] = 1.0
    return out
