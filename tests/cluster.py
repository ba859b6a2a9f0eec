"""Real services for the ``cluster`` tests: PostgreSQL and Ray.

CI starts them with ``scripts/services.sh start`` (a private PostgreSQL on 127.0.0.1:55432 and a two-node
Ray cluster on 127.0.0.1:6390) and exports their addresses (``AUTOCOMP_TEST_POSTGRES_URL``,
``AUTOCOMP_TEST_RAY_ADDRESS``); the fixtures in conftest.py read them. Tests that must break a cluster
(kill a node) start their own with :func:`start_private_ray_cluster` and leave the shared one alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

POSTGRES_ENV = "AUTOCOMP_TEST_POSTGRES_URL"
RAY_ENV = "AUTOCOMP_TEST_RAY_ADDRESS"
REQUIRE_ENV = "AUTOCOMP_REQUIRE_CLUSTER"
HINT = "run scripts/services.sh start and source its env.sh"

RAY_BIN = Path(sys.executable).with_name("ray")
OBJECT_STORE_BYTES = 100_000_000  # per node; Ray's minimum is 75 MB
# Node death detected after about period * threshold: measured 2.8 s, against 14.9 s with Ray's
# defaults (5 failed checks 3 s apart). Passed to the head with --system-config (GCS runs the checks).
FAST_HEALTH_CHECK = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def require_cluster() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


# ---------------------------------------------------------------- PostgreSQL


def sqlalchemy_url(url: str) -> str:
    """``url`` with an explicit driver SQLAlchemy can load. SQLAlchemy 2.1 maps a bare ``postgresql://``
    to psycopg 3; the test environment has psycopg2 (psycopg2-binary)."""
    if url.startswith("postgresql://"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead (same scheme, credentials and server)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def check_postgres(url: str, timeout: float = 10.0) -> str:
    """Connect to ``url`` and return the server version; raises on failure."""
    import sqlalchemy as sa

    engine = sa.create_engine(sqlalchemy_url(url), connect_args={"connect_timeout": int(timeout)},
                              poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as con:
            return con.execute(sa.text("SHOW server_version")).scalar_one()
    finally:
        engine.dispose()


def create_database(url: str, prefix: str = "autocomp_t") -> str:
    """Create a new, uniquely named database on ``url``'s server (the role needs CREATEDB); its URL."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(sqlalchemy_url(url), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as con:
            con.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return with_database(url, name)


def drop_database(url: str) -> None:
    """Drop ``url``'s database after ending its other connections (run from the server's main database)."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    admin = sa.create_engine(sqlalchemy_url(with_database(url, "postgres")), isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as con:
            con.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
            con.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


# ---------------------------------------------------------------- Ray


def alive_ray_nodes(address: str, timeout: float = 60.0) -> int:
    """The number of alive nodes of the Ray cluster at ``address``, asked from a fresh process (so the
    test process does not become a Ray driver)."""
    if not _port_open(address):  # ray.init would retry a missing head for about a minute
        raise RuntimeError(f"nothing listens on {address}")
    code = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False, "
            "configure_logging=False); print(len([n for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"cannot connect to Ray at {address}: {out.stderr.strip()[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def free_port(start: int = 6400, stop: int = 6500) -> int:
    """A port in [start, stop) that is free together with the next one (a private head uses both: GCS and
    dashboard), away from the CI cluster (6390) and Ray's defaults (6379, 8265, 10001)."""
    for port in range(start, stop, 2):
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("", p))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port pair in {start}..{stop}")


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: the group id is the leader's pid
    except ProcessLookupError:
        pass


