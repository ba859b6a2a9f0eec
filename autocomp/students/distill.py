"""Knowledge distillation of a pruned student against its teacher.

The loss per token mixes soft and hard targets (Hinton et al.; DistilBERT; Minitron)::

    alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, next token)
    + hidden_weight * mean_i ||h_s,i - h_t,map(i)||^2 / mean ||h_t,map(i)||^2

Teacher targets come either **online** (the teacher runs on every batch: exact full-vocabulary KL,
hidden states available) or from a **top-k** table computed once per window set (the teacher's k
largest logits and their indices; the KL runs over those k tokens, the student's log-probabilities
normalised over the full vocabulary, as EvoPress does). The top-k table is what makes distilling
many students of one teacher cheap: the teacher's forward pass is paid once.

Training is deterministic given the seed: the batch of step ``s`` is a function of ``(seed, s)``
only, there is no dropout (modules stay in eval mode, gradients flow all the same), and a run
resumed from its checkpoint continues with the same optimizer and schedule state, so a resumed run
ends with the same weights as an uninterrupted one (same thread count).
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autocomp.students.spec import DistillSpec
from autocomp.inputs.targets import find_decoder_blocks

CHECKPOINT = "distill-checkpoint.pt"


@dataclass
class DistillResult:
    """What one distillation run did (``losses``: the training loss of every step, from step 0)."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0

    def to_dict(self) -> dict:
        head = self.losses[: max(1, len(self.losses) // 10)]
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {"steps": self.steps, "tokens": self.tokens, "seconds": self.seconds, "resumed_from": self.resumed_from,
                "loss_first": sum(head) / len(head) if head else None,
                "loss_last": sum(tail) / len(tail) if tail else None}


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's ``k`` largest logits (and their token ids) at every position of a window set."""

    logits: torch.Tensor     # [n, seq, k] float32
    indices: torch.Tensor    # [n, seq, k] int64

    @classmethod
    def compute(cls, teacher: nn.Module, windows: torch.Tensor, k: int, batch: int = 1) -> "TeacherTopK":
        values, indices = [], []
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch):
                logits = teacher(windows[start:start + batch]).logits.float()
                top = logits.topk(min(k, logits.shape[-1]), dim=-1)
                values.append(top.values)
                indices.append(top.indices)
                del logits
        return cls(torch.cat(values), torch.cat(indices))


def lr_at(step: int, spec: DistillSpec) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to 10% of ``lr``."""
    warm = max(1, round(spec.warmup * spec.steps)) if spec.warmup > 0 else 0
    if step < warm:
        return spec.lr * (step + 1) / warm
    progress = (step - warm) / max(1, spec.steps - warm)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(step: int, n_windows: int, spec: DistillSpec) -> torch.Tensor:
    """Windows of step ``step``: epochs of a seeded permutation, a function of (seed, step) only."""
    per_epoch = max(1, n_windows // spec.batch)
    epoch, slot = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
    order = torch.randperm(n_windows, generator=gen)
    size = min(spec.batch, n_windows)
    return order[slot * size:(slot + 1) * size]


@contextmanager
def block_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect every decoder block's output hidden state during forward passes inside the block."""
    _, blocks = find_decoder_blocks(model)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher_T || student_T), full vocabulary."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def topk_kl(student_logits: torch.Tensor, top: TeacherTopK, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL over the teacher's top-k tokens (teacher renormalised over them, student over the vocabulary)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, top.indices[rows])
    log_p = F.log_softmax(top.logits[rows] / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _trainable(student: nn.Module, spec: DistillSpec) -> list[nn.Parameter]:
    frozen: set[int] = set()
    if spec.freeze_embeddings:
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(student, getter)() if hasattr(student, getter) else None
            if module is not None and getattr(module, "weight", None) is not None:
                frozen.add(id(module.weight))
    params = [p for p in student.parameters() if id(p) not in frozen]
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen)
    return params


