"""The llama.cpp engine on a tiny Llama written as GGUF: quantizing per tensor, the importance
matrix, ggml's quantizer as autocomp's (byte-identical to llama.cpp's), scoring and timing in
llama.cpp, studies of llama.cpp's types timed in llama.cpp, bad input.

The tiny model has 256-wide rows (K-quants need rows that are a multiple of 256). Skipped without
llama-cpp-python unless AUTOCOMP_REQUIRE_LLAMA_CPP=1 (CI), where it fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from optional_deps import llama_cpp_or_skip

import autocomp
from autocomp.config.plan import CompressionPlan, LayerPlan
from autocomp.errors import DependencyError, EngineError, ModelLoadError, PlanError
from autocomp.exporters.gguf_file import GGUF_FILE

llama_cpp_or_skip(module_level=True)

from autocomp.llamacpp import gguf_raw  # noqa: E402
from autocomp.llamacpp.imatrix import importance_matrix  # noqa: E402
from autocomp.llamacpp.quantize import quantize, tensor_types  # noqa: E402
from autocomp.llamacpp.runtime import LlamaCppModel, measure, reference  # noqa: E402


@pytest.fixture(scope="module")
def wide(tiny_root, tmp_path_factory):
    """(HF folder, its F32 GGUF file) of a tiny Llama with 256-wide rows, trained a few steps so that
    its predictions are not uniform."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("wide")
    tok = AutoTokenizer.from_pretrained(tiny_root / "tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    folder = root / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    exported = autocomp.compress(str(folder), CompressionPlan(default=LayerPlan()), root / "gguf", format="gguf",
                                 dtype="float32")
    return folder, exported / GGUF_FILE


def _ids(n: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_overrides_set_each_named_tensor_and_the_preset_the_rest(wide, tmp_path):
    _, ref = wide
    out = quantize(ref, tmp_path / "q.gguf", preset="Q8_0",
                   types={"blk.0.ffn_down.weight": "Q2_K", "blk.1.attn_q.weight": "q5_k", "token_embd.weight": "Q4_0"})
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}   # read back with gguf-py
    assert tensor_types(out) == types
    assert types["blk.0.ffn_down.weight"] == "Q2_K"
    assert types["blk.1.attn_q.weight"] == "Q5_K"
    assert types["token_embd.weight"] == "Q4_0"
    assert types["blk.1.ffn_down.weight"] == "Q8_0"          # the preset's
    assert types["blk.0.attn_norm.weight"] == "F32"          # norms are never quantized


@pytest.mark.parametrize("which", ["wide", "narrow"])
def test_the_ggml_quantizer_writes_the_blocks_llama_quantize_writes(which, wide, tiny_models, tmp_path):
    """Method ggml-imatrix on every matmul, one width each, against llama.cpp's own quantizer asked
    for the K-quant of each width with the same importance matrix: the same type (``wide`` rows of
    256 and 512 take the K-quants; the tiny Llama's 64 and 128, llama.cpp's own fallback types) and
    the same bytes, tensor by tensor."""
    from transformers import AutoModelForCausalLM

    from autocomp.compressors.ggml import K_QUANT, ggml_type
    from autocomp.exporters.gguf_file import GGUFLayout
    from autocomp.inputs.targets import find_targets, get_module, read_weight
    from autocomp.pipeline.calibration import LayerStats
    from autocomp.pipeline.layer import compress_weight

    if which == "wide":
        folder, ref = wide
    else:
        folder = tiny_models["llama"]
        ref = autocomp.compress(str(folder), CompressionPlan(default=LayerPlan()), tmp_path / "ref", format="gguf",
                                dtype="float32") / GGUF_FILE
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    matrix = importance_matrix(model, _ids(2, 64, model.config.vocab_size, seed=4))
    layout = GGUFLayout.of(model)
    ours, asked, types = {}, {}, {}
    for i, t in enumerate(t for t in find_targets(model) if t.stats_module is not None and t.in_blocks):
        name, bits = f"{layout.gguf_name(t.name)}.weight", (2, 3, 4, 5, 6, 8)[i % 6]
        stats = LayerStats(torch.from_numpy(matrix[name]).double(), 1)     # mean squares over 1 "token": exact
        cw = compress_weight(read_weight(get_module(model, t.name)), LayerPlan(method="ggml-imatrix", bits=bits), stats)
        rows = layout.rows(t.name, t.out_features)
        ours[name] = (cw.quant.codes if rows is None else cw.quant.codes[rows]).numpy().tobytes()
        asked[name], types[name] = K_QUANT[bits], ggml_type(bits, t.in_features)
    assert (which == "wide") == (asked == types), types
    direct = quantize(ref, tmp_path / "direct.gguf", preset="Q8_0", types=asked, imatrix=matrix)
    written = gguf_raw.read_layout(direct)
    assert {n: tensor_types(direct)[n] for n in types} == types
    with direct.open("rb") as fh:
        for name, blob in ours.items():
            fh.seek(written.tensors[name].offset)
            assert fh.read(written.tensors[name].nbytes) == blob, name


