"""``wikitext_lastword``: LAMBADA-style last-word prediction on WikiText-2 test passages, built offline.

A document is one body paragraph of the WikiText-2 **test** split (not a ``" = Heading = "`` line) of
``MIN_WORDS`` to ``MAX_WORDS`` whitespace-separated words, taken only from the second half of the split's text:
the search scores the first windows of the test split, so this task never overlaps them. The paragraph
is cut at its last alphabetic word: ``context`` is everything before that word (stripped), ``target``
is ``" " + word``. Punctuation after the word is dropped. When more than ``MAX_EXAMPLES`` paragraphs
qualify, evenly spaced ones are kept, in text order, so the list is deterministic and stable. The upper
bound on words bounds memory: lm-eval holds ``batch x tokens x vocabulary`` log-probabilities at once,
about 1.7 GB per copy for 8 passages of 200 tokens with Gemma 3's 262k vocabulary.

The task is lm-eval's ``loglikelihood`` type, like its ``lambada_openai``: ``acc`` is 1 when every
target token is the model's greedy (argmax) choice given the context, and ``perplexity`` is
``exp(-mean log P(target | context))`` over documents.

Files, under ``$AUTOCOMP_CACHE/tasks/wikitext_lastword/<key>/`` where ``key`` hashes the source text
and the build parameters (a changed source gives a new folder): ``wikitext_lastword.jsonl`` (fields
``context``, ``target``, ``offset``: the paragraph's character offset in the test text),
``wikitext_lastword.yaml`` (the lm-eval task, pointing at the JSONL by absolute path) and
``build.json`` (what the folder was built from). A folder is built in a temporary sibling and renamed
into place, so a reader never sees a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError, TaskError

TASK = "wikitext_lastword"
BUILD_VERSION = 1
MIN_WORDS = 40
MAX_WORDS = 150
MAX_EXAMPLES = 500
SOURCE = ("wikitext2", "test")
_WORD = re.compile(r"\S+")


def cut_last_word(passage: str) -> tuple[str, str] | None:
    """``(context, word)`` with ``word`` the last purely alphabetic word of ``passage``; None if there is none
    or nothing comes before it."""
    last = None
    for match in _WORD.finditer(passage):
        if match.group().isalpha():
            last = match
    if last is None:
        return None
    context = passage[:last.start()].strip()
    return (context, last.group()) if context else None


def lastword_examples(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS,
                      max_examples: int = MAX_EXAMPLES) -> list[dict[str, Any]]:
    """The task's documents from ``text`` (a whole WikiText split): paragraphs starting in its second half."""
    half = len(text) // 2
    docs: list[dict[str, Any]] = []
    offset = 0
    for line in text.split("\n"):
        start, offset = offset, offset + len(line) + 1
        passage = line.strip()
        if start < half or not passage or passage.startswith("="):
            continue
        if not min_words <= len(passage.split()) <= max_words:
            continue
        cut = cut_last_word(passage)
        if cut is None:
            continue
        context, word = cut
        docs.append({"context": context, "target": " " + word, "offset": start + len(line) - len(line.lstrip())})
    if len(docs) > max_examples:
        docs = [docs[i * len(docs) // max_examples] for i in range(max_examples)]
    return docs


def task_config(data_file: Path) -> dict[str, Any]:
    """The lm-eval task YAML as a dict (same form as lm-eval's ``lambada_openai``), reading ``data_file``."""
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "loglikelihood",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": float(BUILD_VERSION)},
    }


def _load_source() -> tuple[str, str, str]:
    from autocomp.inputs.data import load_named_split

    try:
        text = load_named_split(*SOURCE)
    except AutocompError as exc:
        raise TaskError(f"built-in task {TASK} is built from WikiText-2 test, which cannot be read: {exc}") from None
    return text.text, text.origin, text.sha256


def prepare(root: Path | None = None) -> Path:
    """Build the task folder if it is missing or stale; returns it (for lm-eval's include path).

    ``root`` defaults to ``$AUTOCOMP_CACHE/tasks``. Raises TaskError if WikiText-2 test cannot be read.
    """
    import yaml

    from autocomp.inputs.models import cache_root

    text, origin, source_sha = _load_source()
    build = {"task": TASK, "version": BUILD_VERSION, "min_words": MIN_WORDS, "max_words": MAX_WORDS,
             "max_examples": MAX_EXAMPLES,
             "source": "/".join(SOURCE), "source_sha256": source_sha}
    key = hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()[:16]
    parent = (root or cache_root() / "tasks") / TASK
    folder = parent / key
    if (folder / "build.json").is_file():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    docs = lastword_examples(text)
    if not docs:
        raise TaskError(f"built-in task {TASK}: no paragraph of {MIN_WORDS}-{MAX_WORDS} words in the second half "
                        f"of {origin}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=parent))
    try:
        data_file = folder / f"{TASK}.jsonl"          # the path the YAML names: where the file will be
        with (tmp / data_file.name).open("w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
        (tmp / f"{TASK}.yaml").write_text(yaml.safe_dump(task_config(data_file), sort_keys=False), encoding="utf-8")
        (tmp / "build.json").write_text(json.dumps({**build, "origin": origin, "documents": len(docs)}, indent=1),
                                        encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "build.json").is_file():   # not a concurrent builder that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
