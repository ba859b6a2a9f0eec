"""Sensitivity pass: per-group error at every choice of the space, used to seed and pin.

For each group of the space (granularity) and each choice (sparsity level x bits x methods), the
relative output error of its layers is measured on calibration statistics without any forward pass:

    e = sum_layers tr(dW H dW^T) / sum_layers tr(W H W^T)          (H = 2 X X^T / n, the input Hessian)

falling back to the diagonal ``sum_j dW_ij^2 * ||X_j||^2`` when only per-feature norms were collected,
and to ``||dW||^2 / ||W||^2`` for a data-free space. With ``sensitivity: "fisher"`` the error is the
*predicted KL to the dense model* in nats per token, ``1/2 sum_i G_i dW_i Hg dW_i^T`` with the
gradient-weighted factors of :mod:`autocomp.sensitivity.fisher` (one backward pass per calibration window, then
no forward pass at all): each output channel and each calibration token weighted by what it does to
the prediction. With ``sensitivity: "kl"`` the error is instead measured end to end: the KL to the dense model on the first evaluation windows when only that group
is compressed (one short forward pass per group and choice; it captures what a layer's error does
downstream, which the layer-local figure misses). Compressed variants go through the stitcher's
cache, so the trials that follow reuse them.

The table is stored with the study. It is used to

* **seed**: after the uniform baselines, for each uniform configuration that compresses, enqueue the
  allocation of the same size that minimises the summed error (a multiple-choice knapsack solved
  exactly by dynamic programming over sizes rounded up to 1/4096 of the budget), in the spirit of
  OWL / EvoPress non-uniform allocation;
* **pin** (``pin_sensitive = K``): the K groups with the largest error at their cheapest choice are
  fixed to their most accurate choice for the whole study.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from autocomp.config.space import SearchSpace
from autocomp.inputs.targets import Target


def choice_label(values: Mapping[str, Any]) -> str:
    return json.dumps(dict(sorted(values.items())), sort_keys=True)


def _error(delta: torch.Tensor, weight: torch.Tensor, stats) -> tuple[float, float]:
    hessian = getattr(stats, "hessian", None) if stats is not None else None
    if hessian is not None:
        h = hessian.to(torch.float32)
        return float(((delta @ h) * delta).sum()), float(((weight @ h) * weight).sum())
    sq = getattr(stats, "input_sq_norm", None) if stats is not None else None
    if sq is not None:
        d = sq.to(torch.float32).unsqueeze(0)
        return float((delta.pow(2) * d).sum()), float((weight.pow(2) * d).sum())
    return float(delta.pow(2).sum()), float(weight.pow(2).sum())


def sensitivity_table(space: SearchSpace, targets: list[Target], stitcher,
                      kl_probe=None, fisher=None, progress: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {choice label: {"error": e, "bytes": b}}}`` for every group and choice.

    Without ``kl_probe`` or ``fisher`` the error is the relative layer-output error on calibration
    statistics (no forward pass). With ``kl_probe`` (a callable scoring the model as it currently is,
    returning the mean KL to the dense model on a few windows) the error is end to end: the KL when
    only this group is compressed, every other layer dense (one short evaluation per group and
    choice). With ``fisher`` (:class:`~autocomp.sensitivity.fisher.FisherFactors`) it is the predicted KL to the dense model; groups
    with a member that has no factors or no input statistics (the embedding) are then measured with
    ``kl_probe``, so that every error is a KL in nats per token.
    """
    table: dict[str, dict[str, dict[str, float]]] = {}
    probed = False
    groups = space.groups(targets)
    choices = space.group_choices()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * len(choices), desc="sensitivity", unit="choice", dynamic_ncols=True)
    for group, members in groups.items():
        predicted = fisher is not None and all(fisher.covers(t.name) for t in members)
        if fisher is not None and not predicted and kl_probe is None:
            raise ValueError(f"group {group} has no Fisher factors and no KL probe was given to measure it")
        rows: dict[str, dict[str, float]] = {}
        for values in choices:
            plan = space.group_plan(members, values)
            size = space.group_bytes(members, values)
            if plan.is_dense:
                error = 0.0
            elif kl_probe is not None and not predicted:
                stitcher.apply({t.name: plan for t in members})
                error, probed = max(float(kl_probe()), 0.0), True
            else:
                num = den = 0.0
                for t in members:
                    dense = stitcher.dense_weight(t.name).to(torch.float32)
                    delta = stitcher.variant(t.name, plan).to(torch.float32) - dense
                    if predicted:
                        num, den = num + fisher.predicted_kl(t.name, delta), 1.0
                    else:
                        n, d = _error(delta, dense, stitcher.stats.get(t.name))
                        num, den = num + n, den + d
                error = num / den if den > 0 else 0.0
            rows[choice_label(values)] = {"error": error, "bytes": float(size)}
            if bar is not None:
                bar.update(1)
        table[group] = rows
    if bar is not None:
        bar.close()
    if probed:
        stitcher.apply({})
    return table


