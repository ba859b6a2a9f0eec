"""Text sources, tokenization, and calibration / evaluation windows.

A data reference (``--data D``) is either a named dataset or a local file:

* ``wikitext2`` (WikiText-2 raw; the ``wikitext`` / ``wikitext-2-raw-v1`` dataset). Its splits are
  looked up in this order, first hit wins:
  1. ``$AUTOCOMP_DATA_DIR/wikitext-2-raw/wiki.<split>.raw``;
  2. ``../shared/data/wikitext-2-raw/`` seen from the working directory, then from this package's
     checkout (the offline copy; its text equals the hub's rows);
  3. the Hugging Face hub through ``datasets.load_dataset`` (needs network or the datasets cache).
  As in the GPTQ / SparseGPT evaluation, the rows are joined with ``"\\n\\n"``.
* ``pycode``: the source of pure-Python standard-library modules (a second domain, code instead of
  encyclopedia prose, present in every Python install; ``test`` and ``validation`` name disjoint
  module lists, and the text changes with the Python version, which the origin records).
* a local ``.txt`` / ``.raw`` file (read as it is) or ``.jsonl`` file (the ``"text"`` field of each
  line, joined with ``"\\n\\n"``).

Named datasets give evaluation windows from the ``test`` split and calibration windows from
``validation`` (never the same text). A single local file is cut in two at half of its tokens:
evaluation windows come from the first half, calibration windows from the second.

Evaluation windows are consecutive, non-overlapping and start at the first token (the papers'
protocol); calibration windows start at seeded random offsets. When the tokenizer adds a BOS token
by default (Gemma, Llama, OPT), every window starts with it, followed by ``seq_len - 1`` text tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from autocomp.errors import DataError

NAMED_DATASETS = {
    "wikitext2": {"hub": ("wikitext", "wikitext-2-raw-v1"), "folder": "wikitext-2-raw",
                  "files": {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}},
    # a second domain that every Python install carries: source code of pure-Python standard modules
    "pycode": {"modules": {
        "test": ("argparse", "dataclasses", "difflib", "enum", "fractions", "gettext", "heapq", "inspect",
                 "json.decoder", "json.encoder", "optparse", "pprint", "random", "shutil"),
        "validation": ("statistics", "string", "tarfile", "textwrap", "threading", "tokenize", "typing",
                       "calendar", "csv", "ftplib", "glob", "locale", "mailbox", "netrc")}},
}
EVAL_SPLIT = "test"
CALIB_SPLIT = "validation"
LOCAL_SUFFIXES = (".txt", ".raw", ".jsonl")


@dataclass(frozen=True)
class Text:
    """A loaded text with where it came from."""

    text: str
    origin: str          # file path or "hub:wikitext/wikitext-2-raw-v1:test"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _shared_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("AUTOCOMP_DATA_DIR"):
        dirs.append(Path(os.environ["AUTOCOMP_DATA_DIR"]))
    dirs.append(Path.cwd().parent / "shared" / "data")
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return dirs


def _join_rows(rows: list[str]) -> str:
    return "\n\n".join(rows)


def _read_local(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if path.suffix != ".jsonl":
        return raw
    rows = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{lineno}: each line must be an object with a string field 'text'")
        rows.append(obj["text"])
    return _join_rows(rows)


def is_named_dataset(ref: str) -> bool:
    return ref in NAMED_DATASETS


def load_named_split(name: str, split: str) -> Text:
    """Load one split of a named dataset, offline copy first (see module docstring)."""
    spec = NAMED_DATASETS[name]
    if "modules" in spec:
        return _python_modules_text(name, split, spec["modules"])
    filename = spec["files"].get(split)
    if filename is None:
        raise DataError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(spec['files'])}")
    for base in _shared_dirs():
        candidate = base / spec["folder"] / filename
        if candidate.is_file():
            lines = _read_local(candidate).splitlines(keepends=True)
            return Text(_join_rows(lines), str(candidate))
    try:
        import datasets

        ds = datasets.load_dataset(*spec["hub"], split=split)
    except Exception as exc:  # offline, missing cache, hub errors: all mean "not available here"
        raise DataError(
            f"dataset {name!r} split {split!r}: no local copy in {[str(d / spec['folder']) for d in _shared_dirs()]} "
            f"and the hub is not reachable ({type(exc).__name__}); set AUTOCOMP_DATA_DIR or pass a local .txt/.jsonl file"
        ) from None
    return Text(_join_rows(list(ds["text"])), f"hub:{'/'.join(spec['hub'])}:{split}")


def _python_modules_text(name: str, split: str, splits: dict[str, tuple[str, ...]]) -> Text:
    """The source of standard-library modules, one after another (text depends on the Python version)."""
    import importlib.util
    import sys

    if split not in splits:
        raise DataError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits)}")
    rows = []
    for module in splits[split]:
        found = importlib.util.find_spec(module)
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise DataError(f"dataset {name!r}: standard module {module} has no Python source in this install")
        rows.append(Path(found.origin).read_text(encoding="utf-8"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Text(_join_rows(rows), f"python{version} stdlib source ({split}: {', '.join(splits[split])})")


def load_local(path_str: str) -> Text:
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} does not exist; give a local .txt/.raw/.jsonl file or one of: {', '.join(NAMED_DATASETS)}")
    if path.is_dir() or path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"data file {path} must be a {'/'.join(LOCAL_SUFFIXES)} file")
    return Text(_read_local(path), str(path.resolve()))


def validate_data_ref(ref: str) -> None:
    """Raise DataError now (before a model is loaded) if ``ref`` cannot name any text."""
    if not is_named_dataset(ref):
        load_local(ref)


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts its BOS token first by default (Gemma, Llama, OPT; not GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class WindowSpec:
    """How many windows of which length, and the seed for random offsets."""

    count: int
    seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise DataError(f"window count must be at least 1, got {self.count}")
        if self.seq_len < 2:
            raise DataError(f"window length must be at least 2 tokens, got {self.seq_len}")


@dataclass
class Windows:
    """``input_ids`` of shape ``[count, seq_len]`` plus provenance."""

    input_ids: torch.Tensor
    origin: str
    mode: str            # "sequential" | "random"
    seed: int

    @property
    def n_tokens(self) -> int:
        """Tokens that are predicted (every position but the first of each window)."""
        return self.input_ids.shape[0] * (self.input_ids.shape[1] - 1)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()


BOS_MODES = ("every", "first", "none")


def bos_id_for(tokenizer: Any, bos: str) -> int | None:
    if bos not in BOS_MODES:
        raise DataError(f"bos mode {bos!r} is not one of {', '.join(BOS_MODES)}")
    return tokenizer.bos_token_id if bos != "none" and adds_bos(tokenizer) else None


def make_windows(ids: torch.Tensor, spec: WindowSpec, bos: int | None, random: bool, origin: str,
                 bos_mode: str = "every", skip: int = 0) -> Windows:
    """Cut ``ids`` into windows; raises DataError when there are too few tokens.

    ``skip`` (sequential windows only) leaves out the first ``skip`` windows: windows ``skip`` to
    ``skip + count - 1`` of the same cut, so a held-out slice never overlaps the searched one.

    ``bos_mode="every"`` starts each window with ``bos`` then ``seq_len - 1`` text tokens (each
    window is an independent sequence, as the model was trained); ``"first"`` puts ``bos`` once
    before the whole stream and cuts plain ``seq_len`` windows from it (only the first window has
    it); ``bos=None`` or ``"none"``: plain text windows.
    """
    if bos is not None and bos_mode == "first" and not random:
        ids = torch.cat([torch.tensor([bos], dtype=torch.long), ids])
        bos = None
    if bos_mode == "none":
        bos = None
    body = spec.seq_len - (1 if bos is not None else 0)
    most = ids.numel() // body
    if skip and random:
        raise DataError("skip applies to sequential (evaluation) windows only")
    if (not random and most < skip + spec.count) or most == 0:
        after = f" after the first {skip}" if skip else ""
        raise DataError(
            f"{origin} has {ids.numel()} tokens: room for {most} windows of {spec.seq_len}, "
            f"but {spec.count} were asked for{after}; ask for fewer or shorter windows, or give more text"
        )
    if random:
        gen = torch.Generator().manual_seed(spec.seed)
        starts = torch.randint(0, ids.numel() - body + 1, (spec.count,), generator=gen).tolist()
    else:
        starts = [(skip + i) * body for i in range(spec.count)]
    rows = []
    for s in starts:
        chunk = ids[s:s + body]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos], dtype=torch.long), chunk])
        rows.append(chunk)
    return Windows(torch.stack(rows), origin, "random" if random else "sequential", spec.seed)


def calibration_source(data: str, calib_data: str | None) -> tuple[str, str]:
    """(source, split) of the calibration text for a search on ``data`` (see module docstring)."""
    if calib_data is not None:
        return calib_data, (CALIB_SPLIT if is_named_dataset(calib_data) else "all")
    return data, (CALIB_SPLIT if is_named_dataset(data) else "second-half")


def load_text(source: str, split: str) -> tuple[Text, str]:
    """Text of ``source``/``split``; split is a dataset split, or ``all`` / ``first-half`` /
    ``second-half`` for a local file (halves are cut by tokens later, see :func:`split_ids`)."""
    if is_named_dataset(source):
        return load_named_split(source, split), "all"
    if split not in ("all", "first-half", "second-half"):
        raise DataError(f"a local file has no split {split!r}; use all, first-half or second-half")
    return load_local(source), split


def split_ids(ids: torch.Tensor, part: str) -> torch.Tensor:
    half = ids.numel() // 2
    return {"all": ids, "first-half": ids[:half], "second-half": ids[half:]}[part]


def text_windows(tokenizer: Any, source: str, split: str, spec: WindowSpec, random: bool,
                 bos: str = "every", skip: int = 0) -> Windows:
    """Windows from one text source and split: sequential for evaluation (``skip`` leaves out the
    first windows), random for calibration."""
    text, part = load_text(source, split)
    ids = split_ids(tokenize(tokenizer, text.text), part)
    origin = text.origin + ("" if part == "all" else f" ({part})")
    return make_windows(ids, spec, bos_id_for(tokenizer, bos), random=random, origin=origin, bos_mode=bos, skip=skip)


def check_window_lengths(lengths: Mapping[str, int], config: Any, model: str = "the model") -> None:
    """DataError when a sequence length (by the flag that set it) is longer than the positions the
    model's config allows (:func:`autocomp.inputs.models.max_positions`); nothing when it names none."""
    from autocomp.inputs.models import max_positions

    limit = max_positions(config)
    if limit is None:
        return
    for flag, length in lengths.items():
        if length > limit:
            raise DataError(f"{flag} {length} is longer than the {limit} positions that {model} takes "
                            f"(its config's maximum); use at most {limit}")


def eval_source(data: str, calib_data: str | None) -> tuple[str, str]:
    """(source, split) of the evaluation text for a search on ``data``."""
    if is_named_dataset(data):
        return data, EVAL_SPLIT
    return data, ("first-half" if calib_data is None else "all")
