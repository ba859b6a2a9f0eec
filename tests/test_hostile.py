"""Hostile input through the real command line: a table of bad command lines.

Every row runs the console script in a subprocess and must end with exit 2, exactly one stderr line
``autocomp: error: ...`` (nothing else on stderr), no traceback, the words the row names in that
line, and the trials of a pre-built study exactly as they were. A new option joins by adding a row
to ``ROWS``: ``args`` may use the placeholders of :func:`_fill`.
"""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from cli_helpers import SMALL, assert_ok, run_cli

STUDY = "h"
SECRET = "s3cr3tpw"


@dataclass(frozen=True)
class Row:
    args: list[str]
    words: list[str] = field(default_factory=list)     # must appear in the error line
    cwd: str = "{tmp}"                                  # where the command runs
    absent: list[str] = field(default_factory=list)     # paths that must not exist afterwards
    kept: list[str] = field(default_factory=list)       # paths that must still exist afterwards


def _search(*extra: str, model: str = "{model}") -> list[str]:
    """A cheap search on a fresh storage, with ``extra`` flags replacing or adding to the defaults."""
    opts = {"--model": model, "--space": "bits", "--trials": "2", "--storage": "sqlite:///{tmp}/fresh.db",
            "--study-name": "fresh"}
    rest: list[str] = []
    pairs = list(extra)
    while pairs:
        flag = pairs.pop(0)
        if pairs and not pairs[0].startswith("--"):
            value = pairs.pop(0)
            if flag in opts:
                opts[flag] = value
            else:
                rest += [flag, value]
        else:
            rest.append(flag)
    return ["search", *SMALL, "--no-validate", *[x for kv in opts.items() for x in kv], *rest]


def _study(command: str, *extra: str, url: str = "{url}", name: str = STUDY) -> list[str]:
    return [command, "--storage", url, "--study-name", name, *extra]


