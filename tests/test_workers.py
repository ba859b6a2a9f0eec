"""Workers that share a study through its storage, on one machine and SQLite: heartbeats, lost
trials, identical configurations, ``autocomp worker`` and its errors. The Ray and PostgreSQL
versions are in test_distributed.py."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from cli_helpers import SMALL, run_cli

COMPLETE = optuna.trial.TrialState.COMPLETE
RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL
WAITING = optuna.trial.TrialState.WAITING


def _spec(model, **extra):
    from autocomp.inputs.data import WindowSpec
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec

    space = SearchSpace.from_dict({"name": "bits", "granularity": "layer",
                                   "quantization": {"methods": ["rtn"], "bits": [2, 4, 8], "group_size": [32]}}, "b")
    return StudySpec(model=str(model), space=space, eval_windows=WindowSpec(2, 32), calib_windows=WindowSpec(2, 32, 0),
                     **extra)


def test_sqlite_storage_is_opened_in_wal_mode(tmp_path):
    from autocomp.store.urls import open_storage

    path = tmp_path / "study.db"
    open_storage(f"sqlite:///{path}")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_trial_whose_heartbeat_stops_is_failed_and_queued_again(tmp_path, monkeypatch):
    """A worker on another host (its pid means nothing here) stops beating: after the grace period the
    trial is failed with the reason and its configuration queued again, at most MAX_RETRIES times."""
    from autocomp.store.urls import grace_period
    from autocomp.study.recovery import MAX_RETRIES, Heartbeat, claim, recover_dead_trials
    from autocomp.store.urls import open_storage

    monkeypatch.setenv("AUTOCOMP_HEARTBEAT_S", "1")
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=True)
    study = optuna.create_study(study_name="hb", storage=storage)
    study.enqueue_trial({"x": 1.0})
    with pytest.warns(UserWarning):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
    claim(trial, "elsewhere:1", host="another-machine")
    with Heartbeat(study, trial):
        time.sleep(2.5)           # beating: never stale, however long it runs
        assert recover_dead_trials(study) == 0
    assert grace_period() == 6
    deadline = time.monotonic() + 30
    while recover_dead_trials(study) == 0:    # the beats stopped (the worker is "lost")
        assert time.monotonic() < deadline, "the stale trial was never failed"
        time.sleep(0.5)
    trials = study.get_trials()
    assert trials[0].state == FAIL
    assert trials[0].user_attrs["fail_reason"].startswith("no heartbeat for 6 s (worker elsewhere:1 lost)")
    assert trials[1].state == WAITING
    assert trials[1].params == {"x": 1.0} or trials[1].system_attrs["fixed_params"] == {"x": 1.0}
    assert (trials[1].user_attrs["retry_of"], trials[1].user_attrs["retries"]) == (0, 1)
    assert MAX_RETRIES >= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies are read from /proc")
def test_a_killed_worker_not_yet_reaped_is_dead():
    """A worker killed under a parent that has not waited for it yet is a zombie: ``kill(pid, 0)``
    still succeeds, but its trial is dead now (not after the heartbeat grace period)."""
    from autocomp.study.recovery import _pid_alive

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _pid_alive(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 30
        while _pid_alive(proc.pid) and time.monotonic() < deadline:   # a zombie once the kill lands
            time.sleep(0.05)
        assert not _pid_alive(proc.pid)
        assert proc.poll() is not None   # only now reaped; dead either way
        assert not _pid_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_an_identical_configuration_is_not_evaluated_twice(tiny_models, tmp_path):
    """The same configuration queued twice: the second trial takes the first one's figures."""
    from autocomp import api
    from autocomp.store.schema import load_existing
    from autocomp.store.urls import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = _spec(tiny_models["llama"])
    api.prepare(spec, 4, url, "twins", cache_dir="none", echo=lambda m: None)
    study = load_existing(open_storage(url), "twins")
    queued = study.get_trials(states=(WAITING,))
    assert len(queued) == 3  # the uniform baselines: 2, 4 and 8 bits
    study.enqueue_trial(queued[1].system_attrs["fixed_params"])   # a second 4-bit one
    outcome = api.worker(url, "twins", progress=False, cache_dir="none", echo=lambda m: None)
    assert (outcome.completed, outcome.ran, outcome.failed, outcome.reused) == (4, 4, 0, 1)
    trials = study.get_trials()
    twin = trials[3]
    assert twin.user_attrs["reused_from"] == 1
    assert twin.values == trials[1].values
    assert twin.user_attrs["metrics"]["seconds"] == 0.0
    assert {k: v for k, v in twin.user_attrs["metrics"].items() if k != "seconds"} == \
        {k: v for k, v in trials[1].user_attrs["metrics"].items() if k != "seconds"}


def test_worker_errors_are_clear_and_create_nothing(tmp_path, cache_dir):
    missing = tmp_path / "nope.db"
    proc = run_cli(["worker", "--storage", f"sqlite:///{missing}", "--study-name", "s"], tmp_path, cache_dir)
    assert proc.returncode == 2
    assert "no study storage at" in proc.stderr and not missing.exists()

    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="foreign", storage=url)
    proc = run_cli(["worker", "--storage", url, "--study-name", "absent"], tmp_path, cache_dir)
    assert proc.returncode == 2
    assert "no study 'absent'" in proc.stderr and "--prepare-only" in proc.stderr
    proc = run_cli(["worker", "--storage", url, "--study-name", "foreign"], tmp_path, cache_dir)
    assert proc.returncode == 2 and "not created by autocomp" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "2"], "--concurrency only apply to --backend ray"),
    (["--address", "auto"], "--address only apply to --backend ray"),
    (["--backend", "ray", "--concurrency", "-1"], "--concurrency must be at least 1"),
    (["--backend", "ray", "--cpus-per-trial", "0"], "--cpus-per-trial must be positive"),
    (["--backend", "ray", "--prepare-only"], "leave out --backend ray"),
])
def test_bad_backend_options_are_refused_before_any_work(tiny_models, tmp_path, cache_dir, flags, message):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = run_cli(["search", "--model", tiny_models["llama"], "--space", "bits", "--trials", 2, *SMALL,
                    "--storage", url, "--study-name", "s", *flags], tmp_path, cache_dir)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Loading" not in proc.stderr
    assert not (tmp_path / "study.db").exists() or not optuna.get_all_study_names(url)


