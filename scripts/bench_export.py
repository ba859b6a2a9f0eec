#!/usr/bin/env python
"""Benchmark: the front of a mixed study exported in every format, loaded in the engine each format is
for, and scored there on the trial's own evaluation windows.

A short search (per-layer symmetric 4 / 5 / 8 / 16 bits in groups of 32, embedding included, with
``deploy_target: llamacpp`` so that every point is exactly representable in GGUF; uniform baselines
first) runs on the model; its uniform 4-bit point, its best mixed (non-uniform) point (on the front if one is, else the
lowest-perplexity one) and the rest of its Pareto front, up to ``--max-points``, are exported as

* ``compressed-tensors`` and loaded with plain ``AutoModelForCausalLM.from_pretrained``;
* ``gguf`` and run in llama.cpp (llama-cpp-python, full logits) when it is installed, and read back
  with gguf-py into torch either way;
* ``packed`` and loaded with ``autocomp.load_model``.

For each: bytes of the weight file on disk, the trial's accounted bytes, the engine's perplexity on
the trial's windows against the trial's stored perplexity (ratio), and the load time. llama.cpp
quantizes activations in its matmuls, so its ratio is not 1; the others should be within the 16-bit
storage of the tensors kept in floating point.

    .venv/bin/python scripts/bench_export.py [--model gemma3-270m] [--trials 8] [--eval-windows 4]

Writes results/bench_export/table.md, table.csv and summary.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autocomp import api  # noqa: E402
from autocomp.config.space import SearchSpace  # noqa: E402
from autocomp.config.spec import StudySpec  # noqa: E402
from autocomp.evaluators.quality import score_windows  # noqa: E402
from autocomp.inputs.data import WindowSpec  # noqa: E402
from autocomp.store.records import load_records  # noqa: E402

SPACE = {"name": "export-bench", "deploy_target": "llamacpp",
         "description": "per-layer symmetric 4/5/8/16 bits, group 32, embedding included (exact in GGUF)",
         "targets": {"include": ["re:.*"], "embeddings": True}, "granularity": "layer",
         "quantization": {"methods": ["rtn"], "bits": [4, 5, 8, 16], "group_size": [32], "symmetric": [True]},
         "baselines": True}


def llama_cpp_perplexity(path: Path, input_ids: torch.Tensor, threads: int) -> tuple[float, float]:
    """The file's perplexity from llama.cpp's own logits, and its load time."""
    from autocomp.llamacpp.runtime import LlamaCppModel

    start = time.perf_counter()
    with LlamaCppModel(path, input_ids.shape[1], threads) as llm:
        load = time.perf_counter() - start
        return llm.score(input_ids)[0].perplexity, load


def torch_perplexity(load, input_ids: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        scores, _ = score_windows(model.eval(), input_ids)
    return scores.perplexity, seconds


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-points", type=int, default=4, help="front points exported (uniform 4-bit always included)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_export"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False

    spec = StudySpec(model=args.model, space=SearchSpace.from_dict(SPACE, "bench_export"),
                     eval_windows=WindowSpec(args.eval_windows, args.seq_len),
                     calib_windows=WindowSpec(args.calib_windows, args.seq_len, seed=0))
    url = f"sqlite:///{work / 'study.db'}"
    start = time.perf_counter()
    api.search(spec, args.trials, storage=url, study_name="export-bench", progress=False, cache_dir="none",
               echo=lambda m: print(m, file=sys.stderr))
    search_s = time.perf_counter() - start
    front = sorted(api.pareto(url, "export-bench"), key=lambda r: r.metrics["size_bytes"])
    everything = load_records(url, "export-bench").records
    uniform4 = [r for r in everything if r.uniform == "uniform rtn 4b"][:1]
    mixed = [r for r in front if r.uniform is None][:1] or sorted(
        (r for r in everything if r.uniform is None), key=lambda r: r.metrics["perplexity"])[:1]
    chosen = uniform4 + mixed
    points = (chosen + [r for r in front if r not in chosen])[:args.max_points]
    on_front = {r.trial for r in front}

    from autocomp.exporters import get_format
    from autocomp.study.evaluate import TrialEvaluator

    windows = TrialEvaluator(spec).eval_windows.input_ids
    rows = []
    for record in sorted(points, key=lambda r: r.metrics["size_bytes"]):
        label = (record.uniform or f"mixed (trial {record.trial})") + ("" if record.trial in on_front else ", off the front")
        trial_ppl = record.metrics["perplexity"]
        for fmt in ("compressed-tensors", "gguf", "packed"):
            folder = work / f"t{record.trial}-{fmt}"
            t0 = time.perf_counter()
            api.export(url, "export-bench", record.trial, folder, format=fmt, cache_dir="none")
            export_s = time.perf_counter() - t0
            engines = [("transformers" if fmt == "compressed-tensors" else "autocomp" if fmt == "packed"
                        else "gguf-py -> torch", lambda f=fmt, d=folder: get_format(f).load(d))]
            for engine, load in engines:
                ppl, load_s = torch_perplexity(load, windows)
                rows.append((label, fmt, weight_bytes(folder), record.metrics["size_bytes"], engine, ppl, trial_ppl,
                             load_s, export_s))
                print(rows[-1], file=sys.stderr)
            if fmt == "gguf" and have_llama:
                ppl, load_s = llama_cpp_perplexity(folder / "model.gguf", windows, args.threads)
                rows.append((label, fmt, weight_bytes(folder), record.metrics["size_bytes"], "llama.cpp", ppl,
                             trial_ppl, load_s, export_s))
                print(rows[-1], file=sys.stderr)
            shutil.rmtree(folder)

    header = ["configuration", "format", "bytes on disk", "accounted bytes", "disk / accounted", "loads in",
              "engine ppl", "trial ppl", "engine / trial", "load s", "export s"]
    table = [[label, fmt, disk, acc, f"{disk / acc:.3f}", engine, f"{ppl:.3f}", f"{trial:.3f}", f"{ppl / trial:.4f}",
              f"{load_s:.1f}", f"{export_s:.1f}"] for label, fmt, disk, acc, engine, ppl, trial, load_s, export_s in rows]
    lines = [f"# Exports of a {args.trials}-trial study's front on {args.model}",
             "",
             f"{args.eval_windows} x {args.seq_len} WikiText-2 test tokens (the trial's own windows); "
             f"search {search_s:.0f} s; llama-cpp-python {'installed' if have_llama else 'not installed'}; "
             f"{args.threads} threads.",
             "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table]
    text = "\n".join(lines) + "\n"
    print(text)
    (out_dir / "table.md").write_text(text)
    with open(out_dir / "table.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *table])
    (out_dir / "summary.json").write_text(json.dumps(
        {"model": args.model, "trials": args.trials, "eval_windows": args.eval_windows, "seq_len": args.seq_len,
         "space": SPACE, "llama_cpp": have_llama, "search_seconds": search_s,
         "rows": [dict(zip(header, row)) for row in table]}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
