"""Late imports of optional packages, with one error for a missing one.

Heavy or optional packages (Ray, plotly, matplotlib, lm-eval, gguf, optuna-dashboard, the bundled
model) are imported where they are used, never at ``import autocomp``. :func:`optional` imports one
and turns a missing package into a :class:`~autocomp.errors.DependencyError` that says what needs it,
which package is missing and what to install, so every optional dependency fails the same way (one
line, exit 2)::

    ray = optional("ray", "the Ray backend", "pip install 'autocomp[cluster]'")
"""

from __future__ import annotations

import importlib
from types import ModuleType

from autocomp.errors import DependencyError

# llama-cpp-python has no wheel on PyPI: the extra compiles it
LLAMA_CPP_INSTALL = ("pip install 'autocomp[llamacpp]' (or bash scripts/setup.sh --llama-cpp; it compiles llama.cpp, "
                     "10-15 minutes)")


def optional(module: str, needed_by: str, install: str) -> ModuleType:
    """Import ``module``; DependencyError("<needed_by>: package '<name>' is not installed; <install>")
    when it (or a package it imports) is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module.split(".")[0]
        raise DependencyError(f"{needed_by}: package {missing.split('.')[0]!r} is not installed; {install}") from None
