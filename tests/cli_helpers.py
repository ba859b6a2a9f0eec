"""Running the autocomp CLI from tests, and reading back the studies it writes (shared by the CLI,
study, worker, distributed and backend-contract tests)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import sqlalchemy.exc

SMALL = ["--eval-windows", "4", "--eval-seq-len", "64", "--calib-windows", "4", "--calib-seq-len", "64", "--no-progress"]

COMPLETE = optuna.trial.TrialState.COMPLETE
RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL
WAITING = optuna.trial.TrialState.WAITING


# ---- running the CLI -----------------------------------------------------------------------------


def cli_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["AUTOCOMP_CACHE"] = str(cache)
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def cli_command() -> list[str]:
    """The command line that runs ``autocomp``: the venv's console script; ``AUTOCOMP_TEST_CLI`` (a
    shell-quoted command) runs the CLI tests against another build, e.g. an older checkout:
    ``AUTOCOMP_TEST_CLI="env PYTHONPATH=/tmp/old .venv/bin/python -m autocomp.cli"``."""
    override = os.environ.get("AUTOCOMP_TEST_CLI")
    if override:
        return shlex.split(override)
    script = Path(sys.executable).parent / "autocomp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "autocomp.cli"]


def run_cli(args: list, cwd: Path, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command() + [str(a) for a in args], cwd=cwd, env=cli_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def search_args(model, url: str, name: str, trials: int, *extra, space: str = "bits", windows=SMALL) -> list:
    """``autocomp search`` of ``space`` on ``model`` into study ``name`` at ``url``."""
    return ["search", "--model", model, "--space", space, "--trials", trials, *windows,
            "--storage", url, "--study-name", name, *extra]


def wait_for(proc: subprocess.Popen, log: Path, predicate, what: str, timeout: float = 300):
    """Poll ``predicate()`` until it returns something true (returned); fail the test with the log's
    tail if ``proc`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s:\n{log.read_text()[-5000:]}")
        time.sleep(0.05)


# ---- reading studies back ------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def open_storage(url: str, lock_timeout: float = 60) -> optuna.storages.RDBStorage:
    """A reader's storage: it waits up to ``lock_timeout`` s for a writing search's SQLite locks;
    PostgreSQL through psycopg2."""
    if url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": lock_timeout}})
    from cluster import sqlalchemy_url

    return optuna.storages.RDBStorage(sqlalchemy_url(url))


def trials_of(url: str, name: str, lock_timeout: float = 60) -> list[optuna.trial.FrozenTrial]:
    """Every trial of study ``name`` (none while the study does not exist yet)."""
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url, lock_timeout)).get_trials(deepcopy=True)
    except KeyError:
        return []


def count(trials, state) -> int:
    return sum(1 for t in trials if t.state == state)


def assert_evaluated_once(trials) -> None:
    """No configuration evaluated twice, except by the retry of a lost trial (``retry_of``) or as a
    twin that took an earlier trial's figures (``reused_from``). A trial without sampled parameters
    (a llama.cpp preset baseline) is named by its plan."""
    keys = [json.dumps(t.params or t.user_attrs.get("plan"), sort_keys=True) for t in trials
            if t.state == COMPLETE and "reused_from" not in t.user_attrs and "retry_of" not in t.user_attrs]
    assert len(keys) == len(set(keys)), "a configuration was evaluated twice"


def assert_target_reached(trials, n_trials: int, workers: int = 1) -> None:
    """The study holds its target: at least ``n_trials`` finished trials and at most ``workers - 1``
    more (workers that check the count at the same moment may each start the last trial: the race of
    Optuna's own MaxTrialsCallback, documented in docs/guide/cluster.md)."""
    finished = count(trials, COMPLETE)
    assert n_trials <= finished <= n_trials + workers - 1, [t.state for t in trials]


def assert_recovered(trials, lost, n_trials: int, before: dict, workers: int = 1):
    """After a worker died running trial ``lost``: the study reached its target, ``lost`` failed and its
    configuration ran again exactly once (and finished), every trial finished before the loss is kept as
    it was, and no configuration was evaluated twice. Returns the failed trial."""
    assert_target_reached(trials, n_trials, workers)
    by_number = {t.number: t for t in trials}
    failed = by_number[lost.number]
    assert failed.state == FAIL, failed.state
    retries = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retries) == 1, [(t.number, t.user_attrs.get("retry_of")) for t in trials]
    retry = retries[0]
    assert retry.state == COMPLETE and retry.number > lost.number and retry.user_attrs["retries"] == 1
    # the retry repeats the lost trial's configuration: its queued (fixed) params when it was queued,
    # else every param it had drawn (a trial killed while still drawing had only some: the rest are new)
    expected = {**failed.params, **failed.system_attrs.get("fixed_params", {})}
    assert expected.items() <= retry.params.items()
    for number, values in before.items():
        assert by_number[number].state == COMPLETE and by_number[number].values == values, number
    assert count(trials, RUNNING) == 0
    assert_evaluated_once(trials)
    return failed


def just_started(trials, accept, min_complete: int = 2):
    """A RUNNING trial for which ``accept(trial)`` holds that started moments ago, so that it surely
    still runs when a kill lands, once ``min_complete`` trials finished; else None. "Moments" is a
    third of the shortest finished trial (a fixed window is missed on a loaded machine, or too late)."""
    done = [t for t in trials if t.state == COMPLETE and t.datetime_start and t.datetime_complete]
    if len(done) < min_complete:
        return None
    window = max(min((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / 3, 0.3)
    for t in trials:
        if t.state == RUNNING and t.datetime_start is not None and accept(t):
            if time.time() - t.datetime_start.timestamp() < window:
                return t
    return None



def running(trials, accept, min_complete: int = 2):
    """A RUNNING trial for which ``accept(trial)`` holds, once ``min_complete`` trials finished; else None."""
    if count(trials, COMPLETE) < min_complete:
        return None
    return next((t for t in trials if t.state == RUNNING and accept(t)), None)


def stop_mid_trial(url: str, name: str, proc: subprocess.Popen, log: Path, accept, what: str,
                   min_complete: int = 2, timeout: float = 300):
    """Stop (SIGSTOP) the process of a running trial (:func:`running`) and return ``(trial, before)``
    once the storage shows that trial still RUNNING with the process stopped: a SIGKILL sent next
    surely lands mid-trial, however fast trials run on a loaded machine (no need to catch one that
    just started). ``before`` maps each trial finished by then to its values. A trial that finished
    between being seen and being stopped lets its process go on (SIGCONT), and the next one is tried."""
    deadline = time.monotonic() + timeout
    while True:
        trial = wait_for(proc, log, lambda: running(trials_of(url, name), lambda t: "pid" in t.user_attrs and accept(t),
                                                    min_complete), what, max(deadline - time.monotonic(), 1))
        pid = trial.user_attrs["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            # a short lock wait: the stopped process may hold SQLite's write lock (then: try again)
            now = {t.number: t for t in trials_of(url, name, lock_timeout=2)}
        except sqlalchemy.exc.OperationalError:
            now = {}
        if trial.number in now and now[trial.number].state == RUNNING:
            return trial, {t.number: t.values for t in now.values() if t.state == COMPLETE}
        os.kill(pid, signal.SIGCONT)