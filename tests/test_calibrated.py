"""Calibrated compression on tiny random models: GPTQ and SparseGPT against their data-free
counterparts (layer reconstruction error on the calibration inputs), exact sparsity and code
invariants, the layer-variant cache (memory / disk tiers, corruption, two processes racing on one
entry), staged evaluation (unit and end to end), sequential calibration, and the sensitivity pass."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from tiny import state_copy
import torch

from autocomp.pipeline.variants import LayerVariantCache, variant_key
from autocomp.pipeline.calibration import LayerStats, collect_input_stats
from autocomp.pipeline.layer import compress_weight
from autocomp.inputs.data import WindowSpec, text_windows
from autocomp.inputs.models import load_model
from autocomp.config.plan import CalibrationSpec, CompressionPlan, LayerPlan
from autocomp.inputs.targets import find_targets, get_module, read_weight

COMPLETE = optuna.trial.TrialState.COMPLETE
PRUNED = optuna.trial.TrialState.PRUNED
CALIB = WindowSpec(8, 64, 0)          # calibration windows for the per-layer comparisons
SEQ_CALIB = WindowSpec(4, 64, 0)      # calibration windows of the sequential / study tests
EVAL = WindowSpec(6, 64)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@dataclass
class Calibrated:
    targets: list          # decoder-block targets
    weights: dict          # name -> [out, in] float32 dense weight
    stats: dict            # name -> LayerStats with a Hessian
    inputs: dict           # name -> [n, in] float64 inputs of the layer on the calibration windows


def _calibrate(folder: Path) -> Calibrated:
    lm = load_model(str(folder))
    targets = [t for t in find_targets(lm.model) if t.in_blocks]
    windows = text_windows(lm.tokenizer, "wikitext2", "validation", CALIB, random=True)
    stats = collect_input_stats(lm.model, targets, windows.input_ids, hessian=True)
    # the raw inputs too, to check the Hessian against ||W X - Q X||^2 directly
    captured: dict[str, list] = {}
    handles = [lm.model.get_submodule(t.stats_module).register_forward_pre_hook(
        lambda _m, inp, name=t.name: captured.setdefault(name, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for t in targets]
    try:
        with torch.no_grad():
            for row in windows.input_ids:
                lm.model(row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    weights = {t.name: read_weight(get_module(lm.model, t.name)).detach().float().clone() for t in targets}
    inputs = {name: torch.cat(xs).double() for name, xs in captured.items()}
    return Calibrated(targets, weights, stats, inputs)


@pytest.fixture(scope="module")
def calibrated(tiny_models) -> dict[str, Calibrated]:
    return {arch: _calibrate(tiny_models[arch]) for arch in ("llama", "gpt2", "opt")}


def recon_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) with the undamped Hessian H = 2 X^T X / n."""
    d = (w - q).double()
    return float(((d @ hessian.double()) * d).sum())


def _row_group_distinct(values: torch.Tensor, gs: int) -> int:
    """Largest number of distinct values within one (row, group) of ``values``."""
    in_f = values.shape[1]
    worst = 0
    for start in range(0, in_f, gs):
        srt = values[:, start:start + gs].sort(dim=1).values
        distinct = (srt[:, 1:] != srt[:, :-1]).sum(dim=1) + 1
        worst = max(worst, int(distinct.max()))
    return worst