ROWS: dict[str, Row] = {
    # ---- models (items 2, 7) ----
    "model-missing": Row(_search(model="./no-such-model"), ["no-such-model", "does not exist"]),
    "model-folder-without-config": Row(_search(model="{bad}/hf-models"), ["config.json"]),
    "model-config-not-json": Row(_search(model="{bad}/bad-config"), ["config"]),
    "model-nan-weight": Row(_search(model="{bad}/nan-model"), ["non-finite", "down_proj"]),
    "model-truncated-search": Row(_search(model="{bad}/truncated-model"), ["truncated"]),
    "model-truncated-compress": Row(["compress", "--model", "{bad}/truncated-model", "--plan", "{bad}/plan.json",
                                     "--out", "{tmp}/out"], ["truncated"], absent=["{tmp}/out"]),
    # ---- window lengths (item 8) ----
    "eval-seq-len-over-positions": Row(_search("--eval-seq-len", "100000", model="{gpt2}"),
                                       ["--eval-seq-len 100000", "256"]),
    "calib-seq-len-over-positions": Row(_search("--calib-seq-len", "4096"), ["--calib-seq-len 4096", "256"]),
    "eval-windows-zero": Row(_search("--eval-windows", "0"), ["window count"]),
    # ---- study names (item 6) ----
    "study-name-escape": Row(["search", *SMALL, "--no-validate", "--model", "{model}", "--space", "bits", "--trials",
                              "2", "--study-name", "../../../escape"], ["study name", "escape"],
                             cwd="{tmp}/w/x/y", absent=["{tmp}/w/escape", "{tmp}/w/x/y/results"]),
    "study-name-empty": Row(["search", *SMALL, "--no-validate", "--model", "{model}", "--space", "bits", "--trials",
                             "2", "--study-name", ""], ["study name"], absent=["{tmp}/results"]),
    "study-name-nested": Row(_search("--study-name", "a/b"), ["study name", "a/b"], absent=["{tmp}/fresh.db"]),
    "study-name-escape-reading": Row(_study("pareto", name="../h"), ["study name"]),
    # ---- storage URLs (item 4) ----
    "storage-scheme": Row(_study("pareto", url="foo://bar"), ["foo://bar"]),
    "storage-password-in-userinfo": Row(_study("pareto", url=f"postgresql://:{SECRET}@127.0.0.1:1/db"), ["***"]),
    "storage-password-in-query": Row(_study("pareto", url=f"postgresql://u@127.0.0.1:1/db?password={SECRET}"),
                                     ["***"]),
    "storage-missing-folder": Row(_study("pareto", url="sqlite:///{tmp}/no/such/study.db"), ["no/such"]),
    "storage-no-such-study": Row(_study("pareto", name="nope"), ["nope"]),
    # ---- numbers ----
    "trials-negative": Row(_search("--trials", "-3"), ["--trials"]),
    "trials-not-a-number": Row(_search("--trials", "abc"), ["--trials", "abc"]),
    "cache-mb-negative": Row(_search("--cache-mb", "-5"), ["--cache-mb"]),
    "budget-nan": Row(_search("--max-ppl-increase", "nan"), ["finite"]),
    "budget-negative-size": Row(_study("recommend", "--max-size-mb", "-3"), ["--max-size-mb"]),
    "kl-topk-zero": Row(_search("--kl-topk", "0"), ["kl_topk"]),
    "seed-negative": Row(_search("--seed", "-1"), ["--seed"]),
    "staged-windows-too-many": Row(_search("--staged-windows", "9"), ["staged"]),
    "max-gb-negative": Row(["cache", "--dir", "{tmp}/variants", "--max-gb", "-1"], ["--max-gb"]),
    # ---- names of things ----
    "space-unknown": Row(_search("--space", "no-such-space"), ["no-such-space"]),
    "space-yaml-syntax": Row(_search("--space", "{bad}/broken.yaml"), ["broken.yaml", "line 4, column 10"]),
    "space-not-utf8": Row(_search("--space", "{bad}/binary.yaml"), ["binary.yaml", "UTF-8"]),
    "objective-unknown": Row(_search("--objectives", "perplexity,speed"), ["speed"]),
    "sampler-unknown": Row(_search("--sampler", "random"), ["--sampler", "random"]),
    "format-unknown": Row(_study("export", "--trial", "0", "--out", "{tmp}/out", "--format", "onnx"),
                          ["--format", "onnx"], absent=["{tmp}/out"]),
    "format-cannot-hold": Row(["compress", "--model", "{model}", "--plan", "{bad}/asym8.json", "--out", "{tmp}/out",
                               "--format", "gguf"], ["asymmetric 8-bit", "model.layers.0."], absent=["{tmp}/out"]),
    "format-group-not-32": Row(["compress", "--model", "{gpt2}", "--plan", "{bad}/g16.json", "--out", "{tmp}/out",
                                "--format", "gguf"], ["multiples of 32", "transformer.h.0."], absent=["{tmp}/out"]),
    "target-unknown": Row(_study("export", "--trial", "0", "--out", "{tmp}/out", "--target", "sglang"),
                          ["--target", "sglang"], absent=["{tmp}/out"]),
    "target-not-checked-by-format": Row(_study("export", "--trial", "0", "--out", "{tmp}/out", "--format", "packed",
                                               "--target", "vllm"), ["--target vllm", "packed"], absent=["{tmp}/out"]),
    "prefer-unknown": Row(_study("recommend", "--prefer", "fastest"), ["--prefer", "fastest"]),
    "command-unknown": Row(["serch"], ["serch"]),
    "option-unknown": Row(_study("pareto", "--jsn"), ["--jsn"]),
    "data-not-utf8": Row(_search("--data", "{bad}/binary.txt"), ["binary.txt"]),
    "data-empty": Row(_search("--data", "{bad}/empty.txt"), ["empty.txt"]),
    # ---- trials and outputs (items 9, 10) ----
    "trial-missing": Row(_study("export", "--trial", "999", "--out", "{tmp}/out"), ["999"], absent=["{tmp}/out"]),
    "export-out-is-a-file": Row(_study("export", "--trial", "0", "--out", "{bad}/a-file"), ["a-file", "is a file"]),
    "report-out-is-a-file": Row(_study("report", "--out", "{bad}/a-file"), ["a-file", "is a file"]),
    "plan-missing": Row(["compress", "--model", "{model}", "--plan", "{tmp}/nope.json", "--out", "{tmp}/out"],
                        ["nope.json"], absent=["{tmp}/out"]),
    "validate-heldout-one": Row(_study("validate", "--heldout-windows", "1", "--no-progress"), ["at least 2"]),
    # ---- the variant cache folder (item 3) ----
    "cache-prune-foreign-folder": Row(["cache", "--dir", "{bad}/hf-models", "--max-gb", "0"],
                                      ["not a variant cache"], kept=["{bad}/hf-models/m/model.safetensors"]),
    # ---- custom model code (item 5): the stored spec says --trust-remote-code, the command does not ----
    "worker-remote-code": Row(_study("worker", "--trials", "3", "--no-progress", url="{trust_url}"),
                              ["--trust-remote-code"]),
    "validate-remote-code": Row(_study("validate", "--no-progress", url="{trust_url}"), ["--trust-remote-code"]),
    "export-remote-code": Row(_study("export", "--trial", "0", "--out", "{tmp}/out", url="{trust_url}"),
                              ["--trust-remote-code"], absent=["{tmp}/out"]),
}


