"""Sequential (exact) calibration: compress block by block on the compressed model's own activations.

This is the "sequential" mode of GPTQ and SparseGPT. The calibration windows run once through the
dense model to record every decoder block's call arguments (attention masks, position embeddings:
they do not depend on the weights) and the first block's input. Then, for each block in order:

1. run the block on its current inputs with hooks that accumulate each target's input statistics;
2. compress the block's targets with those statistics;
3. run the compressed block again: its outputs are the next block's inputs.

So every layer is calibrated on the outputs of the already-compressed layers before it, and memory
stays bounded by one block's activations. Targets outside the blocks (embedding / LM head) are
compressed last, on statistics gathered by a full pass of the compressed model. Unlike the default
("dense statistics") mode, a layer's variant now depends on every layer upstream of it, so variants
cannot be stitched from a per-layer cache: each plan is compressed from scratch (slower, exact).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from autocomp.calibration import LayerStats, StatsAccumulator, collect_input_stats
from autocomp.compressors import compress_weight
from autocomp.errors import PlanError
from autocomp.plan import LayerPlan
from autocomp.targets import Target, find_decoder_blocks, get_module, read_weight, write_weight


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


@torch.no_grad()
def compress_sequential(model: nn.Module, targets: list[Target], plan: Mapping[str, LayerPlan],
                        windows: torch.Tensor, hessian: bool) -> dict[str, LayerStats]:
    """Compress ``model`` in place, block by block (see module docstring). Returns the statistics used."""
    _, blocks = find_decoder_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        if t.in_blocks and not plan.get(t.name, LayerPlan()).is_dense:
            by_block.setdefault(t.block, []).append(t)
    hidden, calls = _capture_block_calls(model, blocks, windows)
    used: dict[str, LayerStats] = {}
    for index, block in enumerate(blocks):
        members = by_block.get(index, [])
        if members:
            accs = {t.stats_module: StatsAccumulator(hessian) for t in members}
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
            for t in members:
                stats = accs[t.stats_module].result()
                used[t.name] = stats
                module = get_module(model, t.name)
                try:
                    compressed = compress_weight(read_weight(module), plan[t.name], stats).weight
                except PlanError as exc:
                    raise PlanError(f"layer {t.name}: {exc}") from None
                write_weight(module, compressed)
        hidden = [_run_block(block, x, *calls[index][w]) for w, x in enumerate(hidden)]
    extra = [t for t in targets if not t.in_blocks and not plan.get(t.name, LayerPlan()).is_dense]
    if extra:
        stats_extra = collect_input_stats(model, extra, windows, hessian=hessian)
        for t in extra:
            module = get_module(model, t.name)
            stats = stats_extra.get(t.name)
            used[t.name] = stats
            write_weight(module, compress_weight(read_weight(module), plan[t.name], stats).weight)
    return used