def test_perplexity_in_llama_cpp_is_within_2_percent_of_torch(wide):
    from transformers import AutoModelForCausalLM

    from autocomp.evaluators.quality import score_windows

    folder, ref = wide
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = _ids(2, 96, model.config.vocab_size)
    torch_scores, _ = score_windows(model, ids)
    with LlamaCppModel(ref, 96, 1) as llm:
        scores, _ = llm.score(ids)
    assert scores.perplexity == pytest.approx(torch_scores.perplexity, rel=0.02)


def test_kl_to_the_reference_grows_as_bits_shrink(wide, tmp_path):
    _, ref = wide
    ids = _ids(2, 64, 384, seed=1)
    dense = reference(ref, ids, 32, 1)
    kls = []
    for kind in ("Q8_0", "Q4_K", "Q2_K"):
        path = quantize(ref, tmp_path / f"{kind}.gguf", preset=kind if kind == "Q8_0" else "Q8_0",
                        types={n: kind for n, t in tensor_types(ref).items() if n.startswith("blk.") and "norm" not in n})
        with LlamaCppModel(path, 64, 1) as llm:
            kls.append(llm.score(ids, dense)[0].mean_kl)
    assert 0 <= kls[0] < kls[1] < kls[2], kls


def test_importance_matrix_names_every_matmul_and_changes_the_quantization(wide, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, ref = wide
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    matrix = importance_matrix(model, _ids(2, 64, model.config.vocab_size))
    layout = gguf_raw.read_layout(ref)
    matmuls = {n for n, t in layout.tensors.items() if len(t.ne) == 2 and n != "token_embd.weight"}
    assert set(matrix) == matmuls            # untied: the LM head is output.weight, the embedding has none
    for name, values in matrix.items():
        assert values.shape == (layout.tensors[name].ne[0],) and (values > 0).all(), name
    types = {"blk.0.ffn_down.weight": "Q2_K"}
    plain = quantize(ref, tmp_path / "plain.gguf", preset="Q8_0", types=types)
    weighted = quantize(ref, tmp_path / "weighted.gguf", preset="Q8_0", types=types, imatrix=matrix)
    a, b = gguf_raw.read_layout(plain).tensors["blk.0.ffn_down.weight"], gguf_raw.read_layout(weighted).tensors[
        "blk.0.ffn_down.weight"]
    with plain.open("rb") as fa, weighted.open("rb") as fb:
        fa.seek(a.offset)
        fb.seek(b.offset)
        assert fa.read(a.nbytes) != fb.read(b.nbytes)


def test_timing_reports_prefill_and_decode(wide):
    timing = measure(wide[1], threads=1, prompt=16, decode=4, repeats=1)
    assert timing.prefill_ms > 0 and timing.decode_ms_per_token > 0
    assert (timing.prompt, timing.decode, timing.threads) == (16, 4, 1)


def test_bad_input_is_one_line(wide, tmp_path, monkeypatch):
    _, ref = wide
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        quantize(junk, tmp_path / "out.gguf")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        gguf_raw.read_layout(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(ref.read_bytes()[: ref.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        gguf_raw.read_layout(truncated)
    with pytest.raises(ModelLoadError, match="llama.cpp cannot load"):
        LlamaCppModel(truncated, 32, 1)
    with pytest.raises(PlanError, match="unknown GGUF tensor type"):
        quantize(ref, tmp_path / "out.gguf", types={"blk.0.attn_q.weight": "Q9_K"})
    with pytest.raises(PlanError, match="unknown llama.cpp preset"):
        quantize(ref, tmp_path / "out.gguf", preset="Q4_K_XL")
    with pytest.raises(EngineError, match="no tensor named blk.7"):
        quantize(ref, tmp_path / "out.gguf", types={"blk.7.attn_q.weight": "Q8_0"})
    with pytest.raises(EngineError, match="only with an importance matrix"):
        quantize(ref, tmp_path / "out.gguf", types={"blk.0.attn_q.weight": "IQ2_XXS"})
    assert not (tmp_path / "out.gguf").exists()
    assert not list(tmp_path.glob(".out.gguf.tmp*"))
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    with pytest.raises(DependencyError, match=r"autocomp\[llamacpp\]"):
        quantize(ref, tmp_path / "out.gguf")


def test_raw_layout_agrees_with_gguf_py(wide):
    import gguf

    _, ref = wide
    layout = gguf_raw.read_layout(ref)
    reader = gguf.GGUFReader(str(ref))
    assert layout.data_start == reader.data_offset
    for t in reader.tensors:
        raw = layout.tensors[t.name]
        assert (raw.offset, raw.nbytes, raw.ggml_type) == (int(t.data_offset), int(t.n_bytes), int(t.tensor_type))


def test_cli_quantizes_a_model_with_types_and_an_importance_matrix_then_scores_it(wide, tmp_path, capsys):
    from autocomp.cli import main

    folder, _ = wide
    out = tmp_path / "mix.gguf"
    assert main(["llamacpp", "quantize", "--model", str(folder), "--out", str(out), "--preset", "Q4_K_M",
                 "--type", "blk.0.ffn_down.weight=q2_k", "--imatrix-windows", "2", "--seq-len", "64"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert tensor_types(out)["blk.0.ffn_down.weight"] == "Q2_K"
    assert main(["llamacpp", "score", "--model", str(folder), "--gguf", str(out), "--eval-windows", "2",
                 "--seq-len", "64", "--threads", "1", "--json"]) == 0
    import json

    score = json.loads(capsys.readouterr().out)
    assert score["kl"] > 0 and score["perplexity"] > 1 and score["decode_ms_per_token"] > 0


def test_score_keeps_the_reference_of_its_windows(wide, monkeypatch):
    from autocomp.llamacpp import commands, runtime

    folder, path = wide
    first = commands.score_file(str(folder), path, eval_windows=2, seq_len=64, threads=1)
    monkeypatch.setattr(runtime, "reference", lambda *a, **k: pytest.fail("the reference was computed again"))
    second = commands.score_file(str(folder), path, eval_windows=2, seq_len=64, threads=1)
    assert (second.reference_perplexity, second.kl, second.perplexity) == \
        (first.reference_perplexity, first.kl, first.perplexity)


@pytest.mark.parametrize("argv, message", [
    (["--type", "blk.0.ffn_down.weight=Q9_K"], "unknown GGUF tensor type"),
    (["--type", "blk.0.ffn_down.weight"], "is not TENSOR=TYPE"),
    (["--preset", "Q4_K_XL"], "unknown llama.cpp preset"),
    (["--type", "blk.0.attn_q.weight=IQ2_XXS"], "only with an importance matrix"),
])
def test_cli_bad_quantize_input_is_one_line_and_exit_2(wide, tmp_path, capsys, argv, message):
    from autocomp.cli import main

    out = tmp_path / "x.gguf"
    assert main(["llamacpp", "quantize", "--model", str(wide[0]), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err
    assert not out.exists()


def test_cli_unreadable_gguf_and_missing_extra_are_one_line(wide, tmp_path, capsys, monkeypatch):
    from autocomp.cli import main

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 4096)
    assert main(["llamacpp", "score", "--model", str(wide[0]), "--gguf", str(junk)]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    assert main(["llamacpp", "score", "--model", str(wide[0]), "--gguf", str(wide[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert "autocomp[llamacpp]" in err and err.count("\n") == 0


# ---- a study timed in llama.cpp: --latency-engine llamacpp ---------------------------------------

LLAMACPP_LATENCY = ["--objectives", "perplexity,latency_ms", "--latency-engine", "llamacpp", "--latency-threads", "1",
                    "--latency-prompt-len", "16", "--latency-new-tokens", "8", "--latency-repeats", "3"]


def _gguf_space_with_two_presets(folder: Path) -> Path:
    """The built-in ``gguf`` space with fewer widths and two presets (a short study)."""
    import yaml

    from autocomp.config.space import BUILTIN_DIR

    data = yaml.safe_load((BUILTIN_DIR / "gguf.yaml").read_text())
    data["quantization"]["bits"], data["presets"] = [2, 4, 8, 16], ["Q4_K_M", "Q2_K"]
    path = folder / "gguf-presets.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("space", ["llamacpp", "gguf"])
def test_a_study_timed_in_llama_cpp_resumes_after_a_kill_and_exports_the_gguf_it_timed(space, wide, tmp_path,
                                                                                      cache_dir):
    """``--latency-engine llamacpp`` on autocomp's GPTQ codes in Q4_0/Q5_0/Q8_0 (space ``llamacpp``)
    and on llama.cpp's own types with two llama-quantize presets as baselines (space ``gguf``): every
    measured trial was timed on the GGUF file its export writes; a search killed (SIGKILL) mid-trial
    resumes with the same command, the lost trial failed and run again once; the front is
    re-measured in llama.cpp; the export of a front member is a GGUF file that llama.cpp runs, with
    the types its plan names; a preset baseline holds the types llama.cpp's preset chose."""
    import signal
    import subprocess

    from cli_helpers import (COMPLETE, assert_ok, assert_recovered, cli_command, cli_env, search_args, sqlite_url,
                             stop_mid_trial, trials_of)
    from transformers import AutoModelForCausalLM

    from autocomp import api
    from autocomp.compressors.ggml import GGML_METHODS, ggml_type
    from autocomp.exporters.gguf_file import GGUFLayout
    from autocomp.inputs.models import load_model
    from autocomp.llamacpp.commands import reference_gguf
    from autocomp.llamacpp.presets import preset_types

    folder, _ = wide
    hf = AutoModelForCausalLM.from_pretrained(folder)
    layout = GGUFLayout.of(hf)

    def types_of_plan(plan: dict) -> dict[str, str]:
        """GGUF tensor -> the type a stored plan puts it in."""
        out = {}
        for module, lp in CompressionPlan.from_dict(plan).layers:
            if lp.bits < 16:
                inputs = hf.get_submodule(module).weight.shape[1]
                out[f"{layout.gguf_name(module)}.weight"] = (ggml_type(lp.bits, inputs) if lp.quantizer in GGML_METHODS
                                                             else {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}[lp.bits])
        return out

    url, n = sqlite_url(tmp_path / "study.db"), 8   # beyond the presets and baselines: the retry runs too
    windows = ["--eval-windows", "8", "--eval-seq-len", "64", "--calib-windows", "4", "--calib-seq-len", "64",
               "--no-progress"]
    space_ref = space if space == "llamacpp" else _gguf_space_with_two_presets(tmp_path)
    args = [str(a) for a in search_args(folder, url, "gguf", n, "--no-validate", *LLAMACPP_LATENCY,
                                         space=space_ref, windows=windows)]
    log = tmp_path / "search.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cli_command() + args, cwd=tmp_path, env=cli_env(cache_dir), stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        lost, before = stop_mid_trial(url, "gguf", proc, log, lambda t: "pid" in t.user_attrs and "worker" in t.user_attrs,
                                      "a trial ran after 2 finished")
        os.kill(lost.user_attrs["pid"], signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    again = subprocess.run(cli_command() + args, cwd=tmp_path, env=cli_env(cache_dir), capture_output=True,
                           text=True, timeout=600)
    assert_ok(again)
    trials = trials_of(url, "gguf")
    assert_recovered(trials, lost, n, before)
    done = [t for t in trials if t.state == COMPLETE]
    if space == "gguf":
        presets = {t.user_attrs["preset"]: t for t in done if "preset" in t.user_attrs}
        assert set(presets) == {"Q4_K_M", "Q2_K"} and all(t.params == {} for t in presets.values())
        assert "llama.cpp preset Q4_K_M: perplexity" in log.read_text()
        reference = reference_gguf(load_model(str(folder)))
        for name, t in presets.items():
            planned = types_of_plan(t.user_attrs["plan"])
            chosen = preset_types(reference, name)
            assert planned == {k: chosen[k] for k in planned}, name
            assert all(chosen[k] in ("F32", "F16") for k in set(chosen) - set(planned)), name   # norms
    measured = [t.user_attrs["metrics"] for t in done if t.user_attrs["metrics"]["latency_measured"] == 1.0]
    assert measured and all(m["gguf_bytes"] > 0 and m["latency_ms"] > 0 and m["prefill_ms"] > 0 for m in measured)
    assert "(llamacpp)" in again.stdout + again.stderr        # the front, re-measured in llama.cpp
    front = api.pareto(url, "gguf")
    assert front and all(r.metrics["latency_remeasured"] == 1.0 for r in front)
    member = min(front, key=lambda r: r.metrics["size_mb"])
    gguf_path = api.export(url, "gguf", member.trial, tmp_path / "export") / GGUF_FILE
    expected = types_of_plan(member.plan)
    assert expected and {name: tensor_types(gguf_path)[name] for name in expected} == expected
    with LlamaCppModel(gguf_path, 64, 1) as llm:
        scores, _ = llm.score(_ids(2, 64, llm.vocab, seed=3))
    assert 1 < scores.perplexity < 1e4
    assert member.metrics["gguf_bytes"] == pytest.approx(gguf_path.stat().st_size, rel=0.01)   # the file it timed


def test_the_llamacpp_latency_engine_needs_a_llamacpp_space(wide, tmp_path, capsys):
    from autocomp.cli import main

    code = main(["search", "--model", str(wide[0]), "--space", "bits", "--trials", "2", "--no-progress",
                 "--storage", f"sqlite:///{tmp_path / 's.db'}", "--study-name", "x", *LLAMACPP_LATENCY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "deploy_target: llamacpp" in err and err.count("\n") == 0
    assert not (tmp_path / "s.db").exists()      # refused before any study was touched
