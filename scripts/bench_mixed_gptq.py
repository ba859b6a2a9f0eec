#!/usr/bin/env python
"""Benchmark: per-layer GPTQ bit allocation vs uniform GPTQ 4-bit at the same size, held out.

Searches GPTQ bit widths {2, 3, 4, 8} per decoder layer on gemma3-270m under a size budget equal to
uniform 4-bit (same average bits), with the sensitivity pass seeding allocations, scoring on a
*search* slice of WikiText-2 test. The best feasible configuration found and uniform GPTQ 4-bit
are then re-scored on a *held-out* slice of WikiText-2 test that the search never saw (the windows
after the search windows), and the ratio of their perplexities is reported.

    .venv/bin/python scripts/bench_mixed_gptq.py --trials 30

Writes results/bench_mixed_gptq[_output|_kl]/table.md and summary.json (by sensitivity proxy); the
study stays there too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autocomp.inputs.data import WindowSpec, load_named_split, make_windows, tokenize  # noqa: E402
from autocomp.evaluators.quality import score_windows  # noqa: E402
from autocomp.evaluators.size import model_size  # noqa: E402
from autocomp.inputs.models import cache_root, load_model  # noqa: E402
from autocomp.config.objectives import Budgets  # noqa: E402
from autocomp.front import pareto_front  # noqa: E402
from autocomp.store.records import load_records
from autocomp.config.plan import CompressionPlan, LayerPlan  # noqa: E402
from autocomp.config.space import SearchSpace  # noqa: E402
from autocomp.config.spec import StudySpec  # noqa: E402
from autocomp.study.evaluate import TrialEvaluator  # noqa: E402
from autocomp.study.local import run_local  # noqa: E402

SPACE = {
    "name": "gptq-bits",
    "description": "GPTQ bit width per decoder layer",
    "granularity": "layer",
    "quantization": {"methods": ["gptq"], "bits": [2, 3, 4, 8], "group_size": [128]},
    "baselines": True,
}


def _seeded(storage: str) -> set[int]:
    import optuna

    study = optuna.load_study(study_name="mixed-gptq", storage=storage)
    return {t.number for t in study.trials if t.user_attrs.get("seeded")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--search-windows", type=int, default=8)
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--sensitivity", default="kl", choices=["output", "fisher", "kl"],
                    help="proxy of the sensitivity pass that seeds the search (default kl)")
    ap.add_argument("--sampler", default="evo", choices=["evo", "nsga2", "tpe"],
                    help="sampler after the baselines and seeded allocations (default evo: level switches)")
    ap.add_argument("--out", default=None, help="default results/bench_mixed_gptq[_kl]")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(ROOT / "results" / ("bench_mixed_gptq" if args.sensitivity == "kl" else f"bench_mixed_gptq_{args.sensitivity}"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'study.db'}"

    loaded = load_model(args.model)
    space = SearchSpace.from_dict(SPACE, "bench_mixed_gptq.py")
    # the size budget: uniform GPTQ 4-bit on the searched layers
    from autocomp.inputs.targets import find_targets

    targets = find_targets(loaded.model)
    uniform4 = {t.name: LayerPlan("gptq", bits=4, group_size=128) for t in targets if t.in_blocks}
    budget_mb = model_size(loaded.model, targets, uniform4).size_mb
    spec = StudySpec(model=args.model, space=space, eval_windows=WindowSpec(args.search_windows, args.seq_len),
                     calib_windows=WindowSpec(args.calib_windows, args.seq_len, 0),
                     budgets=Budgets(max_size_mb=budget_mb),
                     sensitivity=args.sensitivity, sampler=args.sampler)
    holder: dict[str, TrialEvaluator] = {}

    def factory(s):
        # GPTQ variants on disk: a rerun (another proxy or sampler, same calibration) reuses them
        holder["ev"] = TrialEvaluator(s, loaded=loaded, cache_bytes=8 << 30, cache_dir=cache_root() / "variants")
        return holder["ev"]

    t0 = time.perf_counter()
    run_local(spec, storage, "mixed-gptq", args.trials, progress=True, evaluator_factory=factory)
    search_s = time.perf_counter() - t0

    records = load_records(storage, "mixed-gptq")
    uniform_rec = next(r for r in records.records if r.uniform == "uniform gptq 4b")
    front = pareto_front(records)
    best = min(front, key=lambda r: r.metrics["perplexity"])
    seeded = sorted((r for r in records.records if r.trial in _seeded(storage)), key=lambda r: r.metrics["size_mb"])

    # held-out windows: WikiText-2 test after the tokens the search scored
    ids = tokenize(loaded.tokenizer, load_named_split("wikitext2", "test").text)
    skip = args.search_windows * (args.seq_len - 1)
    heldout = make_windows(ids[skip:], WindowSpec(args.heldout_windows, args.seq_len), loaded.tokenizer.bos_token_id,
                           random=False, origin="wikitext2 test (held out)")
    ev = holder.get("ev") or TrialEvaluator(spec, loaded=loaded, cache_bytes=8 << 30, cache_dir=cache_root() / "variants")

    def heldout_ppl(plan_dict) -> float:
        plan = CompressionPlan.from_dict(plan_dict)
        per_layer = plan.resolve([t.name for t in ev.all_targets if t.in_blocks], [t.name for t in ev.all_targets if not t.in_blocks])
        ev.stitcher.apply(per_layer)
        scores, _ = score_windows(loaded.model, heldout.input_ids)
        return scores.perplexity

    ev.stitcher.apply({})
    dense_h = score_windows(loaded.model, heldout.input_ids)[0].perplexity
    uniform_h = heldout_ppl(uniform_rec.plan)
    best_h = heldout_ppl(best.plan)
    origin = "sensitivity-seeded" if best.trial in _seeded(storage) else ("uniform" if best.uniform else f"{args.sampler} sampler")
    rows = [("dense", records.dense["perplexity"], dense_h, records.dense["size_mb"], 16.0),
            ("uniform GPTQ 4b", uniform_rec.metrics["perplexity"], uniform_h, uniform_rec.metrics["size_mb"], uniform_rec.metrics["avg_bits"]),
            (f"searched (trial {best.trial}, {origin})", best.metrics["perplexity"], best_h, best.metrics["size_mb"], best.metrics["avg_bits"])]
    at_budget = [r for r in seeded if r.metrics["size_mb"] <= budget_mb]
    if at_budget and at_budget[-1].trial != best.trial:  # the knapsack allocation alone, for comparison
        r = at_budget[-1]
        rows.append((f"seeded allocation only (trial {r.trial})", r.metrics["perplexity"], heldout_ppl(r.plan),
                     r.metrics["size_mb"], r.metrics["avg_bits"]))
    lines = [f"# bench_mixed_gptq: {args.model}, GPTQ bits {{2,3,4,8}} per decoder layer, budget = uniform 4-bit size, "
             f"sensitivity proxy: {args.sensitivity}",
             "",
             f"{len(records.records)} trials ({search_s:.0f} s); search split: WikiText-2 test first {args.search_windows} x "
             f"{args.seq_len} tokens; held out: the next {args.heldout_windows} x {args.seq_len}; calibration: validation "
             f"{args.calib_windows} x {args.seq_len} (dense statistics, stitched); size budget {budget_mb:.2f} MB",
             "",
             "| config | search ppl | held-out ppl | size MB | avg bits (decoder) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {s:.3f} | {h:.3f} | {mb:.2f} | {b:.3f} |" for n, s, h, mb, b in rows]
    lines += ["", "sensitivity-seeded allocations (search split): " + "; ".join(
        f"trial {r.trial}: {r.metrics['size_mb']:.2f} MB, avg bits {r.metrics['avg_bits']:.3f}, ppl {r.metrics['perplexity']:.3f}"
        for r in seeded)]
    lines += ["", f"held-out perplexity ratio searched / uniform 4-bit: {best_h / uniform_h:.4f} "
              f"({'lower' if best_h < uniform_h else 'NOT lower'})"]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({
        "budget_mb": budget_mb, "trials": len(records.records), "search_seconds": search_s,
        "dense": {"search": records.dense["perplexity"], "heldout": dense_h},
        "uniform4": {"trial": uniform_rec.trial, "search": uniform_rec.metrics["perplexity"], "heldout": uniform_h,
                     "size_mb": uniform_rec.metrics["size_mb"]},
        "best": {"trial": best.trial, "search": best.metrics["perplexity"], "heldout": best_h,
                 "size_mb": best.metrics["size_mb"], "avg_bits": best.metrics["avg_bits"]},
        "heldout_ratio": best_h / uniform_h}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
