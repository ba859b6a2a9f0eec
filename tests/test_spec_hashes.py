"""Stored studies resume only while their spec hash is unchanged: these digests are pinned.

Each value was computed from the same spec by the release that created studies with it (checked
equal on the code before the package was reorganised into subpackages). A change to a spec's
fields, defaults or serialisation that alters any of them makes every existing study of that kind
refuse to resume ("a different spec"); if that is intended, it needs a migration, not a new golden.
"""

from __future__ import annotations

import pytest

from autocomp.config.objectives import Budgets
from autocomp.config.space import SearchSpace
from autocomp.config.spec import StudySpec
from autocomp.inputs.data import WindowSpec
from autocomp.latency.spec import LatencySpec

CASES = {
    "bits, size budget": (dict(model="m", space=SearchSpace.load("bits"), budgets=Budgets(max_size_mb=5)),
                          "1e1507c91a912536"),
    "mixed, defaults": (dict(model="google/gemma-3-270m", space=SearchSpace.load("mixed")), "50256506d0fe0a7a"),
    "sparsity, sequential, sensitivity": (dict(model="m", space=SearchSpace.load("sparsity"), calibration_mode="sequential",
                                               sensitivity="fisher", pin_sensitive=2, seed=3, eval_windows=WindowSpec(8, 256)),
                                          "33597f14baf99711"),
    "students, tpe, ppl budget": (dict(model="m", space=SearchSpace.load("students"), sampler="tpe",
                                       budgets=Budgets(max_ppl_increase_pct=5.0)), "faa1d81d880cc7d7"),
    "latency budget": (dict(model="m", space=SearchSpace.load("latency"), budgets=Budgets(max_latency_ms=20.0),
                            latency=LatencySpec(threads=2, prompt_len=64, new_tokens=16, repeats=5)), "bf19bb68fa5c8675"),
    "student space from a dict": (dict(model="m", space=SearchSpace.from_dict(
        {"name": "s", "quantization": {"bits": [4, 8]}, "student": {"layers": [1.0, 0.5], "distill": {"steps": [0, 50]}}}, "s")),
        "3c026bfd404f1b24"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_spec_hashes_are_unchanged(case):
    kwargs, golden = CASES[case]
    spec = StudySpec(**kwargs)
    assert spec.digest() == golden
    assert StudySpec.from_dict(spec.to_dict()).digest() == golden   # as a resumed study reads it back


def test_the_hash_sees_what_the_study_depends_on():
    kwargs, golden = CASES["bits, size budget"]
    assert StudySpec(**{**kwargs, "seed": 1}).digest() != golden
    assert StudySpec(**{**kwargs, "budgets": Budgets(max_size_mb=6)}).digest() != golden
    assert StudySpec(**{**kwargs, "model": "n"}).digest() != golden
