"""Strict JSON for everything autocomp prints or writes: non-finite numbers become ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON (``jq``, browsers and most
parsers reject them). Every JSON output (``--json`` of the commands, the report's files) goes
through :func:`dumps`, which converts them and then refuses any that is left (``allow_nan=False``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, tuples made lists and keys made strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)``, strict (``allow_nan=False``)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)
