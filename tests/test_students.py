"""Students: distillation, the student cache, the ``student:`` search-space section, cost-aware
sampling, and a joint (student size x bits x sparsity) search end to end, on tiny random models."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from cli_helpers import SMALL, assert_ok, run_cli
from tiny import ARCHS, state_copy

from autocomp.inputs.data import WindowSpec, text_windows
from autocomp.errors import PlanError, SpaceError
from autocomp.evaluators.quality import score_windows
from autocomp.inputs.models import load_model
from autocomp.config.plan import CompressionPlan
from autocomp.config.space import SearchSpace
from autocomp.students.build import build_student
from autocomp.samplers.cost_aware import CostAwareSampler, allowed_steps, cap_steps
from autocomp.students.distill import TeacherTopK, distill, lr_at, soft_kl, topk_kl
from autocomp.students.prune import prune_student, teacher_dims
from autocomp.students.spec import DistillSpec, StudentSpec

SMALL_DISTILL = dict(batch=4, seq_len=64, windows=16, lr=1e-3)


def _windows(tok, split: str, count: int, random: bool) -> torch.Tensor:
    return text_windows(tok, "wikitext2", split, WindowSpec(count, 64, 0), random=random).input_ids


# ---- distillation --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_distillation_lowers_held_out_kl_to_the_teacher(tiny_models, arch):
    loaded = load_model(str(tiny_models[arch]))
    train = _windows(loaded.tokenizer, "validation", 16, random=True)
    held = _windows(loaded.tokenizer, "test", 6, random=False)     # text the student never trains on
    _, reference = score_windows(loaded.model, held, topk=64)
    shape = StudentSpec(layers=1, ffn=64)
    student = prune_student(loaded.model, shape, train[:8])
    before = score_windows(student.model, held, reference=reference)[0].mean_kl
    spec = DistillSpec(steps=30, alpha=1.0, temperature=1.0, **SMALL_DISTILL)
    result = distill(student.model, loaded.model, train, spec, layer_map=student.kept_layers, progress=False)
    after = score_windows(student.model, held, reference=reference)[0].mean_kl
    assert result.steps == 30 and len(result.losses) == 30
    assert after < 0.7 * before, (before, after)


def test_hidden_state_loss_and_mixed_targets_train(tiny_models):
    loaded = load_model(str(tiny_models["llama"]))
    train = _windows(loaded.tokenizer, "validation", 16, random=True)
    student = prune_student(loaded.model, StudentSpec(layers=1), train[:8])
    spec = DistillSpec(steps=12, alpha=0.5, hidden_weight=1.0, **SMALL_DISTILL)
    result = distill(student.model, loaded.model, train, spec, layer_map=student.kept_layers, progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    with pytest.raises(ValueError, match="layer_map"):
        distill(student.model, loaded.model, train, spec, progress=False)


def test_resumed_distillation_reproduces_the_uninterrupted_student(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["gemma3"]))
    train = _windows(loaded.tokenizer, "validation", 16, random=True)
    spec = DistillSpec(steps=8, **SMALL_DISTILL, seed=3)
    shape = StudentSpec(layers=1, ffn=96)
    straight = prune_student(loaded.model, shape, train[:8])
    distill(straight.model, loaded.model, train, spec, layer_map=straight.kept_layers, progress=False)

    resumed = prune_student(loaded.model, shape, train[:8])
    partial = distill(resumed.model, loaded.model, train, spec, layer_map=resumed.kept_layers,
                      checkpoint_dir=tmp_path, stop_at=3, progress=False)
    assert partial.steps == 3 and (tmp_path / "distill-checkpoint.pt").exists()
    fresh = prune_student(loaded.model, shape, train[:8])   # a new process: weights from the pruning again
    rest = distill(fresh.model, loaded.model, train, spec, layer_map=fresh.kept_layers, checkpoint_dir=tmp_path,
                   progress=False)
    assert rest.resumed_from == 3 and len(rest.losses) == 8
    assert not (tmp_path / "distill-checkpoint.pt").exists()
    a, b = state_copy(straight.model), state_copy(fresh.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must end with the same weights"
    other = prune_student(loaded.model, shape, train[:8])
    distill(other.model, loaded.model, train, DistillSpec(steps=8, **SMALL_DISTILL, seed=4),
            layer_map=other.kept_layers, progress=False)
    assert any(not torch.equal(a[k], v) for k, v in state_copy(other.model).items()), "the seed must matter"


def test_topk_kl_equals_full_kl_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 40), torch.randn(2, 5, 40) * 3
    top = TeacherTopK(*t.topk(40, dim=-1))
    rows = torch.arange(2)
    assert torch.allclose(topk_kl(s, top, rows, 2.0), soft_kl(s, t, 2.0), atol=1e-5)
    small = TeacherTopK(*t.topk(8, dim=-1))
    assert topk_kl(s, small, rows, 2.0) > 0


def test_topk_teacher_distills(tiny_models):
    loaded = load_model(str(tiny_models["qwen2"]))
    train = _windows(loaded.tokenizer, "validation", 16, random=True)
    held = _windows(loaded.tokenizer, "test", 6, random=False)
    _, reference = score_windows(loaded.model, held, topk=64)
    student = prune_student(loaded.model, StudentSpec(layers=1, ffn=64), train[:8])
    before = score_windows(student.model, held, reference=reference)[0].mean_kl
    spec = DistillSpec(steps=30, alpha=1.0, temperature=1.0, teacher="topk", topk=256, **SMALL_DISTILL)
    distill(student.model, loaded.model, train, spec, progress=False)
    assert score_windows(student.model, held, reference=reference)[0].mean_kl < 0.8 * before


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    spec = DistillSpec(steps=100, lr=1e-3, warmup=0.1)
    lrs = [lr_at(s, spec) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_distill_spec_rejects_bad_settings():
    with pytest.raises(PlanError, match="alpha"):
        DistillSpec(alpha=1.5)
    with pytest.raises(PlanError, match="online"):
        DistillSpec(teacher="topk", hidden_weight=1.0)
    with pytest.raises(PlanError, match="unknown key"):
        StudentSpec.from_dict({"layers": 2, "depth": 3})
    with pytest.raises(PlanError, match="multiple of kv_heads"):
        StudentSpec(heads=3, kv_heads=2)


# ---- building and caching ------------------------------------------------------------------------


def test_built_students_are_cached_and_rebuilt_identically(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["llama"]))
    spec = StudentSpec(layers=1, ffn=64, distill=DistillSpec(steps=4, **SMALL_DISTILL))
    first = build_student(loaded, spec, cache_dir=tmp_path, progress=False)
    assert not first.from_cache and first.seconds_distill > 0 and first.spec.heads == 4
    again = build_student(loaded, spec, cache_dir=tmp_path, progress=False)
    assert again.from_cache and again.kept_layers == first.kept_layers
    assert again.seconds_distill == first.seconds_distill            # what building it cost, kept
    uncached = build_student(loaded, spec, cache_dir=tmp_path, progress=False, use_cache=False)
    a, b, c = state_copy(first.model), state_copy(again.model), state_copy(uncached.model)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    other = build_student(loaded, StudentSpec(layers=1, ffn=64, distill=DistillSpec(steps=5, **SMALL_DISTILL)),
                          cache_dir=tmp_path, progress=False)
    assert not other.from_cache
    assert len([p for p in tmp_path.iterdir() if (p / "student.json").exists()]) == 2


# ---- the student section of a search space -------------------------------------------------------

JOINT = {
    "name": "joint",
    "granularity": "role",
    "sparsity": {"methods": ["magnitude"], "levels": [0.0, 0.5]},
    "quantization": {"methods": ["rtn"], "bits": [4, 16], "group_size": [32]},
    "student": {"layers": [1.0, 0.5], "ffn": [1.0, 0.5],
                "distill": {"steps": [0, 4, 12], "batch": 4, "seq_len": 64, "windows": 16, "lr": 1.0e-3}},
}


def test_student_space_resolves_fractions_against_the_teacher():
    space = SearchSpace.from_dict(JOINT, "joint").student
    dims = {"layers": 18, "ffn": 2048, "heads": 4, "kv_heads": 1, "head_dim": 256, "hidden": 640}
    spec = space.resolve({"layers": 0.75, "ffn": 0.75, "heads": 1.0, "steps": 4}, dims)
    assert (spec.layers, spec.ffn, spec.heads, spec.kv_heads, spec.distill.steps) == (14, 1536, 4, 1, 4)
    assert spec.distill.lr == 1e-3 and spec.distill.seq_len == 64
    assert space.resolve({"layers": 1.0, "ffn": 1.0, "heads": 1.0, "steps": 12}, dims) is None   # the teacher
    gqa = {"layers": 2, "ffn": 128, "heads": 4, "kv_heads": 2, "head_dim": 16, "hidden": 64}
    assert space.resolve({"layers": 1.0, "ffn": 1.0, "heads": 0.75, "steps": 0}, gqa).heads == 2   # whole groups
    assert space.resolve({"layers": 1.0, "ffn": 1.0, "heads": 0.25, "steps": 0}, gqa).kv_heads == 1
    assert [d for d, _ in space.dimensions()] == ["layers", "ffn", "steps"]
    assert space.largest_cheapest()["steps"] == 0
    sweep = space.sweep_values()
    assert {(v["layers"], v["ffn"], v["steps"]) for v in sweep} == {(0.5, 1.0, 4), (1.0, 0.5, 4)}


@pytest.mark.parametrize("student, words", [
    ({"layers": [1.5]}, "fraction in (0, 1]"),
    ({"layers": [0.5], "width": [1.0]}, "unknown key 'width'"),
    ({"distill": {"batch": [2, 4]}}, "cannot be searched"),
    ({"distill": {"alpha": [0.5, 2.0]}}, "alpha"),
    ({"depth_importance": "random"}, "depth_importance"),
    ({"cost_share": 0}, "cost_share"),
])
def test_bad_student_sections_are_named(student, words):
    with pytest.raises(SpaceError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SearchSpace.from_dict({"name": "bad", "student": student}, "bad.yaml")


def test_student_sizes_a_teacher_cannot_take_fail_before_any_trial(tiny_models):
    from autocomp.config.spec import StudySpec
    from autocomp.study.evaluate import TrialEvaluator

    space = SearchSpace.from_dict({"name": "heads", "student": {"heads": [1.0, 0.5]}}, "heads.yaml")
    spec = StudySpec(model=str(tiny_models["gpt2"]), space=space, eval_windows=WindowSpec(2, 64))
    with pytest.raises(SpaceError, match="head_dim"):
        TrialEvaluator(spec)


# ---- cost-aware sampling -------------------------------------------------------------------------


class _Done:
    def __init__(self, seconds, steps=0, distill_s=0.0, cached=False):
        self.user_attrs = {"metrics": {"seconds": seconds, "distill_steps": steps, "seconds_distill": distill_s,
                                       "student_cached": float(cached)}}


def test_expensive_budgets_unlock_as_the_study_spends():
    choices = [0, 10, 50, 200]
    assert allowed_steps(choices, [], 0.5) == [0, 10]               # nothing measured: the cheapest only
    done = [_Done(40.0) for _ in range(5)] + [_Done(25.0, steps=10, distill_s=20.0)]   # 2 s per step; 225 s spent
    assert allowed_steps(choices, done, 0.5) == [0, 10, 50]          # 50 steps ~ 100 s <= 112.5 s; 200 ~ 400 s
    assert cap_steps(200, choices, done, 0.5) == 50
    assert cap_steps(10, choices, done, 0.5) == 10
    rich = done + [_Done(1000.0)]
    assert allowed_steps(choices, rich, 0.5) == choices
    cached = [_Done(20.0) for _ in range(5)] + [_Done(1.0, steps=10, distill_s=20.0, cached=True)]
    assert allowed_steps(choices, cached, 0.5) == [0, 10]           # a cached student measured no price


def test_cost_aware_sampler_caps_proposals_and_keeps_the_space_static():
    def objective(trial):
        steps = trial.suggest_categorical("student:steps", [0, 5, 50, 500])
        x = trial.suggest_categorical("bits", [4, 8, 16])
        trial.set_user_attr("metrics", {"seconds": 1.0 + steps * 0.1, "distill_steps": steps,
                                        "seconds_distill": steps * 0.1})
        return x - math.log1p(steps), steps

    base = optuna.samplers.NSGAIISampler(seed=0, population_size=6)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=CostAwareSampler(base, share=0.5))
    study.optimize(objective, n_trials=40)
    steps = [t.params["student:steps"] for t in study.trials]
    spent = 0.0
    for t, s in zip(study.trials, steps):
        if s > 5:
            assert s * 0.1 <= 0.5 * spent + 1e-9, (t.number, s, spent)
        spent += t.user_attrs["metrics"]["seconds"]
    assert 50 in steps and 500 not in steps[:10]


# ---- a joint search, end to end ------------------------------------------------------------------


def test_joint_search_front_contains_distilled_students(tiny_models, tmp_path, cache_dir):
    import yaml

    space_file = tmp_path / "joint.yaml"
    space_file.write_text(yaml.safe_dump(JOINT))
    db = tmp_path / "joint.db"
    proc = run_cli(["search", "--model", tiny_models["llama"], "--space", space_file, "--trials", 14,
                    "--storage", f"sqlite:///{db}", "--study-name", "joint", *SMALL],
                   tmp_path, cache_dir)
    assert_ok(proc)
    from autocomp.validation.runner import load_validation

    validation = load_validation(f"sqlite:///{db}", "joint")   # run at the end of the search
    rebuilt = {int(n): e["search_reproduced_rel"] for n, e in validation["trials"].items()}
    front = run_cli(["pareto", "--storage", f"sqlite:///{db}", "--study-name", "joint", "--json"], tmp_path, cache_dir)
    assert_ok(front)
    rows = json.loads(front.stdout)
    students = [r for r in rows if r["plan"].get("student")]
    assert students, "the front must contain students"
    for r in students:  # validation rebuilt each student from its plan and scored what the search scored
        assert rebuilt[r["trial"]] < 1e-6, (r["trial"], rebuilt[r["trial"]])
    assert_ok(run_cli(["report", "--storage", f"sqlite:///{db}", "--study-name", "joint", "--out", tmp_path / "report"],
                      tmp_path, cache_dir))
    study = optuna.load_study(study_name="joint", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 14
    distilled = [t for t in done if t.user_attrs["metrics"]["distill_steps"] > 0]
    assert distilled and all(t.user_attrs["metrics"]["seconds_distill"] > 0 for t in distilled)
    for t in done:  # the stored plan names the student's own modules, and its metrics count the student
        plan = CompressionPlan.from_dict(t.user_attrs["plan"])
        if plan.student is not None:
            assert plan.student.layers == t.user_attrs["metrics"]["student_layers"]
            assert all(int(k.split(".")[2]) < plan.student.layers for k, _ in plan.layers)
    # export a student trial: a loadable smaller model that scores as the search did
    number = students[0]["trial"]
    out = tmp_path / "export"
    assert_ok(run_cli(["export", "--storage", f"sqlite:///{db}", "--study-name", "joint", "--trial", number,
                       "--out", out, "--format", "packed"], tmp_path, cache_dir))
    from autocomp.inputs.models import load_model

    exported = load_model(str(out)).model   # the packed format: the student's config, its layers packed
    spec = CompressionPlan.from_dict(json.loads((out / "plan.json").read_text())).student
    assert exported.config.num_hidden_layers == spec.layers
    assert exported.config.intermediate_size == spec.ffn
    info = json.loads((out / "autocomp.json").read_text())
    assert info["params"] == sum(p.numel() for p in {id(p): p for p in exported.parameters()}.values())
    tok = load_model(str(tiny_models["llama"])).tokenizer
    ids = text_windows(tok, "wikitext2", "test", WindowSpec(4, 64), random=False).input_ids
    scores, _ = score_windows(exported, ids)
    record = next(t for t in done if t.number == number)
    # packed: the student's norms and dense layers are stored in float16, hence a tolerance
    assert scores.perplexity == pytest.approx(record.user_attrs["metrics"]["perplexity"], rel=2e-3)


def test_teacher_dims_of_every_family(tiny_models):
    for arch in ARCHS:
        dims = teacher_dims(load_model(str(tiny_models[arch])).model.config)
        assert dims["layers"] == 2 and dims["heads"] == 4 and dims["ffn"] in (128, 256)


def test_layer_plans_follow_the_teacher_blocks_a_student_keeps(tiny_models):
    from autocomp.config.plan import LayerPlan
    from autocomp.config.spec import StudySpec
    from autocomp.pipeline.apply import teacher_target_name
    from autocomp.study.evaluate import TrialEvaluator

    assert teacher_target_name("model.layers.1.mlp.up_proj", "model.layers", (0, 3)) == "model.layers.3.mlp.up_proj"
    assert teacher_target_name("model.embed_tokens", "model.layers", (0, 3)) == "model.embed_tokens"
    space = SearchSpace.from_dict({"name": "per-layer", "granularity": "layer",
                                   "quantization": {"methods": ["rtn"], "bits": [4, 8, 16], "group_size": [32]},
                                   "student": {"layers": [1.0, 0.5], "distill": {"steps": [0]}}}, "per-layer")
    evaluator = TrialEvaluator(StudySpec(model=str(tiny_models["llama"]), space=space, eval_windows=WindowSpec(2, 64)))
    teacher_plan = {t.name: LayerPlan(method="rtn", bits=4 if t.block == 0 else 8, group_size=32)
                    for t in evaluator.targets}
    teacher_params = evaluator.evaluate({})["params"]
    for importance in ("bi", "tail"):  # whichever block bi keeps, then the last one (tail)
        student = StudentSpec(layers=1, depth_importance=importance, distill=DistillSpec(steps=0))
        built, state, _ = evaluator.applier.student(student)
        plan = evaluator.student_plan(teacher_plan, student)
        kept = built.kept_layers[0]
        assert set(plan) == {t.name for t in state.stats_targets} and all(".layers.0." in n for n in plan)
        assert {lp.bits for lp in plan.values()} == {4 if kept == 0 else 8}
        metrics = evaluator.evaluate(plan, student=student)
        assert metrics["student_layers"] == 1 and metrics["avg_bits"] == (4 if kept == 0 else 8)
        assert metrics["params"] < teacher_params
