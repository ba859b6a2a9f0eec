"""Sequential (exact) calibration: compress block by block on the compressed model's own activations.

This is the "sequential" mode of GPTQ and SparseGPT. The calibration windows run once through the
dense model to record every decoder block's call arguments (attention masks, position embeddings:
they do not depend on the weights) and the first block's input. Then, for each block in order:

1. split the block's targets into *stages* by execution order: layers reading the very same input
   tensor form one stage (q/k/v; gate/up), so a Llama block has four (qkv, o, gate/up, down);
2. for each stage in order, run the block on its current inputs with hooks that accumulate that
   stage's input statistics, then compress the stage's layers with them (the "true sequential"
   option of the GPTQ reference code: o_proj sees the compressed q/k/v's attention output);
3. run the compressed block again: its outputs are the next block's inputs.

So every layer is calibrated on the outputs of the already-compressed layers before it, within its
block too, and memory stays bounded by one block's activations. Targets outside the blocks (embedding / LM head) are
compressed last, on statistics gathered by a full pass of the compressed model. Unlike the default
("dense statistics") mode, a layer's variant now depends on every layer upstream of it, so variants
cannot be stitched from a per-layer cache: each plan is compressed from scratch (slower, exact).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from autocomp.pipeline.calibration import LayerStats, StatsAccumulator, collect_input_stats
from autocomp.pipeline.layer import compress_weight
from autocomp.errors import PlanError
from autocomp.config.plan import LayerPlan
from autocomp.inputs.targets import Target, find_decoder_blocks, get_module, read_weight, write_weight


def _capture_block_calls(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor):
    """Per window: the first block's input hidden states and each block's (args, kwargs) minus hidden."""
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    first_inputs: list[torch.Tensor] = []

    def make_hook(index: int):
        def hook(_module, args, kwargs):
            if args:
                hidden, rest, kw = args[0], tuple(args[1:]), dict(kwargs)
            else:
                kw = dict(kwargs)
                hidden, rest = kw.pop("hidden_states"), ()
            calls[index].append((rest, kw))
            if index == 0:
                first_inputs.append(hidden.detach())
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for row in windows:
                model(row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first_inputs, calls


def _run_block(block: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _stages(model: nn.Module, block: nn.Module, members: list[Target], hidden: torch.Tensor,
            call: tuple[tuple, dict]) -> list[list[Target]]:
    """``members`` grouped into stages by the order their inputs appear in one run of the block:
    consecutive modules reading the same tensor share a stage."""
    order: list[tuple[str, torch.Tensor]] = []  # the tensors are kept alive, so equal addresses mean equal tensors
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(_module, inputs):
            if name not in seen:
                seen.add(name)
                order.append((name, inputs[0]))
        return hook

    names = list(dict.fromkeys(t.stats_module for t in members))
    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        _run_block(block, hidden, *call)
    finally:
        for h in handles:
            h.remove()
    stage_of: dict[str, int] = {}
    for i, (name, x) in enumerate(order):
        same = i > 0 and x.data_ptr() == order[i - 1][1].data_ptr() and x.shape == order[i - 1][1].shape
        stage_of[name] = stage_of[order[i - 1][0]] if same else len(set(stage_of.values()))
    stages: dict[int, list[Target]] = {}
    for t in members:  # a module the block never called (unused branch) goes last
        stages.setdefault(stage_of.get(t.stats_module, len(order)), []).append(t)
    return [stages[k] for k in sorted(stages)]


@torch.no_grad()
def compress_sequential(model: nn.Module, targets: list[Target], plan: Mapping[str, LayerPlan],
                        windows: torch.Tensor, hessian: bool, sink: dict | None = None) -> dict[str, LayerStats]:
    """Compress ``model`` in place, block by block (see module docstring). Returns the statistics used;
    ``sink``, when given, receives each compressed layer's ``CompressedWeight`` by name."""
    _, blocks = find_decoder_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        if t.in_blocks and not plan.get(t.name, LayerPlan()).is_dense:
            by_block.setdefault(t.block, []).append(t)
    hidden, calls = _capture_block_calls(model, blocks, windows)
    used: dict[str, LayerStats] = {}
    for index, block in enumerate(blocks):
        members = by_block.get(index, [])
        for stage in (_stages(model, block, members, hidden[0], calls[index][0]) if members else []):
            accs = {t.stats_module: StatsAccumulator(hessian) for t in stage}
            memo: dict = {}
            handles = [model.get_submodule(name).register_forward_pre_hook(lambda _m, inp, acc=acc, memo=memo: acc.add(inp[0], memo))
                       for name, acc in accs.items()]
            try:
                for w, x in enumerate(hidden):
                    memo.clear()
                    _run_block(block, x, *calls[index][w])
            finally:
                for h in handles:
                    h.remove()
            for t in stage:
                stats = accs[t.stats_module].result()
                used[t.name] = stats
                module = get_module(model, t.name)
                try:
                    compressed = compress_weight(read_weight(module), plan[t.name], stats)
                except PlanError as exc:
                    raise PlanError(f"layer {t.name}: {exc}") from None
                write_weight(module, compressed.weight)
                if sink is not None:
                    sink[t.name] = compressed
        hidden = [_run_block(block, x, *calls[index][w]) for w, x in enumerate(hidden)]
    extra = [t for t in targets if not t.in_blocks and not plan.get(t.name, LayerPlan()).is_dense]
    if extra:
        stats_extra = collect_input_stats(model, extra, windows, hessian=hessian)
        for t in extra:
            module = get_module(model, t.name)
            stats = stats_extra.get(t.name)
            used[t.name] = stats
            compressed = compress_weight(read_weight(module), plan[t.name], stats)
            write_weight(module, compressed.weight)
            if sink is not None:
                sink[t.name] = compressed
    return used