def _check_codes(qw, bits: int, mask: torch.Tensor | None = None) -> None:
    """codes / scales / zeros reproduce the dequantized weight exactly, with at most 2^bits levels a group."""
    out_f, in_f = qw.weight.shape
    gs = qw.group_size
    ng = -(-in_f // gs)
    assert qw.bits == bits
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (out_f, in_f)
    assert int(qw.codes.max()) <= 2 ** bits - 1
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (out_f, ng)
    assert bool((qw.scales > 0).all())
    col = torch.arange(in_f) // gs
    scale = qw.scales.float()[:, col]
    zero = qw.zeros.float()[:, col] if qw.zeros is not None else torch.full_like(scale, float(2 ** (bits - 1)))
    deq = (qw.codes.float() - zero) * scale
    if mask is not None:
        deq = torch.where(mask, deq, torch.zeros(()))
    assert torch.equal(deq, qw.weight)
    assert _row_group_distinct(qw.weight, gs) <= 2 ** bits
    assert _row_group_distinct(qw.codes.float(), gs) <= 2 ** bits


def _correlated_layer(seed: int = 0, n: int = 512, rank: int = 16, d: int = 128, out: int = 64):
    """A layer whose inputs are strongly correlated: X = Z A (+ a little noise), A a random mixing."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    a = torch.randn(rank, d, generator=g)
    x = z @ a + 0.01 * torch.randn(n, d, generator=g)
    w = torch.randn(out, d, generator=g) * 0.05
    stats = LayerStats(x.double().pow(2).sum(dim=0), n, (2.0 * x.t() @ x / n).float())
    return w, x.double(), stats


# ---------------------------------------------------------------------------------------------
# 1. GPTQ vs RTN
# ---------------------------------------------------------------------------------------------

def test_hessian_error_equals_output_error(calibrated):
    # tr(dW H dW^T) == (2 / n) ||dW X^T||^2: the Hessian collected is the one of the layer's real inputs
    for arch, cal in calibrated.items():
        for t in cal.targets:
            st, x = cal.stats[t.name], cal.inputs[t.name]
            assert st.n_tokens == x.shape[0] == CALIB.count * CALIB.seq_len
            w = cal.weights[t.name]
            q = compress_weight(w, LayerPlan("rtn", bits=3, group_size=32)).weight
            direct = 2.0 / x.shape[0] * float(((w - q).double() @ x.t()).pow(2).sum())
            assert recon_error(w, q, st.hessian) == pytest.approx(direct, rel=1e-4), (arch, t.name)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_gptq_beats_rtn_on_every_layer(calibrated, arch):
    cal = calibrated[arch]
    assert len(cal.targets) >= 8
    if arch == "gpt2":
        assert {t.kind for t in cal.targets} == {"conv1d"}
    for t in cal.targets:
        w, st = cal.weights[t.name], cal.stats[t.name]
        for bits in (3, 4):
            for gs in (32, -1):
                rtn = compress_weight(w, LayerPlan("rtn", bits=bits, group_size=gs)).weight
                e_rtn = recon_error(w, rtn, st.hessian)
                for options in ({}, {"act_order": True}):
                    res = compress_weight(w, LayerPlan("gptq", bits=bits, group_size=gs, options=options), st)
                    e_gptq = recon_error(w, res.weight, st.hessian)
                    assert e_gptq < e_rtn, (arch, t.name, bits, gs, options, e_gptq, e_rtn)
                    assert res.mask is None
                    _check_codes(res.quant, bits)
                    assert res.quant.group_size == (t.in_features if gs == -1 else gs)
                    assert torch.equal(res.weight, res.quant.weight)


def test_gptq_large_gap_on_correlated_inputs():
    w, x, st = _correlated_layer()
    for bits in (3, 4):
        for gs in (32, -1):
            rtn = compress_weight(w, LayerPlan("rtn", bits=bits, group_size=gs)).weight
            e_rtn = float(((w - rtn).double() @ x.t()).pow(2).sum())
            for options in ({}, {"act_order": True}):
                res = compress_weight(w, LayerPlan("gptq", bits=bits, group_size=gs, options=options), st)
                e_gptq = float(((w - res.weight).double() @ x.t()).pow(2).sum())
                assert e_gptq < 0.5 * e_rtn, (bits, gs, options, e_gptq / e_rtn)
                _check_codes(res.quant, bits)
                # and in the Hessian form as well
                assert recon_error(w, res.weight, st.hessian) < 0.5 * recon_error(w, rtn, st.hessian)


def test_gptq_symmetric_and_act_order_static_groups():
    w, _, st = _correlated_layer(seed=3)
    res = compress_weight(w, LayerPlan("gptq", bits=4, group_size=32, symmetric=True, options={"act_order": True}), st)
    assert res.quant.zeros is None
    _check_codes(res.quant, 4)
    plain = compress_weight(w, LayerPlan("gptq", bits=4, group_size=32), st)
    assert not torch.equal(plain.weight, res.weight)


# ---------------------------------------------------------------------------------------------
# 2. SparseGPT vs magnitude
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_sparsegpt_beats_magnitude_with_exact_counts(calibrated, arch):
    cal = calibrated[arch]
    for t in cal.targets:
        w, st = cal.weights[t.name], cal.stats[t.name]
        out_f, in_f = w.shape
        for kw in ({"sparsity": 0.5}, {"pattern": "2:4"}):
            sg = compress_weight(w, LayerPlan("sparsegpt", **kw), st)
            mag = compress_weight(w, LayerPlan("magnitude", **kw))
            assert recon_error(w, sg.weight, st.hessian) < recon_error(w, mag.weight, st.hessian), (arch, t.name, kw)
            mask = sg.mask
            assert mask.dtype == torch.bool and mask.shape == w.shape
            if "pattern" in kw:
                assert bool((mask.reshape(out_f, in_f // 4, 4).sum(dim=2) == 2).all()), (arch, t.name)
            else:
                assert int((~mask).sum()) == round(0.5 * w.numel()), (arch, t.name)
            assert bool((sg.weight[~mask] == 0).all())
            assert sg.quant is None
            # the kept weights were updated (reconstruction), not just masked
            assert not torch.equal(sg.weight[mask], w[mask])

            # joint pruning + GPTQ quantization in one pass, against magnitude + RTN
            for bits in (3, 4):
                lp = LayerPlan("sparsegpt+gptq", bits=bits, group_size=32, **kw)
                joint = compress_weight(w, lp, st)
                assert joint.quant is not None and joint.mask is not None
                jm = joint.mask
                if "pattern" in kw:
                    assert bool((jm.reshape(out_f, in_f // 4, 4).sum(dim=2) == 2).all())
                else:
                    assert int((~jm).sum()) == round(0.5 * w.numel())
                assert bool((joint.weight[~jm] == 0).all())
                _check_codes(joint.quant, bits, mask=jm)
                # kept weights: at most 2^bits levels per (row, group), zeros included
                assert _row_group_distinct(torch.where(jm, joint.weight, joint.weight.new_zeros(())), 32) <= 2 ** bits
                base = compress_weight(w, LayerPlan("magnitude+rtn", bits=bits, group_size=32, **kw))
                assert recon_error(w, joint.weight, st.hessian) < recon_error(w, base.weight, st.hessian), \
                    (arch, t.name, kw, bits)


def test_sparsegpt_exact_count_odd_sparsity_and_ragged_blocks():
    # block quotas add up to exactly round(s * numel), also when blocks are cut unevenly
    w, _, st = _correlated_layer(seed=5, d=200, out=13)
    for s in (0.1, 0.37, 0.5, 0.63):
        for block in (7, 64, 128):
            res = compress_weight(w, LayerPlan("sparsegpt", sparsity=s, options={"block_size": block}), st)
            assert int((~res.mask).sum()) == round(s * w.numel()), (s, block)


def test_sparsegpt_large_gap_on_correlated_inputs():
    w, x, st = _correlated_layer(seed=1)
    sg = compress_weight(w, LayerPlan("sparsegpt", sparsity=0.5), st).weight
    mag = compress_weight(w, LayerPlan("magnitude", sparsity=0.5)).weight
    def err(q):
        return float(((w - q).double() @ x.t()).pow(2).sum())

    assert err(sg) < 0.5 * err(mag)


# ---------------------------------------------------------------------------------------------
# 3. the layer-variant cache
# ---------------------------------------------------------------------------------------------

CACHE_PLANS = [
    LayerPlan("gptq", bits=4, group_size=32),
    LayerPlan("gptq", bits=3, group_size=-1, symmetric=True, options={"act_order": True}),
    LayerPlan("sparsegpt", sparsity=0.5),
    LayerPlan("sparsegpt", pattern="2:4"),
    LayerPlan("sparsegpt+gptq", sparsity=0.5, bits=4, group_size=32),
    LayerPlan("sparsegpt+gptq", pattern="2:4", bits=3, group_size=32, symmetric=True),
    LayerPlan("wanda", sparsity=0.5),
    LayerPlan("wanda+rtn", pattern="2:4", bits=4, group_size=32),
    LayerPlan("wanda+gptq", sparsity=0.37, bits=4, group_size=32),
]


@pytest.fixture(scope="module")
def llama_stats(tiny_models):
    lm = load_model(str(tiny_models["llama"]))
    targets = find_targets(lm.model)
    windows = text_windows(lm.tokenizer, "wikitext2", "validation", SEQ_CALIB, random=True)
    stats = collect_input_stats(lm.model, targets, windows.input_ids, hessian=True)
    return lm, targets, stats


def _stitcher(lm, targets, stats, directory):
    from autocomp.pipeline.stitch import ModelStitcher

    return ModelStitcher(lm.model, targets, lm.fingerprint, stats, "digest-a", LayerVariantCache(directory=directory))


def test_variant_cache_memory_and_disk_hits_are_bit_identical(llama_stats, tmp_path):
    lm, targets, stats = llama_stats
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    first = _stitcher(lm, targets, stats, tmp_path)
    fresh = {}
    for name in names:
        dense = first.dense_weight(name).clone()
        for i, lp in enumerate(CACHE_PLANS):
            fresh[name, i] = compress_weight(dense, lp, stats[name]).weight
            got = first.variant(name, lp)
            assert torch.equal(got, fresh[name, i]), (name, lp)
    n = len(names) * len(CACHE_PLANS)
    assert (first.cache.misses, first.cache.hits, first.cache.disk_hits) == (n, 0, 0)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == n       # calibrated variants are persisted, one file each
    # memory hits
    for name in names:
        for i, lp in enumerate(CACHE_PLANS):
            assert torch.equal(first.variant(name, lp), fresh[name, i])
    assert (first.cache.misses, first.cache.hits, first.cache.disk_hits) == (n, n, 0)
    # disk hits: a new cache (a new process) on the same folder computes nothing
    second = _stitcher(lm, targets, stats, tmp_path)
    for name in names:
        for i, lp in enumerate(CACHE_PLANS):
            got = second.variant(name, lp)
            assert got.dtype == fresh[name, i].dtype
            assert torch.equal(got, fresh[name, i]), (name, lp)
    assert (second.cache.misses, second.cache.hits, second.cache.disk_hits) == (0, 0, n)
    # quantized variants are stored as codes (smaller than the float weight)
    sizes = {f.stat().st_size for f in files}
    assert min(sizes) < 64 * 64 * 4
    # other statistics: another key, so another variant (never a stale hit)
    from autocomp.pipeline.stitch import ModelStitcher

    other = ModelStitcher(lm.model, targets, lm.fingerprint, stats, "digest-b", LayerVariantCache(directory=tmp_path))
    other.variant(names[0], CACHE_PLANS[0])
    assert (other.cache.misses, other.cache.disk_hits) == (1, 0)


def test_variant_cache_rtn_roundtrip_and_key(llama_stats, tmp_path):
    lm = llama_stats[0]
    w = read_weight(get_module(lm.model, "model.layers.0.mlp.up_proj")).clone()
    plans = [LayerPlan("rtn", bits=4, group_size=32), LayerPlan("rtn", bits=3, group_size=-1, symmetric=True),
             LayerPlan("magnitude+rtn", sparsity=0.5, bits=4, group_size=32), LayerPlan("magnitude", pattern="2:4")]
    cache = LayerVariantCache(directory=tmp_path)
    fresh = {}
    for lp in plans:
        key = variant_key(lm.fingerprint, "model.layers.0.mlp.up_proj", lp, "digest-a")
        # data-free methods do not depend on the statistics' digest; calibrated ones do
        assert key == variant_key(lm.fingerprint, "model.layers.0.mlp.up_proj", lp, "digest-b")
        fresh[key] = compress_weight(w, lp).weight
        assert torch.equal(cache.get_or_compute(key, lambda lp=lp: compress_weight(w, lp), persist=True), fresh[key])
        assert torch.equal(cache.get_or_compute(key, lambda: pytest.fail("memory hit expected"), persist=True), fresh[key])
    assert (cache.misses, cache.hits, cache.disk_hits) == (len(plans), len(plans), 0)
    again = LayerVariantCache(directory=tmp_path)
    for key, value in fresh.items():
        assert torch.equal(again.get_or_compute(key, lambda: pytest.fail("disk hit expected"), persist=True), value)
    assert (again.misses, again.hits, again.disk_hits) == (0, 0, len(plans))
    gp = LayerPlan("gptq", bits=4, group_size=32)
    assert variant_key("f", "l", gp, "digest-a") != variant_key("f", "l", gp, "digest-b")
    assert variant_key("f", "l", gp, "digest-a") != variant_key("f", "l2", gp, "digest-a")
    assert variant_key("f", "l", gp, "digest-a") != variant_key("f", "l", LayerPlan("gptq", bits=4, group_size=32,
                                                                                    options={"act_order": True}), "digest-a")


def test_a_ggml_variant_comes_back_from_disk_with_its_blocks(llama_stats, tmp_path):
    """llama.cpp's blocks round-trip through the variant cache: the same bytes, type and weight."""
    from optional_deps import llama_cpp_or_skip

    llama_cpp_or_skip()
    lm, _, stats = llama_stats
    name = "model.layers.0.mlp.up_proj"
    w = read_weight(get_module(lm.model, name)).clone()
    lp = LayerPlan("ggml-imatrix", bits=3)
    key = variant_key(lm.fingerprint, name, lp, "digest-a")
    made = compress_weight(w, lp, stats[name])
    assert made.quant.ggml_type == "Q4_0"       # 64 inputs: llama.cpp's fallback for Q3_K
    LayerVariantCache(directory=tmp_path).get_compressed(key, lambda: made, persist=True)
    back = LayerVariantCache(directory=tmp_path).get_compressed(key, lambda: pytest.fail("disk hit expected"))
    assert back.quant.ggml_type == made.quant.ggml_type and back.quant.bits == 3
    assert torch.equal(back.quant.codes, made.quant.codes) and torch.equal(back.weight, made.weight)


def test_variant_cache_prune_keeps_the_recently_used(llama_stats, tmp_path):
    import os
    import time

    lm = llama_stats[0]
    w = read_weight(get_module(lm.model, "model.layers.0.mlp.up_proj")).clone()
    cache = LayerVariantCache(directory=tmp_path)
    keys = []
    for i, bits in enumerate([2, 3, 4, 5]):
        lp = LayerPlan("rtn", bits=bits, group_size=32)
        key = variant_key(lm.fingerprint, "model.layers.0.mlp.up_proj", lp, None)
        cache.get_or_compute(key, lambda lp=lp: compress_weight(w, lp), persist=True)
        os.utime(cache._path(key), (time.time() - 100 + i, time.time() - 100 + i))  # written in this order
        keys.append(key)
    # reading the oldest from disk (a new process) makes it the most recently used
    LayerVariantCache(directory=tmp_path).get_or_compute(keys[0], lambda: pytest.fail("disk hit expected"))
    entries = cache.disk_entries()
    assert [p.stem for p, _, _ in entries] == keys[1:] + keys[:1]
    sizes = [size for _, size, _ in entries]
    removed, freed = cache.prune_disk(sum(sizes) - sizes[0] - 1)  # room for all but the two oldest
    assert (removed, freed) == (2, sizes[0] + sizes[1])
    assert sorted(p.stem for p, _, _ in cache.disk_entries()) == sorted([keys[3], keys[0]])
    assert cache.prune_disk(10**12) == (0, 0)
    assert cache.prune_disk(0)[0] == 2 and cache.disk_entries() == []


def test_variant_cache_corrupt_file_is_recomputed(llama_stats, tmp_path):
    lm, targets, stats = llama_stats
    name = "model.layers.1.self_attn.v_proj"
    lp = LayerPlan("sparsegpt+gptq", sparsity=0.5, bits=4, group_size=32)
    good = _stitcher(lm, targets, stats, tmp_path).variant(name, lp).clone()
    [path] = list(tmp_path.rglob("*.safetensors"))
    valid = path.read_bytes()
    for broken in (b"not a safetensors file", valid[: len(valid) // 2], b"", valid[:8] + b"\xff" * 64):
        path.write_bytes(broken)
        st = _stitcher(lm, targets, stats, tmp_path)
        assert torch.equal(st.variant(name, lp), good)
        assert (st.cache.misses, st.cache.disk_hits) == (1, 0)
        # ... and rewritten: the next process reads it
        st2 = _stitcher(lm, targets, stats, tmp_path)
        assert torch.equal(st2.variant(name, lp), good)
        assert (st2.cache.misses, st2.cache.disk_hits) == (0, 1)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


RACE_ROUNDS = 25


def _race_case(r: int):
    g = torch.Generator().manual_seed(1000 + r)
    w = torch.randn(48, 96, generator=g)
    plans = [LayerPlan("rtn", bits=4, group_size=32), LayerPlan("magnitude", sparsity=0.5),
             LayerPlan("magnitude+rtn", pattern="2:4", bits=3, group_size=32)]
    return w, plans[r % len(plans)]


def _hot_case():
    g = torch.Generator().manual_seed(7)
    return torch.randn(512, 1024, generator=g), LayerPlan("magnitude", sparsity=0.5)


def _race_key(r: int, plan: LayerPlan) -> str:
    return variant_key("race", f"layer.{r}", plan, None)


def _race_worker(directory: str, rounds: int, barrier, hot_rounds: int) -> None:
    """One of two processes writing the same entries at the same time (run with 'spawn')."""
    torch.set_num_threads(1)
    for r in range(rounds):
        w, plan = _race_case(r)
        expected = compress_weight(w, plan).weight
        barrier.wait(timeout=120)
        cache = LayerVariantCache(directory=directory)
        got = cache.get_or_compute(_race_key(r, plan), lambda w=w, plan=plan: compress_weight(w, plan), persist=True)
        if not torch.equal(got, expected):
            raise SystemExit(3)
    # one hot entry (large enough that a write is not a single system call), written by both
    # processes over and over while they read it back
    w, plan = _hot_case()
    cw = compress_weight(w, plan)
    cache = LayerVariantCache(directory=directory)
    key = _race_key(-1, plan)
    barrier.wait(timeout=120)
    for _ in range(hot_rounds):   # no barrier: the two loops drift, so writes overlap reads
        cache._write(key, cw)
        # the file is complete at every moment (ours, or the other process's): always a disk hit
        again = LayerVariantCache(directory=directory)
        if not torch.equal(again.get_or_compute(key, lambda: compress_weight(w, plan), persist=True), cw.weight):
            raise SystemExit(4)
        if (again.disk_hits, again.misses) != (1, 0):
            raise SystemExit(5)


def test_two_processes_writing_the_same_entries(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    hot_rounds = 200
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), RACE_ROUNDS, barrier, hot_rounds)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]

    expected_files = {}
    for r in range(RACE_ROUNDS):
        _, plan = _race_case(r)
        key = _race_key(r, plan)
        expected_files[key] = r
    expected_files[_race_key(-1, _hot_case()[1])] = -1
    from autocomp.pipeline.variants import MARKER

    every = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != MARKER]
    # exactly one file per entry, nothing else (no temporary files left behind)
    assert sorted(p.name for p in every) == sorted(f"{k}.safetensors" for k in expected_files)
    assert not [p for p in every if p.name.startswith(".") or p.suffix == ".tmp"]
    reader = LayerVariantCache(directory=tmp_path)
    for key, r in expected_files.items():
        w, plan = _race_case(r) if r >= 0 else _hot_case()
        got = reader.get_or_compute(key, lambda: pytest.fail("a valid entry was expected on disk"), persist=True)
        assert torch.equal(got, compress_weight(w, plan).weight)
    assert reader.disk_hits == len(expected_files) and reader.misses == 0


