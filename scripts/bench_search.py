#!/usr/bin/env python
"""Benchmark: uniform baselines vs a searched per-block front on gemma3-270m (WikiText-2 test).

Runs one study (the uniform configurations of the space first, then NSGA-II trials) with a fixed
evaluation token budget, and writes a table of every uniform point and every point of the searched
front: config, average bits, sparsity, size MB, perplexity and ratio to the dense perplexity
measured in the same run. It then compares the 2-D hypervolume (perplexity ratio x size MB,
reference point: 2x dense perplexity and the dense size) of the uniform points alone with that of
the front of all trials.

    .venv/bin/python scripts/bench_search.py --trials 48 --eval-windows 8 --eval-seq-len 256

Writes results/bench_search/table.md, table.csv and summary.json; the study stays in
results/bench_search/study.db, so re-running resumes it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autocomp import api  # noqa: E402
from autocomp.inputs.data import WindowSpec  # noqa: E402
from autocomp.config.objectives import Budgets  # noqa: E402
from autocomp.multiobjective import hypervolume_2d, non_dominated  # noqa: E402
from autocomp.store.records import load_records
from autocomp.config.space import SearchSpace  # noqa: E402
from autocomp.config.spec import StudySpec  # noqa: E402

SPACE = {
    "name": "bench-mixed",
    "description": "per-block bits and Wanda sparsity, embedding / LM head as its own group",
    "targets": {"include": ["re:.*"], "embeddings": True},
    "granularity": "block",
    "sparsity": {"methods": ["wanda"], "levels": [0.0, 0.25, 0.5]},
    "quantization": {"methods": ["rtn"], "bits": [3, 4, 6, 8], "group_size": [128], "symmetric": [False]},
    "baselines": True,
}


def _seeded_trials(storage: str) -> list[int]:
    import optuna

    study = optuna.load_study(study_name="bench_search", storage=storage)
    return [t.number for t in study.trials if t.user_attrs.get("seeded")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--trials", type=int, default=48, help="total trials, the uniform baselines included")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--sensitivity", action="store_true", help="seed the search with the sensitivity pass")
    ap.add_argument("--out", default=None, help="default results/bench_search (results/bench_search_sensitivity)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(ROOT / "results" / ("bench_search_sensitivity" if args.sensitivity else "bench_search"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'study.db'}"
    spec = StudySpec(model=args.model, space=SearchSpace.from_dict(SPACE, "bench_search.py"),
                     eval_windows=WindowSpec(args.eval_windows, args.eval_seq_len),
                     calib_windows=WindowSpec(args.calib_windows, args.calib_seq_len, 0),
                     budgets=Budgets(), sensitivity=args.sensitivity)
    start = time.perf_counter()
    api.search(spec, args.trials, storage, "bench_search", progress=True)
    wall = time.perf_counter() - start

    study = load_records(storage, "bench_search")
    dense_ppl, dense_mb = study.dense["perplexity"], study.dense["size_mb"]
    uniform = [r for r in study.records if r.uniform]
    searched = [r for r in study.records if not r.uniform]
    seeded = {t for t in _seeded_trials(storage)}
    front = non_dominated([((r.metrics["perplexity"], r.metrics["size_mb"]), r) for r in study.records])
    ref = (2.0, dense_mb)

    def point(r):
        return (r.metrics["perplexity"] / dense_ppl, r.metrics["size_mb"])

    hv_uniform = hypervolume_2d([point(r) for r in uniform], ref)
    hv_front = hypervolume_2d([point(r) for r in front], ref)

    rows = []
    for kind, recs in (("uniform", sorted(uniform, key=lambda r: r.metrics["size_mb"])),
                       ("front", sorted(front, key=lambda r: r.metrics["size_mb"]))):
        for r in recs:
            m = r.metrics
            label = r.uniform or ("sensitivity-seeded (per block)" if r.trial in seeded else "searched (per block)")
            rows.append({"set": kind, "trial": r.trial, "config": label,
                         "avg_bits": round(m["avg_bits"], 3), "avg_sparsity": round(m["avg_sparsity"], 3),
                         "size_mb": round(m["size_mb"], 2), "perplexity": round(m["perplexity"], 3),
                         "ratio_to_dense": round(m["perplexity"] / dense_ppl, 4), "kl": round(m["kl"], 5)})
    with (out / "table.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# bench_search: {args.model}, WikiText-2 test, {args.eval_windows} x {args.eval_seq_len} tokens",
        "",
        f"dense perplexity {dense_ppl:.3f}, dense size {dense_mb:.2f} MB (16-bit); "
        f"{len(study.records)} completed trials ({len(uniform)} uniform, {len(searched)} searched, "
        f"{len(seeded)} of them seeded by the sensitivity pass), "
        f"{study.n_failed} failed; wall {wall:.0f} s this run",
        "",
        "| set | trial | config | avg bits | sparsity | size MB | perplexity | ratio to dense | KL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['set']} | {r['trial']} | {r['config']} | {r['avg_bits']} | {r['avg_sparsity']} | {r['size_mb']} | "
              f"{r['perplexity']} | {r['ratio_to_dense']} | {r['kl']} |" for r in rows]
    lines += ["", f"hypervolume (ppl ratio x MB, reference ({ref[0]}, {ref[1]:.1f})): uniform points {hv_uniform:.2f}, "
              f"front of all trials {hv_front:.2f}, ratio {hv_front / hv_uniform if hv_uniform else float('inf'):.3f}"]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({
        "model": args.model, "dense_perplexity": dense_ppl, "dense_size_mb": dense_mb,
        "eval_tokens": args.eval_windows * (args.eval_seq_len - 1), "trials": len(study.records),
        "uniform": len(uniform), "searched": len(searched), "hypervolume_uniform": hv_uniform,
        "hypervolume_front": hv_front, "reference": ref, "wall_seconds_this_run": wall}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
