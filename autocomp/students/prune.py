"""Structured pruning of a causal LM into a real, smaller Hugging Face model (the student).

A :class:`~autocomp.students.spec.StudentSpec` asks for fewer decoder blocks (depth), a narrower FFN,
and/or fewer attention heads. The student is a plain ``AutoModelForCausalLM.from_config`` model of the
smaller config whose weights are sliced out of the teacher's, so it saves, reloads and generates like
any Hugging Face model, and runs faster (unlike masking).

What is kept is chosen by importance, highest first (ties: lower index), in the original order:

* depth: ``bi`` Block Influence (ShortGPT, 1 - cosine between a block's input and output hidden
  states), ``loss`` (increase of next-token NLL when the block is skipped), or ``tail`` (data-free:
  the first ``layers - 1`` blocks and the last);
* width: ``activation`` (Minitron: mean |activation| of each FFN neuron at the down projection's
  input, mean L2 norm of each head's slice of the output projection's input), or ``magnitude``
  (data-free weight norms). Every student block has the same FFN width and head count (HF configs
  have one size), chosen per block by that block's importance. Grouped-query attention keeps whole
  kv groups (the best ``kv_heads`` by summed query-head importance), then the best query heads of
  each kept group.

Everything is deterministic given the teacher, the spec and the calibration ids; the teacher is
never modified.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autocomp.errors import PlanError
from autocomp.students.arch import (
    Family,
    Keep,
    family_of,
    family_of_model,
    slice_param,
    slicing,
    teacher_dims,
)
from autocomp.students.spec import StudentSpec
from autocomp.inputs.targets import read_weight

__all__ = ["StudentModel", "layer_importance", "prune_student", "resolve_student", "student_config", "teacher_dims",
           "width_importance"]

PER_LAYER_LISTS = ("layer_types",)   # config lists with one entry per decoder block
CALIB_BATCH = 4                      # calibration rows per forward pass (importance)
BUILD_SEED = 0                       # torch seed while the student is initialised (all weights are then copied)


@dataclass
class StudentModel:
    """A pruned student: the model and how it was cut from the teacher."""

    model: nn.Module                  # plain HF causal LM of the smaller config, eval mode, float32
    spec: StudentSpec                 # resolved: layers / ffn / heads / kv_heads are absolute
    kept_layers: tuple[int, ...]      # teacher block index of each student block, increasing
    layer_scores: tuple[float, ...] = ()  # depth importance of every teacher block; () when depth is kept


# ---------------------------------------------------------------- sizes


def _range_error(name: str, asked: int, teacher: int) -> PlanError:
    return PlanError(f"student {name} ({asked}) exceeds the teacher's {teacher}: a student can only be smaller; "
                     f"choose {name} in 1..{teacher}, or null to keep the teacher's")


def _valid_kv(heads: int, t_kv: int, group: int) -> list[int]:
    """kv-head counts that ``heads`` query heads can use: divisors within the teacher's kv heads and group size."""
    return [kv for kv in range(1, t_kv + 1) if heads % kv == 0 and heads // kv <= group]


def _resolve_heads(spec: StudentSpec, dims: dict[str, int], family: Family, model_type: str) -> tuple[int, int]:
    t_heads, t_kv = dims["heads"], dims["kv_heads"]
    if family.head_dim_tied:
        if spec.heads not in (None, t_heads) or spec.kv_heads not in (None, t_kv):
            raise PlanError(f"student heads/kv_heads cannot change on {model_type}: its head_dim is tied to "
                            f"hidden / heads ({dims['hidden']} / {t_heads}), so fewer heads would change the "
                            f"hidden size; leave heads and kv_heads null (or {t_heads}) and prune layers / ffn")
        return t_heads, t_kv
    heads = t_heads if spec.heads is None else spec.heads
    if heads > t_heads:
        raise _range_error("heads", heads, t_heads)
    group = t_heads // t_kv
    kv = spec.kv_heads
    if kv is None:
        if heads % t_kv == 0:
            kv = t_kv
        elif t_kv == t_heads:       # multi-head teacher: the student stays multi-head
            kv = heads
        else:
            raise PlanError(f"student heads ({heads}) is not a multiple of the teacher's {t_kv} kv heads, so "
                            f"kv_heads cannot be kept: set kv_heads to one of {_valid_kv(heads, t_kv, group) or '(none)'}")
    if kv > t_kv:
        raise _range_error("kv_heads", kv, t_kv)
    if heads % kv:
        raise PlanError(f"student heads ({heads}) must be a multiple of kv_heads ({kv})")
    if heads // kv > group:
        valid = sorted({k * m for k in range(1, t_kv + 1) for m in range(1, group + 1)})
        raise PlanError(f"student heads ({heads}) over kv_heads ({kv}) gives {heads // kv} query heads per kv head, "
                        f"but the teacher's kv heads each serve {group}: kv_heads for heads={heads} can be "
                        f"{_valid_kv(heads, t_kv, group) or '(none)'}; heads can be one of {valid}")
    return heads, kv


def resolve_student(config: Any, spec: StudentSpec) -> StudentSpec:
    """The spec with every size absolute (None -> the teacher's), checked against the teacher.

    PlanError when a size exceeds the teacher's, when heads / kv_heads do not form valid groups of
    the teacher's grouped-query attention, or when heads change on a family whose head_dim is
    hidden / heads (GPT-2, OPT).
    """
    family = family_of(config)
    dims = teacher_dims(config)
    layers = dims["layers"] if spec.layers is None else spec.layers
    if layers > dims["layers"]:
        raise _range_error("layers", layers, dims["layers"])
    ffn = dims["ffn"] if spec.ffn is None else spec.ffn
    if ffn > dims["ffn"]:
        raise _range_error("ffn", ffn, dims["ffn"])
    heads, kv = _resolve_heads(spec, dims, family, getattr(config, "model_type", "?"))
    if (heads, kv) != (dims["heads"], dims["kv_heads"]):
        _check_heads_config(config, family, dims, heads, kv)
    return replace(spec, layers=layers, ffn=ffn, heads=heads, kv_heads=kv)


def _config_error(config: Any) -> Exception | None:
    """What the config's own validators (transformers' strict configs) say against it; None if valid."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as exc:  # noqa: BLE001 - validators raise several error types
        return exc
    return None


def _check_heads_config(config: Any, family: Family, dims: dict[str, int], heads: int, kv: int) -> None:
    """PlanError when the family's config class refuses the head count (e.g. Llama / Gemma3 configs require
    hidden % heads == 0 even though head_dim is explicit), so the student could not be built or reloaded."""
    if _config_error(config) is not None:   # the teacher's own config does not validate: nothing to learn
        return
    cfg = copy.deepcopy(config)
    setattr(cfg, family.heads_key, heads)
    setattr(cfg, family.kv_key, kv)
    cfg.head_dim = dims["head_dim"]
    error = _config_error(cfg)
    if error is not None:
        cause = getattr(error, "__cause__", None) or error
        valid = [h for h in range(1, dims["heads"] + 1) if dims["hidden"] % h == 0]
        raise PlanError(f"student heads ({heads}): the {type(config).__name__} class refuses it ({cause}); "
                        f"heads that divide the hidden size {dims['hidden']}: {valid}")


def student_config(config: Any, spec: StudentSpec, kept_layers) -> Any:
    """A deep copy of the teacher's config with the student's sizes (float32).

    Per-block lists (``layer_types``) follow ``kept_layers``; Qwen2's ``max_window_layers`` becomes the
    number of kept blocks below it (the kept full-attention prefix); ``head_dim`` is written explicitly
    on families that read it, so fewer heads keep the teacher's head size.
    """
    spec = resolve_student(config, spec)
    family = family_of(config)
    dims = teacher_dims(config)
    kept = [int(i) for i in kept_layers]
    if len(kept) != spec.layers or kept != sorted(set(kept)) or (kept and not 0 <= kept[0] <= kept[-1] < dims["layers"]):
        raise PlanError(f"kept_layers {kept} must be {spec.layers} increasing block indices in 0..{dims['layers'] - 1}")
    cfg = copy.deepcopy(config)
    setattr(cfg, family.layers_key, len(kept))
    if spec.ffn != dims["ffn"]:
        setattr(cfg, family.ffn_key, spec.ffn)
    if not family.head_dim_tied:
        setattr(cfg, family.heads_key, spec.heads)
        setattr(cfg, family.kv_key, spec.kv_heads)
        cfg.head_dim = dims["head_dim"]
    for key in PER_LAYER_LISTS:
        values = getattr(cfg, key, None)
        if isinstance(values, (list, tuple)) and len(values) == dims["layers"]:
            setattr(cfg, key, type(values)(values[i] for i in kept))
    window = getattr(cfg, "max_window_layers", None)
    if isinstance(window, int):
        cfg.max_window_layers = sum(1 for i in kept if i < window)
    cfg.dtype = torch.float32
    if _config_error(config) is None and (error := _config_error(cfg)) is not None:
        raise PlanError(f"the student config is not valid for {type(config).__name__}: {error}")
    return cfg


# ---------------------------------------------------------------- importance


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; every module's training flag is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _need_calib(calib_ids: torch.Tensor | None, what: str, alternative: str) -> torch.Tensor:
    if calib_ids is None:
        raise PlanError(f"{what} needs calibration text (token ids); give calibration data, or use {alternative}")
    ids = torch.as_tensor(calib_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise PlanError(f"calibration ids must be a non-empty [n, seq] tensor, got shape {tuple(ids.shape)}")
    return ids.long()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head: hooks see every block, and no [seq, vocab] logits are made."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def _block_io(args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's input and output hidden states (blocks return a tensor or a tuple, by version)."""
    inp = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, (tuple, list)) else output
    return inp, out


