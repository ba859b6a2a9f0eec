"""Storage URLs: defaults, validation, opening, and hiding credentials.

The Optuna RDB storage is the single source of truth of a study. Supported URLs: ``sqlite:///PATH``
(the default, ``results/<study>/study.db``), ``postgresql://...`` and ``mysql://...`` (need their
drivers). SQLite is opened with a 60 s busy timeout, in WAL mode and with immediate transactions, so
that readers (``pareto``, a test, the dashboard) and several local writers (``autocomp worker``
processes, Ray workers of one machine) share the file safely and never claim the same trial; it must live on a local disk (not NFS), and a cluster whose workers
run on other machines needs PostgreSQL (the Ray backend refuses SQLite there).

Workers open the storage with ``heartbeat=True``: Optuna's heartbeat table then tells which running
trials lost their worker (see :mod:`autocomp.study.recovery`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from autocomp.errors import StorageError, StudyError

SCHEMES = ("sqlite", "postgresql", "mysql")
DEFAULT_HEARTBEAT_S = 10


def heartbeat_interval() -> int:
    """Seconds between heartbeats (``AUTOCOMP_HEARTBEAT_S``, default 10)."""
    raw = os.environ.get("AUTOCOMP_HEARTBEAT_S", str(DEFAULT_HEARTBEAT_S))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise StudyError(f"AUTOCOMP_HEARTBEAT_S must be a whole number of seconds >= 1, got {raw!r}")
    return value


def grace_period() -> int:
    """A running trial without a heartbeat for this long is dead: 6 missed beats, at least 6 s."""
    return 6 * heartbeat_interval()


def default_storage_url(study_name: str, results_dir: str | Path = "results") -> str:
    folder = Path(results_dir) / study_name
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'study.db'}"


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, errors and reports)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def validate_url(url: str) -> None:
    """Raise StorageError unless ``url`` is a supported, well-formed storage URL."""
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise StorageError(f"storage URL {mask_url(url)!r} is not supported; use sqlite:///path/study.db or postgresql://user@host/db")
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path:
            raise StorageError(f"storage URL {url!r} names no file; write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        parent = Path(path).expanduser().parent
        if not parent.is_dir():
            raise StorageError(f"storage URL {url!r}: folder {parent} does not exist; create it or choose another path")
        if Path(path).is_dir():
            raise StorageError(f"storage URL {url!r} names a folder, not a database file")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def engine_url(url: str) -> str:
    """``url`` with an installed driver named: a bare ``postgresql://`` means psycopg 3 to SQLAlchemy 2.1
    and psycopg2 to 2.0, so name whichever is installed (psycopg 3 first)."""
    if url.startswith("postgresql://"):
        for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if _installed(module):
                return f"postgresql+{driver}://" + url[len("postgresql://"):]
        raise StorageError("PostgreSQL storage needs a driver: pip install 'autocomp[cluster]' (psycopg2-binary) "
                           "or psycopg[binary]")
    return url


def open_storage(url: str, must_exist: bool = False, heartbeat: bool = False):
    """An ``optuna.storages.RDBStorage`` for ``url``; raises StorageError with the masked URL.
    ``must_exist``: refuse a SQLite file that does not exist yet (readers must not create one).
    ``heartbeat``: record and check trial heartbeats (for workers; see :mod:`autocomp.study.recovery`)."""
    validate_url(url)
    if must_exist and is_sqlite(url):
        path = Path(url.split(":///", 1)[1]).expanduser()
        if not path.is_file():
            raise StorageError(f"no study storage at {path}; check --storage (it is created by 'autocomp search')")
    import optuna

    target = engine_url(url)
    kwargs = {"connect_args": {"timeout": 60}} if is_sqlite(url) else {"pool_pre_ping": True}
    beat = {}
    if heartbeat:

        beat = {"heartbeat_interval": heartbeat_interval(), "grace_period": grace_period()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks the heartbeat arguments experimental
            storage = optuna.storages.RDBStorage(target, engine_kwargs=kwargs, **beat)
        if is_sqlite(url):
            _wal(url)
            _serialise_sqlite(storage.engine)
        return storage
    except Exception as exc:  # sqlalchemy / driver errors of many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {mask_url(url)}: {mask_url(first)}") from None


def _serialise_sqlite(engine) -> None:
    """Every transaction ``BEGIN IMMEDIATE``: SQLite ignores ``SELECT ... FOR UPDATE``, so two processes
    could both read a queued trial as waiting and both claim it (Optuna's read-check-write in
    ``set_trial_state_values``); an immediate transaction takes the write lock before reading, which
    makes such read-check-writes atomic across processes. Connections opened before are dropped."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection, _record):
        dbapi_connection.isolation_level = None   # the driver's own BEGIN (deferred) off: ours below

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def _wal(url: str) -> None:
    """Switch the SQLite file to write-ahead logging (persistent: once per file): readers never block
    the writer and several local processes can write in turn."""
    import sqlite3

    path = url.split(":///", 1)[1]
    if path in ("", ":memory:"):
        return
    con = sqlite3.connect(Path(path).expanduser(), timeout=60)
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()