@dataclass
class PrivateRayCluster:
    """A Ray cluster of its own: ``head`` and each of ``nodes`` is a ``ray start --block`` process leading
    its own process group (``os.killpg(node.pid, signal.SIGKILL)`` loses that node abruptly)."""

    address: str
    head: subprocess.Popen
    nodes: list[subprocess.Popen]
    temp_dir: Path
    log_dir: Path
    _stopped: bool = field(default=False, repr=False)

    def kill_node(self, index: int) -> None:
        """SIGKILL worker node ``index``'s whole process group (its raylet and agents)."""
        _kill_group(self.nodes[index], signal.SIGKILL)
        self.nodes[index].wait(timeout=10)

    def stop(self) -> None:
        """Stop every node (SIGTERM: ``ray start --block`` shuts its processes down; SIGKILL after 15 s)
        and remove the temp dir. Never touches other Ray clusters (unlike ``ray stop``)."""
        if self._stopped:
            return
        self._stopped = True
        procs = [*self.nodes, self.head]
        for p in procs:
            if p.poll() is None:
                _kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:  # also any process left in the group (a raylet that ignored SIGTERM)
            _kill_group(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> PrivateRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _popen_node(args: list[str], log: Path) -> subprocess.Popen:
    # RAY_AUTH_MODE=disabled: `ray start --head` turns token auth on whenever ~/.ray/auth_token exists
    # (any local ray.init() of Ray 2.60 writes one), while a driver given an explicit address does not
    # send it: the driver would be refused. No drain on SIGTERM (Ray otherwise waits up to 30 s).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with log.open("wb") as out:
        return subprocess.Popen([str(RAY_BIN), "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)


def _wait_alive(address: str, count: int, procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"ray start exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            # ray.init retries a missing head for a long time: ask only once the port answers
            if alive_ray_nodes(address, timeout=30) >= count:
                return
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"Ray cluster at {address} has not {count} alive nodes after {timeout:.0f} s ({last})")


def start_private_ray_cluster(tmp_path: Path, port: int, cpus_per_node: int = 1, nodes: int = 2,
                              node_resources: dict | None = None, timeout: float = 120.0,
                              system_config: dict | None = None) -> PrivateRayCluster:
    """Start a separate local Ray cluster: a head on 127.0.0.1:``port`` and ``nodes - 1`` worker nodes,
    each ``ray start --block`` in its own process group, with fast node-death detection
    (``system_config``, default :data:`FAST_HEALTH_CHECK`; ``{}`` for Ray's defaults). ``node_resources``: custom resources of every worker node (not the head),
    e.g. ``{"doomed": 1}`` to pin tasks there. Logs go to ``tmp_path``; Ray's temp dir is a short folder
    under /tmp (Ray's unix socket paths must stay under 107 bytes, and pytest's tmp_path is too deep).
    The caller must ``stop()`` it (or use it as a context manager)."""
    log_dir = Path(tmp_path)
    log_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="acray-", dir="/tmp"))
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node),
              "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
    head_log = log_dir / "ray-head.log"
    head = _popen_node(["--head", "--port", str(port), "--include-dashboard=false",
                        # keep clear of another head's dashboard port on this machine (default 8265)
                        "--dashboard-port", str(port + 1),
                        "--temp-dir", str(temp_dir), "--system-config", json.dumps(FAST_HEALTH_CHECK if system_config is None else system_config), *common],
                       head_log)
    cluster = PrivateRayCluster(address=address, head=head, nodes=[], temp_dir=temp_dir, log_dir=log_dir)
    try:
        _wait_alive(address, 1, [head], [head_log], timeout)
        logs = [head_log]
        extra = ["--resources", json.dumps(node_resources)] if node_resources else []
        for i in range(1, nodes):
            log = log_dir / f"ray-node-{i}.log"
            cluster.nodes.append(_popen_node(["--address", address, *common, *extra], log))
            logs.append(log)
        _wait_alive(address, nodes, [head, *cluster.nodes], logs, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_node_dead(node_id: str, timeout: float = 30.0, poll: float = 0.1) -> float:
    """Seconds until the connected Ray cluster (``ray.init`` done in this process) reports node
    ``node_id`` dead; TimeoutError after ``timeout``."""
    import ray

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        state = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        if not state.get(node_id, False):
            return time.monotonic() - t0
        time.sleep(poll)
    raise TimeoutError(f"Ray still reports node {node_id} alive after {timeout:.0f} s")
