#!/usr/bin/env python
"""Benchmark: calibrated vs data-free compression on gemma3-270m, WikiText-2.

Calibration on WikiText-2 validation, evaluation on WikiText-2 test (never the same text). Every
configuration compresses the decoder-block linears only (the embedding stays dense, as in the
papers) and is scored on the same windows, against the dense perplexity measured in the same run:

* RTN vs GPTQ at 4 and 3 bits, group 128, asymmetric;
* magnitude vs Wanda vs SparseGPT at 50% unstructured and 2:4.

Published ratios (shared/ANCHORS.md) are printed beside ours; they come from larger models and
2048-token contexts, so compare ratios, not perplexities. Targets: GPTQ 4-bit's increase over dense
at most half of RTN 4-bit's; SparseGPT 50%'s increase at most a third of magnitude 50%'s.

    .venv/bin/python scripts/bench_quality.py [--mode sequential|dense] [--eval-windows 16 --seq-len 512]

Writes results/bench_quality/table.md, table.csv and summary.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autocomp.api import apply_plan  # noqa: E402
from autocomp.inputs.data import WindowSpec, text_windows  # noqa: E402
from autocomp.evaluators.quality import score_windows  # noqa: E402
from autocomp.evaluators.size import model_size  # noqa: E402
from autocomp.inputs.models import load_model  # noqa: E402
from autocomp.config.plan import CalibrationSpec, CompressionPlan, LayerPlan  # noqa: E402
from autocomp.inputs.targets import find_targets, get_module, read_weight, write_weight  # noqa: E402

# (name, layer plan, published ratio to dense and its source)
CONFIGS = [
    ("dense", None, "1.00"),
    ("RTN 4b g128", LayerPlan("rtn", bits=4, group_size=128), "1.35 (OPT-125M, per-row) / 1.05 (Llama-2-7B, g128)"),
    ("GPTQ 4b g128", LayerPlan("gptq", bits=4, group_size=128), "1.13 (OPT-125M, per-row) / 1.04 (Llama-2-7B, g128)"),
    ("RTN 3b g128", LayerPlan("rtn", bits=3, group_size=128), "47 (OPT-125M, per-row) / 1.22 (Llama-2-7B, g128)"),
    ("GPTQ 3b g128", LayerPlan("gptq", bits=3, group_size=128), "1.95 (OPT-125M, per-row) / 1.18 (Llama-2-7B, g128)"),
    ("magnitude 50%", LayerPlan("magnitude", sparsity=0.5), "6.98 (OPT-125M) / 2.91 (Llama-2-7B)"),
    ("Wanda 50%", LayerPlan("wanda", sparsity=0.5), "1.25 (Llama-2-7B)"),
    ("SparseGPT 50%", LayerPlan("sparsegpt", sparsity=0.5), "1.33 (OPT-125M) / 1.27 (Llama-2-7B)"),
    ("magnitude 2:4", LayerPlan("magnitude", pattern="2:4"), "10.7 (Llama-2-7B)"),
    ("Wanda 2:4", LayerPlan("wanda", pattern="2:4"), "2.19 (OPT-125M) / 2.15 (Llama-2-7B)"),
    ("SparseGPT 2:4", LayerPlan("sparsegpt", pattern="2:4"), "1.64 (OPT-125M) / 1.99 (Llama-2-7B)"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--mode", default="sequential", choices=["sequential", "dense"],
                    help="calibration mode of GPTQ / SparseGPT / Wanda (default sequential, as in the papers)")
    ap.add_argument("--only", nargs="*", help="run only these configuration names")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_quality"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.model)
    model = loaded.model
    targets = find_targets(model)
    block_names = [t.name for t in targets if t.in_blocks]
    dense_weights = {n: read_weight(get_module(model, n)).clone() for n in block_names}
    windows = text_windows(loaded.tokenizer, "wikitext2", "test", WindowSpec(args.eval_windows, args.seq_len), random=False)
    calib = CalibrationSpec("wikitext2", "validation", args.calib_windows, args.seq_len, 0, "every", args.mode)

    rows = []
    dense_ppl = None
    for name, layer_plan, published in CONFIGS:
        if args.only and name not in args.only and name != "dense":
            continue
        for n, w in dense_weights.items():
            write_weight(get_module(model, n), w)
        t0 = time.perf_counter()
        per_layer = {}
        if layer_plan is not None:
            plan = CompressionPlan(default=layer_plan, calibration=calib)
            per_layer = apply_plan(loaded, plan).per_layer
        t1 = time.perf_counter()
        scores, _ = score_windows(model, windows.input_ids)
        t2 = time.perf_counter()
        ppl = scores.perplexity
        if dense_ppl is None:
            dense_ppl = ppl
        size = model_size(model, targets, per_layer)
        rows.append({"config": name, "perplexity": round(ppl, 3), "ratio_to_dense": round(ppl / dense_ppl, 4),
                     "published_ratio": published, "size_mb": round(size.size_mb, 2),
                     "compress_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1)})
        print(f"{name:<16} ppl {ppl:10.3f}  x{ppl / dense_ppl:7.3f}  {size.size_mb:7.1f} MB  "
              f"compress {t1 - t0:6.1f}s  eval {t2 - t1:5.1f}s", flush=True)

    by = {r["config"]: r for r in rows}

    def increase(name: str) -> float | None:
        return by[name]["perplexity"] - dense_ppl if name in by else None

    checks = {}
    pairs = [("GPTQ 4b g128", "RTN 4b g128", 0.5, "GPTQ 4-bit increase <= 1/2 of RTN 4-bit's"),
             ("SparseGPT 50%", "magnitude 50%", 1 / 3, "SparseGPT 50% increase <= 1/3 of magnitude 50%'s")]
    for better, base, factor, label in pairs:
        a, b = increase(better), increase(base)
        if a is not None and b is not None:
            checks[label] = {"increase": round(a, 3), "baseline_increase": round(b, 3),
                             "fraction": round(a / b, 4) if b else None, "met": a <= factor * b}
    with (out / "table.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# bench_quality: {args.model}, decoder linears compressed, embedding dense",
             "",
             f"WikiText-2 test {args.eval_windows} x {args.seq_len} tokens (BOS first in each window); calibration "
             f"WikiText-2 validation {args.calib_windows} x {args.seq_len}, mode {args.mode}; torch threads "
             f"{torch.get_num_threads()}",
             "",
             "| config | perplexity | ratio to dense | published ratio | size MB | compress s | eval s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['config']} | {r['perplexity']} | {r['ratio_to_dense']} | {r['published_ratio']} | {r['size_mb']} | "
              f"{r['compress_s']} | {r['eval_s']} |" for r in rows]
    lines += [""] + [f"- {label}: increase {c['increase']} vs {c['baseline_increase']} (fraction {c['fraction']}): "
                     f"{'met' if c['met'] else 'NOT met'}" for label, c in checks.items()]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "checks": checks, "dense_perplexity": dense_ppl,
                                                  "mode": args.mode}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
