"""Distributed studies on real services: a two-node Ray cluster and PostgreSQL (CI starts both with
scripts/services.sh; the fixtures skip without them, or fail under AUTOCOMP_REQUIRE_CLUSTER=1).

Every search here is the CLI in a subprocess, so this test process never becomes a Ray driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from cli_helpers import (COMPLETE, FAIL, RUNNING, assert_ok, assert_recovered, cli_command, cli_env, just_started,
                         stop_mid_trial, trials_of, wait_for)
from cluster import start_private_ray_cluster

pytestmark = pytest.mark.cluster

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


def _start_ray_search(model, url: str, name: str, n: int, address: str, tmp_path, cache_dir, windows: int = 96,
                      **popen):
    """A two-worker Ray search of ``n`` slow-ish trials (96 windows: ~0.75 s each) in the background."""
    command = _search(model, url, name, n, windows, "--backend", "ray", "--address", address, "--concurrency", "2")
    log = tmp_path / f"{name}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(command, cwd=tmp_path, env=_env(cache_dir), stdout=fh, stderr=subprocess.STDOUT, **popen)
    return command, proc, log


def _is_ray_trial(node: str | None = None):
    """Whether a trial runs in a Ray actor (on ``node``, if given)."""
    return lambda t: t.user_attrs.get("backend") == "ray" and (node is None or t.user_attrs.get("node") == node)


def _check_recovered(trials, lost, n_trials: int, before: dict):
    """After a lost trial: see cli_helpers.assert_recovered (two workers at once)."""
    return assert_recovered(trials, lost, n_trials, before, workers=2)


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
            lost, before = stop_mid_trial(url, "node", proc, log, _is_ray_trial(doomed),
                                          "a trial ran on the worker node after 2 finished")
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
        trials = trials_of(url, "node")
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
    # trials of ~3 s: the one seen just started still runs when Ray has ended the dead driver's actors
    command, proc, log = _start_ray_search(tiny_models["llama"], url, "driver", n, ray_address, tmp_path, cache_dir,
                                           windows=384, start_new_session=True)
    try:
        lost, before = stop_mid_trial(url, "driver", proc, log, _is_ray_trial(), "a trial ran after 3 finished", 3)
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and anything it started; Ray then ends its actors
        try:
            os.kill(lost.user_attrs["pid"], signal.SIGKILL)   # stopped, the lost trial's actor waits for no Ray
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert trials_of(url, "driver")[lost.number].state == RUNNING   # left behind
    again = subprocess.run(command, cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert_ok(again)
    failed = _check_recovered(trials_of(url, "driver"), lost, n, before)
    reason = failed.user_attrs["fail_reason"]
    assert "died during the trial" in reason or "no heartbeat" in reason, reason


def test_a_trial_asking_for_gpus_the_cluster_lacks_is_refused(ray_address, tiny_models, tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run(_search(tiny_models["llama"], url, "gpu", 4, 4, "--backend", "ray", "--address", ray_address,
                                  "--gpus-per-trial", "1"),
                          cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "0 GPUs; a trial asks for 1 CPUs and 1 GPUs" in proc.stderr
    assert not trials_of(url, "gpu")   # nothing was created


def test_ctrl_c_stops_a_ray_search_cleanly_and_the_next_run_resumes(ray_address, tiny_models, tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    n = 10
    # a shell running this suite in the background (`nohup ... &`) starts it with SIGINT ignored, which
    # children inherit and Python then leaves ignored: give the search the default disposition back
    # trials of ~3 s: the one seen just started still runs when the interrupt has reached the actors
    command, proc, log = _start_ray_search(tiny_models["llama"], url, "sigint", n, ray_address, tmp_path, cache_dir,
                                           windows=384, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(proc, log, lambda: just_started(trials_of(url, "sigint"), _is_ray_trial(), 3),
                 "a trial ran after 3 finished")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted; run the same command again to resume" in log.read_text()
    stopped = trials_of(url, "sigint")
    assert not [t for t in stopped if t.state == RUNNING]     # the workers' trials were closed, not left behind
    interrupted = [t for t in stopped if t.state == FAIL]
    assert interrupted and all(t.user_attrs["fail_reason"] == "interrupted (Ctrl-C)" for t in interrupted)
    before = {t.number: t.values for t in stopped if t.state == COMPLETE}
    again = subprocess.run(command, cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert_ok(again)
    trials = trials_of(url, "sigint")
    for lost in interrupted:
        _check_recovered(trials, lost, n, before)
