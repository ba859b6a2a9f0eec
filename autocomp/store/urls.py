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


_STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_study_name(name: str) -> str:
    """``name`` when it is a safe study name, else StudyError: one path component of 1-128 letters,
    digits, ``.``, ``_`` and ``-``, not starting with ``.`` (the default storage is
    ``results/<name>/study.db``, so a name must not leave ``results/`` or nest folders). Every
    entry point that creates a study, forms a path from its name or works on it (search, prepare,
    worker, the default storage URL, study creation) checks it here; readers of an existing storage
    read any name it holds."""
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name):
        shown = name if isinstance(name, str) else type(name).__name__
        raise StudyError(f"study name {shown!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
                         "not starting with '.' (a single folder name under results/)")
    return name


def safe_study_name(text: str) -> str:
    """``text`` made into a name that :func:`check_study_name` accepts (for derived default names)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip(".-")[:128]
    return name or "study"


def default_storage_url(study_name: str, results_dir: str | Path = "results") -> str:
    folder = Path(results_dir) / check_study_name(study_name)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'study.db'}"


_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|cred", re.IGNORECASE)


def _url_parts(url: str) -> tuple[str, str, str, str, str]:
    """``(scheme://, userinfo, host and path, ?query, #fragment)`` split by hand, so that even a URL
    no parser accepts (an unencoded ``@`` or ``/`` in the password) is masked: the userinfo ends at
    the last ``@`` before the query."""
    head, hash_, fragment = url.partition("#")
    base, q, query = head.partition("?")
    scheme, sep, rest = base.partition("://")
    if not sep:
        return "", "", base, q + query, hash_ + fragment
    userinfo, at, hostpath = rest.rpartition("@")
    if not at or userinfo.startswith("/"):
        return scheme + sep, "", rest, q + query, hash_ + fragment
    return scheme + sep, userinfo + "@", hostpath, q + query, hash_ + fragment


def url_secrets(url: str) -> list[str]:
    """The secrets a URL carries: its password and the values of secret-looking query parameters."""
    _, userinfo, _, query, _ = _url_parts(url)
    out = []
    if ":" in userinfo:
        out.append(userinfo[:-1].split(":", 1)[1])
    for pair in re.split(r"[&;]", query[1:]):
        key, eq, value = pair.partition("=")
        if eq and value and _SECRET_KEY.search(key):
            out.append(value)
    return [s for s in out if s]


def mask_url(url: str) -> str:
    """The URL with every secret replaced by ``***`` (for logs, errors and reports): the password of
    ``user:pass@`` and ``:pass@``, and the value of any query parameter whose name looks secret
    (``password``, ``sslpassword``, ``passwd``, ``pwd``, ``token``, ``secret``, ``*key``, ``auth*``)."""
    scheme, userinfo, hostpath, query, fragment = _url_parts(url)
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***@"

    def hide(m: re.Match) -> str:
        return f"{m.group(1)}{m.group(2)}=***" if _SECRET_KEY.search(m.group(2)) else m.group(0)

    query = re.sub(r"([?&;])([^=&;]*)=([^&;]*)", hide, query)
    return scheme + userinfo + hostpath + query + fragment


def mask_secrets(text: str, url: str) -> str:
    """``text`` (a driver's error message) with the URL's secrets replaced by ``***`` wherever they
    occur, and the URL itself masked."""
    text = text.replace(url, mask_url(url))
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def validate_url(url: str) -> None:
    """Raise StorageError unless ``url`` is a supported, well-formed storage URL."""
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise StorageError(f"storage URL {mask_url(url)!r} is not supported; use sqlite:///path/study.db or postgresql://user@host/db")
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path:
            raise StorageError(f"storage URL {mask_url(url)!r} names no file; write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        parent = Path(path).expanduser().parent
        if not parent.is_dir():
            raise StorageError(f"storage URL {mask_url(url)!r}: folder {parent} does not exist; create it or choose another path")
        if Path(path).is_dir():
            raise StorageError(f"storage URL {mask_url(url)!r} names a folder, not a database file")


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
        raise StorageError(f"cannot open storage {mask_url(url)}: {mask_secrets(first, url)}") from None


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
