"""Storage URLs: defaults, validation, opening, and hiding credentials.

The Optuna RDB storage is the single source of truth of a study. Supported URLs: ``sqlite:///PATH``
(the default, ``results/<study>/study.db``), ``postgresql://...`` and ``mysql://...`` (need their
drivers). SQLite is opened with a 60 s busy timeout so that a reader (``pareto``, a test) and the
writing search can share the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from autocomp.errors import StorageError

SCHEMES = ("sqlite", "postgresql", "mysql")


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


def open_storage(url: str, must_exist: bool = False):
    """An ``optuna.storages.RDBStorage`` for ``url``; raises StorageError with the masked URL.
    ``must_exist``: refuse a SQLite file that does not exist yet (readers must not create one)."""
    validate_url(url)
    if must_exist and url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1]).expanduser()
        if not path.is_file():
            raise StorageError(f"no study storage at {path}; check --storage (it is created by 'autocomp search')")
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:  # sqlalchemy / driver errors of many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {mask_url(url)}: {mask_url(first)}") from None