# ---------------------------------------------------------------------------------------------
# 4. staged evaluation
# ---------------------------------------------------------------------------------------------

def _windows_nll(dense_per_token: list[float], diff_per_token: list[float], tokens: int = 63):
    toks = torch.full((len(dense_per_token),), tokens, dtype=torch.long)
    dense = torch.tensor(dense_per_token, dtype=torch.float64) * tokens
    cand = dense + torch.tensor(diff_per_token, dtype=torch.float64) * tokens
    return cand, toks, dense


def test_staged_estimate_and_budget():
    from autocomp.config.objectives import Budgets
    from autocomp.study.staged import estimate, stage1_reason, t_quantile

    dense_ppl = math.exp(3.0)
    budgets = Budgets(max_ppl_increase_pct=1.0)
    objectives = ("perplexity", "size_mb")
    # far above the dense NLL on every window: stopped for the perplexity budget
    nll, toks, dense = _windows_nll([3.0, 2.9, 3.1, 3.05], [0.50, 0.48, 0.53, 0.51])
    est = estimate(nll, toks, None, dense, dense_ppl)
    mean = float(((nll - dense) / toks).mean())
    assert est.windows == 4
    assert est.ppl_estimate == pytest.approx(dense_ppl * math.exp(mean))
    assert dense_ppl * 1.01 < est.ppl_lower < est.ppl_estimate
    sd = float(((nll - dense) / toks).std())
    assert est.ppl_lower == pytest.approx(dense_ppl * math.exp(mean - t_quantile(3) * sd / 2))
    reason = stage1_reason(est, 1.0, budgets, dense_ppl, objectives, [])
    assert reason and "budget" in reason and "perplexity" in reason
    # slightly noisy around the dense model: not stopped
    nll, toks, dense = _windows_nll([3.0, 2.9, 3.1, 3.05], [0.004, -0.003, 0.002, -0.001])
    est = estimate(nll, toks, None, dense, dense_ppl)
    assert est.ppl_lower < dense_ppl * 1.01
    assert stage1_reason(est, 1.0, budgets, dense_ppl, objectives, []) is None
    # a small but very consistent increase above the budget is stopped (paired differences)
    nll, toks, dense = _windows_nll([3.0, 5.0, 1.0, 4.0, 2.0, 3.5], [0.03, 0.031, 0.029, 0.030, 0.0305, 0.0295])
    est = estimate(nll, toks, None, dense, dense_ppl)
    assert stage1_reason(est, 1.0, budgets, dense_ppl, objectives, []) is not None
    # no budget, no front: nothing to stop for
    assert stage1_reason(est, 1.0, Budgets(), dense_ppl, objectives, []) is None


