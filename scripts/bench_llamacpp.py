#!/usr/bin/env python
"""Benchmark: llama.cpp's presets against the front of an ``autocomp search`` of llama.cpp's own types,
all scored in llama.cpp.

1. The reference: the model as an F16 GGUF file (for gemma3-270m, its de-quantized Q4_K_M weights:
   the "dense" model of every other benchmark; :func:`autocomp.llamacpp.commands.reference_gguf`).
2. The search: ``autocomp.search`` of the built-in ``gguf`` space (llama.cpp's types per role, the
   embedding included, quantized by ggml's own quantizer with the importance matrix of the study's
   ``--calib-windows`` validation windows; every preset of ``--presets`` a baseline of the study),
   objectives perplexity and accounted size on the first ``--search-windows`` WikiText-2 *test*
   windows.
3. Every preset quantized by llama.cpp without an importance matrix, and, with it, the study's preset
   baselines exported (the blocks ``llama-quantize --imatrix`` writes with the study's matrix).
4. The search's Pareto front and every preset exported as GGUF and scored on ``--eval-windows``
   *held-out* test windows (after the search's): perplexity and KL to the reference, from llama.cpp's
   own logits; prefill and decode times in llama.cpp at ``--threads`` threads.

    .venv/bin/python scripts/bench_llamacpp.py [--trials 30] [--eval-windows 8] [--search-windows 4]

Writes results/bench_llamacpp/table.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import autocomp  # noqa: E402
from autocomp.inputs.data import WindowSpec, text_windows  # noqa: E402
from autocomp.inputs.models import load_model  # noqa: E402
from autocomp.llamacpp import gguf_raw  # noqa: E402
from autocomp.llamacpp.commands import reference_gguf  # noqa: E402
from autocomp.llamacpp.quantize import quantize, tensor_types  # noqa: E402
from autocomp.llamacpp.runtime import LlamaCppModel, measure, reference  # noqa: E402
from autocomp.store.records import load_records  # noqa: E402

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--trials", type=int, default=30, help="finished trials of the study, its baselines included")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--search-windows", type=int, default=4)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/autocomp-bench-llamacpp"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_llamacpp")
    args = ap.parse_args()

    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    ref_path = reference_gguf(loaded)
    held_w = text_windows(loaded.tokenizer, "wikitext2", "test", WindowSpec(args.eval_windows, args.seq_len),
                          random=False, skip=args.search_windows)   # after the windows the search scored
    del loaded
    held_ref = reference(ref_path, held_w.input_ids, 64, args.threads)
    layout = gguf_raw.read_layout(ref_path)
    n_params = sum(math.prod(t.ne) for t in layout.tensors.values())
    n_embedding = math.prod(layout.tensors["token_embd.weight"].ne)

    def row(name: str, path: Path, kind: str, **extra) -> dict:
        emb_bytes = gguf_raw.read_layout(path).tensors["token_embd.weight"].nbytes
        total = path.stat().st_size
        with LlamaCppModel(path, args.seq_len, args.threads) as model:
            scores, _ = model.score(held_w.input_ids, held_ref)
        timing = measure(path, args.threads, 128, 16)
        out = {"name": name, "kind": kind, "file_mb": total / 1e6,
               "bpw": 8 * total / n_params, "bpw_no_embedding": 8 * (total - emb_bytes) / (n_params - n_embedding),
               "ppl": scores.perplexity, "ppl_ratio": scores.perplexity / held_ref.perplexity, "kl": scores.mean_kl,
               "prefill_ms": timing.prefill_ms, "decode_ms": timing.decode_ms_per_token, **extra}
        print(out, flush=True)
        return out

    # the study: llama.cpp's types per role, the presets its baselines
    space = autocomp.SearchSpace.load("gguf")
    space = autocomp.SearchSpace.from_dict({**space.to_dict(), "presets": list(args.presets)}, "gguf (bench)")
    spec = autocomp.StudySpec(model=args.model, space=space, eval_windows=WindowSpec(args.search_windows, args.seq_len),
                              calib_windows=WindowSpec(args.calib_windows, args.seq_len))
    url, name = f"sqlite:///{work / 'study.db'}", "bench-llamacpp"
    t0 = time.perf_counter()
    autocomp.search(spec, args.trials, url, name, progress=False, echo=print)
    seconds_search = time.perf_counter() - t0
    front = autocomp.pareto(url, name)
    records = {r.trial: r for r in load_records(url, name).records}
    by_preset = {r.uniform.removeprefix("llama.cpp preset "): r for r in records.values()
                 if (r.uniform or "").startswith("llama.cpp preset ")}

    def exported(trial: int) -> Path:
        folder = work / f"trial-{trial}"
        if not (folder / "model.gguf").is_file():
            autocomp.export(url, name, trial, folder)
        return folder / "model.gguf"

    rows = [row("F16 (reference)", ref_path, "reference")]
    for preset in args.presets:
        path = work / f"{preset}.gguf"
        if not path.is_file():
            quantize(ref_path, path, preset=preset, threads=args.threads)
        rows.append(row(preset, path, "preset"))
        if preset in by_preset:
            rows.append(row(f"{preset} + imatrix", exported(by_preset[preset].trial), "preset",
                            trial=by_preset[preset].trial))
    for r in front:
        if r.trial in {p.trial for p in by_preset.values()}:
            continue
        path = exported(r.trial)
        types = tensor_types(path)
        rows.append(row(f"searched #{r.trial}", path, "searched", trial=r.trial, search_ppl=r.metrics["perplexity"],
                        types={k: types[k] for k in sorted(types) if not k.endswith("norm.weight")}))
    goals = check_goals(rows)
    summary = {"model": args.model, "threads": args.threads, "eval_windows": args.eval_windows,
               "search_windows": args.search_windows, "calib_windows": args.calib_windows, "seq_len": args.seq_len,
               "trials": args.trials, "seconds_search": seconds_search, "seconds_total": time.perf_counter() - started,
               "reference_ppl": held_ref.perplexity, "rows": rows, "goals": goals}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    table = render(summary)
    (args.out / "table.md").write_text(table)
    print(table)


def _front_ppl_at(searched: list[dict], mb: float) -> float | None:
    """The lowest held-out perplexity of a searched file no larger than ``mb``."""
    ok = [r["ppl"] for r in searched if r["file_mb"] <= mb]
    return min(ok) if ok else None


def check_goals(rows: list[dict]) -> dict:
    presets = {r["name"]: r for r in rows if r["kind"] == "preset"}
    searched = [r for r in rows if r["kind"] == "searched"]
    ref_ppl = next(r["ppl"] for r in rows if r["kind"] == "reference")
    goals: dict = {}
    limit = presets.get("Q4_K_S", {}).get("file_mb")
    dominated = {}
    for name, p in presets.items():
        if limit is None or p["file_mb"] > limit + 1e-9:
            continue
        best = _front_ppl_at(searched, p["file_mb"])
        dominated[name] = best is not None and best <= p["ppl"]
    goals["front_dominates_presets_up_to_Q4_K_S"] = dominated
    q3 = presets.get("Q3_K_M + imatrix")
    if q3 is not None:
        best = _front_ppl_at(searched, q3["file_mb"])
        ratio = None if best is None else (best / ref_ppl - 1) / (q3["ppl"] / ref_ppl - 1)
        goals["at_Q3_K_M_imatrix_size_increase_ratio"] = ratio
        goals["at_Q3_K_M_imatrix_size_increase_ratio_met"] = ratio is not None and ratio <= 0.85
    q4 = presets.get("Q4_K_S")
    if q4 is not None:
        fits = [r for r in searched if r["ppl"] <= q4["ppl"]]
        smallest = min(fits, key=lambda r: r["file_mb"]) if fits else None
        goals["smallest_searched_at_Q4_K_S_ppl_mb"] = smallest["file_mb"] if smallest else None
        goals["smaller_than_Q4_K_S_pct"] = None if smallest is None else 100 * (1 - smallest["file_mb"] / q4["file_mb"])
        goals["15pct_smaller_than_Q4_K_S_met"] = smallest is not None and smallest["file_mb"] <= 0.85 * q4["file_mb"]
    return goals


def render(summary: dict) -> str:
    lines = [f"# llama.cpp presets and the front of a search of llama.cpp's types: {summary['model']}", "",
             f"Held-out: {summary['eval_windows']} x {summary['seq_len']} WikiText-2 test tokens after the search's, "
             f"scored from llama.cpp's logits (reference F16 perplexity {summary['reference_ppl']:.3f}); KL to the F16 "
             f"file (top-64). Search: `autocomp.search` of the `gguf` space, {summary['trials']} finished trials "
             f"(presets and uniform baselines included) on the first {summary['search_windows']} test windows, "
             f"importance matrix from {summary['calib_windows']} validation windows; search "
             f"{summary['seconds_search']:.0f} s, whole run {summary['seconds_total']:.0f} s. Times: llama.cpp, "
             f"{summary['threads']} threads, 128-token prompt, 16 decoded tokens, best of 3.", "",
             "| file | MB | bpw | bpw without embedding | held-out ppl | ppl / F16 | KL | prefill ms | decode ms/token |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(summary["rows"], key=lambda r: -r["file_mb"]):
        kl = "" if r["kl"] is None else f"{r['kl']:.4f}"
        lines.append(f"| {r['name']} | {r['file_mb']:.1f} | {r['bpw']:.2f} | {r['bpw_no_embedding']:.2f} | {r['ppl']:.3f} "
                     f"| {r['ppl_ratio']:.4f} | {kl} | {r['prefill_ms']:.0f} | {r['decode_ms']:.1f} |")
    lines += ["", "Searched files, their types (tensor counts):", ""]
    for r in summary["rows"]:
        if r["kind"] == "searched":
            counts: dict[str, int] = {}
            for kind in r["types"].values():
                counts[kind] = counts.get(kind, 0) + 1
            lines.append(f"- {r['name']} ({r['file_mb']:.1f} MB): embedding {r['types'].get('token_embd.weight')}; "
                         + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    lines += ["", "Goals (issue 18):", "", "```", json.dumps(summary["goals"], indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
