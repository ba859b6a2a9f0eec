"""A per-layer plan laid out as a grid: rows are layer types, columns are decoder blocks.

A layer named ``<prefix>.<block>.<path>`` (``model.layers.3.mlp.down_proj``) sits in row ``<path>``
(shortened to its last part, ``down_proj``, when that is unambiguous) and column ``<block>``. A layer
outside the blocks (``model.embed_tokens``, ``lm_head``) gets a row of its own and the single column
:data:`NON_BLOCK`. Pattern keys (``re:...``) and a plan's ``default`` name no single layer and are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

NON_BLOCK = "non-block"
DENSE_BITS = 16
_BLOCK_RE = re.compile(r"^(?P<prefix>.*?)\.(?P<block>\d+)\.(?P<path>.+)$")


@dataclass(frozen=True)
class LayerCell:
    name: str
    method: str
    bits: int
    sparsity: float
    pattern: str
    group_size: int | None

    def describe(self) -> str:
        parts = [self.method, f"{self.bits} bits"]
        if self.sparsity:
            parts.append(f"sparsity {self.sparsity:g}" + (f" ({self.pattern})" if self.pattern != "unstructured" else ""))
        if self.bits < DENSE_BITS and self.group_size is not None:
            parts.append(f"group {self.group_size}" if self.group_size > 0 else "per channel")
        return ", ".join(parts)


@dataclass(frozen=True)
class LayerGrid:
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    cells: Mapping[tuple[str, str], LayerCell]

    def values(self, attribute: str, rows: Sequence[str] | None = None,
               columns: Sequence[str] | None = None) -> list[list[float | None]]:
        """``attribute`` (``bits`` or ``sparsity``) of every cell, row by row (on this grid's axes, or on
        the ``rows`` x ``columns`` given, see :func:`merged_axes`); None where no layer is."""
        return [[_number(self.cells.get((row, col)), attribute) for col in (columns or self.columns)]
                for row in (rows or self.rows)]

    def texts(self, rows: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> list[list[str]]:
        """Description of every cell (empty where no layer is), laid out as :meth:`values`."""
        return [[(c.name + ": " + c.describe()) if (c := self.cells.get((row, col))) else ""
                 for col in (columns or self.columns)] for row in (rows or self.rows)]

    @property
    def empty(self) -> bool:
        return not self.cells


def _number(cell: LayerCell | None, attribute: str) -> float | None:
    return None if cell is None else float(getattr(cell, attribute))


def layer_cell(name: str, plan: Mapping[str, Any]) -> LayerCell:
    group = plan.get("group_size")
    return LayerCell(name=name, method=str(plan.get("method", "none")), bits=int(plan.get("bits", DENSE_BITS)),
                     sparsity=float(plan.get("sparsity", 0.0)), pattern=str(plan.get("pattern", "unstructured")),
                     group_size=int(group) if isinstance(group, int) else None)


def layer_grid(plan: Mapping[str, Any]) -> LayerGrid:
    """The grid of an explicit plan dict (``{"layers": {name: layer plan}}``)."""
    layers = plan.get("layers") or {}
    placed: list[tuple[tuple[str, str], int | None, LayerCell]] = []   # ((prefix, path), block, cell)
    for name, entry in layers.items():
        if not isinstance(name, str) or name.startswith("re:") or not isinstance(entry, Mapping):
            continue
        match = _BLOCK_RE.match(name)
        if match:
            placed.append(((match["prefix"], match["path"]), int(match["block"]), layer_cell(name, entry)))
        else:
            placed.append((("", name), None, layer_cell(name, entry)))
    labels = _row_labels([key for key, block, _ in placed if block is not None])
    block_rows: list[str] = []
    other_rows: list[str] = []
    blocks: set[int] = set()
    cells: dict[tuple[str, str], LayerCell] = {}
    for key, block, cell in placed:
        if block is None:
            row, col = cell.name, NON_BLOCK
            if row not in other_rows:
                other_rows.append(row)
        else:
            row, col = labels[key], str(block)
            blocks.add(block)
            if row not in block_rows:
                block_rows.append(row)
        cells[(row, col)] = cell
    columns = [str(b) for b in sorted(blocks)] + ([NON_BLOCK] if other_rows else [])
    return LayerGrid(tuple(block_rows + other_rows), tuple(columns), cells)


def _row_labels(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Shortest unambiguous row label of every (prefix, path): the path's last part, else the path,
    else prefix and path."""
    distinct = list(dict.fromkeys(keys))
    for label_of in (lambda k: k[1].rsplit(".", 1)[-1], lambda k: k[1], lambda k: f"{k[0]}.*.{k[1]}"):
        labels = {k: label_of(k) for k in distinct}
        if len(set(labels.values())) == len(distinct):
            return labels
    return {k: f"{k[0]}.*.{k[1]}" for k in distinct}


def merged_axes(grids: Sequence[LayerGrid]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Rows and columns covering every grid (block rows first, blocks in order, non-block column last),
    so that several plans can be shown on one set of axes."""
    rows: list[str] = []
    other: list[str] = []
    blocks: set[int] = set()
    for grid in grids:
        for row in grid.rows:
            in_blocks = any(col != NON_BLOCK for (r, col) in grid.cells if r == row)
            target = rows if in_blocks else other
            if row not in target:
                target.append(row)
        blocks.update(int(col) for col in grid.columns if col != NON_BLOCK)
    has_other = any(NON_BLOCK in grid.columns for grid in grids)
    columns = [str(b) for b in sorted(blocks)] + ([NON_BLOCK] if has_other else [])
    return tuple(rows + [r for r in other if r not in rows]), tuple(columns)