def test_staged_dominated_by_front():
    from autocomp.config.objectives import Budgets
    from autocomp.study.staged import estimate, stage1_reason

    dense_ppl = math.exp(3.0)
    objectives = ("perplexity", "size_mb")
    nll, toks, dense = _windows_nll([3.0, 2.9, 3.1, 3.05], [0.30, 0.29, 0.31, 0.30])
    est = estimate(nll, toks, None, dense, dense_ppl)
    front = [{"perplexity": dense_ppl * 1.05, "size_mb": 1.0}]
    reason = stage1_reason(est, 2.0, Budgets(), dense_ppl, objectives, front)
    assert reason and reason.startswith("dominated")
    # a front point that is larger, or worse, does not dominate
    assert stage1_reason(est, 0.5, Budgets(), dense_ppl, objectives, front) is None
    worse = [{"perplexity": dense_ppl * 2.0, "size_mb": 1.0}]
    assert stage1_reason(est, 2.0, Budgets(), dense_ppl, objectives, worse) is None
    # KL objective: compared by the KL bound
    kl = torch.tensor([0.2, 0.21, 0.19, 0.2], dtype=torch.float64) * 63
    est = estimate(nll, toks, kl, dense, dense_ppl)
    assert est.kl_lower is not None and 0 < est.kl_lower < est.kl_estimate
    front = [{"kl": 0.01, "perplexity": 1e9, "size_mb": 1.0}]
    reason = stage1_reason(est, 2.0, Budgets(), dense_ppl, ("kl", "size_mb"), front)
    assert reason and reason.startswith("dominated") and "kl" in reason
    assert stage1_reason(est, 2.0, Budgets(max_kl=0.05), dense_ppl, ("kl", "size_mb"), []) is not None
    assert stage1_reason(est, 2.0, Budgets(max_kl=1.0), dense_ppl, ("kl", "size_mb"), []) is None


