"""Named errors of autocomp.

Every error a user can cause derives from :class:`AutocompError`. The CLI prints
``autocomp: error: <message>`` on one line and exits with the class's ``exit_code``;
no traceback is shown for these. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AutocompError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class ModelLoadError(AutocompError):
    """A model id, folder or GGUF file cannot be resolved or loaded."""


class DataError(AutocompError):
    """A text source cannot be read, or yields too few tokens for the windows asked for."""


class PlanError(AutocompError):
    """A compression plan is malformed or asks for something a layer cannot do."""


class SpaceError(AutocompError):
    """A search-space YAML file has an unknown key or a bad value."""


class BudgetError(AutocompError):
    """A budget is malformed or cannot be met by any configuration of the search space."""


class StorageError(AutocompError):
    """A storage URL is malformed or the storage cannot be opened."""


class StudyError(AutocompError):
    """A study is missing, or exists with a different specification."""


class TrialNotFoundError(StudyError):
    """A trial number does not name a completed trial of the study."""


class TaskError(AutocompError):
    """An evaluation task (lm-eval) is unknown, cannot be read offline, or reports no usable metric."""


class DependencyError(AutocompError):
    """An optional package needed for this command is not installed."""


class ReportError(AutocompError):
    """A report or dashboard cannot be written or served (folder, port, malformed stored results)."""


class ClusterError(AutocompError):
    """A Ray cluster cannot be reached, cannot run a trial (resources), or cannot reach the storage."""


class NonFiniteScoreError(AutocompError):
    """A compressed model scores a non-finite perplexity, KL or objective value (a broken model):
    the trial is recorded as failed with this reason, never as completed."""


class EngineError(AutocompError):
    """A serving engine (llama.cpp) refuses a file or an operation; the message quotes what it logged."""


class ExportError(AutocompError):
    """An export cannot be written (disk full, permissions) or its format cannot hold the configuration."""


class DiskFullError(AutocompError):
    """A write failed because the disk (or the file-size limit, ``ulimit -f``) is full."""


_DISK_FULL_ERRNOS = (28, 27, 122)   # ENOSPC, EFBIG, EDQUOT
_DISK_FULL_TEXT = ("no space left on device", "file too large", "disk quota exceeded", "database or disk is full",
                   "disk i/o error", "os error 28", "os error 27", "os error 122")


def disk_full_error(exc: BaseException) -> DiskFullError | None:
    """The :class:`DiskFullError` that ``exc`` (or an exception it was raised from) stands for: an
    OSError with ENOSPC / EFBIG / EDQUOT, or a library's wrapping of one (safetensors, SQLite through
    SQLAlchemy and Optuna); None for anything else. What was written before stays as it was: the
    study storage's transactions and autocomp's write-then-rename files are never left half done."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = " ".join(str(current).split())
        if (isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS) or \
                any(t in text.lower() for t in _DISK_FULL_TEXT):
            detail = current.strerror if isinstance(current, OSError) and current.strerror else text.split(" (Background")[0]
            where = f" ({current.filename})" if isinstance(current, OSError) and current.filename else ""
            return DiskFullError(f"a write failed: {detail[:200]}{where}; the disk or the file-size limit is full: "
                                 "free space (or raise ulimit -f) and run the command again; what was stored "
                                 "before (finished trials, complete exports) is intact")
        current = current.__cause__ or current.__context__
    return None



_DISK_ERRNOS = {27: "file too large", 28: "no space left on the device", 122: "disk quota exceeded"}
_DISK_TEXTS = {"os error 27": "file too large", "os error 28": "no space left on the device",
               "file too large": "file too large", "no space left": "no space left on the device",
               "database or disk is full": "no space left on the device", "disk i/o error": "disk I/O error"}


def disk_write_failure(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) is a failed write to a full or size-limited
    disk, in words; None when it is something else. Libraries wrap the OSError (safetensors, SQLite
    through SQLAlchemy and Optuna), so the whole cause chain and the messages are looked at."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return _DISK_ERRNOS[exc.errno]
        text = str(exc).lower()
        for needle, reason in _DISK_TEXTS.items():
            if needle in text:
                return reason
        exc = exc.__cause__ or exc.__context__
    return None
