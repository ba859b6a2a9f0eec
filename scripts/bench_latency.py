#!/usr/bin/env python
"""Benchmark: latency, memory and bytes on disk of gemma3-270m as deployed, dense vs compressed.

Every variant is compressed with a data-free plan (RTN, magnitude), materialised with real kernels
where the device has them (:mod:`autocomp.deploy.kernels`) and measured end to end
(:func:`autocomp.latency.timing.measure_latency`): prefill of a ``--prompt-len`` prompt and
decode ms per token over ``--new-tokens`` tokens, median and range of ``--repeats`` runs after
warm-up, peak memory (resident weights + peak RSS increase during the run on CPU; CUDA max
allocated on a GPU). Bytes on disk are those of the packed export (``model.packed.safetensors``),
next to the accounted size. The lookup-table latency model (fitted on the dense measurement of the
same run) predicts each variant first; its error against the measurement is reported. Held-out
perplexity (WikiText-2 test, ``--eval-windows`` x 512 tokens) of the deployed model shows what each
format costs in quality (int8 dynamic quantizes activations, so it differs from its simulation).

Students come from the student cache of ``scripts/bench_students.py`` (same distillation settings;
built here, 5 minutes each, when missing).

    .venv/bin/python scripts/bench_latency.py            # CPU; on a machine with CUDA add --device cuda

Writes results/bench_latency[-cuda]/table.md and summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from autocomp.inputs.data import WindowSpec, text_windows  # noqa: E402
from autocomp.latency.table import LatencyModel, LatencyTable  # noqa: E402
from autocomp.latency.trial import deployable_copy, kernel_summary  # noqa: E402
from autocomp.latency.timing import measure_latency  # noqa: E402
from autocomp.latency.spec import LatencySpec  # noqa: E402
from autocomp.evaluators.quality import score_windows  # noqa: E402
from autocomp.evaluators.size import model_size  # noqa: E402
from autocomp.inputs.models import load_model  # noqa: E402
from autocomp.config.plan import LayerPlan  # noqa: E402
from autocomp.pipeline.stitch import ModelStitcher  # noqa: E402
from autocomp.inputs.targets import find_decoder_blocks, find_targets  # noqa: E402

INT8 = LayerPlan(method="rtn", bits=8, group_size=-1)
INT4 = LayerPlan(method="rtn", bits=4, group_size=128)
# (label, student label or None, plan for block layers, plan for the embedding / LM head, dynamic int8)
VARIANTS = [
    ("dense", None, None, None, False),
    ("int8 weight-only", None, INT8, INT8, False),
    ("int8 dynamic", None, INT8, INT8, True),
    ("int4 weight-only g128", None, INT4, INT4, False),
    ("int4 blocks, dense head", None, INT4, None, False),
    ("3-bit g128 (no CPU kernel)", None, LayerPlan(method="rtn", bits=3, group_size=128),
     LayerPlan(method="rtn", bits=3, group_size=128), False),
    ("2:4 sparse (no CPU kernel)", None, LayerPlan(method="magnitude", pattern="2:4"), None, False),
    ("student width-75", "width-75", None, None, False),
    ("student depth-50", "depth-50", None, None, False),
    ("student width-75 + int4", "width-75", INT4, INT4, False),
]
STUDENT_SHAPES = {"width-75": {"ffn": 1320}, "depth-50": {"layers": 9}}


def student_spec(label: str):
    from autocomp.students.spec import DistillSpec, StudentSpec

    summary = ROOT / "results" / "bench_students" / "summary.json"
    distill = (DistillSpec.from_dict(json.loads(summary.read_text())["distill"]) if summary.exists()
               else DistillSpec(steps=48, temperature=1.0, alpha=1.0, lr=5e-5, batch=2, seq_len=256, windows=64,
                                teacher="topk"))
    return StudentSpec(**STUDENT_SHAPES[label], distill=distill)


def plan_for(targets, block_plan: LayerPlan | None, head_plan: LayerPlan | None) -> dict[str, LayerPlan]:
    out = {}
    for t in targets:
        chosen = block_plan if t.in_blocks else head_plan
        if chosen is not None:
            out[t.name] = chosen
    return out


def disk_bytes(model, targets, compressed, plans) -> int:
    from autocomp.deploy.packed_io import PACKED_FILE, save_packed

    with tempfile.TemporaryDirectory() as tmp:
        save_packed(tmp, model, targets, compressed, plans, dtype=torch.float16)
        return (Path(tmp) / PACKED_FILE).stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-windows", type=int, default=4, help="held-out WikiText-2 test windows of 512 tokens")
    ap.add_argument("--only", nargs="*", help="labels of the variants to run (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    out = Path(args.out or ROOT / "results" / ("bench_latency" + ("-cuda" if args.device == "cuda" else "")))
    out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only]
    if args.device == "cuda":  # 2:4 has a kernel there: time it as such
        variants = [(v[0].replace(" (no CPU kernel)", ""), *v[1:]) for v in variants]

    loaded = load_model(args.model)
    teacher = loaded.model
    held = text_windows(loaded.tokenizer, "wikitext2", "test", WindowSpec(args.eval_windows, 512), random=False).input_ids
    base = LatencySpec(device=args.device, threads=args.threads, dtype=dtype, prompt_len=args.prompt_len,
                       new_tokens=args.new_tokens, repeats=args.repeats, warmup=1)
    table = LatencyTable(base, ROOT / "results" / "latency-tables")
    teacher_targets = find_targets(teacher)
    original_bytes = model_size(teacher, teacher_targets, {}).total_bytes
    rows, latency_model = [], None
    students: dict[str, object] = {}
    for label, student, block_plan, head_plan, dynamic in variants:
        t0 = time.perf_counter()
        spec = LatencySpec(**{**base.to_dict(), "dynamic_int8": dynamic})
        if student is not None:
            from autocomp.students.build import build_student

            if student not in students:
                students[student] = build_student(loaded, student_spec(student), progress=True).model
            model = students[student]
        else:
            model = teacher
        targets = find_targets(model)
        plans = plan_for(targets, block_plan, head_plan)
        stitcher = ModelStitcher(model, targets, f"{loaded.fingerprint}:{student}")
        stitcher.apply(plans)
        compressed = stitcher.compressed_weights()
        blocks = len(find_decoder_blocks(model)[1])
        predicted = None
        if latency_model is not None:
            var_table = table if not dynamic else LatencyTable(spec, ROOT / "results" / "latency-tables")
            fitted = LatencyModel(var_table, latency_model.rest_prefill_per_block, latency_model.rest_decode_per_block)
            predicted = fitted.predict(targets, plans, blocks)
        deployed, report = deployable_copy(model, targets, compressed, plans, spec)
        result = measure_latency(deployed, spec)
        with torch.inference_mode():
            ppl = score_windows(deployed, held.to(spec.device))[0].perplexity
        del deployed
        if latency_model is None:  # the dense teacher: fit the table's per-block rest on it
            latency_model = LatencyModel.fit(table, targets, blocks, result.prefill.median, result.decode.median)
            predicted = latency_model.predict(targets, plans, blocks)
        accounted = model_size(model, targets, plans).total_bytes
        on_disk = disk_bytes(model, targets, compressed, plans)
        stitcher.apply({})  # the model back to dense for the next variant
        row = {"label": label, "student": student, "dynamic_int8": dynamic,
               "prefill_ms": result.prefill.median, "prefill_range": [result.prefill.min, result.prefill.max],
               "decode_ms": result.decode.median, "decode_range": [result.decode.min, result.decode.max],
               "decode_iqr_pct": result.decode.iqr_pct, "peak_mb": result.peak_mb, "model_mb": result.model_mb,
               "work_mb": result.work_mb, "accounted_bytes": accounted, "disk_bytes": on_disk,
               "disk_vs_accounted_pct": 100.0 * (on_disk - accounted) / accounted,
               "ratio_vs_original": original_bytes / accounted,
               "predicted_decode_ms": predicted.decode_ms, "predicted_prefill_ms": predicted.prefill_ms,
               "decode_error_pct": 100.0 * (predicted.decode_ms - result.decode.median) / result.decode.median,
               "prefill_error_pct": 100.0 * (predicted.prefill_ms - result.prefill.median) / result.prefill.median,
               "heldout_ppl": ppl, **kernel_summary(report), "no_kernel": report.reasons(),
               "settings": result.settings, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"{label}: prefill {row['prefill_ms']:.0f} ms, decode {row['decode_ms']:.1f} ms/token, "
              f"peak {row['peak_mb']:.0f} MB, disk {on_disk / 1e6:.1f} MB (accounted {accounted / 1e6:.1f}), "
              f"ppl {ppl:.2f}, table error decode {row['decode_error_pct']:+.1f}%", flush=True)
    dense = rows[0] if rows and rows[0]["label"] == "dense" else None
    for row in rows:
        if dense is not None:
            row["decode_speedup"] = dense["decode_ms"] / row["decode_ms"]
            row["prefill_speedup"] = dense["prefill_ms"] / row["prefill_ms"]
    summary = {"model": args.model, "latency": base.to_dict(), "eval": {"windows": args.eval_windows, "seq_len": 512,
               "split": "wikitext2 test"}, "table_entries": len(table.entries), "variants": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = render(summary)
    (out / "table.md").write_text(text)
    print(text)
    return 0


def render(summary: dict) -> str:
    lat = summary["latency"]
    rows = summary["variants"]
    settings = rows[0]["settings"] if rows else {}
    lines = [f"# Latency of {summary['model']} as deployed ({lat['device']}, {settings.get('threads')} threads, "
             f"{lat['dtype']}, {settings.get('cpu_capability', '')}, torch {settings.get('torch', '')})", "",
             f"Prompt {lat['prompt_len']} tokens, batch {lat['batch']}, {lat['new_tokens']} decoded tokens; median "
             f"(min-max) of {lat['repeats']} runs after {lat['warmup']} warm-up. Peak memory = resident weights + "
             "peak RSS increase during the run. Disk = packed safetensors file. Held-out perplexity on "
             f"{summary['eval']['windows']} x 512 WikiText-2 test tokens. Table = lookup-table prediction error.", "",
             "| variant | prefill ms | decode ms/token | decode speed-up | peak MB | disk MB | accounted MB | "
             "disk vs acc. | ppl | layers on kernels / without | table err decode | table err prefill |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['prefill_ms']:.0f} ({r['prefill_range'][0]:.0f}-{r['prefill_range'][1]:.0f}) | "
            f"{r['decode_ms']:.1f} ({r['decode_range'][0]:.1f}-{r['decode_range'][1]:.1f}) | "
            f"{r.get('decode_speedup', 1):.2f}x | {r['peak_mb']:.0f} | {r['disk_bytes'] / 1e6:.1f} | "
            f"{r['accounted_bytes'] / 1e6:.1f} | {r['disk_vs_accounted_pct']:+.2f}% | {r['heldout_ppl']:.2f} | "
            f"{int(r['kernel_layers'])} / {int(r['no_kernel_layers'])} | {r['decode_error_pct']:+.1f}% | "
            f"{r['prefill_error_pct']:+.1f}% |")
    reasons = {}
    for r in rows:
        for reason, n in r["no_kernel"].items():
            reasons.setdefault(reason, []).append(f"{r['label']} ({n})")
    if reasons:
        lines += ["", "Layers without a kernel on this device (run dequantized in float, timed as such):"]
        lines += [f"- {reason}: {', '.join(where)}" for reason, where in reasons.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