def test_staged_two_noisy_windows_are_not_stopped():
    from autocomp.config.objectives import Budgets
    from autocomp.study.staged import (
        estimate,
        optimistic_bound,
        stage1_reason,
        t_quantile,
    )

    assert t_quantile(1) == pytest.approx(12.706)
    assert t_quantile(3) == pytest.approx(3.182)
    assert t_quantile(1000) == pytest.approx(1.96)
    dense_ppl = math.exp(3.0)
    budgets = Budgets(max_ppl_increase_pct=1.0)
    nll, toks, dense = _windows_nll([3.0, 3.2], [0.3, 0.5])
    est = estimate(nll, toks, None, dense, dense_ppl)
    assert est.ppl_estimate > dense_ppl * 1.3        # the point estimate alone would stop it ...
    diffs = (nll - dense) / toks
    mean, _ = optimistic_bound(diffs)
    se = float(diffs.std()) / math.sqrt(2)
    assert mean - 1.96 * se > math.log(1.01)           # ... and so would a normal quantile
    assert stage1_reason(est, 1.0, budgets, dense_ppl, ("perplexity", "size_mb"), []) is None
    front = [{"perplexity": dense_ppl * 1.05, "size_mb": 0.5}]
    assert stage1_reason(est, 1.0, budgets, dense_ppl, ("perplexity", "size_mb"), front) is None
    # the same mean over many consistent windows is stopped
    nll, toks, dense = _windows_nll([3.0] * 8, [0.3, 0.5, 0.35, 0.45, 0.4, 0.42, 0.38, 0.4])
    est = estimate(nll, toks, None, dense, dense_ppl)
    assert stage1_reason(est, 1.0, budgets, dense_ppl, ("perplexity", "size_mb"), []) is not None


