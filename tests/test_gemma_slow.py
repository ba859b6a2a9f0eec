"""Integration: the real CLI on the bundled gemma3-270m with a tiny budget (marked slow).

Uses the persistent model cache (``$AUTOCOMP_CACHE`` of the outer environment, or
``~/.cache/autocomp``) so that the one-minute GGUF conversion happens once per machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

AUTOCOMP = [sys.executable, "-m", "autocomp.cli"]


def _env() -> dict:
    env = dict(os.environ)
    env["AUTOCOMP_CACHE"] = os.environ.get("AUTOCOMP_PERSISTENT_CACHE", str(Path.home() / ".cache" / "autocomp"))
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    return env


def test_gemma_search_pareto_recommend(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["--storage", storage, "--study-name", "gemma-slow"]
    search = subprocess.run(
        AUTOCOMP + ["search", "--model", "gemma3-270m", "--space", "demo", "--trials", "3",
                    "--eval-windows", "2", "--eval-seq-len", "128", "--max-ppl-increase", "50", "--no-progress"] + common,
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1200)
    assert search.returncode == 0, search.stderr[-3000:]
    assert "3 completed trials" in search.stderr

    pareto = subprocess.run(AUTOCOMP + ["pareto", "--json"] + common, cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert pareto.returncode == 0, pareto.stderr
    front = json.loads(pareto.stdout)
    assert front, "the front of a study with a dense baseline cannot be empty under a 50% budget"
    for point in front:
        m = point["metrics"]
        assert m["perplexity"] > 1 and m["size_mb"] > 0
        assert m["ppl_increase_pct"] <= 50
        # the tied 262k x 640 embedding alone is 168M parameters: no configuration is below 80 MB
        assert m["size_mb"] > 80
    by_uniform = {p["uniform"]: p for p in front if p["uniform"]}
    # the first uniform baselines of the demo space are 4-bit and 8-bit everywhere
    sizes = sorted(p["metrics"]["size_mb"] for p in front)
    assert sizes[0] < 300, f"an 8-bit or 4-bit point should be on the front: {sizes} {list(by_uniform)}"

    rec = subprocess.run(AUTOCOMP + ["recommend", "--json", "--max-ppl-increase", "50"] + common, cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert rec.returncode == 0, rec.stderr
    chosen = json.loads(rec.stdout)
    assert chosen["metrics"]["size_mb"] == min(p["metrics"]["size_mb"] for p in front)

    # validation with the built-in lm-eval task on the real model, then the report
    val = subprocess.run(AUTOCOMP + ["validate", "--tasks", "wikitext_lastword", "--task-limit", "16",
                                     "--heldout-windows", "2", "--trials", str(chosen["trial"]), "--no-progress",
                                     "--json"] + common,
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1200)
    assert val.returncode == 0, val.stderr[-3000:]
    validation = json.loads(val.stdout)
    dense_task = validation["dense"]["tasks"]["wikitext_lastword"]
    # a trained model gets some last words right (a random one gets none); 16 documents, so only a floor
    assert dense_task["n"] == 16 and dense_task["value"] >= 2 / 16
    entry = validation["trials"][str(chosen["trial"])]
    assert entry["search_reproduced_rel"] < 1e-6
    assert entry["sets"]["heldout"]["ppl_increase_ci"][0] <= entry["sets"]["heldout"]["ppl_increase_pct"]
    report = subprocess.run(AUTOCOMP + ["report", "--out", str(tmp_path / "report")] + common, cwd=tmp_path,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "report" / "front.png").exists()
