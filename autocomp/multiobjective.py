"""Pareto maths on objective vectors (every objective minimised): dominance, the non-dominated
filter and the 2-D hypervolume. Pure functions; nothing here knows about studies or storage."""

from __future__ import annotations

from typing import Any, Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in at least one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: list[tuple[Sequence[float], Any]]) -> list[Any]:
    """Items whose objective vectors no other item dominates (duplicates all kept)."""
    return [item for vec, item in points if not any(dominates(other, vec) for other, _ in points)]


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both objectives minimised) and bounded by ``reference``."""
    pts = sorted((x, y) for x, y in points if x < reference[0] and y < reference[1])
    area, prev_y = 0.0, reference[1]
    for x, y in pts:  # sweep by the first objective, adding each step of the staircase
        if y < prev_y:
            area += (reference[0] - x) * (prev_y - y)
            prev_y = y
    return area
