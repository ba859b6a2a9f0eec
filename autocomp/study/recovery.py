"""Trials whose worker is gone: who owns a trial, its heartbeat, and putting it back in the queue.

Every running trial records its owner (``host``, ``pid``, ``worker``) and, while it runs, a heartbeat
in the storage (Optuna's ``trial_heartbeats`` table, every ``heartbeat_interval()`` seconds). A
``RUNNING`` trial is known dead when

* its process is gone and it ran on this host (checked by pid: immediate), or
* its heartbeat is older than ``grace_period()`` (any host: a lost node, a killed container), or
* the Ray driver saw its worker actor die (:func:`fail_worker_trials`: immediate), or
* nobody claimed it within ``UNCLAIMED_GRACE_S`` of its start.

A dead trial is marked ``FAIL`` with the reason and its configuration is queued again, at most
``MAX_RETRIES`` times; the retry records ``retry_of`` and ``retries``. Any worker (or the next run of
the same command) picks the retry up.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
from pathlib import Path

from autocomp.store.schema import optuna_quiet
from autocomp.store.urls import grace_period

MAX_RETRIES = 2
UNCLAIMED_GRACE_S = 60


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs. A zombie (dead, not yet reaped by its parent:
    a worker killed under a supervisor that has not waited for it) is dead: ``kill(pid, 0)`` alone
    would call it alive until its heartbeat went stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state is the field after the parenthesised command name
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True   # no /proc (macOS) or it vanished meanwhile: trust kill()
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def claim(trial, worker: str, **extra) -> None:
    """Record who runs ``trial`` (before anything else happens to it)."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("worker", worker)
    for key, value in extra.items():
        trial.set_user_attr(key, value)


def _is_dead(t, host: str) -> str | None:
    """Why a RUNNING trial is known dead on this host, or None. A trial that never got its owner
    recorded (its process died between asking for it and writing the owner) is dead after a grace period."""
    pid = t.user_attrs.get("pid")
    if pid is None:
        started = t.datetime_start
        if started is not None and (datetime.datetime.now() - started).total_seconds() > UNCLAIMED_GRACE_S:
            return f"no worker claimed the trial within {UNCLAIMED_GRACE_S} s of its start"
        return None
    if t.user_attrs.get("host") != host:
        return None  # another machine's worker: left to its heartbeat
    if int(pid) == os.getpid() or _pid_alive(int(pid)):
        return None
    return f"worker process {pid} died during the trial"


def requeue(study, trial, retries: int) -> bool:
    """Queue ``trial``'s configuration again: its queued (fixed) params if it was enqueued (a baseline,
    a seeded allocation), overlaid on whatever it had drawn; at most MAX_RETRIES times. True if queued."""
    params = {**trial.params, **trial.system_attrs.get("fixed_params", {})}
    if retries > MAX_RETRIES or not params:
        return False
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "seeded")}
    study.enqueue_trial(params, user_attrs={**attrs, "retries": retries, "retry_of": trial.number})
    return True


def fail_and_requeue(study, trial, reason: str) -> bool:
    """Mark a RUNNING trial failed with ``reason`` and queue its retry. False if it had finished meanwhile."""
    optuna = optuna_quiet()
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # it finished (or another process failed it) a moment ago
    requeue(study, trial, int(trial.user_attrs.get("retries", 0)) + 1)
    return True


def recover_dead_trials(study) -> int:
    """Fail the RUNNING trials known dead (see the module doc) and queue their retries. Returns the count."""
    optuna = optuna_quiet()
    host = socket.gethostname()
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        reason = _is_dead(t, host)
        if reason is not None and fail_and_requeue(study, t, reason):
            recovered += 1
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if is_heartbeat_enabled(study._storage):  # Optuna's own stale check, with our reason and retry
        for trial_id in study._storage._get_stale_trial_ids(study._study_id):
            t = study._storage.get_trial(trial_id)
            reason = f"no heartbeat for {grace_period()} s (worker {t.user_attrs.get('worker', '?')} lost)"
            if t.state == optuna.trial.TrialState.RUNNING and fail_and_requeue(study, t, reason):
                recovered += 1
    return recovered


def fail_worker_trials(study, worker: str, reason: str) -> int:
    """Fail (and queue again) the RUNNING trials of ``worker``, whose death the caller saw."""
    optuna = optuna_quiet()
    lost = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("worker") == worker and fail_and_requeue(study, t, reason):
            lost += 1
    return lost


class Heartbeat:
    """``with Heartbeat(study, trial):`` records the trial's heartbeat every interval while the body runs
    (a daemon thread: a killed process stops beating, which is the point)."""

    def __init__(self, study, trial) -> None:
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self._storage = study._storage
        self._trial_id = trial._trial_id
        self._enabled = is_heartbeat_enabled(self._storage)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        interval = self._storage.get_heartbeat_interval()
        while True:
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # a busy database: the next beat retries; a missed one is within the grace
                pass
            if self._stop.wait(interval):
                return

    def __enter__(self) -> "Heartbeat":
        if self._enabled:
            self._storage.record_heartbeat(self._trial_id)
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self._trial_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
