"""The export-format registry: :class:`ExportFormat`, :func:`register_format`, :func:`get_format`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from autocomp.errors import PlanError

if TYPE_CHECKING:
    from autocomp.inputs.models import LoadedModel
    from autocomp.pipeline.apply import AppliedPlan


@dataclass(frozen=True)
class ExportOptions:
    """Options every format receives; a format reads those that apply to it."""

    dtype: str = "float16"          # storage dtype of the tensors kept in 16-bit floats
    target: str | None = None       # the engine the export must be servable by (one of the format's targets)


@dataclass(frozen=True)
class ExportFormat:
    name: str
    description: str                               # one line: what it is and which engines load it
    write: Callable[[Path, "AppliedPlan", "LoadedModel", ExportOptions], dict[str, Any]]
    load: Callable[[Path], Any]
    check: Callable[["AppliedPlan", ExportOptions], None] = field(default=lambda applied, options: None)
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    targets: tuple[str, ...] = ()                  # engines ``--target`` can check the export against


def sparse_layers(applied: "AppliedPlan") -> dict[str, str]:
    """``{layer: "2:4" | "unstructured 0.5"}`` of every pruned layer: what a format without sparse
    storage writes as zeros and states in ``autocomp.json``."""
    return {t.name: p.pattern if p.nm else f"unstructured {p.sparsity:g}" for t in applied.targets
            if (p := applied.per_layer.get(t.name)) is not None and p.pruner is not None}


def refuse(problems: list[str], what: str, advice: str) -> None:
    """PlanError ``"<what>: <first six problems>[; and N more]. <advice>"`` when there are problems."""
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise PlanError(f"{what}: {shown}. {advice}")


_FORMATS: dict[str, ExportFormat] = {}
# what ``export`` / ``compress`` write unless told otherwise: loads with plain from_pretrained, stays low-bit on disk
DEFAULT_FORMAT = "compressed-tensors"


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to the registry (a name registered twice is a programming error)."""
    if fmt.name in _FORMATS:
        raise ValueError(f"export format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def available_formats() -> list[str]:
    return sorted(_FORMATS)


def get_format(name: str) -> ExportFormat:
    """The registered format ``name``; PlanError naming the formats otherwise."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise PlanError(f"export format {name!r} is not one of {', '.join(available_formats())}") from None