def _knapsack(table: Mapping[str, Mapping[str, Mapping[str, float]]], budget_bytes: float, resolution: int,
              rounding) -> dict[str, str] | None:
    """Multiple-choice knapsack by dynamic programming over sizes in units of ``budget / resolution``,
    each size converted to units by ``rounding``. None when nothing fits."""
    import numpy as np

    groups = list(table)
    unit = budget_bytes / resolution

    def units(nbytes: float) -> int:
        return int(rounding(nbytes / unit))

    best = np.full(resolution + 1, np.inf)
    best[0] = 0.0
    picks = []
    for g in groups:
        labels = list(table[g])
        new = np.full(resolution + 1, np.inf)
        arg = np.full(resolution + 1, -1, dtype=np.int64)
        for i, label in enumerate(labels):
            cost = units(table[g][label]["bytes"])
            if cost > resolution:
                continue
            candidate = np.full(resolution + 1, np.inf)
            candidate[cost:] = best[: resolution + 1 - cost] + table[g][label]["error"]
            better = candidate < new
            new[better] = candidate[better]
            arg[better] = i
        picks.append((labels, arg))
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None
    chosen: dict[str, str] = {}
    for g, (labels, arg) in zip(reversed(groups), reversed(picks)):
        label = labels[int(arg[end])]
        chosen[g] = label
        end -= units(table[g][label]["bytes"])
    return {g: chosen[g] for g in groups}


def allocate(table: Mapping[str, Mapping[str, Mapping[str, float]]], budget_bytes: float,
             resolution: int = 4096) -> dict[str, str]:
    """Choice label per group minimising the summed error with summed bytes <= ``budget_bytes``.

    A multiple-choice knapsack solved exactly by dynamic programming over sizes in units of
    ``budget / resolution``: first with sizes rounded to the nearest unit (exact whenever the answer
    really fits), and if the true size of that answer exceeds the budget, again with sizes rounded up
    (always fits; optimal for the rounded sizes). When even the smallest choices do not fit, every
    group gets its smallest choice.
    """
    import math

    smallest = {g: min(rows, key=lambda c: (rows[c]["bytes"], rows[c]["error"])) for g, rows in table.items()}
    if budget_bytes <= 0 or sum(table[g][c]["bytes"] for g, c in smallest.items()) > budget_bytes:
        return smallest
    for rounding in (round, lambda x: math.ceil(x - 1e-9)):
        chosen = _knapsack(table, budget_bytes, resolution, rounding)
        if chosen is not None and sum(table[g][c]["bytes"] for g, c in chosen.items()) <= budget_bytes:
            return chosen
    return smallest


def pinned_groups(table: Mapping[str, Mapping[str, Mapping[str, float]]], k: int) -> dict[str, dict[str, Any]]:
    """The ``k`` groups most hurt at their cheapest choice, each pinned to its most accurate choice."""
    if k <= 0:
        return {}

    def worst(rows) -> float:
        cheapest = min(rows.values(), key=lambda r: (r["bytes"], r["error"]))
        return cheapest["error"]

    ranked = sorted(table, key=lambda g: worst(table[g]), reverse=True)[:k]
    return {g: json.loads(min(table[g], key=lambda c: (table[g][c]["error"], -table[g][c]["bytes"]))) for g in ranked}


def seeded_params(space: SearchSpace, targets: list[Target], table, baselines: list[dict[str, Any]],
                  uniform_bytes: list[float], pinned: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One sensitivity-guided allocation per compressing uniform baseline, at that baseline's size."""
    out = []
    free = {g: rows for g, rows in table.items() if g not in pinned}
    pinned_bytes = sum(table[g][choice_label(v)]["bytes"] for g, v in pinned.items())
    groups = space.groups(targets)
    for params, total in zip(baselines, uniform_bytes):
        chosen = allocate(free, total - pinned_bytes)
        candidate = {}
        for g in groups:
            values = pinned[g] if g in pinned else json.loads(chosen[g])
            for dim, value in values.items():
                candidate[f"{g}:{dim}"] = value
        if candidate != params and candidate not in out:
            out.append(candidate)
    return out
