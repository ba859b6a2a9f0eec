"""The Ray backend: trials run in Ray actors, each a :class:`~autocomp.study.worker.StudyWorker`.

Why Ray actors driving Optuna rather than Ray Tune with an Optuna searcher: the Optuna storage must
stay the single source of truth (resume, ``autocomp worker`` processes joining the same study, the
dashboard, validation all read it), while Tune keeps its own experiment state and drives an in-memory
copy of the study through its searcher; and a trial here needs a loaded base model and a cache of
compressed layer variants that should live across trials, which an actor is (a Tune trainable is
rebuilt per trial). So each actor loads the model once, then runs the same ask-evaluate-tell loop as a
local search against the shared storage; the driver only places actors, watches them, and replaces
the ones that die.

Placement: ``concurrency`` actors, each with ``cpus_per_trial`` CPUs (its torch thread count) and
``gpus_per_trial`` GPUs. Without an address a local Ray runtime is started and stopped again.

Faults: an actor that dies (its process or node killed, out of memory) fails its running trial at
once (``fail_worker_trials``), which is queued again, and a replacement actor is started (at most
``max_worker_restarts`` in all). The driver dying takes its actors with it; their trials are
recovered by pid (same host) or heartbeat (other hosts) when the command runs again, which resumes.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from autocomp._imports import optional
from autocomp.errors import AutocompError, ClusterError, StudyError
from autocomp.config.spec import StudySpec
from autocomp.study.local import SearchOutcome, finished_already
from autocomp.study.loop import LoopCounts, count_completed, progress_bar, say, trial_counts
from autocomp.store.schema import BASELINES_ATTR, TARGET_ATTR, load_existing
from autocomp.study.recovery import fail_worker_trials
from autocomp.store.urls import is_sqlite, mask_url, open_storage

POLL_S = 1.0
KILL_WAIT_S = 10.0  # how long a killed actor gets to be reported dead
DRAIN_S = 3.0    # after the study is complete: how long idle workers get to notice and return


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None     # None: start a local Ray runtime; "auto": the running cluster; ray://host:port
    concurrency: int = 0           # Ray workers (trials at once); 0: as many as the cluster fits
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_worker_restarts: int = 4   # replacement actors for lost ones, in all

    def __post_init__(self) -> None:
        if self.concurrency < 0:
            raise ClusterError(f"--concurrency must be at least 1 (or 0 for as many as fit), got {self.concurrency}")
        if self.cpus_per_trial <= 0:
            raise ClusterError(f"--cpus-per-trial must be positive, got {self.cpus_per_trial:g}")
        if self.gpus_per_trial < 0:
            raise ClusterError(f"--gpus-per-trial must be 0 or more, got {self.gpus_per_trial:g}")
        if self.max_worker_restarts < 0:
            raise ClusterError(f"--max-worker-restarts must be 0 or more, got {self.max_worker_restarts}")


def _ray():
    return optional("ray", "the Ray backend", "pip install 'autocomp[cluster]'")


class RayTrialWorker:
    """The actor: a StudyWorker that remembers where it runs. Created through :func:`_actor_class`."""

    def __init__(self, spec: dict[str, Any], storage_url: str, study_name: str, worker: str, primary: bool,
                 threads: int, cache_bytes: int, cache_dir: str | None) -> None:
        import ray
        import torch

        from autocomp.study.worker import StudyWorker

        torch.set_num_threads(max(1, threads))
        self.node = ray.get_runtime_context().get_node_id()
        # the spec is the search command's own (checked equal to the stored one): its flag is the user's word
        self.inner = StudyWorker(storage_url, study_name, worker=worker, primary=primary, cache_bytes=cache_bytes,
                                 cache_dir=cache_dir, claim_attrs={"node": self.node, "backend": "ray"},
                                 trust_remote_code=bool(spec.get("trust_remote_code")))
        self.inner.evaluator(StudySpec.from_dict(spec))  # load the model now: all actors load at once

    def where(self) -> dict[str, Any]:
        return {"node": self.node, "host": socket.gethostname(), "pid": os.getpid()}

    def prepare(self, spec: dict[str, Any], n_trials: int) -> dict[str, float]:
        return self.inner.prepare(StudySpec.from_dict(spec), n_trials, echo=print)

    def run(self, n_trials: int) -> dict[str, int]:
        return asdict(self.inner.run(n_trials, progress=False, echo=print))


def _actor_class(ray, config: RayConfig):
    return ray.remote(RayTrialWorker).options(num_cpus=config.cpus_per_trial, num_gpus=config.gpus_per_trial,
                                             max_restarts=0, max_task_retries=0)


def _connect(ray, config: RayConfig) -> bool:
    """Connect to (or start) Ray; True if this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": "WARNING", "log_to_driver": True}
    if config.address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=config.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = config.address or "a local runtime"
        raise ClusterError(f"cannot connect to Ray at {where}: {str(exc).splitlines()[0] if str(exc) else exc}; "
                           "start it with 'ray start --head' or leave --address out for a local runtime") from None
    return True


