"""Real kernels for compressed layers, beyond the shared contract (tests/contracts/test_kernel_contract.py,
where every registered kernel's module is checked against the simulated layer): the selection logic's
reasons and notes, what the modules store, and whole tiny models materialised under a mixed plan
giving the simulated model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from autocomp.pipeline.layer import CompressedWeight, compress_weight
from autocomp.deploy.kernels import (
    KERNELS,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    QuantizedEmbedding,
    SemiStructured24Linear,
    check_codes_reproduce,
    choose_kernel,
    compute_dtype,
    format_label,
    int4_op_group,
    materialize,
)
from autocomp.errors import PlanError
from autocomp.inputs.models import load_model
from autocomp.config.plan import DENSE, LayerPlan
from autocomp.inputs.targets import find_targets, get_module, read_weight, write_weight

OUT, IN = 256, 512


def _weight(out_f: int = OUT, in_f: int = IN, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * 0.02


def _input(in_f: int = IN, seed: int = 1, shape: tuple[int, ...] = (2, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, in_f, generator=g)


def _plan(bits: int, group_size: int, symmetric: bool, masked: bool = False, pattern: str | None = None) -> LayerPlan:
    if pattern:
        return LayerPlan(method="magnitude+rtn", pattern=pattern, bits=bits, group_size=group_size, symmetric=symmetric)
    if masked:
        return LayerPlan(method="magnitude+rtn", sparsity=0.5, bits=bits, group_size=group_size, symmetric=symmetric)
    return LayerPlan(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)


def _close(y: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    scale = float(ref.abs().max())
    err = float((y.float() - ref.float()).abs().max())
    assert err <= rel * scale, f"max error {err:g} > {rel:g} x {scale:g}"


# ------------------------------------------------------------------------------ kernel modules
# What every kernel module must do (equal the simulated layer, exactly where the registry says so, on
# every device it runs on) is the contract suite: tests/contracts/test_kernel_contract.py.
def test_int4_group_mapping():
    assert int4_op_group(128, 512) == 128
    assert int4_op_group(-1, 640) == 128          # per channel: 5 op groups of 128 share the row's scale
    assert int4_op_group(512, 1024) == 256
    assert int4_op_group(256, 640) == 128         # ragged last group of 128
    assert int4_op_group(48, 480) is None
    assert int4_op_group(64, 96) == 32


def test_modules_hold_the_packed_bytes():
    asym, sym = compress_weight(_weight(), _plan(8, -1, False)), compress_weight(_weight(), _plan(8, -1, True))
    int4 = Int4WeightOnlyLinear.from_compressed(compress_weight(_weight(), _plan(4, 128, False)), None, "cpu",
                                                torch.float32)
    assert int4.nbytes < 0.6 * OUT * IN           # half a byte per weight plus scales and float zeros
    for cw, symmetric in ((asym, False), (sym, True)):
        int8 = Int8WeightOnlyLinear.from_compressed(cw, None, "cpu", torch.float32)
        assert (int8.correction is None) == symmetric   # only asymmetric rows need the x.sum correction
        assert int8.nbytes < 1.1 * OUT * IN
    dynamic = Int8DynamicLinear.from_compressed(asym, None, "cpu", torch.float32)
    assert not dynamic.requantized and dynamic.nbytes < 1.1 * OUT * IN   # fbgemm keeps the zero points


def test_compute_dtypes():
    assert compute_dtype("int4_weight_only", "cpu", torch.float32) == torch.bfloat16
    assert compute_dtype("int4_weight_only", "cpu", torch.float32, torch.float32) == torch.float32
    assert compute_dtype("int4_weight_only", "cuda", torch.float32, torch.float32) == torch.bfloat16
    assert compute_dtype("int8_weight_only", "cuda", torch.float16) == torch.float16
    assert compute_dtype("int8_dynamic", "cpu", torch.bfloat16) == torch.float32
    assert compute_dtype("semi_structured_2_4", "cuda", torch.float32) == torch.bfloat16
    assert compute_dtype("embedding_gather", "cpu", torch.float16) == torch.float16


def test_half_precision_models_stay_close():
    x = _input()
    for cls, plan in ((Int4WeightOnlyLinear, _plan(4, 128, False)), (Int8WeightOnlyLinear, _plan(8, -1, False))):
        cw = compress_weight(_weight(), plan)
        ref = F.linear(x, cw.weight)
        for dtype in (torch.bfloat16, torch.float16):
            y = cls.from_compressed(cw, None, "cpu", dtype)(x.to(dtype))
            assert y.dtype == dtype
            _close(y, ref, rel=3e-2)
        assert not choose_kernel(plan, OUT, IN, "cpu", dtype=torch.bfloat16).exact


def test_quantized_embedding_scales_and_stores_nibbles():
    for bits, dim in ((3, 77), (6, 64)):
        cw = compress_weight(_weight(300, dim), _plan(bits, 32, False))
        emb = QuantizedEmbedding.from_compressed(cw, "cpu", torch.float32, embed_scale=torch.tensor(2.5))
        ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(0))
        assert torch.equal(emb(ids), F.embedding(ids, cw.weight) * 2.5)   # Gemma's scaled lookup
        assert emb.codes.shape[1] == (-(-dim // 2) if bits <= 4 else dim)  # two codes a byte up to 4 bits


def test_tied_int8_embedding_shares_the_head_weight():
    cw = compress_weight(_weight(), _plan(8, -1, False))
    head = Int8WeightOnlyLinear.from_compressed(cw, None, "cpu", torch.float32)
    emb = QuantizedEmbedding.from_compressed(cw, "cpu", torch.float32, shared=head)
    assert emb.codes is head.weight_int8
    ids = torch.arange(OUT)
    assert torch.equal(emb(ids), cw.weight)


def test_codes_must_reproduce_the_float_weight():
    cw = compress_weight(_weight(), _plan(4, 128, False))
    check_codes_reproduce(cw)
    bad = CompressedWeight(cw.weight + 1e-3, cw.mask, cw.quant)
    with pytest.raises(ValueError, match="do not reproduce"):
        check_codes_reproduce(bad, "layer.x")


def test_int8_on_cpu_in_bfloat16_needs_in_features_divisible_by_16():
    """torch 2.13's CPU int8 op in bfloat16 crashes the process (or returns inf / NaN for one row) when
    in_features is not a multiple of 16: the choice refuses it there and the module raises PlanError."""
    plan = _plan(8, -1, False)
    choice = choose_kernel(plan, OUT, 77, "cpu")
    assert choice.kernel is None and "in_features divisible by 16" in choice.reason
    assert choose_kernel(plan, OUT, 80, "cpu").kernel == "int8_weight_only"
    assert choose_kernel(plan, OUT, 77, "cpu", kernel_dtype=torch.float32).kernel == "int8_weight_only"
    cw = compress_weight(_weight(OUT, 77), plan)
    with pytest.raises(PlanError, match="divisible by 16"):
        Int8WeightOnlyLinear.from_compressed(cw, None, "cpu", torch.bfloat16)


# ------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("plan,device,kind,needle", [
    (_plan(3, 128, False), "cpu", "linear", "no 3-bit kernel on cpu: runs dequantized in float (no speed-up)"),
    (_plan(5, 128, True), "cpu", "linear", "no 5-bit kernel on cpu"),
    (_plan(6, -1, False), "cuda", "linear", "no 6-bit kernel on cuda"),
    (_plan(8, 128, False), "cpu", "linear", "int8 weight-only kernel needs one group per row (group_size -1); "
                                            "this layer has group_size 128"),
    (LayerPlan(method="magnitude", pattern="2:4"), "cpu", "linear", "2:4 sparse kernels need CUDA"),
    (LayerPlan(method="magnitude", pattern="4:8"), "cuda", "linear", "no kernel for 4:8 sparsity"),
    (LayerPlan(method="magnitude", sparsity=0.5), "cpu", "linear", "no kernel for unstructured sparsity"),
    (_plan(4, 48, False), "cpu", "linear", "int4 kernel needs groups of 32, 64, 128 or 256"),
    (LayerPlan(method="magnitude", sparsity=0.5), "cpu", "embedding", "no kernel for unstructured sparsity"),
])
def test_layers_without_a_kernel_say_why(plan, device, kind, needle):
    choice = choose_kernel(plan, OUT, IN, device, kind=kind)
    assert choice.kernel is None
    assert needle in choice.reason
    assert choice.format == format_label(plan, IN) != "dense"


def test_int4_needs_out_features_divisible_by_16():
    choice = choose_kernel(_plan(4, 128, False), 250, IN, "cpu")
    assert choice.kernel is None and "out_features divisible by 16" in choice.reason


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "pruned"])
def test_notes_say_what_a_kernel_leaves_out(masked):
    plan = _plan(4, 128, False, masked)
    exact = choose_kernel(plan, OUT, IN, "cpu", kernel_dtype=torch.float32)
    assert exact.kernel == "int4_weight_only" and exact.exact
    assert ("sparsity not exploited on cpu" in exact.reason) == masked
    fast = choose_kernel(plan, OUT, IN, "cpu")   # the default: bfloat16 compute (fast, not exact)
    assert fast.kernel == "int4_weight_only" and not fast.exact and "computes in bfloat16" in fast.reason
    dynamic = choose_kernel(_plan(8, -1, False), OUT, IN, "cpu", dynamic_int8=True)
    assert dynamic.kernel == "int8_dynamic" and not dynamic.exact and "approximate" in dynamic.reason


def test_low_bit_codes_run_in_a_larger_container_when_asked():
    choice = choose_kernel(_plan(3, 128, False), OUT, IN, "cpu")
    assert "pack_low_bits=True runs it with int4_weight_only" in choice.reason
    packed = choose_kernel(_plan(3, 128, False), OUT, IN, "cpu", pack_low_bits=True, kernel_dtype=torch.float32)
    assert packed.kernel == "int4_weight_only" and packed.exact
    assert choose_kernel(_plan(6, -1, False), OUT, IN, "cpu").kernel is None
    six = choose_kernel(_plan(6, -1, False), OUT, IN, "cpu", pack_low_bits=True, kernel_dtype=torch.float32)
    assert six.kernel == "int8_weight_only" and six.exact


def test_cuda_choices():
    sparse = LayerPlan(method="magnitude", pattern="2:4")
    choice = choose_kernel(sparse, OUT, IN, "cuda", dtype=torch.bfloat16)
    assert choice.kernel == "semi_structured_2_4" and choice.exact and choice.format == "2:4 sparse"
    assert not choose_kernel(sparse, OUT, IN, "cuda:0").exact          # float32 model: runs in bf16
    assert "in_features % 64" in choose_kernel(sparse, OUT, 96, "cuda").reason
    quant = choose_kernel(_plan(4, 128, True), OUT, IN, "cuda")
    assert quant.kernel == "int4_weight_only" and not quant.exact and "bfloat16" in quant.reason
    assert choose_kernel(_plan(8, -1, False), OUT, IN, "cuda").kernel == "int8_weight_only"
    assert choose_kernel(_plan(8, -1, False), OUT, IN, "cuda", dynamic_int8=True).kernel == "int8_weight_only"
    assert choose_kernel(_plan(4, 128, False, pattern="2:4"), OUT, IN, "cuda").kernel == "int4_weight_only"


def test_dense_and_labels():
    assert choose_kernel(DENSE, OUT, IN, "cpu").format == "dense"
    assert format_label(_plan(4, 128, False), IN) == "int4 g128 asym"
    assert format_label(_plan(8, -1, True), IN) == "int8 per-channel sym"
    assert format_label(_plan(3, 128, False), IN) == "3-bit g128 asym"
    assert format_label(_plan(4, 64, True, pattern="2:4"), IN) == "2:4 sparse + int4 g64 sym"
    assert KERNELS["int8_dynamic"].opt_in and KERNELS["semi_structured_2_4"].devices == ("cuda",)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_semi_structured_refuses_clearly_without_cuda():
    cw = compress_weight(_weight(), LayerPlan(method="magnitude", pattern="2:4"))
    with pytest.raises(PlanError, match="needs a CUDA device"):
        SemiStructured24Linear.from_compressed(cw, None, "cuda", torch.bfloat16)


# ------------------------------------------------------------------------------ whole models
MIXED = [
    _plan(4, 32, False),                           # int4 kernel
    _plan(4, 64, True, masked=True),               # int4 kernel, sparsity not exploited
    _plan(8, -1, False),                           # int8 weight-only kernel
    _plan(3, 32, False),                           # no 3-bit kernel
    _plan(8, 32, True),                            # int8 needs per channel
    LayerPlan(method="magnitude", pattern="2:4"),  # 2:4 needs CUDA
    DENSE,
]
EMBEDDING_PLANS = {"llama": _plan(3, 32, False), "gemma3": _plan(4, 64, False), "gpt2": _plan(8, -1, True)}
HEAD_PLANS = {"llama": _plan(4, 64, False)}


def _compressed_model(path, arch):
    lm = load_model(str(path))
    model = lm.model
    targets = find_targets(model)
    plans, compressed = {}, {}
    for i, t in enumerate(targets):
        if t.in_blocks:
            plan = MIXED[i % len(MIXED)]
        elif t.kind == "embedding":
            plan = EMBEDDING_PLANS[arch]
        else:
            plan = HEAD_PLANS[arch]
        plans[t.name] = plan
        if plan.is_dense:
            continue
        module = get_module(model, t.name)
        compressed[t.name] = compress_weight(read_weight(module), plan)
        write_weight(module, compressed[t.name].weight)
    return lm, targets, plans, compressed


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_materialized_tiny_model_gives_the_simulated_logits(tiny_models, arch):
    lm, targets, plans, compressed = _compressed_model(tiny_models[arch], arch)
    simulated = lm.model
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = simulated(input_ids=ids).logits
    deployed = copy.deepcopy(simulated)
    report = materialize(deployed, targets, compressed, plans, kernel_dtype=torch.float32)   # the exact path
    with torch.no_grad():
        out = deployed(input_ids=ids).logits
    _close(out, ref, rel=1e-4)
    assert not report.inexact

    kinds = {n: c.kernel for n, c in report.choices.items()}
    assert "int4_weight_only" in kinds.values() and "int8_weight_only" in kinds.values()
    no_kernel = report.no_kernel
    assert any("no 3-bit kernel on cpu" in r for r in no_kernel.values())
    assert any("one group per row" in r for r in no_kernel.values())
    assert any("2:4 sparse kernels need CUDA" in r for r in no_kernel.values())
    assert set(report.dense_layers) == {t.name for t in targets if plans[t.name].is_dense}
    assert len(report.kernel_layers) + len(no_kernel) + len(report.dense_layers) == len(targets)
    tied = {t.name for t in targets if t.tied_with}
    for name, choice in report.choices.items():
        module = deployed.get_submodule(name)
        if choice.kernel in ("int4_weight_only", "int8_weight_only") and name not in tied:
            assert type(module).__name__ in ("Int4WeightOnlyLinear", "Int8WeightOnlyLinear")
        elif choice.kernel is None and choice.format != "dense":
            assert torch.equal(read_weight(module), compressed[name].weight)   # the simulated float weight
    dense_bytes = sum(4 * t.numel for t in targets)
    assert 0 < report.resident_bytes < dense_bytes
    assert "layers with kernels" in report.table() and report.to_dict()["kernel_layers"] == len(report.kernel_layers)

    fast = copy.deepcopy(simulated)   # the default: kernels compute in bfloat16 on cpu
    fast_report = materialize(fast, targets, compressed, plans)
    assert set(fast_report.inexact) == set(fast_report.kernel_layers) - {
        n for n, c in fast_report.choices.items() if c.kernel == "embedding_gather"}
    with torch.no_grad():
        _close(fast(input_ids=ids).logits, ref, rel=3e-2)

    emb = next(t for t in targets if t.kind == "embedding")
    if emb.tied_with:   # gemma3 / gpt2: a quantized lookup plus a head kernel over the same codes
        assert type(deployed.get_submodule(emb.name)).__name__ == "QuantizedEmbedding"
        assert type(deployed.get_output_embeddings()).__name__ in ("Int4WeightOnlyLinear", "Int8WeightOnlyLinear")
        assert "tied" in report.choices[emb.name].reason
    else:               # llama: a 3-bit lookup (exact gather) and its own int4 LM head
        assert report.choices[emb.name].kernel == "embedding_gather"
        assert report.choices["lm_head"].kernel == "int4_weight_only"


def test_materialized_model_generates_like_the_simulated_one(tiny_models):
    lm, targets, plans, compressed = _compressed_model(tiny_models["gemma3"], "gemma3")
    deployed = copy.deepcopy(lm.model)
    materialize(deployed, targets, compressed, plans, kernel_dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(deployed.generate(ids, **kwargs), lm.model.generate(ids, **kwargs))


def test_materialize_dense_and_errors(tiny_models):
    lm = load_model(str(tiny_models["llama"]))
    targets = find_targets(lm.model)
    before = {n: type(m) for n, m in lm.model.named_modules()}
    report = materialize(lm.model, targets, {}, {})
    assert {n: type(m) for n, m in lm.model.named_modules()} == before
    assert len(report.dense_layers) == len(targets) and not report.kernel_layers and not report.no_kernel
    assert report.resident_bytes == sum(p.numel() * 4 for p in lm.model.parameters()
                                        if p.dim() == 2)
    with pytest.raises(PlanError, match="no compressed weight"):
        materialize(lm.model, targets, {}, {targets[0].name: _plan(4, 32, False)})


def test_dynamic_int8_model_is_close(tiny_models):
    lm = load_model(str(tiny_models["llama"]))
    model = lm.model
    targets = find_targets(model, embeddings=False)
    plan = _plan(8, -1, False)
    compressed = {}
    for t in targets:
        module = get_module(model, t.name)
        compressed[t.name] = compress_weight(read_weight(module), plan)
        write_weight(module, compressed[t.name].weight)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    deployed = copy.deepcopy(model)
    report = materialize(deployed, targets, compressed, {t.name: plan for t in targets}, dynamic_int8=True)
    assert set(report.kernel_layers) == {t.name for t in targets}
    assert set(report.inexact) == set(report.kernel_layers)
    with torch.no_grad():
        ref, out = model(input_ids=ids).logits, deployed(input_ids=ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_a_packed_export_loads_onto_kernels(tiny_models, tmp_path):
    """``autocomp.load_deployed``: a packed folder straight onto real kernels, same logits as the
    simulated model it was exported from (bf16 compute), the layers without a kernel listed."""
    import autocomp
    from autocomp.deploy.packed_io import save_packed
    from autocomp.errors import AutocompError

    lm, targets, plans, compressed = _compressed_model(tiny_models["gemma3"], "gemma3")
    save_packed(tmp_path / "packed", lm.model, targets, compressed, plans, dtype=torch.float32)
    deployed, report = autocomp.load_deployed(tmp_path / "packed")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(deployed(input_ids=ids).logits, lm.model(input_ids=ids).logits, rel=3e-2)
    assert "int4_weight_only" in {c.kernel for c in report.choices.values()}
    assert report.reasons() and all(n in plans and not plans[n].is_dense for n in report.no_kernel)
    with pytest.raises(AutocompError, match="packed"):
        autocomp.load_deployed(tmp_path)   # not a packed export