@dataclass
class _Stats:
    """Accumulated calibration statistics per teacher block."""

    bi: dict[int, list[float]] = field(default_factory=dict)         # block -> [sum of cos, token count]
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)       # block -> sum |down input| per neuron
    heads: dict[int, torch.Tensor] = field(default_factory=dict)     # block -> sum of head-slice L2 norms
    tokens: dict[int, int] = field(default_factory=dict)             # block -> tokens seen by the width hooks


def _collect(model: nn.Module, family: Family, blocks: nn.ModuleList, ids: torch.Tensor, bi: bool,
             width_blocks: list[int], heads: bool) -> _Stats:
    """One pass over the calibration ids, hooks gathering block influence and/or width activations."""
    dims = teacher_dims(model.config)
    stats = _Stats()
    handles = []

    def bi_hook(index):
        def hook(module, args, kwargs, output):
            inp, out = _block_io(args, kwargs, output)
            cos = F.cosine_similarity(inp.float(), out.float(), dim=-1)
            acc = stats.bi.setdefault(index, [0.0, 0])
            acc[0] += float(cos.sum())
            acc[1] += cos.numel()
        return hook

    def ffn_hook(index):
        def hook(module, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            stats.ffn[index] = stats.ffn.get(index, 0) + x.abs().sum(0)
            stats.tokens[index] = stats.tokens.get(index, 0) + x.shape[0]
        return hook

    def heads_hook(index):
        def hook(module, args):
            x = args[0].detach().float()
            x = x.reshape(-1, dims["heads"], dims["head_dim"])
            stats.heads[index] = stats.heads.get(index, 0) + x.norm(dim=-1).sum(0)
        return hook

    try:
        for index, block in enumerate(blocks):
            if bi:
                handles.append(block.register_forward_hook(bi_hook(index), with_kwargs=True))
            if index in width_blocks:
                handles.append(block.get_submodule(family.down).register_forward_pre_hook(ffn_hook(index)))
                if heads:
                    handles.append(block.get_submodule(family.o).register_forward_pre_hook(heads_hook(index)))
        backbone = _backbone(model)
        device = _device(model)
        for start in range(0, ids.shape[0], CALIB_BATCH):
            backbone(input_ids=ids[start:start + CALIB_BATCH].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _tail_scores(n: int) -> list[float]:
    """Data-free depth scores: a decreasing ramp (earlier blocks first), the last block highest."""
    return [float(n) if i == n - 1 else float(n - 1 - i) for i in range(n)]


def _nll(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over the calibration ids (one row per pass: bounded logits)."""
    device = _device(model)
    total, count = 0.0, 0
    for row in ids:
        row = row[None].to(device)
        logits = model(input_ids=row, use_cache=False).logits[:, :-1]
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), row[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += row.shape[1] - 1
    if count == 0:
        raise PlanError("depth importance 'loss' needs calibration rows of at least 2 tokens")
    return total / count


def _skip_hook(module, args, kwargs, output):
    """Forward hook making a block the identity: its output is its input."""
    inp, _ = _block_io(args, kwargs, output)
    return (inp, *output[1:]) if isinstance(output, tuple) else inp


def _loss_scores(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> list[float]:
    base = _nll(model, ids)
    scores = []
    for block in blocks:
        handle = block.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            scores.append(_nll(model, ids) - base)
        finally:
            handle.remove()
    return scores


def _bi_scores(stats: _Stats, n: int) -> list[float]:
    return [1.0 - stats.bi[i][0] / stats.bi[i][1] for i in range(n)]


def layer_importance(model: nn.Module, calib_ids: torch.Tensor | None, method: str) -> list[float]:
    """Depth importance of every decoder block of ``model`` (higher = more important).

    ``bi``: 1 - mean token cosine between block input and output; ``loss``: mean NLL increase when the
    block alone is skipped; ``tail``: data-free ramp keeping the first blocks and the last.
    """
    family, _, blocks = family_of_model(model)
    if method == "tail":
        return _tail_scores(len(blocks))
    if method not in ("bi", "loss"):
        raise PlanError(f"depth importance {method!r} is not one of bi, loss, tail")
    ids = _need_calib(calib_ids, f"depth importance {method!r}", "depth_importance 'tail'")
    with _evaluating(model), torch.no_grad():
        if method == "bi":
            return _bi_scores(_collect(model, family, blocks, ids, bi=True, width_blocks=[], heads=False), len(blocks))
        return _loss_scores(model, blocks, ids)


def _magnitude(block: nn.Module, family: Family, dims: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free width scores of one block: FFN neuron (down column x up/gate rows norms), head (o columns norm)."""
    ffn = read_weight(block.get_submodule(family.down)).float().norm(dim=0)
    for path in (family.up, family.gate):
        if path:
            ffn = ffn * read_weight(block.get_submodule(path)).float().norm(dim=1)
    o = read_weight(block.get_submodule(family.o)).float()
    heads = o.reshape(o.shape[0], dims["heads"], dims["head_dim"]).norm(dim=(0, 2))
    return ffn, heads


def width_importance(model: nn.Module, calib_ids: torch.Tensor | None, method: str, blocks_wanted=None,
                     heads: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{block: (FFN neuron scores [ffn], head scores [heads] or None)}`` for ``blocks_wanted`` (default all)."""
    family, _, blocks = family_of_model(model)
    dims = teacher_dims(model.config)
    wanted = list(range(len(blocks))) if blocks_wanted is None else [int(i) for i in blocks_wanted]
    with torch.no_grad():
        if method == "magnitude":
            return {i: _magnitude(blocks[i], family, dims) for i in wanted}
        if method != "activation":
            raise PlanError(f"width importance {method!r} is not one of activation, magnitude")
        ids = _need_calib(calib_ids, "width importance 'activation'", "width_importance 'magnitude'")
        with _evaluating(model):
            stats = _collect(model, family, blocks, ids, bi=False, width_blocks=wanted, heads=heads)
    return _width_from_stats(stats, wanted)


def _width_from_stats(stats: _Stats, wanted: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    out = {}
    for i in wanted:
        n = stats.tokens[i]
        out[i] = (stats.ffn[i] / n, stats.heads[i] / n if i in stats.heads else None)
    return out


# ---------------------------------------------------------------- selection


def _top(scores, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores (ties: lower index first), in increasing order."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values


def _select_heads(scores: torch.Tensor, dims: dict[str, int], heads: int, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept query heads and kv groups: the best ``kv`` groups by summed head score, then the best heads of each."""
    group_t, group_s = dims["heads"] // dims["kv_heads"], heads // kv
    groups = _top(scores.reshape(dims["kv_heads"], group_t).sum(1), kv)
    kept = [g * group_t + _top(scores[g * group_t:(g + 1) * group_t], group_s) for g in groups.tolist()]
    return torch.cat(kept), groups


# ---------------------------------------------------------------- building the student


def _student_state(teacher: nn.Module, student: nn.Module, family: Family, blocks_name: str,
                   kept: tuple[int, ...], keeps: list[Keep], head_dim: int) -> dict[str, torch.Tensor]:
    """The student's state dict made from the teacher's: block i <- teacher block kept[i], sliced."""
    source = teacher.state_dict()
    prefix = blocks_name + "."
    rules = [slicing(family, keep, head_dim) for keep in keeps]
    state, used = {}, set()
    for key, target in student.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            j = int(index)
            teacher_key = f"{prefix}{kept[j]}.{rest}"
            path, param = rest.rsplit(".", 1)
            tensor = source[teacher_key]
            if path in rules[j]:
                tensor = slice_param(tensor, param, *rules[j][path], conv1d=family.conv1d)
        else:
            teacher_key = key
            tensor = source[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise PlanError(f"cannot copy {teacher_key} {tuple(tensor.shape)} into the student's {key} "
                            f"{tuple(target.shape)}: this {family.name}-family variant is not supported")
        state[key] = tensor
        used.add(teacher_key)
    kept_prefixes = tuple(f"{prefix}{i}." for i in kept)
    expected = {k for k in source if not k.startswith(prefix) or k.startswith(kept_prefixes)}
    if expected - used:
        raise PlanError(f"the student has no place for teacher weights {sorted(expected - used)[:5]}: "
                        f"this {family.name}-family variant is not supported")
    return state


def _tied(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return emb is not None and head is not None and head.weight is emb.weight


def _build(teacher: nn.Module, family: Family, blocks_name: str, spec: StudentSpec, kept: tuple[int, ...],
           keeps: list[Keep]) -> nn.Module:
    """``from_config`` of the student config (fixed seed), then a strict load of the sliced teacher weights."""
    from transformers import AutoModelForCausalLM

    cfg = student_config(teacher.config, spec, kept)
    kwargs = {"dtype": torch.float32}
    attn = getattr(teacher.config, "_attn_implementation", None)
    if attn:
        kwargs["attn_implementation"] = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        student = AutoModelForCausalLM.from_config(cfg, **kwargs)
    state = _student_state(teacher, student, family, blocks_name, kept, keeps, teacher_dims(teacher.config)["head_dim"])
    student.load_state_dict(state, strict=True)
    if _tied(teacher) and not _tied(student):
        raise PlanError("the teacher ties its embedding and LM head but the student built from its config does not")
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(_device(teacher)).eval()


def prune_student(teacher: nn.Module, spec: StudentSpec, calib_ids: torch.Tensor | None = None) -> StudentModel:
    """Prune ``teacher`` to the student ``spec`` (depth by ``depth_importance``, width by ``width_importance``).

    ``calib_ids`` ([n, seq] token ids) is needed by the data-driven methods (``bi``, ``loss``,
    ``activation``) when they are used, i.e. when that dimension is actually pruned. The teacher is
    not modified (its train/eval flags are restored).
    """
    family, blocks_name, blocks = family_of_model(teacher)
    spec = resolve_student(teacher.config, spec)
    dims = teacher_dims(teacher.config)
    prune_depth = spec.layers < dims["layers"]
    prune_ffn = spec.ffn < dims["ffn"]
    prune_heads = spec.heads < dims["heads"] or spec.kv_heads < dims["kv_heads"]
    prune_width = prune_ffn or prune_heads
    ids = None
    if prune_depth and spec.depth_importance in ("bi", "loss"):
        ids = _need_calib(calib_ids, f"depth importance {spec.depth_importance!r}", "depth_importance 'tail'")
    if prune_width and spec.width_importance == "activation":
        ids = _need_calib(calib_ids, "width importance 'activation'", "width_importance 'magnitude'")

    scores: list[float] = []
    width: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with _evaluating(teacher), torch.no_grad():
        shared = prune_depth and spec.depth_importance == "bi" and prune_width and spec.width_importance == "activation"
        if shared:  # one calibration pass for both
            stats = _collect(teacher, family, blocks, ids, bi=True, width_blocks=list(range(len(blocks))),
                             heads=prune_heads)
            scores = _bi_scores(stats, len(blocks))
        elif prune_depth:
            scores = layer_importance(teacher, ids, spec.depth_importance)
        kept = tuple(_top(scores, spec.layers).tolist()) if prune_depth else tuple(range(dims["layers"]))
        if shared:
            width = _width_from_stats(stats, list(kept))
        elif prune_width:
            width = width_importance(teacher, ids, spec.width_importance, kept, heads=prune_heads)

    keeps = []
    for i in kept:
        ffn_idx = _top(width[i][0], spec.ffn) if prune_ffn else None
        heads_idx, kv_idx = _select_heads(width[i][1], dims, spec.heads, spec.kv_heads) if prune_heads else (None, None)
        keeps.append(Keep(ffn=ffn_idx, heads=heads_idx, kv=kv_idx))
    student = _build(teacher, family, blocks_name, spec, kept, keeps)
    return StudentModel(model=student, spec=spec, kept_layers=kept, layer_scores=tuple(float(s) for s in scores))
