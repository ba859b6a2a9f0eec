"""``autocomp llamacpp``: quantize a model with llama.cpp (presets, per-tensor types, an importance
matrix from calibration text) and score / time a GGUF file in llama.cpp (see :mod:`autocomp.llamacpp`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("llamacpp", help="quantize with llama.cpp and score / time GGUF files in llama.cpp "
                                               "(needs autocomp[llamacpp])")
    sub = p.add_subparsers(dest="llamacpp_command", required=True)
    q = sub.add_parser("quantize", help="write a GGUF file: a llama-quantize preset, per-tensor types, an importance matrix")
    q.add_argument("--model", required=True, help="bundled name, folder or .gguf file")
    q.add_argument("--out", required=True, help="the .gguf file to write")
    q.add_argument("--preset", default="Q4_K_M", help="llama-quantize preset for the tensors --type does not name")
    q.add_argument("--type", action="append", default=[], metavar="TENSOR=TYPE",
                   help="a tensor's type, by its GGUF name (repeatable): blk.0.ffn_down.weight=Q6_K")
    q.add_argument("--imatrix-windows", type=int, default=0,
                   help="compute an importance matrix from this many WikiText-2 validation windows (0: none)")
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--threads", type=int, default=0)
    q.set_defaults(func=run_quantize)
    s = sub.add_parser("score", help="perplexity and KL to the model's F16 GGUF, and prefill / decode times, in llama.cpp")
    s.add_argument("--model", required=True, help="the model the file was made from (for its tokenizer and reference)")
    s.add_argument("--gguf", required=True, help="the GGUF file to score")
    s.add_argument("--eval-windows", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_score)


def run_quantize(args: argparse.Namespace) -> int:
    from autocomp.llamacpp.commands import parse_types, quantize_model
    from autocomp.llamacpp.quantize import tensor_types

    out = quantize_model(args.model, args.out, args.preset, parse_types(args.type), args.imatrix_windows,
                         args.seq_len, args.threads)
    counts: dict[str, int] = {}
    for kind in tensor_types(out).values():
        counts[kind] = counts.get(kind, 0) + 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0


def run_score(args: argparse.Namespace) -> int:
    from autocomp.llamacpp.commands import score_file

    score = score_file(args.model, args.gguf, args.eval_windows, args.seq_len, args.threads)
    if args.json:
        print(json.dumps(asdict(score)))
    else:
        print(f"{score.path}: {score.file_mb:.1f} MB, perplexity {score.perplexity:.3f} "
              f"(F16 {score.reference_perplexity:.3f}, x{score.perplexity / score.reference_perplexity:.4f}), "
              f"KL {score.kl:.4f}, prefill {score.prefill_ms:.0f} ms, decode {score.decode_ms_per_token:.1f} ms/token "
              f"({score.threads} threads)")
    return 0
