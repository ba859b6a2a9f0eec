"""Text sources and windows: the offline WikiText-2 copy, local files, BOS placement, splits."""

import json

import pytest
import torch

from autocomp.inputs.data import (WindowSpec, eval_source, calibration_source, load_named_split, make_windows,
                           text_windows)
from autocomp.errors import DataError
from autocomp.inputs.models import load_model


def test_offline_wikitext_is_the_documented_split():
    test = load_named_split("wikitext2", "test")
    valid = load_named_split("wikitext2", "validation")
    assert test.origin.endswith("wiki.test.raw") and valid.origin.endswith("wiki.valid.raw")
    # the 4,358 lines (each with its newline, like the hub's rows) joined with "\n\n" (GPTQ's protocol)
    assert test.text.count("\n\n") == 4357
    assert test.text.startswith(" \n\n\n = Robert Boulter = \n\n\n")
    assert test.sha256 != valid.sha256


IDS = torch.arange(10, 110)


def test_every_window_starts_with_bos_when_asked():
    w = make_windows(IDS, WindowSpec(3, 8), bos=1, random=False, origin="x", bos_mode="every")
    assert w.input_ids.shape == (3, 8)
    assert w.input_ids[:, 0].tolist() == [1, 1, 1]
    assert w.input_ids[0, 1:].tolist() == list(range(10, 17))  # consecutive, non-overlapping
    assert w.input_ids[1, 1].item() == 17


def test_bos_first_only_precedes_the_stream():
    w = make_windows(IDS, WindowSpec(3, 8), bos=1, random=False, origin="x", bos_mode="first")
    assert w.input_ids[0].tolist() == [1] + list(range(10, 17))
    assert w.input_ids[1].tolist() == list(range(17, 25))


def test_no_bos():
    w = make_windows(IDS, WindowSpec(2, 8), bos=1, random=False, origin="x", bos_mode="none")
    assert w.input_ids[0].tolist() == list(range(10, 18))


def test_random_windows_are_seeded():
    a = make_windows(IDS, WindowSpec(4, 8, seed=3), bos=None, random=True, origin="x")
    b = make_windows(IDS, WindowSpec(4, 8, seed=3), bos=None, random=True, origin="x")
    c = make_windows(IDS, WindowSpec(4, 8, seed=4), bos=None, random=True, origin="x")
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(DataError, match="room for 12 windows of 8, but 20 were asked for"):
        make_windows(IDS, WindowSpec(20, 8), bos=None, random=False, origin="x")


def test_splits_never_share_text(tmp_path):
    assert eval_source("wikitext2", None) == ("wikitext2", "test")
    assert calibration_source("wikitext2", None) == ("wikitext2", "validation")
    f = tmp_path / "t.txt"
    assert eval_source(str(f), None) == (str(f), "first-half")
    assert calibration_source(str(f), None) == (str(f), "second-half")
    assert calibration_source(str(f), "wikitext2") == ("wikitext2", "validation")


def test_local_halves_and_jsonl(tiny_models, tmp_path):
    tok = load_model(str(tiny_models["llama"])).tokenizer
    text = load_named_split("wikitext2", "validation").text[:20000]
    txt = tmp_path / "a.txt"
    txt.write_text(text)
    first = text_windows(tok, str(txt), "first-half", WindowSpec(4, 32), random=False)
    second = text_windows(tok, str(txt), "second-half", WindowSpec(4, 32), random=False)
    body_first = set(first.input_ids[:, 1:].flatten().tolist())
    assert first.input_ids[0, 0].item() == tok.bos_token_id
    assert not torch.equal(first.input_ids, second.input_ids) and body_first
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in text.split("\n\n")[:200]))
    w = text_windows(tok, str(jl), "all", WindowSpec(2, 16), random=False)
    assert w.input_ids.shape == (2, 16)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match="b.jsonl:2"):
        text_windows(tok, str(bad), "all", WindowSpec(1, 4), random=False)
