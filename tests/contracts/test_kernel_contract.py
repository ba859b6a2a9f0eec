"""The kernel contract: every kernel in the registry passes the same checks.

For each kernel in :data:`~autocomp.deploy.kernels.KERNELS` and each device it runs on, every layer of
a grid of plans and shapes that :func:`~autocomp.deploy.kernels.choose_kernel` gives to it (the
fallback: every compressed layer given to none) is built as the kernel's module
(:data:`~autocomp.deploy.kernels.KERNEL_MODULES`) and compared with the simulated layer, ``F.linear``
(``F.embedding`` for a lookup) with the weight :func:`~autocomp.pipeline.layer.compress_weight`
simulates:

- where the registry says the kernel is exact (``choice.exact`` with a float32 compute dtype): bit for
  bit on the identity input (each output is then one weight plus the bias, so no accumulation order
  can change it) and to float32 rounding on random inputs;
- otherwise within a stated tolerance: the kernel's own ``KernelSpec.rel_error`` for one approximate by
  design, :func:`_half_bound` (:data:`HALF_REL` for codes of 4 bits or more) for one that computes in
  bfloat16 / float16.

And every plan a kernel cannot take gets a reason from ``choose_kernel`` when no kernel runs it.
Registering a kernel is enough for it to join; a grid that reaches none of its layers fails its test.
CUDA cases are skipped without a GPU, and fail instead under ``AUTOCOMP_REQUIRE_GPU=1``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from autocomp.config.plan import LayerPlan
from autocomp.deploy.kernels import (
    FALLBACK_KERNEL,
    KERNEL_MODULES,
    KERNELS,
    KernelRequest,
    choose_kernel,
    compute_dtype,
)
from autocomp.errors import PlanError
from autocomp.pipeline.layer import CompressedWeight, compress_weight

REQUIRE_GPU_ENV = "AUTOCOMP_REQUIRE_GPU"
DEVICES = ("cpu", "cuda")
SHAPES = ((64, 320), (72, 320), (80, 77))   # [out, in]: g256 ragged over 320; out not a multiple of 16; odd in
EXACT_REL = 1e-5     # an exact kernel on random inputs: float32 accumulation order only (max error / max |y|)
HALF_REL = 1.5e-2    # bfloat16 / float16 compute, codes of 4 bits or more: inputs and scales rounded to 8 (11)
#                      significant bits; measured at most 0.31 % (Frobenius) on this grid (torch 2.13, cpu)


@dataclass(frozen=True)
class Case:
    """One layer and the request flags ``choose_kernel`` is asked with."""

    plan: LayerPlan
    out_f: int
    in_f: int
    kind: str
    dynamic_int8: bool
    pack_low_bits: bool

    def choose(self, device: str, kernel_dtype: torch.dtype | None = torch.float32):
        return choose_kernel(self.plan, self.out_f, self.in_f, device, self.dynamic_int8, kind=self.kind,
                             pack_low_bits=self.pack_low_bits, kernel_dtype=kernel_dtype)

    def request(self, device: str) -> KernelRequest:
        return KernelRequest(device, self.dynamic_int8, self.kind, torch.float32, self.pack_low_bits, torch.float32)

    def __str__(self) -> str:
        p = self.plan
        return (f"{self.kind} {self.out_f}x{self.in_f} {p.method} bits={p.bits} group={p.group_size} "
                f"sym={p.symmetric} pattern={p.pattern} sparsity={p.sparsity:g} "
                f"dynamic_int8={self.dynamic_int8} pack_low_bits={self.pack_low_bits}")


def _plans() -> list[LayerPlan]:
    plans = [LayerPlan(method="magnitude", pattern="2:4"), LayerPlan(method="magnitude", pattern="4:8"),
             LayerPlan(method="magnitude", sparsity=0.5)]
    for bits in (2, 3, 4, 6, 8):
        for group_size in (32, 256, -1):
            for symmetric in (False, True):
                q = dict(bits=bits, group_size=group_size, symmetric=symmetric)
                plans += [LayerPlan(method="rtn", **q), LayerPlan(method="magnitude+rtn", sparsity=0.5, **q),
                          LayerPlan(method="magnitude+rtn", pattern="2:4", **q)]
    return plans


@functools.cache
def _grid() -> tuple[Case, ...]:
    return tuple(Case(plan, out_f, in_f, kind, dyn, pack) for plan in _plans() for out_f, in_f in SHAPES
                 for kind in ("linear", "embedding") for dyn in (False, True) for pack in (False, True))


@functools.cache
def _compressed(plan: LayerPlan, out_f: int, in_f: int) -> CompressedWeight | None:
    """The simulated layer, or None when a layer of this shape cannot take the plan (2:4 on 77 inputs)."""
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
    try:
        return compress_weight(weight, plan)
    except PlanError:
        return None


def _runs(name: str, case: Case, device: str, kernel_dtype: torch.dtype | None = torch.float32) -> bool:
    """``choose_kernel`` gives the layer to kernel ``name`` (the fallback: a compressed matmul to none)."""
    kernel = case.choose(device, kernel_dtype).kernel
    if name == FALLBACK_KERNEL:
        return kernel is None and case.kind == "linear"
    return kernel == name


def _accepted(name: str, device: str) -> list[Case]:
    """The grid's layers kernel ``name`` runs on ``device``, one per (plan, shape, kind)."""
    seen, out = set(), []
    for case in _grid():
        key = (case.plan, case.out_f, case.in_f, case.kind)
        if key in seen or not _runs(name, case, device) or _compressed(*key[:3]) is None:
            continue
        seen.add(key)
        out.append(case)
    return out


