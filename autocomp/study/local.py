"""The local backend: this process prepares the study and runs the trial loop itself.

Resume is running the same command again:

* the study's spec hash must equal the new one (else :class:`StudyError` with the differences);
* trials left ``RUNNING`` by a worker that is gone (a killed process of this host, a lost heartbeat)
  are marked failed with that reason and queued again, at most ``MAX_RETRIES`` times each;
* only the missing trials run (see :mod:`autocomp.study.loop`);
* a finished study returns at once without loading the model.

Other processes may work on the same study at the same time (``autocomp worker``, see
:mod:`autocomp.study.worker`); they share nothing but the storage.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

from autocomp.errors import StudyError
from autocomp.config.spec import StudySpec
from autocomp.study.loop import count_completed, trial_loop
from autocomp.samplers import make_sampler
from autocomp.store.schema import PINNED_ATTR, SENSITIVITY_ATTR, load_existing
from autocomp.study.prepare import check_spec, prepare_study
from autocomp.study.recovery import recover_dead_trials
from autocomp.store.urls import open_storage


@dataclass
class SearchOutcome:
    study_name: str
    completed: int      # finished trials in the study: completed + stopped early
    ran: int
    failed: int
    pruned: int = 0     # stopped by staged evaluation in this run
    reused: int = 0     # took the figures of an identical, already evaluated configuration


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def finished_already(study, spec: StudySpec | None, n_trials: int, study_name: str,
                     echo: Callable[[str], None]) -> SearchOutcome | None:
    """Check (and recover) an existing study; the outcome if it already holds ``n_trials``."""
    if study is None:
        return None
    if spec is not None:
        check_spec(study, spec)
    recover_dead_trials(study)
    done = count_completed(study)
    if done >= n_trials:
        echo(f"study {study_name!r} already has {done} completed trials (asked for {n_trials}); nothing to run")
        return SearchOutcome(study_name, done, 0, 0)
    return None


def worker_sampler(study, spec: StudySpec, evaluator, seed: int | None = None):
    """The study's sampler for this worker: the evo sampler's ladders leave pinned groups alone and
    follow the stored sensitivity table."""
    pinned = study.user_attrs.get(PINNED_ATTR, {})
    return make_sampler(spec, evaluator, pinned, study.user_attrs.get(SENSITIVITY_ATTR), seed=seed), pinned


def run_local(spec: StudySpec, storage_url: str, study_name: str, n_trials: int,
              progress: bool = True, evaluator_factory: Callable[[StudySpec], Any] | None = None,
              echo: Callable[[str], None] = print) -> SearchOutcome:
    """Run (or resume) the study until it holds ``n_trials`` completed trials."""
    if n_trials < 1:
        raise StudyError(f"--trials must be at least 1, got {n_trials}")
    storage = open_storage(storage_url, heartbeat=True)
    outcome = finished_already(load_existing(storage, study_name), spec, n_trials, study_name, echo)
    if outcome is not None:
        return outcome

    from autocomp.study.evaluate import TrialEvaluator

    evaluator = (evaluator_factory or TrialEvaluator)(spec)
    study = prepare_study(spec, storage, storage_url, study_name, evaluator, n_trials, echo, progress)
    study.sampler, pinned = worker_sampler(study, spec, evaluator)
    counts = trial_loop(study, spec, evaluator, n_trials, worker=worker_name(), pinned=pinned,
                        progress=progress, echo=echo)
    return SearchOutcome(study_name, count_completed(study), counts.ran, counts.failed, counts.pruned, counts.reused)