class _FakeRay:
    """Just what the cluster checks read from Ray."""

    def __init__(self, cpus, gpus, hosts, here="10.0.0.1"):
        from types import SimpleNamespace

        self._resources = {"CPU": cpus, "GPU": gpus}
        self._hosts = hosts
        self.util = SimpleNamespace(get_node_ip_address=lambda: here)

    def cluster_resources(self):
        return self._resources

    def nodes(self):
        return [{"NodeManagerAddress": h, "Alive": True} for h in self._hosts]


def test_the_ray_cluster_checks_refuse_what_cannot_work():
    from autocomp.errors import ClusterError
    from autocomp.study.ray_backend import RayConfig, _check_cluster

    sqlite, pg = "sqlite:///x.db", "postgresql://u:p@db/autocomp"
    assert _check_cluster(_FakeRay(8, 0, ["10.0.0.1"]), RayConfig(cpus_per_trial=2), sqlite) == 4
    assert _check_cluster(_FakeRay(8, 2, ["10.0.0.1", "10.0.0.2"]), RayConfig(gpus_per_trial=1), pg) == 2
    with pytest.raises(ClusterError, match="0 GPUs; a trial asks for 1 CPUs and 1 GPUs"):
        _check_cluster(_FakeRay(8, 0, ["10.0.0.1"]), RayConfig(gpus_per_trial=1), pg)
    with pytest.raises(ClusterError, match="SQLite storage lives on one machine.*postgresql://"):
        _check_cluster(_FakeRay(8, 0, ["10.0.0.1", "10.0.0.2"]), RayConfig(), sqlite)
    with pytest.raises(ClusterError, match="--gpus-per-trial must be 0 or more"):
        RayConfig(gpus_per_trial=-1)


def test_a_ray_worker_that_cannot_start_is_a_setup_error_not_a_lost_worker():
    from autocomp.study.ray_backend import _init_failure

    class Died(Exception):
        actor_init_failed = True

    class Lost(Exception):
        actor_init_failed = False

    error = _init_failure(Died("The actor died because of an error raised in its creation task\n  File x\n"
                               "autocomp.errors.ModelLoadError: no model at /data/m"))
    assert error is not None and "autocomp.errors.ModelLoadError: no model at /data/m" in str(error)
    assert "every node needs autocomp installed" in str(error)
    assert _init_failure(Lost("killed")) is None


_CLAIMER = """
import sys, warnings
import optuna
from autocomp.store.urls import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.simplefilter("ignore")
study = optuna.load_study(study_name="race", storage=open_storage(sys.argv[1]))
got = []
while True:
    trial = study.ask()
    if trial.number >= 150:   # the queue is empty: a fresh trial
        study.tell(trial, 0.0)
        break
    got.append(trial.number)
    study.tell(trial, 0.0)
print(" ".join(map(str, got)))
"""


def test_processes_sharing_a_sqlite_study_never_claim_the_same_queued_trial(tmp_path):
    """SQLite ignores SELECT ... FOR UPDATE: without immediate transactions two processes can both see
    a queued trial as waiting and both run it (seen with two autocomp workers)."""
    from autocomp.store.urls import open_storage

    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for i in range(150):
        study.enqueue_trial({"x": float(i)}, skip_if_exists=False)
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    claimed = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        claimed += [int(n) for n in out.split()]
    assert len(claimed) == 150 and sorted(claimed) == list(range(150)), "a queued trial was claimed twice"


def test_a_trial_given_up_by_another_worker_is_dropped_and_the_loop_goes_on(tiny_models, tmp_path):
    """A stalled worker whose trial another worker declared lost (failed and queued again) must not
    crash when it wakes up: it drops that trial and goes on; the retry stands for it."""
    from autocomp.study.evaluate import TrialEvaluator
    from autocomp.study.local import run_local
    from autocomp.study.recovery import fail_and_requeue

    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = _spec(tiny_models["llama"])

    class Stalled(TrialEvaluator):
        calls = 0

        def evaluate(self, plan, *args, **kwargs):
            Stalled.calls += 1
            if Stalled.calls == 2:   # meanwhile, another worker gives the running trial up
                study = optuna.load_study(study_name="stall", storage=url)
                (running,) = study.get_trials(states=(RUNNING,))
                assert fail_and_requeue(study, running, "no heartbeat for 60 s (worker elsewhere lost)")
            return super().evaluate(plan, *args, **kwargs)

    messages = []
    outcome = run_local(spec, url, "stall", 4, progress=False, evaluator_factory=Stalled, echo=messages.append)
    assert outcome.completed == 4
    trials = optuna.load_study(study_name="stall", storage=url).get_trials()
    assert trials[1].state == FAIL and trials[1].user_attrs["fail_reason"].startswith("no heartbeat")
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.state == COMPLETE and retry.params == trials[1].params
    assert any("trial 1 was given up as lost by another worker" in m for m in messages)