def test_screen_raises_with_partial_metrics():
    from autocomp.errors import StudyError
    from autocomp.config.objectives import Budgets
    from autocomp.study.staged import Screen, StagedConfig, TrialPruned, estimate

    with pytest.raises(StudyError):
        StagedConfig(1)
    screen = Screen(StagedConfig(2), Budgets(max_size_mb=1.0, max_ppl_increase_pct=1.0), math.exp(3.0),
                    ("perplexity", "size_mb"), [])
    screen.after_size(0.9)
    with pytest.raises(TrialPruned) as info:
        screen.after_size(1.5)
    assert info.value.partial == {"size_mb": 1.5, "stage": 0}
    assert "size" in info.value.reason
    nll, toks, dense = _windows_nll([3.0, 3.0, 3.0], [1.0, 1.01, 0.99])
    with pytest.raises(TrialPruned) as info:
        screen.after_stage1(estimate(nll, toks, None, dense, math.exp(3.0)), 0.9)
    assert info.value.partial["stage"] == 1 and info.value.partial["windows"] == 3
    assert info.value.partial["perplexity_lower"] <= info.value.partial["perplexity_estimate"]


def _spec(model, space, **kw):
    from autocomp.config.spec import StudySpec

    base = {"model": str(model), "space": space, "eval_windows": EVAL, "calib_windows": SEQ_CALIB}
    base.update(kw)
    return StudySpec(**base)


def _trials(url: str, name: str):
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(study_name=name, storage=storage)
    return study, study.get_trials(deepcopy=True)


@pytest.fixture(scope="module")
def trained_llama(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama after 100 quick training steps: a random model is worse than uniform guessing,
    so damaging it barely moves (or even lowers) its perplexity; a trained one is clearly hurt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = tiny_models["llama"], tmp_path_factory.mktemp("trained-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    ids = text_windows(tok, "wikitext2", "validation", WindowSpec(256, 64, 1), random=True).input_ids
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    first = last = None
    for step in range(100):
        batch = ids[(step * 8) % 256:(step * 8) % 256 + 8]
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        last = float(loss.detach())
        first = last if first is None else first
    assert last < first - 0.5, (first, last)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _harsh_space():
    from autocomp.config.space import SearchSpace

    return SearchSpace.from_dict({"name": "harsh", "granularity": "layer",
                                  "sparsity": {"methods": ["magnitude"], "levels": [0.0, 0.5, 0.9]},
                                  "quantization": {"methods": ["rtn"], "bits": [2, 16], "group_size": [-1]}}, "harsh")


def test_staged_study_prunes_on_the_ppl_budget(trained_llama, tmp_path):
    from autocomp.config.objectives import Budgets
    from autocomp.study.local import run_local
    from autocomp.study.loop import count_completed

    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = _spec(trained_llama, _harsh_space(), staged_windows=4, eval_windows=WindowSpec(8, 64),
                 budgets=Budgets(max_ppl_increase_pct=0.0001))
    outcome = run_local(spec, url, "staged", 12, progress=False, echo=lambda m: None)
    study, trials = _trials(url, "staged")
    dense_ppl = study.user_attrs["autocomp_dense"]["perplexity"]
    pruned = [t for t in trials if t.state == PRUNED]
    complete = [t for t in trials if t.state == COMPLETE]
    assert outcome.completed == 12 == count_completed(study) == len(pruned) + len(complete) == len(trials)
    assert outcome.failed == 0 and outcome.pruned == len(pruned)
    assert pruned, [t.user_attrs.get("metrics", {}).get("ppl_increase_pct") for t in complete]
    baselines = [t for t in trials if t.user_attrs.get("baseline")]
    assert len(baselines) == 6 and all(t.state == COMPLETE for t in baselines)
    # a baseline far over the budget is still evaluated in full
    assert max(t.user_attrs["metrics"]["ppl_increase_pct"] for t in baselines) > 5
    for t in pruned:
        assert not t.user_attrs.get("baseline")
        reason = t.user_attrs["pruned_reason"]
        assert isinstance(reason, str) and reason
        partial = t.user_attrs["partial_metrics"]
        assert partial["stage"] == 1 and partial["windows"] == 4
        assert partial["perplexity_lower"] <= partial["perplexity_estimate"]
        if "budget" in reason:
            assert partial["perplexity_lower"] > dense_ppl * (1 + 0.0001 / 100)
        else:
            assert reason.startswith("dominated")
        assert partial["size_mb"] > 0
        assert "metrics" not in t.user_attrs
        assert t.user_attrs["plan"]["layers"]    # the plan is kept with it
    for t in complete:
        assert t.user_attrs["metrics"]["eval_tokens"] == 8 * 63
    # resume: already 12 finished, pruned ones included
    again = run_local(spec, url, "staged", 12, progress=False, echo=lambda m: None)
    assert (again.completed, again.ran) == (12, 0)


def test_staged_study_prunes_on_size_at_stage_0(tiny_models, tmp_path):
    from autocomp.evaluators.size import model_size
    from autocomp.config.objectives import Budgets
    from autocomp.config.space import SearchSpace
    from autocomp.study.local import run_local

    lm = load_model(str(tiny_models["llama"]))
    targets = find_targets(lm.model)
    four = {t.name: LayerPlan("rtn", bits=4, group_size=128) for t in targets if t.in_blocks}
    budget = model_size(lm.model, targets, four).size_mb * 1.0001
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = _spec(tiny_models["llama"], SearchSpace.load("bits"), staged_windows=2, budgets=Budgets(max_size_mb=budget))
    outcome = run_local(spec, url, "size", 10, progress=False, echo=lambda m: None)
    _, trials = _trials(url, "size")
    assert outcome.completed == 10
    pruned = [t for t in trials if t.state == PRUNED]
    assert pruned
    for t in pruned:
        partial = t.user_attrs["partial_metrics"]
        assert partial["stage"] == 0 and partial["size_mb"] > budget
        assert "size budget" in t.user_attrs["pruned_reason"]
    # baselines get the full budget even when too large; every over-budget non-baseline stopped at stage 0
    for t in trials:
        if t.user_attrs.get("baseline"):
            assert t.state == COMPLETE
        elif t.state == COMPLETE:
            assert t.user_attrs["metrics"]["size_mb"] <= budget
    assert any(t.state == COMPLETE and t.user_attrs["metrics"]["size_mb"] > budget for t in trials)


# ---------------------------------------------------------------------------------------------
# 5. sequential calibration
# ---------------------------------------------------------------------------------------------

def test_sequential_calibration(tiny_models):
    from autocomp import api
    from autocomp.evaluators.quality import score_windows
    from autocomp.pipeline.sequential import compress_sequential

    folder = str(tiny_models["llama"])
    lp = LayerPlan("gptq", bits=3, group_size=32)
    seq = load_model(folder)
    targets = find_targets(seq.model)
    plan = {t.name: lp for t in targets if t.in_blocks}
    windows = text_windows(seq.tokenizer, "wikitext2", "validation", SEQ_CALIB, random=True).input_ids
    eval_ids = text_windows(seq.tokenizer, "wikitext2", "test", WindowSpec(4, 64), random=False).input_ids

    # the dense-statistics path
    dense = load_model(folder)
    stats = collect_input_stats(dense.model, targets, windows, hessian=True)
    dense_path = {n: compress_weight(read_weight(get_module(dense.model, n)), p, stats[n]).weight for n, p in plan.items()}

    used = compress_sequential(seq.model, targets, plan, windows, hessian=True)
    assert set(used) == set(plan)
    for t in targets:
        if not t.in_blocks:
            continue
        got = read_weight(get_module(seq.model, t.name))
        if t.block == 0 and t.role in ("q", "k", "v"):   # the first stage's inputs do not depend on compression
            assert torch.equal(used[t.name].hessian, stats[t.name].hessian), t.name
            assert torch.equal(got, dense_path[t.name]), t.name
        else:
            assert not torch.allclose(used[t.name].hessian, stats[t.name].hessian), t.name
            assert not torch.equal(got, dense_path[t.name]), t.name
    # untouched: embeddings, norms
    dense_state = state_copy(dense.model)
    seq_state = state_copy(seq.model)
    changed = {k for k in dense_state if not torch.equal(dense_state[k], seq_state[k])}
    assert changed == {f"{n}.weight" for n in plan}
    ppl_dense = score_windows(dense.model, eval_ids)[0].perplexity
    ppl_seq = score_windows(seq.model, eval_ids)[0].perplexity
    assert math.isfinite(ppl_seq) and ppl_seq != ppl_dense

    # api.apply_plan with a sequential calibration section does exactly this
    cal = CalibrationSpec("wikitext2", "validation", SEQ_CALIB.count, SEQ_CALIB.seq_len, SEQ_CALIB.seed, mode="sequential")
    via_api = load_model(folder)
    per_layer = api.apply_plan(via_api, CompressionPlan(default=lp, calibration=cal)).per_layer
    assert {n: p for n, p in per_layer.items() if not p.is_dense} == plan
    api_state = state_copy(via_api.model)
    assert all(torch.equal(api_state[k], seq_state[k]) for k in seq_state)
    # and the dense mode gives the dense-statistics path
    via_dense = load_model(folder)
    api.apply_plan(via_dense, CompressionPlan(default=lp, calibration=CalibrationSpec(
        "wikitext2", "validation", SEQ_CALIB.count, SEQ_CALIB.seq_len, SEQ_CALIB.seed, mode="dense")))
    for n, w in dense_path.items():
        assert torch.equal(read_weight(get_module(via_dense.model, n)), w), n


STAGES = {
    "llama": [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]],
    "gemma3": [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]],
    "qwen2": [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]],
    "opt": [["q", "k", "v"], ["o"], ["fc1"], ["fc2"]],
    "gpt2": [["qkv"], ["o"], ["up"], ["down"]],
}


