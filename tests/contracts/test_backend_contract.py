"""The trial-backend contract: every way of running a study's trials passes the same checks.

Backends (each a real ``autocomp`` command in subprocesses, on a tiny random Llama):

- ``local``: one ``autocomp search`` process;
- ``workers``: ``autocomp search --prepare-only``, then two ``autocomp worker`` processes on SQLite;
- ``ray-local``: ``autocomp search --backend ray`` on a local Ray runtime (one small case: starting Ray
  is slow), skipped without Ray;
- ``ray-cluster`` and ``workers-postgres`` (marked ``cluster``): the same on the two-node test Ray
  cluster and on the test PostgreSQL (CI starts both; skipped without them, failed under
  ``AUTOCOMP_REQUIRE_CLUSTER=1``).

The contract, for a study of ``n`` trials run by ``K`` workers at once:

- **exactly once**: the study ends with ``n`` to ``n + K - 1`` finished trials (the documented race
  of workers starting the last trial at the same moment), every started trial finished, and no
  configuration evaluated twice (the first run queues every uniform baseline, even beyond ``n``: those
  a short run did not reach stay queued, never started, for a longer run);
- **resume**: running again with a larger ``n`` runs only the missing trials and leaves the finished
  ones as they were; running a complete study again runs nothing and loads no model;
- **a dead worker**: a worker killed (SIGKILL) mid-trial loses only that trial: it is failed with the
  reason, its configuration runs again exactly once, and the study still reaches ``n``.

Backend-specific behaviour (Ray's node loss and GPU checks, Ctrl-C, heartbeats) stays in
test_distributed.py and test_workers.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import (COMPLETE, FAIL, RUNNING, SMALL, WAITING, assert_evaluated_once, assert_ok, assert_recovered,
                         assert_target_reached, cli_command, cli_env, count, search_args, sqlite_url, stop_mid_trial,
                         trials_of)

TIMEOUT_S = 300


def windows(count: int, seq_len: int) -> list[str]:
    return ["--eval-windows", str(count), "--eval-seq-len", str(seq_len), "--calib-windows", "4",
            "--calib-seq-len", "64", "--no-progress"]


@dataclass
class Run:
    """The processes of one run of a backend, with their logs."""

    procs: list[subprocess.Popen]
    logs: list[Path]
    rerun: list[str] = field(default_factory=list)    # the command that resumes it (local backend)

    def text(self) -> str:
        return "\n".join(log.read_text() for log in self.logs if log.exists())

    def log(self) -> Path:
        return self.logs[0]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)


@dataclass
class Backend:
    """How one backend runs a study; see the module docstring."""

    name: str
    workers: int                    # trials at once (K)
    fast: list[str]                 # windows of the exactly-once and resume runs
    slow: list[str]                 # windows of the dead-worker run: trials long enough to be caught mid-way
    exactly_once_trials: int
    cache: Path
    storage: str = "sqlite"         # sqlite | a postgresql:// URL
    ray: list[str] = field(default_factory=list)    # --backend ray flags
    env_extra: dict = field(default_factory=dict)

    def url(self, tmp_path: Path) -> str:
        return sqlite_url(tmp_path / "study.db") if self.storage == "sqlite" else self.storage

    def env(self) -> dict:
        env = {**cli_env(self.cache), "AUTOCOMP_HEARTBEAT_S": "2", **self.env_extra}
        if self.ray and "--address" not in self.ray:
            env.pop("RAY_ADDRESS", None)   # a local runtime
        return env

    def _popen(self, args: list, cwd: Path, log: Path, **popen) -> subprocess.Popen:
        with log.open("w") as fh:
            return subprocess.Popen(cli_command() + [str(a) for a in args], cwd=cwd, env=self.env(), stdout=fh,
                                    stderr=subprocess.STDOUT, **popen)

    def _run_sync(self, args: list, cwd: Path) -> subprocess.CompletedProcess:
        proc = subprocess.run(cli_command() + [str(a) for a in args], cwd=cwd, env=self.env(), capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        assert_ok(proc)
        return proc

    def start(self, model, url: str, name: str, n: int, cwd: Path, windows: list[str]) -> Run:
        """Start a run of ``n`` trials in the background."""
        tag = f"{name}-{int(time.monotonic() * 1000)}"
        args = search_args(model, url, name, n, "--no-validate", windows=windows)
        if self.workers == 1 and not self.ray:
            log = cwd / f"{tag}.log"
            return Run([self._popen(args, cwd, log)], [log], rerun=args)
        if self.ray:
            log = cwd / f"{tag}.log"
            return Run([self._popen(args + self.ray, cwd, log)], [log])
        self._run_sync(args + ["--prepare-only"], cwd)
        worker = ["worker", "--storage", url, "--study-name", name, "--no-progress"]
        logs = [cwd / f"{tag}-worker{i}.log" for i in range(self.workers)]
        return Run([self._popen(worker, cwd, log) for log in logs], logs)

    def wait(self, run: Run, allowed_dead: set[int] = frozenset()) -> None:
        """Wait for every process of ``run``; each exits 0 except those in ``allowed_dead`` (killed)."""
        try:
            for p in run.procs:
                rc = p.wait(timeout=TIMEOUT_S)
                if p.pid not in allowed_dead:
                    assert rc == 0, f"{self.name}: exit {rc}\n{run.text()[-6000:]}"
        finally:
            run.kill_all()

    def run(self, model, url: str, name: str, n: int, cwd: Path, windows: list[str] | None = None) -> Run:
        run = self.start(model, url, name, n, cwd, windows or self.fast)
        self.wait(run)
        return run

    def again_when_finished(self, url: str, name: str, model, n: int, cwd: Path) -> str:
        """Run a complete study again; the output."""
        if self.ray or self.workers == 1:
            args = search_args(model, url, name, n, "--no-validate", windows=self.fast) + self.ray
        else:
            args = ["worker", "--storage", url, "--study-name", name, "--no-progress"]
        proc = self._run_sync(args, cwd)
        return proc.stdout + proc.stderr

    def killable(self, run: Run, trial) -> bool:
        """Whether ``trial`` runs in a process of this run's workers (the search itself, a worker
        process, a Ray actor)."""
        if self.ray:
            return trial.user_attrs.get("backend") == "ray"
        return trial.user_attrs.get("pid") in {p.pid for p in run.procs}

    def after_kill(self, run: Run, lost) -> None:
        """Let the run finish after the worker of ``lost`` was killed (the local search died with it:
        it is run again, as a user would)."""
        pid = lost.user_attrs["pid"]
        if run.rerun:
            assert run.procs[0].wait(timeout=60) == -signal.SIGKILL
            self._run_sync(run.rerun, run.log().parent)
            return
        self.wait(run, allowed_dead={pid})

    def check_lost_reason(self, failed, lost, run: Run) -> None:
        """The failed trial names its dead worker. Whoever notices first fails it: a process on the same
        host sees the pid gone, the Ray driver sees its actor die, anyone sees the heartbeat stop."""
        reason = failed.user_attrs["fail_reason"]
        pid, worker = lost.user_attrs["pid"], lost.user_attrs["worker"]
        seen = [f"worker process {pid} died during the trial", f"(worker {worker} lost)"]
        if self.ray:
            seen.append(f"Ray worker {worker} died: ")
        assert any(s in reason for s in seen), (reason, seen)
        if reason.startswith("Ray worker"):
            assert "queued again" in run.text()

    def check_complete_run(self, trials, run: Run) -> None:
        """What this backend records of where each trial ran."""
        workers = {t.user_attrs["worker"] for t in trials}
        if self.ray:
            assert {t.user_attrs["backend"] for t in trials} == {"ray"}
        if self.ray and self.workers > 1 and self.exactly_once_trials >= 10:
            assert len(workers) == self.workers, workers    # the driver hands trials to every actor of its pool
        if not self.ray and self.workers > 1:
            # Plain workers pull trials: one that starts late may find none left, so which worker ran
            # how many is timing; that each trial names the process that ran it is not.
            pids = {p.pid for p in run.procs}
            assert {t.user_attrs["pid"] for t in trials} <= pids, (workers, pids)
            assert all(t.user_attrs["worker"].endswith(f":{t.user_attrs['pid']}") for t in trials), workers
        if "--address" in self.ray:
            assert len({t.user_attrs["node"] for t in trials}) == 2, "both nodes ran trials"
        if self.storage.startswith("postgresql"):
            password = self.storage.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
            assert password and password not in run.text()
            assert "***@" in run.text()


def started(trials) -> list:
    """The trials that ran (queued baselines a short run did not reach are left out)."""
    queued = [t for t in trials if t.state == WAITING]
    assert all(t.datetime_start is None and ("baseline" in t.user_attrs or "seeded" in t.user_attrs)
               for t in queued), [(t.number, t.user_attrs) for t in queued]
    return [t for t in trials if t.state != WAITING]


def _backend(request, cache_dir) -> Backend:
    name = request.param
    ray_env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    if name == "local":
        return Backend(name, 1, SMALL, windows(16, 128), 8, cache_dir)
    if name == "workers":
        return Backend(name, 2, windows(12, 128), windows(16, 128), 10, cache_dir)
    if name == "ray-local":
        pytest.importorskip("ray")
        return Backend(name, 2, SMALL, SMALL, 4, cache_dir, ray=["--backend", "ray", "--concurrency", "2"],
                       env_extra=ray_env)
    if name == "ray-cluster":
        address = request.getfixturevalue("ray_address")
        return Backend(name, 2, windows(48, 256), windows(192, 256), 14, cache_dir,
                       ray=["--backend", "ray", "--address", address, "--concurrency", "2"], env_extra=ray_env)
    if name == "workers-postgres":
        url = request.getfixturevalue("fresh_postgres_url")
        return Backend(name, 2, windows(48, 256), windows(48, 256), 10, cache_dir, storage=url)
    raise ValueError(name)


CLUSTER = pytest.mark.cluster


@pytest.fixture
def backend(request, cache_dir) -> Backend:
    return _backend(request, cache_dir)


@pytest.fixture
def model(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny Llama (a test deletes its weights)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    return folder


@pytest.mark.parametrize("backend", ["local", "workers", "ray-local", pytest.param("ray-cluster", marks=CLUSTER),
                                     pytest.param("workers-postgres", marks=CLUSTER)], indirect=True)
def test_every_finished_trial_is_stored_once(backend, model, tmp_path):
    url = backend.url(tmp_path)
    n = backend.exactly_once_trials
    run = backend.run(model, url, "once", n, tmp_path)
    trials = started(trials_of(url, "once"))
    assert_target_reached(trials, n, backend.workers)
    assert len(trials) == count(trials, COMPLETE), [t.state for t in trials]
    assert_evaluated_once(trials)
    assert len({t.number for t in trials}) == len(trials)
    backend.check_complete_run(trials, run)


@pytest.mark.parametrize("backend", ["local", "workers", pytest.param("ray-cluster", marks=CLUSTER)], indirect=True)
def test_resume_runs_only_the_missing_trials(backend, model, tmp_path):
    url = backend.url(tmp_path)
    backend.run(model, url, "resume", 3, tmp_path)
    first = started(trials_of(url, "resume"))
    assert_target_reached(first, 3, backend.workers)
    before = {t.number: (t.values, t.params, t.datetime_complete) for t in first if t.state == COMPLETE}
    assert len(before) == len(first)

    second = backend.run(model, url, "resume", 6, tmp_path)
    all_trials = trials_of(url, "resume")
    trials = started(all_trials)
    assert_target_reached(trials, 6, backend.workers)
    if backend.name == "local":
        ran = count(trials, COMPLETE) - len(before)
        assert f"{count(trials, COMPLETE)} completed trials ({ran} run now" in second.text(), second.text()
    assert count(trials, FAIL) == 0 and count(trials, RUNNING) == 0
    assert {t.number: (t.values, t.params, t.datetime_complete) for t in trials if t.number in before} == before
    new = [t for t in trials if t.number not in before]
    assert len(new) == count(trials, COMPLETE) - len(before)
    assert all(t.datetime_start >= max(d for _, _, d in before.values()) for t in new)
    assert_evaluated_once(trials)
    after = [(t.number, t.state, t.values, t.params) for t in all_trials]

    # a complete study: nothing runs and the model is not even loaded (its weights are gone now)
    weights = list(model.glob("*.safetensors"))
    assert weights
    for f in weights:
        f.unlink()
    out = backend.again_when_finished(url, "resume", model, 6, tmp_path)
    assert "nothing to run" in out, out
    if backend.name == "local":
        assert f"already has {count(trials, COMPLETE)} completed trials" in out, out
    assert "Loading weights" not in out
    assert [(t.number, t.state, t.values, t.params) for t in trials_of(url, "resume")] == after


def _stop_mid_trial(url: str, name: str, run: Run, backend: Backend):
    """A trial that just started in one of ``run``'s workers, its process stopped while the trial runs
    (cli_helpers.stop_mid_trial), and the trials finished by then."""
    # the owner is written as two attributes (pid, then worker): wait for both, the lost reason names either
    return stop_mid_trial(url, name, run.procs[0], run.log(),
                          lambda t: {"pid", "worker"} <= set(t.user_attrs) and backend.killable(run, t),
                          "a trial ran after 2 finished", timeout=TIMEOUT_S)


@pytest.mark.parametrize("backend", ["local", "workers", pytest.param("ray-cluster", marks=CLUSTER)], indirect=True)
def test_a_trial_whose_worker_dies_is_retried_once(backend, model, tmp_path):
    url = backend.url(tmp_path)
    n = 6
    run = backend.start(model, url, "dies", n, tmp_path, backend.slow)
    try:
        lost, before = _stop_mid_trial(url, "dies", run, backend)
        os.kill(lost.user_attrs["pid"], signal.SIGKILL)
        backend.after_kill(run, lost)
    finally:
        run.kill_all()
    trials = trials_of(url, "dies")
    failed = assert_recovered(trials, lost, n, before, backend.workers)
    assert count(trials, FAIL) == 1
    backend.check_lost_reason(failed, lost, run)