def _spec_key(spec: DistillSpec, windows: torch.Tensor) -> str:
    digest = hashlib.sha256(repr(sorted(spec.to_dict().items())).encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()[:16]


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, spec: DistillSpec,
            layer_map: Sequence[int] | None = None, teacher_topk: TeacherTopK | None = None,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, stop_at: int | None = None,
            progress: bool = True) -> DistillResult:
    """Train ``student`` in place for ``spec.steps`` steps on ``windows`` ([n, seq] token ids).

    ``layer_map[i]``: the teacher block that student block ``i`` was built from (for the hidden-state
    loss). ``teacher_topk``: precomputed targets for ``spec.teacher == "topk"`` (computed here when
    missing). With ``checkpoint_dir`` the state is saved every ``checkpoint_every`` steps (and when
    stopping early at ``stop_at``); a later call with the same arguments resumes from it.
    """
    if spec.steps == 0:
        return DistillResult(0, 0, 0.0)
    if spec.hidden_weight > 0 and layer_map is None:
        raise ValueError("the hidden-state loss needs layer_map (student block -> teacher block)")
    if spec.teacher == "topk" and teacher_topk is None:
        teacher_topk = TeacherTopK.compute(teacher, windows, spec.topk)
    start_time = time.perf_counter()
    params = _trainable(student, spec)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
    key = _spec_key(spec, windows)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    first, losses = 0, []
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        if state["key"] == key:
            student.load_state_dict(state["student"], strict=False)
            opt.load_state_dict(state["optimizer"])
            first, losses = int(state["step"]), list(state["losses"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.steps, initial=first, desc="distill", unit="step", dynamic_ncols=True, leave=False)
    teacher.eval()
    student.eval()  # no dropout: deterministic; gradients flow in eval mode
    stop = spec.steps if stop_at is None else min(spec.steps, stop_at)
    try:
        for step in range(first, stop):
            rows = batch_indices(step, windows.shape[0], spec)
            ids = windows[rows]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, spec)
            loss = _step_loss(student, teacher, ids, rows, spec, layer_map, teacher_topk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.clip)
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
            done = step + 1
            if ckpt_path is not None and ((checkpoint_every and done % checkpoint_every == 0 and done < spec.steps)
                                          or done == stop < spec.steps):
                _save_checkpoint(ckpt_path, key, student, params, opt, done, losses)
    finally:
        if bar is not None:
            bar.close()
        for p in student.parameters():
            p.requires_grad_(False)
    if ckpt_path is not None and stop == spec.steps and ckpt_path.exists():
        ckpt_path.unlink()
    steps_run = stop - first
    return DistillResult(stop, steps_run * spec.batch * windows.shape[1], time.perf_counter() - start_time,
                         losses, resumed_from=first)


def _step_loss(student, teacher, ids, rows, spec: DistillSpec, layer_map, teacher_topk) -> torch.Tensor:
    want_hidden = spec.hidden_weight > 0
    with torch.no_grad():
        t_logits, t_hidden = None, []
        if spec.teacher == "online":
            with block_outputs(teacher) as captured:
                t_logits = teacher(ids).logits
            t_hidden = [h.detach() for h in captured] if want_hidden else []
    with block_outputs(student) as s_hidden:
        s_logits = student(ids).logits
    if spec.teacher == "online":
        kl = soft_kl(s_logits, t_logits, spec.temperature)
    else:
        kl = topk_kl(s_logits, teacher_topk, rows, spec.temperature)
    loss = spec.alpha * spec.temperature ** 2 * kl
    if spec.alpha < 1.0:
        ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss = loss + (1.0 - spec.alpha) * ce
    if want_hidden:
        terms = [F.mse_loss(h, t_hidden[j]) / t_hidden[j].pow(2).mean().clamp_min(1e-8)
                 for h, j in zip(s_hidden, layer_map)]
        loss = loss + spec.hidden_weight * torch.stack(terms).mean()
    return loss


def _save_checkpoint(path: Path, key: str, student: nn.Module, params, opt, step: int, losses: list[float]) -> None:
    trainable = {id(p) for p in params}
    state = {name: p.detach().clone() for name, p in student.named_parameters() if id(p) in trainable}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "student": state, "optimizer": opt.state_dict(), "step": step, "losses": losses}, tmp)
    tmp.replace(path)