def _check_cluster(ray, config: RayConfig, storage_url: str) -> int:
    """Refuse what cannot work; the number of trials that fit at once."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cpus < config.cpus_per_trial or gpus < config.gpus_per_trial:
        raise ClusterError(f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; a trial asks for "
                           f"{config.cpus_per_trial:g} CPUs and {config.gpus_per_trial:g} GPUs: lower "
                           "--cpus-per-trial / --gpus-per-trial or add nodes")
    fit = int(cpus // config.cpus_per_trial)
    if config.gpus_per_trial:
        fit = min(fit, int(gpus // config.gpus_per_trial))
    if is_sqlite(storage_url):
        here = ray.util.get_node_ip_address()
        hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        if hosts - {here}:
            raise ClusterError(
                f"SQLite storage lives on one machine, but the Ray cluster has nodes on {', '.join(sorted(hosts))}: "
                "use a PostgreSQL storage that every node reaches (--storage postgresql://user@host/db)")
    return fit


def _cause(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _init_failure(exc: BaseException) -> ClusterError | None:
    """A ClusterError when ``exc`` says an actor could not even start (its model did not load, autocomp
    is missing on that node): not a lost worker to replace, but a setup to fix."""
    if not getattr(exc, "actor_init_failed", False):
        return None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return ClusterError(f"a Ray worker could not start: {lines[-1] if lines else type(exc).__name__}; every node "
                        "needs autocomp installed and the model, data and cache paths reachable")


def run_ray(spec: StudySpec, storage_url: str, study_name: str, n_trials: int, config: RayConfig,
            progress: bool = True, echo: Callable[[str], None] = print, cache_bytes: int = 2 << 30,
            cache_dir: str | Path | None = None) -> SearchOutcome:
    """Run (or resume) the study on Ray actors until it holds ``n_trials`` finished trials."""
    if n_trials < 1:
        raise StudyError(f"--trials must be at least 1, got {n_trials}")
    storage = open_storage(storage_url, heartbeat=True)
    existing = load_existing(storage, study_name)
    outcome = finished_already(existing, spec, n_trials, study_name, echo)
    if outcome is not None:
        return outcome
    ray = _ray()
    started = _connect(ray, config)
    driver = None
    try:
        fit = _check_cluster(ray, config, storage_url)
        config = replace(config, concurrency=config.concurrency or fit)
        driver = _Driver(ray, config, spec, storage_url, study_name, cache_bytes,
                         None if cache_dir is None else str(cache_dir))
        if fit < config.concurrency:
            echo(f"note: the cluster fits {fit} trials at once; the other {config.concurrency - fit} workers wait for room")
        workers = [driver.start(primary=i == 0) for i in range(config.concurrency)]  # they load the model in parallel
        if existing is None or not existing.user_attrs.get(BASELINES_ATTR):
            driver.call(workers[0], "prepare", spec.to_dict(), n_trials)
        study = load_existing(storage, study_name)
        study.set_user_attr(TARGET_ATTR, n_trials)
        echo(f"study {study_name!r} in {mask_url(storage_url)} (spec {spec.digest()}) on Ray: "
             f"{config.concurrency} workers x {config.cpus_per_trial:g} CPU, {config.gpus_per_trial:g} GPU")
        counts = driver.work(study, n_trials, progress)
        return SearchOutcome(study_name, count_completed(study), counts.ran, counts.failed, counts.pruned, counts.reused)
    finally:
        if driver is not None:
            driver.close()
        if started:
            ray.shutdown()


class _Driver:
    """Starts, watches and replaces the actors of one run."""

    def __init__(self, ray, config: RayConfig, spec: StudySpec, storage_url: str, study_name: str, cache_bytes: int,
                 cache_dir: str | None) -> None:
        self.ray = ray
        self.config = config
        self.args = (spec.to_dict(), storage_url, study_name)
        self.cache = (cache_bytes, cache_dir)
        self.token = uuid.uuid4().hex[:6]
        self.actors: dict[str, Any] = {}     # worker id -> actor handle (alive or not yet known dead)
        self.started = 0
        self.study = None

    def start(self, primary: bool = False) -> str:
        worker = f"ray-{self.token}-{self.started}"
        self.started += 1
        actor_class = _actor_class(self.ray, self.config)
        threads = max(1, int(self.config.cpus_per_trial))
        self.actors[worker] = actor_class.remote(*self.args, worker, primary, threads, *self.cache)
        return worker

    def call(self, worker: str, method: str, *args):
        """A blocking call on one actor; its autocomp errors come back as themselves."""
        try:
            return self.ray.get(getattr(self.actors[worker], method).remote(*args))
        except self.ray.exceptions.RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, AutocompError):
                raise cause from None
            raise
        except self.ray.exceptions.RayActorError as exc:
            failure = _init_failure(exc)
            if failure is not None:
                raise failure from None
            raise

    def work(self, study, n_trials: int, progress: bool) -> LoopCounts:
        ray = self.ray
        self.study = study
        counts = LoopCounts()
        running: dict[Any, str] = {}    # object ref of run() -> worker id
        for worker in list(self.actors):
            running[self.actors[worker].run.remote(n_trials)] = worker
        restarts = self.config.max_worker_restarts
        bar = progress_bar(progress, n_trials, count_completed(study))
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                done, busy = trial_counts(study)
                if bar is not None:
                    bar.n = min(done, n_trials)
                    bar.refresh()
                for ref in ready:
                    worker = running.pop(ref)
                    try:
                        counts.add(LoopCounts(**ray.get(ref)))
                        self.actors.pop(worker, None)
                    except ray.exceptions.RayTaskError as exc:
                        cause = _cause(exc)
                        if isinstance(cause, AutocompError):
                            raise cause from None
                        raise
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                        failure = _init_failure(exc)
                        if failure is not None:
                            raise failure from None
                        self.actors.pop(worker, None)
                        reason = f"Ray worker {worker} died: {type(exc).__name__}"
                        lost = fail_worker_trials(study, worker, reason)
                        counts.failed += lost
                        say(bar, print, f"{reason}; {lost} running trial(s) queued again")
                        if count_completed(study) < n_trials and restarts > 0:
                            restarts -= 1
                            replacement = self.start()
                            running[self.actors[replacement].run.remote(n_trials)] = replacement
                if done >= n_trials and running and not busy:
                    # complete: the workers still listed are idle (they return within a poll) or were never placed
                    ready, _ = ray.wait(list(running), num_returns=len(running), timeout=DRAIN_S)
                    for ref in ready:
                        try:
                            counts.add(LoopCounts(**ray.get(ref)))
                            self.actors.pop(running[ref], None)
                        except ray.exceptions.RayError:
                            pass
                    break
            if count_completed(study) < n_trials:
                raise StudyError(f"every Ray worker died and the {self.config.max_worker_restarts} replacements are "
                                 f"spent; the study is kept ({count_completed(study)}/{n_trials} trials): re-run to resume")
        except KeyboardInterrupt:
            self.close(reason="interrupted (Ctrl-C)")
            raise
        finally:
            if bar is not None:
                bar.close()
        return counts

    def close(self, reason: str = "the Ray run ended") -> None:
        """Kill the actors still listed and, once they are dead (a kill is asynchronous: an actor could
        still claim a trial meanwhile), fail their running trials and queue them again."""
        ray = self.ray
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        for worker, actor in list(self.actors.items()):
            try:  # queued behind its run(): answers only by failing, once the actor is dead
                ray.get(actor.where.remote(), timeout=KILL_WAIT_S)
            except Exception:  # RayActorError (dead, as expected) or a timeout
                pass
            if self.study is not None:
                fail_worker_trials(self.study, worker, reason)
        self.actors.clear()
