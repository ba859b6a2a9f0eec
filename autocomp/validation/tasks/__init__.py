"""Built-in lm-eval tasks that autocomp builds offline from data it already has.

Each built-in task is a folder with an lm-eval task YAML and its JSONL documents, written under
``$AUTOCOMP_CACHE/tasks/<name>/<content hash>/`` the first time it is asked for; that folder is what
goes into lm-eval's ``TaskManager(include_path=...)``. Nothing here imports lm-eval.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from autocomp.errors import TaskError


def _builders() -> dict[str, Callable[[], Path]]:
    from autocomp.validation.tasks import wikitext_lastword

    return {wikitext_lastword.TASK: wikitext_lastword.prepare}


def builtin_task_names() -> list[str]:
    """Names of the tasks autocomp can build offline, sorted."""
    return sorted(_builders())


def prepare_builtin_task(name: str) -> Path:
    """Build (or reuse) the built-in task ``name``; returns the folder to add to lm-eval's include path.

    Raises TaskError for a name that is not a built-in task, or when its source data cannot be read.
    """
    builders = _builders()
    if name not in builders:
        raise TaskError(f"{name!r} is not a built-in task; built-in tasks: {', '.join(sorted(builders))}")
    return builders[name]()
