#!/usr/bin/env python
"""Benchmark: students of gemma3-270m at ~75% and ~50% of the decoder parameters, before and after
knowledge distillation for the same step budget.

Six students (depth-only, width-only, mixed, at two sizes) are pruned from the teacher by measured
importance (block influence for depth; calibration activations for FFN neurons and heads), then
distilled for ``--steps`` steps on WikiText-2 *validation* windows against the teacher's top-k
targets (computed once, shared by every student). Each is scored on held-out WikiText-2 *test*
windows before and after distillation. CPU forward speed is measured at the end, interleaved across
models (median of ``--repeats`` forward passes of one ``--speed-seq-len``-token window each, after
warm-up), and reported as a speed-up over the teacher measured in the same run.

    .venv/bin/python scripts/bench_students.py --steps 48

Writes results/bench_students/table.md and summary.json. Distilled students are kept in the student
cache (``$AUTOCOMP_CACHE/students``), so a rerun only re-measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from autocomp.inputs.data import WindowSpec, text_windows  # noqa: E402
from autocomp.evaluators.quality import score_windows  # noqa: E402
from autocomp.inputs.models import load_model  # noqa: E402
from autocomp.students.build import build_student  # noqa: E402
from autocomp.students.prune import teacher_dims  # noqa: E402
from autocomp.students.spec import DistillSpec, StudentSpec  # noqa: E402

# (label, kind, target fraction, layers, ffn, heads): sizes for gemma3-270m (18 layers, FFN 2048, 4 heads on 1 kv
# head; its config needs hidden 640 divisible by the heads, so 4, 2 or 1)
STUDENTS = [
    ("depth-75", "depth", 0.75, 14, None, None),
    ("width-75", "width", 0.75, None, 1320, None),
    ("mixed-75", "mixed", 0.75, 16, 1600, None),
    ("depth-50", "depth", 0.50, 9, None, None),
    ("width-50", "width", 0.50, None, 944, 2),
    ("mixed-50", "mixed", 0.50, 13, 1496, 2),
]


def decoder_params(model) -> int:
    from autocomp.inputs.targets import find_decoder_blocks

    return sum(p.numel() for p in find_decoder_blocks(model)[1].parameters())


def unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def held_out_ppl(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        scores, _ = score_windows(model, ids)
    return scores.perplexity


def forward_ms(models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Median and spread of one forward pass per model, interleaved so that drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(ids)
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(ids)
                times[name].append((time.perf_counter() - t0) * 1000)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--steps", type=int, default=48, help="distillation steps per student (same for all)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64, help="distillation windows (WikiText-2 validation)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--teacher", default="topk", choices=["topk", "online"])
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out WikiText-2 test windows")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--speed-seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", nargs="*", help="labels of the students to run (default: all)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_students"))
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    teacher = loaded.model
    dims = teacher_dims(teacher.config)
    held = text_windows(loaded.tokenizer, "wikitext2", "test", WindowSpec(args.eval_windows, args.eval_seq_len),
                        random=False).input_ids
    t_dec, t_all = decoder_params(teacher), unique_params(teacher)
    print(f"teacher: {t_all / 1e6:.1f}M parameters ({t_dec / 1e6:.1f}M in {dims['layers']} decoder blocks); "
          f"threads {torch.get_num_threads()}")
    t_ppl = held_out_ppl(teacher, held)
    print(f"teacher held-out perplexity {t_ppl:.2f}")
    distill = DistillSpec(steps=args.steps, temperature=args.temperature, alpha=args.alpha, lr=args.lr,
                          batch=args.batch, seq_len=args.seq_len, windows=args.windows, teacher=args.teacher)
    rows, models = [], {"teacher": teacher}
    chosen = [s for s in STUDENTS if not args.only or s[0] in args.only]
    for label, kind, target, layers, ffn, heads in chosen:
        spec = StudentSpec(layers=layers, ffn=ffn, heads=heads, distill=distill)
        pruned = build_student(loaded, spec.shape, progress=False)
        ppl_before = held_out_ppl(pruned.model, held)
        t0 = time.perf_counter()
        built = build_student(loaded, spec, progress=True)
        wall = time.perf_counter() - t0
        ppl_after = held_out_ppl(built.model, held)
        dec = decoder_params(built.model)
        row = {"label": label, "kind": kind, "target": target, "layers": built.spec.layers, "ffn": built.spec.ffn,
               "heads": built.spec.heads, "kv_heads": built.spec.kv_heads, "kept_layers": list(built.kept_layers),
               "decoder_params": dec, "decoder_fraction": dec / t_dec, "params": unique_params(built.model),
               "ppl_pruned": ppl_before, "ppl_distilled": ppl_after, "improvement": ppl_before / ppl_after,
               "seconds_distill": built.seconds_distill, "from_cache": built.from_cache, "wall_s": wall,
               "loss_first": built.distill.get("loss_first"), "loss_last": built.distill.get("loss_last")}
        rows.append(row)
        models[label] = built.model
        print(f"{label}: {dec / 1e6:.1f}M decoder params ({dec / t_dec:.0%}), held-out ppl {ppl_before:.1f} pruned -> "
              f"{ppl_after:.1f} distilled ({row['improvement']:.2f}x better), distill {built.seconds_distill:.0f} s", flush=True)
        del pruned
    ids = held[:1, : args.speed_seq_len]
    speed = forward_ms(models, ids, args.repeats)
    for row in rows:
        row["forward_ms"] = speed[row["label"]]["median"]
        row["forward_spread_ms"] = [speed[row["label"]]["min"], speed[row["label"]]["max"]]
        row["speedup"] = speed["teacher"]["median"] / speed[row["label"]]["median"]
    summary = {"model": args.model, "teacher": {"params": t_all, "decoder_params": t_dec, "ppl": t_ppl,
                                                "forward_ms": speed["teacher"]["median"],
                                                "forward_spread_ms": [speed["teacher"]["min"], speed["teacher"]["max"]]},
               "distill": distill.to_dict(), "eval": {"windows": args.eval_windows, "seq_len": args.eval_seq_len,
                                                      "split": "wikitext2 test (held out)"},
               "speed": {"seq_len": args.speed_seq_len, "repeats": args.repeats, "threads": torch.get_num_threads()},
               "students": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = render(summary)
    (out / "table.md").write_text(table)
    print(table)
    return 0 if all(r["ppl_distilled"] < r["ppl_pruned"] for r in rows) else 1


def render(summary: dict) -> str:
    t = summary["teacher"]
    d = summary["distill"]
    lines = [
        f"# Students of {summary['model']}: pruned vs distilled ({d['steps']} steps of {d['batch']} x {d['seq_len']} "
        f"tokens, teacher {d['teacher']}, T={d['temperature']:g}, alpha={d['alpha']:g}, lr={d['lr']:g})",
        "",
        f"Held-out perplexity: {summary['eval']['windows']} x {summary['eval']['seq_len']} tokens of "
        f"{summary['eval']['split']}. Forward: median (min-max) of {summary['speed']['repeats']} passes of one "
        f"{summary['speed']['seq_len']}-token window, {summary['speed']['threads']} threads, interleaved; "
        "speed-up over the teacher in the same run.",
        "",
        "| student | layers | FFN | heads | decoder params | all params | ppl pruned | ppl distilled | better by | "
        "forward ms | speed-up | distill s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher | - | - | - | {t['decoder_params'] / 1e6:.1f}M (100%) | {t['params'] / 1e6:.1f}M | {t['ppl']:.2f} | - | - | "
        f"{t['forward_ms']:.0f} ({t['forward_spread_ms'][0]:.0f}-{t['forward_spread_ms'][1]:.0f}) | 1.00x | - |",
    ]
    for r in summary["students"]:
        lines.append(
            f"| {r['label']} | {r['layers']} | {r['ffn']} | {r['heads']}/{r['kv_heads']} | {r['decoder_params'] / 1e6:.1f}M "
            f"({r['decoder_fraction']:.0%}) | {r['params'] / 1e6:.1f}M | {r['ppl_pruned']:.1f} | {r['ppl_distilled']:.1f} | "
            f"{r['improvement']:.2f}x | {r['forward_ms']:.0f} ({r['forward_spread_ms'][0]:.0f}-{r['forward_spread_ms'][1]:.0f}) | "
            f"{r['speedup']:.2f}x | {r['seconds_distill']:.0f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
