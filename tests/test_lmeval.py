"""lm-eval integration: the built-in offline task, local tasks through lm-eval's own evaluator, and a hand
computation of lm-eval's loglikelihood accuracy that the reported figure must equal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from autocomp.inputs.data import load_named_split  # noqa: E402
from autocomp.errors import BudgetError, DependencyError, TaskError  # noqa: E402
from autocomp.validation.lmeval import (  # noqa: E402
    TaskResult,
    builtin_task_names,
    check_tasks,
    parse_acc_budgets,
    prepare_builtin_task,
    run_tasks,
)
from autocomp.validation.tasks import wikitext_lastword  # noqa: E402


@pytest.fixture(scope="module")
def hf_llama(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models["llama"]
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _docs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "wikitext_lastword.jsonl").read_text().splitlines()]


def _write_task(folder: Path, name: str, docs: list[dict]) -> Path:
    """A local lm-eval task, as docs/tasks.md describes it: a YAML and a JSONL file in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{target}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n")
    return folder


def _hand_score(model, tokenizer, context: str, target: str) -> tuple[bool, float]:
    """lm-eval's loglikelihood protocol done by hand: (every target token is the argmax, log P(target | context)).

    The continuation's tokens are those of ``context + target`` after ``context``'s own tokens; the input is
    left-truncated to the model's context length, as lm-eval's HFLM does."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + target)["input_ids"]
    cont = whole[len(ctx):]
    max_len = model.config.max_position_embeddings
    ids = torch.tensor([(ctx + cont)[-(max_len + 1):][:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, -len(cont):].double(), dim=-1)
    cont_t = torch.tensor(cont)
    greedy = bool((logprobs.argmax(-1) == cont_t).all())
    return greedy, float(logprobs.gather(1, cont_t[:, None]).sum())


# ----------------------------------------------------------------------------------------- built-in task

def test_builtin_task_is_deterministic_and_from_the_second_half():
    assert builtin_task_names() == ["wikitext_lastword"]
    folder = prepare_builtin_task("wikitext_lastword")
    assert prepare_builtin_task("wikitext_lastword") == folder          # reused, not rebuilt
    text = load_named_split("wikitext2", "test").text
    docs = _docs(folder)
    assert docs == wikitext_lastword.lastword_examples(text)           # same list from the same source
    assert 100 <= len(docs) <= wikitext_lastword.MAX_EXAMPLES
    half = len(text) // 2
    offsets = [d["offset"] for d in docs]
    assert offsets == sorted(offsets) and offsets[0] >= half
    for doc in docs:
        assert text.startswith(doc["context"], doc["offset"])
        assert doc["target"].startswith(" ") and doc["target"][1:].isalpha()
        paragraph = text[doc["offset"]: text.index("\n", doc["offset"])]
        assert wikitext_lastword.MIN_WORDS <= len(paragraph.split()) <= wikitext_lastword.MAX_WORDS
        assert doc["target"][1:] in paragraph[len(doc["context"]):].split()[:1]
        assert not doc["context"].startswith("=")
        assert text.find(doc["context"]) >= half                        # never inside the search's text
    build = json.loads((folder / "build.json").read_text())
    assert build["source_sha256"] == load_named_split("wikitext2", "test").sha256
    assert str(folder / "wikitext_lastword.jsonl") in (folder / "wikitext_lastword.yaml").read_text()


def test_builtin_task_folder_follows_its_source(tmp_path, monkeypatch):
    text = load_named_split("wikitext2", "test").text
    first = wikitext_lastword.prepare(tmp_path)
    edited = text[: len(text) // 2] + text[len(text) // 2:].replace(" the ", " a ", 1)
    monkeypatch.setattr(wikitext_lastword, "_load_source", lambda: (edited, "edited", "0" * 64))
    second = wikitext_lastword.prepare(tmp_path)
    assert second != first and (first / "build.json").is_file() and (second / "build.json").is_file()


def test_cut_last_word():
    assert wikitext_lastword.cut_last_word("He was born in Paris , France .") == ("He was born in Paris ,", "France")
    assert wikitext_lastword.cut_last_word("It cost 5 @,@ 000 .") == ("It", "cost")
    assert wikitext_lastword.cut_last_word("1990 .") is None
    assert wikitext_lastword.cut_last_word("Alone") is None


# ------------------------------------------------------------------------------- through lm-eval itself

def test_builtin_task_runs_through_lm_eval(hf_llama):
    model, tok = hf_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    results = run_tasks(model, tok, ["wikitext_lastword"], limit=20, batch_size=4)
    assert set(results) == {"wikitext_lastword"}
    r = results["wikitext_lastword"]
    assert r.metric == "acc" and 0.0 <= r.value <= 1.0 and r.n == 20
    assert r.extra["perplexity"] > 1.0 and r.stderr is not None
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert run_tasks(model, tok, ["wikitext_lastword"], limit=20, batch_size=4)["wikitext_lastword"] == r
    other = run_tasks(model, tok, ["wikitext_lastword"], limit=20, batch_size=8)["wikitext_lastword"]
    assert other.value == r.value                              # padding differs: logits only to rounding
    assert other.extra["perplexity"] == pytest.approx(r.extra["perplexity"], rel=1e-5)
    assert TaskResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_reported_accuracy_equals_a_hand_computation(hf_llama, tmp_path):
    """Targets are chosen so that about half are the model's greedy continuation: an accuracy that lm-eval
    (or our metric picking) computed wrongly cannot match the hand figure by chance."""
    model, tok = hf_llama
    specials = set(tok.all_special_ids)
    docs, hits = [], 0
    for doc in _docs(prepare_builtin_task("wikitext_lastword")):
        context = " ".join(doc["context"].split()[:25])
        ctx = tok(context)["input_ids"]
        with torch.no_grad():
            ranked = model(torch.tensor([ctx])).logits[0, -1].argsort(descending=True).tolist()
        want_hit = len(docs) % 2 == 0
        token = ranked[0] if want_hit else ranked[1]
        target = tok.decode([token])
        if token in specials or not target.strip() or tok(context + target)["input_ids"] != ctx + [token]:
            continue                                      # the target would not stay one token after the context
        docs.append({"context": context, "target": target})
        hits += want_hit
        if len(docs) == 12:
            break
    assert len(docs) == 12 and hits == 6
    docs += [{"context": d["context"], "target": d["target"]} for d in _docs(prepare_builtin_task("wikitext_lastword"))[:4]]
    hand = [_hand_score(model, tok, d["context"], d["target"]) for d in docs]
    assert sum(g for g, _ in hand[:12]) == 6                # the construction holds by hand too

    folder = _write_task(tmp_path / "tasks", "greedy_check", docs)
    r = run_tasks(model, tok, ["greedy_check"], include_paths=[folder], batch_size=3)["greedy_check"]
    assert r.n == len(docs)
    assert r.value == pytest.approx(sum(g for g, _ in hand) / len(docs), abs=1e-12)
    hand_ppl = math.exp(-sum(ll for _, ll in hand) / len(hand))
    assert r.extra["perplexity"] == pytest.approx(hand_ppl, rel=1e-3)


def test_user_local_task_and_builtin_together(hf_llama, tmp_path):
    model, tok = hf_llama
    docs = [{"context": f"The number after {i} is", "target": f" {i + 1}"} for i in range(7)]
    folder = _write_task(tmp_path / "mine", "my_counting", docs)
    results = run_tasks(model, tok, ["my_counting", "wikitext_lastword"], include_paths=[str(folder)], limit=5)
    assert set(results) == {"my_counting", "wikitext_lastword"}
    assert results["my_counting"].n == 5 and 0.0 <= results["my_counting"].value <= 1.0
    assert run_tasks(model, tok, ["my_counting"], include_paths=[folder])["my_counting"].n == 7


def test_local_group_reports_its_tasks_and_itself(hf_llama, tmp_path):
    model, tok = hf_llama
    folder = tmp_path / "grouped"
    _write_task(folder, "part_a", [{"context": f"x {i} y", "target": " z"} for i in range(3)])
    _write_task(folder, "part_b", [{"context": f"q {i} r", "target": " s"} for i in range(5)])
    (folder / "both_parts.yaml").write_text("group: both_parts\ntask:\n  - part_a\n  - part_b\n"
                                            "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
                                            "metadata:\n  version: 1.0\n")
    results = run_tasks(model, tok, ["both_parts"], include_paths=[folder])
    assert set(results) == {"part_a", "part_b", "both_parts"}
    assert results["both_parts"].n == 8
    assert results["both_parts"].value == pytest.approx((3 * results["part_a"].value + 5 * results["part_b"].value) / 8)


def test_check_tasks_before_a_search(tmp_path):
    folder = _write_task(tmp_path / "mine", "my_check", [{"context": "a b", "target": " c"}])
    check_tasks(["wikitext_lastword", "my_check"], include_paths=[folder])
    with pytest.raises(TaskError, match="does not exist"):
        check_tasks(["my_check"], include_paths=[tmp_path / "nowhere"])


def test_head_untied_by_compression_stays_untied(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models["qwen2"]                          # tie_word_embeddings=True
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    head = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    model.lm_head.weight = head
    run_tasks(model, tok, ["wikitext_lastword"], limit=2)
    assert model.lm_head.weight is head and model.model.embed_tokens.weight is not head
    assert "tie_weights" not in vars(model)


# ---------------------------------------------------------------------------------------------- errors

def test_unknown_task_is_a_task_error(hf_llama):
    model, tok = hf_llama
    with pytest.raises(TaskError, match=r"unknown task 'no_such_task_xyz'.*wikitext_lastword.*--task-path"):
        run_tasks(model, tok, ["no_such_task_xyz"])


def test_bad_arguments_are_task_errors(hf_llama, tmp_path):
    model, tok = hf_llama
    with pytest.raises(TaskError, match="does not exist"):
        run_tasks(model, tok, ["wikitext_lastword"], include_paths=[tmp_path / "missing"])
    (tmp_path / "task.yaml").write_text("task: x\n")
    with pytest.raises(TaskError, match="is not a folder"):
        run_tasks(model, tok, ["wikitext_lastword"], include_paths=[tmp_path / "task.yaml"])
    with pytest.raises(TaskError, match="limit"):
        run_tasks(model, tok, ["wikitext_lastword"], limit=0)
    with pytest.raises(TaskError, match="no task"):
        run_tasks(model, tok, [])


def test_missing_lm_eval_is_a_dependency_error(hf_llama, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)          # import lm_eval now raises ImportError
    with pytest.raises(DependencyError, match=r"pip install 'autocomp\[lmeval\]'"):
        run_tasks(*hf_llama, ["wikitext_lastword"])
    with pytest.raises(DependencyError):
        check_tasks(["wikitext_lastword"])
    monkeypatch.delitem(sys.modules, "lm_eval")
    monkeypatch.setitem(sys.modules, "accelerate", None)       # lm-eval without its "hf" extra
    with pytest.raises(DependencyError, match="accelerate"):
        run_tasks(*hf_llama, ["wikitext_lastword"])


def test_broken_local_data_is_a_task_error(hf_llama, tmp_path):
    model, tok = hf_llama
    folder = _write_task(tmp_path / "broken", "broken_task", [{"context": "a", "target": " b"}])
    (folder / "broken_task.jsonl").unlink()
    with pytest.raises(TaskError, match="could not be loaded"):
        run_tasks(model, tok, ["broken_task"], include_paths=[folder])


def test_hub_task_offline_is_a_task_error(hf_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("datasets was imported before offline mode was set")
    model, tok = hf_llama
    with pytest.raises(TaskError, match=r"lambada_openai.*needs network.*--task-path"):
        run_tasks(model, tok, ["lambada_openai"])


def test_task_result_from_dict_rejects_malformed():
    with pytest.raises(TaskError, match="value"):
        TaskResult.from_dict({"task": "t", "metric": "acc", "n": 3})
    with pytest.raises(TaskError, match="malformed"):
        TaskResult.from_dict({"task": "t", "metric": "acc", "value": "x", "n": 3})


# --------------------------------------------------------------------------------------------- budgets

def test_parse_acc_budgets():
    assert parse_acc_budgets(["wikitext_lastword=2.0", " arc_easy = 0.5 "]) == {"wikitext_lastword": 2.0,
                                                                                 "arc_easy": 0.5}
    assert parse_acc_budgets([]) == {}
    assert parse_acc_budgets(["t=0"]) == {"t": 0.0}


@pytest.mark.parametrize("item", ["wikitext_lastword", "=2", "t=", "t=abc", "t=-1", "t=nan", "t=inf", "t=101",
                                  "a=1=2"])
def test_parse_acc_budgets_rejects(item):
    with pytest.raises(BudgetError, match="--max-acc-drop"):
        parse_acc_budgets([item])


def test_parse_acc_budgets_rejects_a_task_twice():
    with pytest.raises(BudgetError, match="twice"):
        parse_acc_budgets(["t=1", "t=2"])
