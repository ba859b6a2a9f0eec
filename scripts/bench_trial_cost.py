#!/usr/bin/env python
"""Benchmark: what one trial costs, with and without the variant cache and staged evaluation.

The same search (GPTQ bits per decoder block, NSGA-II, same seed) runs three times in one process on
one loaded model:

* ``no cache``: every changed layer is re-compressed in every trial (memory cache of 0 bytes, no disk);
* ``cache``: compressed layer variants are kept and stitched in;
* ``cache + staged``: as above, and candidates are first scored on a prefix of the windows and stopped
  when they clearly break the budget or cannot reach the feasible front.

It reports the median seconds per trial of each, and the ratio of a fully cached trial (every layer
variant already computed) to the bare forward passes over the same evaluation tokens, measured in the
same run (target <= 1.3x).

    .venv/bin/python scripts/bench_trial_cost.py --trials 10 --eval-windows 4 --seq-len 256

Writes results/bench_trial_cost/table.md and summary.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autocomp.inputs.data import WindowSpec  # noqa: E402
from autocomp.inputs.models import load_model  # noqa: E402
from autocomp.config.objectives import Budgets  # noqa: E402
from autocomp.config.space import SearchSpace  # noqa: E402
from autocomp.config.spec import StudySpec  # noqa: E402
from autocomp.study.evaluate import TrialEvaluator  # noqa: E402
from autocomp.study.local import run_local  # noqa: E402

SPACE = {
    "name": "bench-cost",
    "description": "GPTQ bit width per decoder block",
    "granularity": "block",
    "quantization": {"methods": ["gptq"], "bits": [3, 4, 16], "group_size": [128]},
    "baselines": True,
}


def trial_seconds(storage: str, name: str) -> list[dict]:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    out = []
    for t in study.trials:
        if t.state.name == "COMPLETE":
            m = t.user_attrs["metrics"]
            out.append({"seconds": m["seconds"], "compress": m["seconds_compress"], "eval": m["seconds_eval"],
                        "state": "COMPLETE"})
        elif t.state.name == "PRUNED" and t.datetime_complete and t.datetime_start:
            out.append({"seconds": (t.datetime_complete - t.datetime_start).total_seconds(), "state": "PRUNED"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--staged-windows", type=int, default=2)
    ap.add_argument("--max-ppl-increase", type=float, default=15.0)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_trial_cost"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.model)
    space = SearchSpace.from_dict(SPACE, "bench_trial_cost.py")
    base = dict(model=args.model, space=space, eval_windows=WindowSpec(args.eval_windows, args.seq_len),
                calib_windows=WindowSpec(args.calib_windows, args.seq_len, 0),
                budgets=Budgets(max_ppl_increase_pct=args.max_ppl_increase))
    configs = [("no cache", StudySpec(**base), 0), ("cache", StudySpec(**base), 8 << 30),
               ("cache + staged", StudySpec(**base, staged_windows=args.staged_windows), 8 << 30)]
    results = {}
    shared: dict[str, TrialEvaluator] = {}
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'cost.db'}"
        for label, spec, cache_bytes in configs:
            def factory(s, cache_bytes=cache_bytes, label=label):
                ev = TrialEvaluator(s, loaded=loaded, cache_bytes=cache_bytes, cache_dir=None)
                shared[label] = ev
                return ev

            t0 = time.perf_counter()
            run_local(spec, storage, label.replace(" ", "-"), args.trials, progress=False, evaluator_factory=factory)
            wall = time.perf_counter() - t0
            results[label] = {"trials": trial_seconds(storage, label.replace(" ", "-")), "wall": wall,
                              "cache_hits": shared[label].stitcher.cache.hits,
                              "cache_misses": shared[label].stitcher.cache.misses}
            shared[label].stitcher.apply({})  # leave the model dense for the next configuration

        # a fully cached trial: re-evaluate the last completed plan of the cached run (all variants in memory)
        evaluator = shared["cache"]
        import optuna

        study = optuna.load_study(study_name="cache", storage=storage)
        last = [t for t in study.trials if t.state.name == "COMPLETE"][-1]
        from autocomp.config.plan import CompressionPlan

        plan = CompressionPlan.from_dict(last.user_attrs["plan"])
        per_layer = plan.resolve([t.name for t in evaluator.all_targets if t.in_blocks],
                                 [t.name for t in evaluator.all_targets if not t.in_blocks])
        evaluator.stitcher.apply({})
        timings = []
        for _ in range(3):
            evaluator.stitcher.apply({})
            t0 = time.perf_counter()
            evaluator.evaluate(per_layer)
            timings.append(time.perf_counter() - t0)
        cached_trial = statistics.median(timings)
        evaluator.stitcher.apply({})
        ids = evaluator.eval_windows.input_ids
        bare = []
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                for row in ids:
                    loaded.model(row.unsqueeze(0), use_cache=False)
            bare.append(time.perf_counter() - t0)
        bare_forward = statistics.median(bare)

    rows = []
    for label, r in results.items():
        secs = [t["seconds"] for t in r["trials"]]
        pruned = sum(1 for t in r["trials"] if t["state"] == "PRUNED")
        rows.append({"config": label, "median_s": round(statistics.median(secs), 2), "mean_s": round(statistics.mean(secs), 2),
                     "trials": len(secs), "stopped_early": pruned, "wall_s": round(r["wall"], 1),
                     "cache_hits": r["cache_hits"], "cache_misses": r["cache_misses"]})
    base_median = rows[0]["median_s"]
    lines = [f"# bench_trial_cost: {args.model}, GPTQ bits per block, {args.trials} trials per configuration",
             "",
             f"evaluation {args.eval_windows} x {args.seq_len} tokens, calibration {args.calib_windows} x {args.seq_len}, "
             f"budget +{args.max_ppl_increase:g}% perplexity, stage 1 = {args.staged_windows} windows; torch threads "
             f"{torch.get_num_threads()}",
             "",
             "| configuration | median s/trial | mean s/trial | speed-up (median) | trials | stopped early | cache hits | cache misses |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['config']} | {r['median_s']} | {r['mean_s']} | {base_median / r['median_s']:.2f}x | {r['trials']} | "
              f"{r['stopped_early']} | {r['cache_hits']} | {r['cache_misses']} |" for r in rows]
    ratio = cached_trial / bare_forward
    lines += ["", f"fully cached trial {cached_trial:.2f} s vs bare forward passes over the same tokens {bare_forward:.2f} s: "
              f"ratio {ratio:.3f} (target <= 1.3)"]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "cached_trial_s": cached_trial,
                                                  "bare_forward_s": bare_forward, "ratio": ratio}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
