"""Distributed studies on real services: a two-node Ray cluster and PostgreSQL (CI starts both with
scripts/services.sh; the fixtures skip without them, or fail under AUTOCOMP_REQUIRE_CLUSTER=1).

Every search here is the CLI in a subprocess, so this test process never becomes a Ray driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from cli_helpers import assert_ok, cli_command, cli_env, wait_for
from cluster import sqlalchemy_url, start_private_ray_cluster

pytestmark = pytest.mark.cluster

COMPLETE = optuna.trial.TrialState.COMPLETE
RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL
TIMEOUT_S = 300
PRIVATE_RAY_PORT = 6420


def _env(cache_dir):
    # a cluster started with token auth off refuses nothing; Ray's own advisories stay out of the logs
    return {**cli_env(cache_dir), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "AUTOCOMP_HEARTBEAT_S": "2"}


def _search(model, url: str, name: str, trials: int, windows: int, *extra) -> list[str]:
    return cli_command() + [
        "search", "--model", str(model), "--space", "bits", "--trials", str(trials), "--eval-windows", str(windows),
        "--eval-seq-len", "256", "--calib-windows", "4", "--calib-seq-len", "64", "--no-progress", "--no-validate",
        "--storage", url, "--study-name", name, *[str(e) for e in extra]]


def _start_ray_search(model, url: str, name: str, n: int, address: str, tmp_path, cache_dir, **popen):
    """A two-worker Ray search of ``n`` slow-ish trials (96 windows: ~0.75 s each) in the background."""
    command = _search(model, url, name, n, 96, "--backend", "ray", "--address", address, "--concurrency", "2")
    log = tmp_path / f"{name}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(command, cwd=tmp_path, env=_env(cache_dir), stdout=fh, stderr=subprocess.STDOUT, **popen)
    return command, proc, log


def _trials(url: str, name: str):
    storage = optuna.storages.RDBStorage(sqlalchemy_url(url) if url.startswith("postgresql") else url,
                                         engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=True)
    except KeyError:
        return []


def _evaluated_once(trials) -> None:
    """No configuration evaluated twice except by a retry of a lost trial."""
    keys = [json.dumps(t.params, sort_keys=True) for t in trials
            if t.state == COMPLETE and "reused_from" not in t.user_attrs and "retry_of" not in t.user_attrs]
    assert len(keys) == len(set(keys))


def _finished(trials) -> int:
    return sum(t.state == COMPLETE for t in trials)


def _complete(trials, n_trials: int, workers: int = 2) -> None:
    """The study holds its target: at least ``n_trials`` finished trials, and at most ``workers - 1``
    more (two workers that check the count at the same moment may both start the last trial: the race
    of Optuna's own MaxTrialsCallback, documented)."""
    assert n_trials <= _finished(trials) <= n_trials + workers - 1, [t.state for t in trials]


def _wait_for(proc, log, predicate, what: str, timeout: float = TIMEOUT_S):
    return wait_for(proc, log, predicate, what, timeout)


def _running_ray_trial(url, name, min_complete: int, node: str | None = None):
    trials = _trials(url, name)
    if _finished(trials) < min_complete:
        return None
    for t in trials:
        if t.state == RUNNING and t.user_attrs.get("backend") == "ray" and (node is None or t.user_attrs.get("node") == node):
            started = t.datetime_start.timestamp() if t.datetime_start else 0
            if time.time() - started < 0.3:    # just started: it is surely still running when the kill lands
                return t
    return None


def _check_recovered(trials, lost, n_trials: int, before: dict):
    """The study is complete, the lost trial failed with its reason and its configuration ran again,
    and every trial finished before the loss is kept as it was."""
    _complete(trials, n_trials)
    by_number = {t.number: t for t in trials}
    failed = by_number[lost.number]
    assert failed.state == FAIL, failed.state
    retries = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert retries and retries[0].state == COMPLETE
    # the retry keeps every parameter the lost trial had drawn (one killed while still drawing its
    # configuration had only some of them; the rest are drawn by the retry)
    assert failed.params.items() <= retries[0].params.items()
    for number, values in before.items():
        assert by_number[number].state == COMPLETE and by_number[number].values == values
    _evaluated_once(trials)
    return failed


def test_two_node_ray_search_completes_every_trial_once(ray_address, tiny_models, tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    log = tmp_path / "search.log"
    with log.open("w") as fh:
        proc = subprocess.run(_search(tiny_models["llama"], url, "two", 14, 48, "--backend", "ray", "--address",
                                      ray_address, "--concurrency", "2"),
                              cwd=tmp_path, env=_env(cache_dir), stdout=fh, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
    assert proc.returncode == 0, log.read_text()[-5000:]
    trials = _trials(url, "two")
    _complete(trials, 14)
    assert len(trials) == _finished(trials)
    _evaluated_once(trials)
    assert {t.user_attrs["backend"] for t in trials} == {"ray"}
    assert len({t.user_attrs["node"] for t in trials}) == 2, "both nodes ran trials"
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert f"{_finished(trials)} completed trials" in log.read_text()


def test_a_ray_worker_killed_mid_trial_is_replaced_and_its_trial_retried(ray_address, tiny_models, tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    n = 10
    _, proc, log = _start_ray_search(tiny_models["llama"], url, "kill", n, ray_address, tmp_path, cache_dir)
    try:
        lost = _wait_for(proc, log, lambda: _running_ray_trial(url, "kill", 3), "a Ray trial ran after 3 finished")
        before = {t.number: t.values for t in _trials(url, "kill") if t.state == COMPLETE}
        os.kill(lost.user_attrs["pid"], signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    failed = _check_recovered(_trials(url, "kill"), lost, n, before)
    assert failed.user_attrs["fail_reason"].startswith(f"Ray worker {lost.user_attrs['worker']} died")
    assert "queued again" in log.read_text()


def _node_ids(address: str) -> dict[str, dict]:
    code = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False, "
            "configure_logging=False); print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_lost_ray_node_leaves_the_study_complete(tiny_models, tmp_path, cache_dir):
    """A private two-node cluster (one CPU each, one worker per node); the worker node is killed with
    SIGKILL (its raylet and its worker processes) mid-trial. The driver sees the actor die, fails and
    queues its trial, and the worker on the head finishes the study."""
    cluster = start_private_ray_cluster(tmp_path / "ray", PRIVATE_RAY_PORT, node_resources={"doomed": 1})
    try:
        doomed = next(node for node, res in _node_ids(cluster.address).items() if "doomed" in res)
        url = f"sqlite:///{tmp_path / 'study.db'}"
        n = 8
        _, proc, log = _start_ray_search(tiny_models["llama"], url, "node", n, cluster.address, tmp_path, cache_dir)
        try:
            lost = _wait_for(proc, log, lambda: _running_ray_trial(url, "node", 2, node=doomed),
                             "a trial ran on the worker node after 2 finished")
            before = {t.number: t.values for t in _trials(url, "node") if t.state == COMPLETE}
            # a lost machine loses all its processes: the node's raylet and agents (its process group) and the
            # Ray worker running the trial (Ray gives workers their own process groups)
            cluster.kill_node(0)
            try:
                os.kill(lost.user_attrs["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-5000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        trials = _trials(url, "node")
        failed = _check_recovered(trials, lost, n, before)
        # whoever notices first: the driver (the actor died) or, all nodes being on this one machine, the
        # surviving worker's check of the dead process
        reason = failed.user_attrs["fail_reason"]
        assert reason.startswith(f"Ray worker {lost.user_attrs['worker']} died") or \
            reason == f"worker process {lost.user_attrs['pid']} died during the trial", reason
        assert all(t.user_attrs.get("node") != doomed for t in trials if t.datetime_start > failed.datetime_start
                   and t.state == COMPLETE)
    finally:
        cluster.stop()


def test_the_driver_killed_mid_study_resumes_when_run_again(ray_address, tiny_models, tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    n = 10
    command, proc, log = _start_ray_search(tiny_models["llama"], url, "driver", n, ray_address, tmp_path, cache_dir,
                                           start_new_session=True)
    try:
        lost = _wait_for(proc, log, lambda: _running_ray_trial(url, "driver", 3), "a trial ran after 3 finished")
        before = {t.number: t.values for t in _trials(url, "driver") if t.state == COMPLETE}
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and anything it started; Ray then ends its actors
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _trials(url, "driver")[lost.number].state == RUNNING   # left behind
    again = subprocess.run(command, cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert_ok(again)
    failed = _check_recovered(_trials(url, "driver"), lost, n, before)
    reason = failed.user_attrs["fail_reason"]
    assert "died during the trial" in reason or "no heartbeat" in reason, reason


def test_two_workers_share_a_postgresql_study(fresh_postgres_url, tiny_models, tmp_path, cache_dir):
    """search --prepare-only on PostgreSQL, then two autocomp worker processes; the password never shows."""
    url = fresh_postgres_url
    password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert password
    prep = subprocess.run(_search(tiny_models["llama"], url, "pg", 10, 48, "--prepare-only"), cwd=tmp_path,
                          env=_env(cache_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert_ok(prep)
    worker = cli_command() + ["worker", "--storage", url, "--study-name", "pg", "--no-progress"]
    procs = [subprocess.Popen(worker, cwd=tmp_path, env=_env(cache_dir), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-5000:]
        assert password not in out + err
        assert "***@" in err
    assert password not in prep.stdout + prep.stderr
    trials = _trials(url, "pg")
    _complete(trials, 10)
    assert len(trials) == _finished(trials)
    _evaluated_once(trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    pareto = subprocess.run(cli_command() + ["pareto", "--storage", url, "--study-name", "pg"], cwd=tmp_path,
                            env=_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert_ok(pareto)
    assert "feasible Pareto set" in pareto.stdout


def test_a_trial_asking_for_gpus_the_cluster_lacks_is_refused(ray_address, tiny_models, tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run(_search(tiny_models["llama"], url, "gpu", 4, 4, "--backend", "ray", "--address", ray_address,
                                  "--gpus-per-trial", "1"),
                          cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "0 GPUs; a trial asks for 1 CPUs and 1 GPUs" in proc.stderr
    assert not _trials(url, "gpu")   # nothing was created


def test_ctrl_c_stops_a_ray_search_cleanly_and_the_next_run_resumes(ray_address, tiny_models, tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    n = 10
    # a shell running this suite in the background (`nohup ... &`) starts it with SIGINT ignored, which
    # children inherit and Python then leaves ignored: give the search the default disposition back
    command, proc, log = _start_ray_search(tiny_models["llama"], url, "sigint", n, ray_address, tmp_path, cache_dir,
                                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(proc, log, lambda: _running_ray_trial(url, "sigint", 3), "a trial ran after 3 finished")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted; run the same command again to resume" in log.read_text()
    stopped = _trials(url, "sigint")
    assert not [t for t in stopped if t.state == RUNNING]     # the workers' trials were closed, not left behind
    interrupted = [t for t in stopped if t.state == FAIL]
    assert interrupted and all(t.user_attrs["fail_reason"] == "interrupted (Ctrl-C)" for t in interrupted)
    before = {t.number: t.values for t in stopped if t.state == COMPLETE}
    again = subprocess.run(command, cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert_ok(again)
    trials = _trials(url, "sigint")
    for lost in interrupted:
        _check_recovered(trials, lost, n, before)