@pytest.mark.parametrize("arch", sorted(STAGES))
def test_sequential_stages_follow_execution_order(tiny_models, arch):
    """True-sequential stages: layers reading the same tensor together, in the order the block runs them."""
    from autocomp.pipeline.sequential import _capture_block_calls, _stages
    from autocomp.inputs.targets import find_decoder_blocks

    lm = load_model(str(tiny_models[arch]))
    _, blocks = find_decoder_blocks(lm.model)
    targets = [t for t in find_targets(lm.model) if t.block == 1]
    ids = text_windows(lm.tokenizer, "wikitext2", "validation", WindowSpec(1, 32, 0), random=True).input_ids
    hidden, calls = _capture_block_calls(lm.model, blocks, ids)
    stages = _stages(lm.model, blocks[1], targets, hidden[0], calls[1][0])
    assert [sorted(t.role for t in stage) for stage in stages] == [sorted(r) for r in STAGES[arch]]


def _gptq_space(name: str, granularity: str, bits: list[int]):
    from autocomp.config.space import SearchSpace

    return SearchSpace.from_dict({"name": name, "granularity": granularity,
                                  "quantization": {"methods": ["gptq"], "bits": bits, "group_size": [32]}}, name)


def test_sequential_study_and_export(tiny_models, tmp_path):
    from autocomp import api
    from autocomp.inputs.data import eval_source
    from autocomp.evaluators.quality import score_windows
    from autocomp.study.local import run_local

    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = _spec(tiny_models["llama"], _gptq_space("gptq-seq", "block", [3, 4, 16]), calibration_mode="sequential")
    outcome = run_local(spec, url, "seq", 4, progress=False, echo=lambda m: None)
    assert (outcome.completed, outcome.failed) == (4, 0)
    _, trials = _trials(url, "seq")
    assert [t.state for t in trials] == [COMPLETE] * 4
    compressed = [t for t in trials if t.user_attrs["plan"]["layers"]]
    assert compressed
    for t in compressed:
        calib = t.user_attrs["plan"].get("calibration")
        assert calib and calib["mode"] == "sequential", t.user_attrs["plan"]
    # export rebuilds a trial from scratch (sequential compression of the dense model): it scores what
    # the study stored, so the evaluator restored the dense weights between sequential trials
    lm = load_model(str(tiny_models["llama"]))
    source, split = eval_source(spec.data, spec.calib_data)
    eval_ids = text_windows(lm.tokenizer, source, split, spec.eval_windows, random=False, bos=spec.bos).input_ids
    dense_ppl = score_windows(lm.model, eval_ids)[0].perplexity
    for t in compressed[:2]:
        out = api.export(url, "seq", t.number, tmp_path / f"export-{t.number}", format="float")
        exported = load_model(str(out))
        ppl = score_windows(exported.model, eval_ids)[0].perplexity
        stored = t.user_attrs["metrics"]["perplexity"]
        assert abs(ppl - stored) / stored < 1e-4, (t.number, ppl, stored)
        assert ppl != dense_ppl
        saved = json.loads((out / "plan.json").read_text())
        assert saved["calibration"]["mode"] == "sequential"


