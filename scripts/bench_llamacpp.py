#!/usr/bin/env python
"""Benchmark: llama.cpp's presets against a searched per-tensor GGUF type mix, all scored in llama.cpp.

1. The reference: the model's GGUF re-written as F16 by llama.cpp (for gemma3-270m, its de-quantized
   Q4_K_M weights: the "dense" model of every other benchmark).
2. The importance matrix: autocomp's per-column mean squared inputs of the torch model on
   ``--imatrix-windows`` validation windows (:mod:`autocomp.llamacpp.imatrix`), handed to llama.cpp's
   quantizer in memory.
3. Every preset of ``--presets`` quantized by llama.cpp, without and (``--imatrix-presets``) with the
   importance matrix.
4. A search over GGUF types per tensor group (the embedding; q/k; v; attn_output; gate/up; down), each
   group choosing among the types its rows can hold, quantized with the importance matrix: Optuna's
   multi-objective TPE on (file bytes, KL to the reference on ``--search-windows`` validation windows
   that the importance matrix did not use), candidates assembled from per-type variants
   (:mod:`autocomp.llamacpp.variants`). The uniform mixes of each type are enqueued first.
5. The search's Pareto front (file size against search KL) and every preset scored on
   ``--eval-windows`` held-out WikiText-2 *test* windows: perplexity and KL to the reference, from
   llama.cpp's own logits; prefill and decode times in llama.cpp at ``--threads`` threads.

This search is the benchmark's own loop over the engine's pieces; ``autocomp search`` does not yet
drive the llama.cpp engine.

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

from autocomp.exporters.gguf_file import source_gguf  # noqa: E402
from autocomp.inputs.data import WindowSpec, text_windows  # noqa: E402
from autocomp.inputs.models import load_model  # noqa: E402
from autocomp.llamacpp import gguf_raw  # noqa: E402
from autocomp.llamacpp.imatrix import importance_matrix  # noqa: E402
from autocomp.llamacpp.quantize import quantize  # noqa: E402
from autocomp.llamacpp.runtime import LlamaCppModel, measure, reference  # noqa: E402
from autocomp.llamacpp.variants import GGUFVariants  # noqa: E402

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
IMATRIX_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S")
GROUPS = {"embedding": ("token_embd.",), "attn_qk": ("attn_q.", "attn_k."), "attn_v": ("attn_v.",),
          "attn_output": ("attn_output.",), "ffn_gate_up": ("ffn_gate.", "ffn_up."), "ffn_down": ("ffn_down.",),
          "output": ("output.",)}
TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q8_0")


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(name.startswith(k) or f".{k}" in name for k in keys):
            return group
    raise KeyError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--search-windows", type=int, default=4)
    ap.add_argument("--imatrix-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--imatrix-presets", nargs="*", default=list(IMATRIX_PRESETS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/autocomp-bench-llamacpp"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_llamacpp")
    args = ap.parse_args()
    import optuna

    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    source = source_gguf(loaded)
    if source is None:
        sys.exit(f"{args.model} was not converted from a GGUF file: this benchmark needs one (gemma3-270m)")
    ref_path = work / "reference-f16.gguf"
    if not ref_path.is_file():
        quantize(source, ref_path, preset="F16", threads=args.threads)
    tok = loaded.tokenizer
    calib = text_windows(tok, "wikitext2", "validation", WindowSpec(args.imatrix_windows, args.seq_len), random=False)
    search_w = text_windows(tok, "wikitext2", "validation", WindowSpec(args.search_windows, args.seq_len),
                            random=False, skip=args.imatrix_windows)
    held_w = text_windows(tok, "wikitext2", "test", WindowSpec(args.eval_windows, args.seq_len), random=False)
    t0 = time.perf_counter()
    imatrix = importance_matrix(loaded.model, calib.input_ids)
    seconds_imatrix = time.perf_counter() - t0
    del loaded
    held_ref = reference(ref_path, held_w.input_ids, 64, args.threads)
    search_ref = reference(ref_path, search_w.input_ids, 64, args.threads)
    layout = gguf_raw.read_layout(ref_path)
    embedding = layout.tensors["token_embd.weight"]
    n_params = sum(math.prod(t.ne) for t in layout.tensors.values())
    n_embedding = math.prod(embedding.ne)

    def row(name: str, path: Path, kind: str) -> dict:
        lay = gguf_raw.read_layout(path)
        emb_bytes = lay.tensors["token_embd.weight"].nbytes
        total = path.stat().st_size
        with LlamaCppModel(path, args.seq_len, args.threads) as model:
            scores, _ = model.score(held_w.input_ids, held_ref)
        timing = measure(path, args.threads, 128, 16)
        return {"name": name, "kind": kind, "file_mb": total / 1e6,
                "bpw": 8 * total / n_params, "bpw_no_embedding": 8 * (total - emb_bytes) / (n_params - n_embedding),
                "ppl": scores.perplexity, "ppl_ratio": scores.perplexity / held_ref.perplexity, "kl": scores.mean_kl,
                "prefill_ms": timing.prefill_ms, "decode_ms": timing.decode_ms_per_token}

    rows = [row("F16 (reference)", ref_path, "reference")]
    for preset in args.presets:
        for with_im in ([False, True] if preset in args.imatrix_presets else [False]):
            path = work / f"{preset}{'-imatrix' if with_im else ''}.gguf"
            if not path.is_file():
                quantize(ref_path, path, preset=preset, imatrix=imatrix if with_im else None, threads=args.threads)
            rows.append(row(f"{preset}{' + imatrix' if with_im else ''}", path, "preset"))
            print(rows[-1], flush=True)

    variants = GGUFVariants(ref_path, work / "cache", imatrix=imatrix, threads=args.threads)
    members: dict[str, list[str]] = {}
    for name in variants.searchable:
        members.setdefault(group_of(name), []).append(name)
    choices = {g: [k for k in TYPES if all(variants.choices(n, [k]) for n in names)] for g, names in members.items()}
    candidate = work / "candidate.gguf"

    def assignment(params: dict) -> dict[str, str]:
        return {n: params[g] for g, names in members.items() for n in names}

    def objective(trial) -> tuple[float, float]:
        params = {g: trial.suggest_categorical(g, c) for g, c in choices.items()}
        mix = assignment(params)
        variants.assemble(mix, candidate)
        with LlamaCppModel(candidate, args.seq_len, args.threads) as model:
            scores, _ = model.score(search_w.input_ids, search_ref)
        trial.set_user_attr("search_ppl", scores.perplexity)
        return variants.file_bytes(mix) / 1e6, scores.mean_kl

    t0 = time.perf_counter()
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=8))
    for kind in ("Q4_0", "Q5_0", "Q8_0"):
        study.enqueue_trial({g: (kind if kind in c else c[-1]) for g, c in choices.items()})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=args.trials)
    seconds_search = time.perf_counter() - t0
    front = sorted(study.best_trials, key=lambda t: t.values[0])
    for i, trial in enumerate(front):
        path = work / f"searched-{i}.gguf"
        variants.assemble(assignment(trial.params), path)
        r = row(f"searched #{trial.number}", path, "searched")
        r["types"] = trial.params
        r["search_kl"] = trial.values[1]
        rows.append(r)
        print(r, flush=True)
    goals = check_goals(rows)
    summary = {"model": args.model, "threads": args.threads, "eval_windows": args.eval_windows,
               "search_windows": args.search_windows, "imatrix_windows": args.imatrix_windows, "seq_len": args.seq_len,
               "trials": args.trials, "seconds_imatrix": seconds_imatrix, "seconds_search": seconds_search,
               "seconds_total": time.perf_counter() - started, "reference_ppl": held_ref.perplexity,
               "choices": choices, "rows": rows, "goals": goals}
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
    lines = [f"# llama.cpp presets and a searched GGUF type mix: {summary['model']}", "",
             f"Held-out: {summary['eval_windows']} x {summary['seq_len']} WikiText-2 test tokens, scored from llama.cpp's "
             f"logits (reference F16 perplexity {summary['reference_ppl']:.3f}); KL to the F16 file (top-64). "
             f"Search: {summary['trials']} trials on {summary['search_windows']} validation windows, importance matrix "
             f"from {summary['imatrix_windows']} other validation windows ({summary['seconds_imatrix']:.0f} s); "
             f"search {summary['seconds_search']:.0f} s, whole run {summary['seconds_total']:.0f} s. Times: llama.cpp, "
             f"{summary['threads']} threads, 128-token prompt, 16 decoded tokens, best of 3.", "",
             "| file | MB | bpw | bpw without embedding | held-out ppl | ppl / F16 | KL | prefill ms | decode ms/token |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(summary["rows"], key=lambda r: -r["file_mb"]):
        kl = "" if r["kl"] is None else f"{r['kl']:.4f}"
        lines.append(f"| {r['name']} | {r['file_mb']:.1f} | {r['bpw']:.2f} | {r['bpw_no_embedding']:.2f} | {r['ppl']:.3f} "
                     f"| {r['ppl_ratio']:.4f} | {kl} | {r['prefill_ms']:.0f} | {r['decode_ms']:.1f} |")
    lines += ["", "Searched types per group:", ""]
    for r in summary["rows"]:
        if r["kind"] == "searched":
            lines.append(f"- {r['name']} ({r['file_mb']:.1f} MB): " + ", ".join(f"{g} {k}" for g, k in r["types"].items()))
    lines += ["", "Goals (issue 18):", "", "```", json.dumps(summary["goals"], indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
