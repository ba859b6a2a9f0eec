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


class ExportError(AutocompError):
    """An export cannot be written (disk full, permissions) or its format cannot hold the configuration."""
