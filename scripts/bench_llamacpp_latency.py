#!/usr/bin/env python
"""Benchmark: a study whose candidates are timed in llama.cpp (``--latency-engine llamacpp``).

``autocomp.search`` of the built-in ``llamacpp`` space (GPTQ per layer at 4, 5, 8 or 16 bits, stored
exactly as GGUF Q4_0 / Q5_0 / Q8_0 blocks, the embedding included) with the objectives perplexity
and ``latency_ms``, each measured candidate written as the GGUF file its export writes and timed in
llama.cpp (decode ms per token at ``--threads`` threads); then the front re-measured alone. The
baseline is the dense model's F16 GGUF file timed in the same run by the same engine (the study's
dense figures): every row's decode time is given as a ratio of it. The per-type prediction's error
(``BytesModel``) is shown for every measured trial.

    .venv/bin/python scripts/bench_llamacpp_latency.py [--model gemma3-270m] [--trials 12] [--threads 2]

Writes results/bench_llamacpp_latency/table.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import autocomp  # noqa: E402
from autocomp.inputs.data import WindowSpec  # noqa: E402
from autocomp.latency.spec import LatencySpec  # noqa: E402
from autocomp.store.records import load_records  # noqa: E402
from autocomp.store.schema import DENSE_ATTR, load_existing  # noqa: E402
from autocomp.store.urls import open_storage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_llamacpp_latency"))
    args = ap.parse_args()

    latency = LatencySpec(engine="llamacpp", threads=args.threads, prompt_len=128, new_tokens=16, repeats=5)
    spec = autocomp.StudySpec(model=args.model, space=autocomp.SearchSpace.load("llamacpp"),
                              objectives=("perplexity", "latency_ms"), latency=latency,
                              eval_windows=WindowSpec(args.eval_windows, args.seq_len),
                              calib_windows=WindowSpec(args.calib_windows, args.seq_len))
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-latency-") as work:
        url, name = f"sqlite:///{work}/study.db", "timed"
        t0 = time.perf_counter()
        autocomp.search(spec, args.trials, url, name, progress=False, echo=print)
        seconds = time.perf_counter() - t0
        dense = load_existing(open_storage(url, must_exist=True), name).user_attrs[DENSE_ATTR]
        records = load_records(url, name)
        front = {r.trial for r in autocomp.pareto(url, name)}
    rows = []
    for r in sorted(records.records, key=lambda r: r.metrics["size_mb"]):
        m = r.metrics
        rows.append({"trial": r.trial, "uniform": r.uniform, "size_mb": m["size_mb"],
                     "gguf_mb": m.get("gguf_bytes", float("nan")) / 1e6, "ppl": m["perplexity"],
                     "ppl_ratio": m["perplexity"] / dense["perplexity"], "decode_ms": m["decode_ms"],
                     "decode_ratio": m["decode_ms"] / dense["decode_ms"], "prefill_ms": m["prefill_ms"],
                     "predicted_decode_ms": m.get("decode_predicted_ms"), "measured": bool(m.get("latency_measured")),
                     "remeasured": bool(m.get("latency_remeasured")), "error_pct": m.get("latency_table_error_pct"),
                     "front": r.trial in front})
    errors = [abs(r["error_pct"]) for r in rows if r["measured"] and r["error_pct"] is not None]
    summary = {"model": args.model, "trials": args.trials, "threads": args.threads, "seconds": seconds,
               "eval_windows": args.eval_windows, "seq_len": args.seq_len, "dense": dense, "rows": rows,
               "median_abs_prediction_error_pct": statistics.median(errors) if errors else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = render(summary)
    (out / "table.md").write_text(table)
    print(table)


def render(s: dict) -> str:
    d = s["dense"]
    lines = [f"# A study timed in llama.cpp: {s['model']}", "",
             f"Space `llamacpp` (GPTQ at 4/5/8/16 bits per layer, stored as Q4_0/Q5_0/Q8_0), objectives perplexity "
             f"and decode ms per token in llama.cpp ({s['threads']} threads, 128-token prompt, 16 decoded tokens, "
             f"median of 5); {s['trials']} trials, {s['eval_windows']} x {s['seq_len']} evaluation windows; "
             f"search and re-measured front {s['seconds']:.0f} s.", "",
             f"Baseline, the dense F16 GGUF in the same run: perplexity {d['perplexity']:.3f}, {d['size_mb']:.1f} MB, "
             f"decode {d['decode_ms']:.2f} ms/token, prefill {d['prefill_ms']:.0f} ms.", "",
             "| trial | configuration | MB | GGUF MB | ppl / dense | decode ms | decode / dense | prefill ms "
             "| predicted decode ms | error % | front |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["rows"]:
        pred = "" if r["predicted_decode_ms"] is None else f"{r['predicted_decode_ms']:.2f}"
        err = "" if not r["measured"] or r["error_pct"] is None else f"{r['error_pct']:+.0f}"
        tag = ("yes, re-measured" if r["remeasured"] else "yes") if r["front"] else ""
        lines.append(f"| {r['trial']} | {r['uniform'] or 'mixed'} | {r['size_mb']:.1f} | {r['gguf_mb']:.1f} "
                     f"| {r['ppl_ratio']:.4f} | {r['decode_ms']:.2f} | {r['decode_ratio']:.2f} | {r['prefill_ms']:.0f} "
                     f"| {pred} | {err} | {tag} |")
    med = s["median_abs_prediction_error_pct"]
    lines += ["", f"Median absolute error of the per-type prediction over the measured trials: "
                  f"{'n/a' if med is None else f'{med:.0f}%'} (the search's figure, before each trial's own "
                  "measurement joined the fit).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
