"""A worker: joins an existing study and runs its trial loop; the same object serves ``autocomp worker``
(a plain process on any machine that reaches the storage) and each Ray actor.

A worker needs nothing but the storage URL and the study name: the study's spec (model, data, space,
budgets, ...) is stored in the study by the ``autocomp search`` that created it. It loads the model once
and keeps it, with its variant cache, for every trial it runs.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

from autocomp.errors import StudyError
from autocomp.config.spec import StudySpec
from autocomp.study.local import SearchOutcome, finished_already, worker_name, worker_sampler
from autocomp.study.loop import LoopCounts, count_completed, trial_loop
from autocomp.store.schema import BASELINES_ATTR, HASH_ATTR, TARGET_ATTR, load_existing
from autocomp.study.prepare import check_remote_code, prepare_study, stored_spec
from autocomp.store.urls import mask_url, open_storage


def worker_seed(spec: StudySpec, worker: str, primary: bool) -> int:
    """The sampler seed of a worker: the study's for the primary one, a distinct derived one for the
    others (equal seeds would make concurrent workers draw the same configurations)."""
    return spec.seed if primary else (spec.seed * 1_000_003 + zlib.crc32(worker.encode())) % (2**31)


class StudyWorker:
    """Runs trials of ``study_name`` in ``storage_url``; keeps its evaluator (the loaded model and the
    variant cache) between :meth:`run` calls.

    ``trust_remote_code``: this process may run the model's own code. The stored spec of a study
    created with ``--trust-remote-code`` is not enough (anyone who can write to a shared storage could
    make every worker run code): :meth:`run` refuses such a study unless the worker itself was given
    the flag (:func:`~autocomp.study.prepare.check_remote_code`)."""

    def __init__(self, storage_url: str, study_name: str, *, worker: str | None = None, primary: bool = False,
                 cache_bytes: int = 2 << 30, cache_dir: str | Path | None = None,
                 evaluator_factory: Callable[[StudySpec], Any] | None = None,
                 claim_attrs: Mapping[str, Any] | None = None, must_exist: bool = False,
                 trust_remote_code: bool = False) -> None:
        self.storage_url = storage_url
        self.trust_remote_code = trust_remote_code
        self.study_name = study_name
        self.worker = worker or worker_name()
        self.primary = primary
        self.claim_attrs = dict(claim_attrs or {})
        self._cache_bytes = cache_bytes
        self._cache_dir = cache_dir
        self._factory = evaluator_factory
        self._evaluator = None
        self._storage = open_storage(storage_url, must_exist=must_exist, heartbeat=True)

    def evaluator(self, spec: StudySpec):
        if self._evaluator is None:
            if self._factory is not None:
                self._evaluator = self._factory(spec)
            else:
                from autocomp.study.evaluate import TrialEvaluator

                self._evaluator = TrialEvaluator(spec, cache_bytes=self._cache_bytes, cache_dir=self._cache_dir)
        return self._evaluator

    def prepare(self, spec: StudySpec, n_trials: int, echo: Callable[[str], None] = print, progress: bool = False) -> dict:
        """Create or check the study (loads the model); returns the dense figures."""
        evaluator = self.evaluator(spec)
        prepare_study(spec, self._storage, self.storage_url, self.study_name, evaluator, n_trials, echo, progress)
        return {"perplexity": evaluator.dense.perplexity, "size_mb": evaluator.dense.size_mb}

    def study(self):
        study = load_existing(self._storage, self.study_name)
        if study is None:
            raise StudyError(f"no study {self.study_name!r} in {mask_url(self.storage_url)}; create it first with "
                             "'autocomp search ... --storage URL --study-name NAME --trials N' (add --prepare-only to "
                             "only create it), then start workers")
        if HASH_ATTR not in study.user_attrs:
            raise StudyError(f"study {self.study_name!r} was not created by autocomp; nothing to work on")
        if not study.user_attrs.get(BASELINES_ATTR):
            raise StudyError(f"study {self.study_name!r} is still being created (its first search has not finished "
                             "preparing it); start the worker again in a minute")
        return study

    def run(self, n_trials: int | None = None, progress: bool = True, echo: Callable[[str], None] = print,
            should_stop: Callable[[], bool] | None = None) -> LoopCounts:
        """Trials until the study holds ``n_trials`` finished ones (default: the target of its search)."""
        study = self.study()
        spec = stored_spec(study)
        check_remote_code(spec, self.trust_remote_code, "autocomp worker", self.study_name)
        target = int(n_trials if n_trials is not None else study.user_attrs.get(TARGET_ATTR, 0))
        if target < 1:
            raise StudyError(f"study {self.study_name!r} stores no trial target; pass --trials N")
        if finished_already(study, None, target, self.study_name, echo) is not None:
            return LoopCounts()
        evaluator = self.evaluator(spec)
        study.sampler, pinned = worker_sampler(study, spec, evaluator, worker_seed(spec, self.worker, self.primary))
        return trial_loop(study, spec, evaluator, target, worker=self.worker, pinned=pinned, progress=progress,
                          echo=echo, claim_attrs=self.claim_attrs, should_stop=should_stop)


def run_worker(storage_url: str, study_name: str, n_trials: int | None = None, progress: bool = True,
               echo: Callable[[str], None] = print, cache_bytes: int = 2 << 30,
               cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> SearchOutcome:
    """``autocomp worker``: join the study and work until it holds its target of finished trials.
    ``trust_remote_code``: see :class:`StudyWorker`."""
    if n_trials is not None and n_trials < 1:
        raise StudyError(f"--trials must be at least 1, got {n_trials}")
    # must_exist: a mistyped SQLite path must not create an empty database
    worker = StudyWorker(storage_url, study_name, cache_bytes=cache_bytes, cache_dir=cache_dir, must_exist=True,
                         trust_remote_code=trust_remote_code)
    check_remote_code(stored_spec(worker.study()), trust_remote_code, "autocomp worker", study_name)  # before any output
    echo(f"worker {worker.worker} joins study {study_name!r} in {mask_url(storage_url)}")
    counts = worker.run(n_trials, progress=progress, echo=echo)
    return SearchOutcome(study_name, count_completed(worker.study()), counts.ran, counts.failed, counts.pruned,
                         counts.reused)
