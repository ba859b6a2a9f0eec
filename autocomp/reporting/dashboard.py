"""``autocomp dashboard``: optuna-dashboard on a study storage (a live view while a search runs)."""

from __future__ import annotations

import errno

from autocomp._imports import optional
from autocomp.errors import ReportError
from autocomp.store.urls import mask_url, open_storage


def run_dashboard(storage_url: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard for every study in ``storage_url`` at ``http://host:port/``; blocks
    until the server stops (Ctrl-C).

    Raises StorageError for a bad URL or a storage that does not exist, DependencyError when
    optuna-dashboard is not installed, ReportError when the port is taken.
    """
    run_server = optional("optuna_dashboard", "the dashboard",
                          "pip install optuna-dashboard (or pip install 'autocomp[dashboard]')").run_server
    storage = open_storage(storage_url, must_exist=True)
    try:
        run_server(storage, host=host, port=port)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise ReportError(f"cannot serve the dashboard of {mask_url(storage_url)} on {host}:{port}: "
                                f"{exc.strerror}; choose another --port or --host") from None
        raise