# ---------------------------------------------------------------------------------------------
# 6. sensitivity pass
# ---------------------------------------------------------------------------------------------

def test_sensitivity_study_pins_groups(tiny_models, tmp_path):
    from autocomp.study.local import run_local
    from autocomp.sensitivity.table import choice_label

    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = _gptq_space("gptq-role", "role", [3, 4, 16])
    spec = _spec(tiny_models["llama"], space, sensitivity=True, pin_sensitive=2)
    outcome = run_local(spec, url, "sens", 7, progress=False, echo=lambda m: None)
    assert (outcome.completed, outcome.failed) == (7, 0)
    study, trials = _trials(url, "sens")
    table = study.user_attrs["autocomp_sensitivity"]
    pinned = study.user_attrs["autocomp_pinned"]
    lm = load_model(str(tiny_models["llama"]))
    groups = space.groups(space.select_targets(find_targets(lm.model)))
    assert set(table) == set(groups) and len(groups) == 7
    labels = {choice_label(v) for v in space.group_choices()}
    assert len(labels) == 3
    for g, rows in table.items():
        assert set(rows) == labels, g
        for label, row in rows.items():
            assert row["error"] >= 0 and row["bytes"] > 0
            if json.loads(label)["bits"] == 16:
                assert row["error"] == 0
            else:
                assert row["error"] > 0
        # fewer bits, more error and fewer bytes
        e = {json.loads(lb)["bits"]: r for lb, r in rows.items()}
        assert e[3]["error"] > e[4]["error"] > e[16]["error"]
        assert e[3]["bytes"] < e[4]["bytes"] < e[16]["bytes"]
    assert len(pinned) == 2
    # the two groups hurt most at their cheapest choice, pinned at their most accurate one
    worst = sorted(table, key=lambda g: min(table[g].values(), key=lambda r: (r["bytes"], r["error"]))["error"],
                   reverse=True)[:2]
    assert set(pinned) == set(worst)
    assert all(v == {"bits": 16} for v in pinned.values())
    assert len(trials) == 7
    for t in trials:
        for g, values in pinned.items():
            for dim, value in values.items():
                assert t.params[f"{g}:{dim}"] == value, (t.number, g)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 3


def _brute_force(table, budget):
    groups = list(table)
    best = None
    for combo in itertools.product(*[list(table[g]) for g in groups]):
        size = sum(table[g][c]["bytes"] for g, c in zip(groups, combo))
        if size > budget:
            continue
        err = sum(table[g][c]["error"] for g, c in zip(groups, combo))
        if best is None or err < best[0] - 1e-12:
            best = (err, dict(zip(groups, combo)))
    return best


# diminishing returns in every group (convex error-vs-bytes curves), bytes in steps of a common unit
ALLOC_TABLE = {
    "a": {"2b": {"bytes": 10, "error": 8.0}, "4b": {"bytes": 20, "error": 2.0}, "8b": {"bytes": 40, "error": 0.5},
          "16b": {"bytes": 80, "error": 0.0}},
    "b": {"2b": {"bytes": 10, "error": 3.0}, "4b": {"bytes": 20, "error": 1.0}, "8b": {"bytes": 40, "error": 0.2},
          "16b": {"bytes": 80, "error": 0.0}},
    "c": {"2b": {"bytes": 10, "error": 20.0}, "4b": {"bytes": 20, "error": 6.0}, "8b": {"bytes": 40, "error": 1.0},
          "16b": {"bytes": 80, "error": 0.0}},
}


@pytest.mark.parametrize("budget", list(range(30, 250, 10)) + [145, 155])
def test_allocate_matches_brute_force(budget):
    from autocomp.sensitivity.table import allocate

    chosen = allocate(ALLOC_TABLE, budget)
    assert set(chosen) == set(ALLOC_TABLE)
    size = sum(ALLOC_TABLE[g][c]["bytes"] for g, c in chosen.items())
    err = sum(ALLOC_TABLE[g][c]["error"] for g, c in chosen.items())
    assert size <= budget
    best_err, _ = _brute_force(ALLOC_TABLE, budget)
    assert err == pytest.approx(best_err), (budget, chosen)


def test_allocate_below_the_smallest_and_above_the_largest():
    from autocomp.sensitivity.table import allocate

    # nothing fits: every group at its cheapest choice (the caller's budget was too small)
    assert allocate(ALLOC_TABLE, 0) == {"a": "2b", "b": "2b", "c": "2b"}
    assert allocate(ALLOC_TABLE, 10_000) == {"a": "16b", "b": "16b", "c": "16b"}


def test_end_to_end_kl_sensitivity(tiny_models, tmp_path):
    """sensitivity='kl': each group's error is the KL with only that group compressed (others dense)."""
    from autocomp.study.local import run_local

    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = _gptq_space("gptq-role", "role", [2, 4, 16])
    spec = _spec(tiny_models["llama"], space, sensitivity="kl")
    outcome = run_local(spec, url, "kl", 4, progress=False, echo=lambda m: None)
    assert outcome.failed == 0
    study, _ = _trials(url, "kl")
    table = study.user_attrs["autocomp_sensitivity"]
    assert len(table) == 7
    for g, rows in table.items():
        e = {json.loads(lb)["bits"]: r["error"] for lb, r in rows.items()}
        assert e[16] == 0.0
        assert e[2] > e[4] >= 0, (g, e)
    # different from the layer-output proxy (it is a KL in nats, not a relative error)
    spec_out = _spec(tiny_models["llama"], space, sensitivity=True)
    run_local(spec_out, url, "out", 4, progress=False, echo=lambda m: None)
    out_table, _ = _trials(url, "out")
    assert out_table.user_attrs["autocomp_sensitivity"] != table