# ---- fixtures ------------------------------------------------------------------------------------

def _snapshot(url: str) -> list[tuple]:
    """What a refused command must not change: every study, every trial's state, values, params, metrics."""
    out = []
    for name in sorted(optuna.get_all_study_names(storage=url)):
        for t in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False):
            out.append((name, t.number, t.state, t.values, t.params, json.dumps(t.user_attrs.get("metrics"),
                                                                               sort_keys=True)))
    return out


@pytest.fixture(scope="module")
def hostile(tiny_models, tmp_path_factory, cache_dir):
    """A finished study (the one every row must leave as it is), one created with --trust-remote-code,
    and a folder of bad inputs."""
    from safetensors.torch import save_file
    from tiny import copy_with_nan_weight

    folder = tmp_path_factory.mktemp("hostile")
    url = f"sqlite:///{folder}/study.db"
    assert_ok(run_cli(["search", "--model", tiny_models["llama"], "--space", "bits", "--trials", 3, *SMALL,
                       "--no-validate", "--storage", url, "--study-name", STUDY], folder, cache_dir))
    trust_url = f"sqlite:///{folder}/trust.db"
    assert_ok(run_cli(["search", "--model", tiny_models["llama"], "--space", "bits", "--trials", 2, *SMALL,
                       "--no-validate", "--trust-remote-code", "--storage", trust_url, "--study-name", STUDY],
                      folder, cache_dir))

    bad = folder / "bad"
    bad.mkdir()
    copy_with_nan_weight(tiny_models["llama"], bad / "nan-model")
    truncated = bad / "truncated-model"
    shutil.copytree(tiny_models["llama"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(tiny_models["llama"], bad / "bad-config")
    (bad / "bad-config" / "config.json").write_text('{"model_type": ')
    (bad / "hf-models" / "m").mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(bad / "hf-models" / "m" / "model.safetensors"))
    (bad / "plan.json").write_text(json.dumps({"version": 1, "default": {"method": "rtn", "bits": 4}}))
    (bad / "g16.json").write_text(json.dumps({"version": 1, "default": {"method": "rtn", "bits": 4, "group_size": 16}}))
    (bad / "asym8.json").write_text(json.dumps({"version": 1, "default": {"method": "rtn", "bits": 8, "group_size": 32}}))
    (bad / "broken.yaml").write_text("name: x\nsparsity:\n  levels: [0.0, 0.5\n  methods: [magnitude]\n")
    (bad / "binary.yaml").write_bytes(b"name: \xff\xfe x\n")
    (bad / "binary.txt").write_bytes(b"\xff\xfe\x00bad\x80" * 10)
    (bad / "empty.txt").write_text("")
    (bad / "a-file").write_text("not a folder\n")
    return SimpleNamespace(folder=folder, url=url, trust_url=trust_url, bad=bad, cache=cache_dir,
                           model=str(tiny_models["llama"]), gpt2=str(tiny_models["gpt2"]))


def _fill(text: str, h, tmp: Path) -> str:
    return text.format(url=h.url, trust_url=h.trust_url, bad=h.bad, tmp=tmp, model=h.model, gpt2=h.gpt2)


def assert_refused(proc, words) -> str:
    """Exit 2, no traceback, stderr exactly one ``autocomp: error:`` line naming ``words``; no secret."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in out, out
    assert SECRET not in out, out
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("autocomp: error: "), f"stderr must be one error line:\n{proc.stderr}"
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_bad_input_is_refused_in_one_line_and_keeps_the_study(row_id, hostile, tmp_path):
    row = ROWS[row_id]
    cwd = Path(_fill(row.cwd, hostile, tmp_path))
    cwd.mkdir(parents=True, exist_ok=True)
    before = {u: _snapshot(u) for u in (hostile.url, hostile.trust_url)}
    proc = run_cli([_fill(a, hostile, tmp_path) for a in row.args], cwd, hostile.cache, timeout=300)
    assert_refused(proc, [_fill(w, hostile, tmp_path) for w in row.words])
    for u, snap in before.items():
        assert _snapshot(u) == snap, f"{row_id} changed the stored study {u}"
    fresh = tmp_path / "fresh.db"
    if fresh.exists():
        assert optuna.get_all_study_names(storage=f"sqlite:///{fresh}") == [], "a refused search created a study"
    for path in row.absent:
        assert not Path(_fill(path, hostile, tmp_path)).exists(), path
    for path in row.kept:
        assert Path(_fill(path, hostile, tmp_path)).exists(), path


# ---- disk full (item 9): writes beyond a file-size limit fail with EFBIG ------------------------

def _file_limit(n_bytes: int):
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


def _run_limited(args, cwd: Path, cache: Path, n_bytes: int):
    """The CLI with files limited to ``n_bytes``; SIGXFSZ left at its default, so only a CLI that ignores
    it sees the write error (EFBIG) instead of being killed."""
    import subprocess

    from cli_helpers import cli_command, cli_env

    return subprocess.run(cli_command() + [str(a) for a in args], cwd=cwd, env=cli_env(cache), capture_output=True,
                          text=True, timeout=300, preexec_fn=_file_limit(n_bytes))


def test_an_export_onto_a_full_disk_is_a_named_error_and_leaves_nothing(hostile, tmp_path):
    out = tmp_path / "export"
    proc = _run_limited(["export", "--storage", hostile.url, "--study-name", STUDY, "--trial", "0", "--out", out,
                         "--format", "float"], tmp_path, hostile.cache, 64 << 10)
    assert proc.returncode != -signal.SIGXFSZ, "killed by SIGXFSZ: the CLI must ignore it and report the error"
    line = assert_refused(proc, ["write failed"])
    assert "space" in line or "large" in line, line
    assert not out.exists() and not list(tmp_path.glob(".export*")), "a failed export left files behind"
    # nothing blocks a re-run to the same --out
    assert_ok(run_cli(["export", "--storage", hostile.url, "--study-name", STUDY, "--trial", "0", "--out", out,
                       "--format", "float"], tmp_path, hostile.cache))


def test_a_search_onto_a_full_disk_is_a_named_error_and_keeps_its_trials(hostile, tmp_path):
    db = tmp_path / "study.db"
    shutil.copy(Path(hostile.url[len("sqlite:///"):]), db)
    url = f"sqlite:///{db}"
    before = [s for s in _snapshot(url) if s[2] == optuna.trial.TrialState.COMPLETE]
    proc = _run_limited(["search", "--model", hostile.model, "--space", "bits", "--trials", 40, *SMALL,
                         "--no-validate", "--storage", url, "--study-name", STUDY], tmp_path, hostile.cache,
                        db.stat().st_size + (8 << 10))
    assert proc.returncode != -signal.SIGXFSZ, "killed by SIGXFSZ: the CLI must ignore it and report the error"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("autocomp: error: ") and ("space" in last or "full" in last or "large" in last), last
    after = [s for s in _snapshot(url) if s[2] == optuna.trial.TrialState.COMPLETE]
    assert after[:len(before)] == before