def _require(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        if os.environ.get(REQUIRE_GPU_ENV) == "1":
            pytest.fail(f"{REQUIRE_GPU_ENV}=1 but torch.cuda.is_available() is False")
        pytest.skip(f"needs a CUDA device ({REQUIRE_GPU_ENV}=1 makes this a failure)")


def _half_bound(bits: int) -> float:
    """The tolerance in bfloat16 / float16 compute for codes of ``bits`` bits.

    Codes under 4 bits run in the int4 container, whose zero is a float ``(8 - z) * s`` several times
    the weight's own scale, rounded to the compute dtype: the error grows as the codes get coarser
    (measured 1.2 % for 3-bit and 3.2 % for 2-bit codes on this grid), so the bound doubles per bit."""
    return HALF_REL * 2 ** max(0, 4 - bits)


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _check_linear(name: str, case: Case, device: str, kernel_dtype: torch.dtype | None) -> None:
    spec, cls = KERNELS[name], KERNEL_MODULES[name]
    cw = _compressed(case.plan, case.out_f, case.in_f)
    bias = torch.randn(case.out_f, generator=torch.Generator().manual_seed(1)) * 0.01
    choice = case.choose(device, kernel_dtype)
    compute = compute_dtype(name, device, torch.float32, kernel_dtype)
    if compute == torch.float32:   # the registry's statement: exact unless approximate by design
        assert choice.exact == (spec.rel_error == 0.0), f"{case}: exact={choice.exact}, rel_error={spec.rel_error}"
    try:
        module = cls.from_compressed(cw, bias, device, compute)
    except PlanError as err:
        if device == "cuda" and "compute capability" in str(err):
            pytest.skip(str(err))
        raise AssertionError(f"{case}: choose_kernel gave it to {name}, the module refused: {err}") from err
    assert module.kernel == name
    assert module.nbytes <= 4 * cw.weight.numel() + 4 * case.out_f
    if name != FALLBACK_KERNEL:
        assert module.nbytes < 4 * cw.weight.numel(), f"{case}: {module.nbytes} bytes, no smaller than float32"

    x = torch.randn(4, 16, case.in_f, generator=torch.Generator().manual_seed(2))
    ref = F.linear(x, cw.weight, bias)
    y = module(x.to(device))
    assert y.shape == ref.shape and y.dtype == x.dtype
    if choice.exact and compute == torch.float32 and not module.note:
        eye = torch.eye(case.in_f)
        assert torch.equal(module(eye.to(device)).cpu(), F.linear(eye, cw.weight, bias)), \
            f"{case}: {name}'s weight is not the simulated one"
        err = float((y.cpu() - ref).abs().max())
        assert err <= EXACT_REL * float(ref.abs().max()), f"{case}: max error {err:g}"
    else:
        bound = spec.rel_error or _half_bound(case.plan.bits)
        rel = _rel_error(y.cpu(), ref)
        assert rel <= bound, f"{case}: relative error {rel:.3g} > {bound:g} (compute {compute})"


def _check_lookup(name: str, case: Case, device: str) -> None:
    cw = _compressed(case.plan, case.out_f, case.in_f)
    choice = case.choose(device)
    assert choice.exact, f"{case}: lookups are exact for every format"
    module = KERNEL_MODULES[name].from_compressed(cw, device, torch.float32)
    assert module.kernel == name and module.nbytes < 4 * cw.weight.numel()
    some = torch.randint(0, case.out_f, (3, 11), generator=torch.Generator().manual_seed(3))
    for ids in (torch.arange(case.out_f), some):   # every row once, then a batch
        out = module(ids.to(device)).cpu()
        assert out.dtype == torch.float32
        assert torch.equal(out, F.embedding(ids, cw.weight)), f"{case}: {name}'s rows are not the simulated ones"


@pytest.mark.parametrize("name,device", [
    pytest.param(name, device, id=f"{name}-{device}", marks=[pytest.mark.gpu] if device == "cuda" else [])
    for name, spec in KERNELS.items() for device in spec.devices
])
def test_kernel_module_equals_the_simulated_layer(name, device):
    assert KERNEL_MODULES[name].kernel == name
    cases = _accepted(name, device)
    assert cases, f"no layer in the contract grid runs on {name} ({device}): extend _plans / SHAPES"
    _require(device)
    for case in cases:
        if case.kind == "embedding":
            _check_lookup(name, case, device)
            continue
        _check_linear(name, case, device, torch.float32)
        default = compute_dtype(name, device, torch.float32)   # bfloat16 on cpu for the weight-only kernels
        if default != compute_dtype(name, device, torch.float32, torch.float32) and _runs(name, case, device, None):
            _check_linear(name, case, device, None)


def test_every_module_is_registered():
    assert set(KERNEL_MODULES) == set(KERNELS)
    assert list(KERNELS)[-1] == FALLBACK_KERNEL


@pytest.mark.parametrize("name", [n for n in KERNELS if n != FALLBACK_KERNEL])
def test_a_layer_the_kernel_cannot_take_gets_a_reason(name):
    """Pure (``choose_kernel`` touches no device), so it runs for every device the registry knows."""
    spec = KERNELS[name]
    refused = 0
    for device in DEVICES:
        for case in _grid():
            if case.kind not in spec.kinds or (spec.opt_in and not case.dynamic_int8) or _runs(name, case, device):
                continue
            req = case.request(device)
            if spec.family(case.plan, req):
                reason = spec.check(case.plan, case.out_f, case.in_f, req)
                assert reason is None or (isinstance(reason, str) and reason), \
                    f"{case} on {device}: {name} refuses without a reason"
            choice = case.choose(device)
            if choice.kernel is None:
                refused += 1
                assert isinstance(choice.reason, str) and choice.reason, f"{case} on {device}: no reason"
                assert "no speed-up" in choice.reason, f"{case} on {device}: {choice.reason!r}"
    assert refused, f"no layer in the contract grid is refused by {name} and run by no other kernel"
