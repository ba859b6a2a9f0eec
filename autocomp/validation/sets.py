"""Which text a front is validated on.

* ``search``: the windows the search scored (re-scored for per-window figures, and as a check
  that a stored trial reproduces).
* ``heldout``: the same source and split, the windows right after the searched ones (same cut,
  never overlapping), so the only difference to ``search`` is that nothing was chosen on them.
* extra sets named by the user (``--extra NAME=SOURCE``): a second domain, e.g. the built-in
  ``pycode`` (Python source) or any local ``.txt`` / ``.jsonl`` file; windows from its start.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from autocomp.inputs.data import EVAL_SPLIT, WindowSpec, eval_source, is_named_dataset, text_windows, validate_data_ref
from autocomp.errors import DataError
from autocomp.config.spec import StudySpec
from autocomp.validation import HELDOUT, SEARCH

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class EvalSet:
    name: str
    source: str
    split: str
    count: int
    seq_len: int
    skip: int = 0

    @property
    def label(self) -> str:
        first, last = self.skip, self.skip + self.count - 1
        return f"{self.source} {self.split}, windows {first}-{last} of {self.seq_len} tokens"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}

    def windows(self, tokenizer: Any, bos: str):
        return text_windows(tokenizer, self.source, self.split, WindowSpec(self.count, self.seq_len), random=False,
                            bos=bos, skip=self.skip)


def parse_extra(items: Sequence[str]) -> dict[str, str]:
    """``["pycode", "news=/data/news.txt"]`` -> ``{"pycode": "pycode", "news": "/data/news.txt"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep:
            name, source = (item if is_named_dataset(item) else re.sub(r"\W+", "_", item.rsplit("/", 1)[-1])), item
        name, source = name.strip(), source.strip()
        if not _NAME_RE.match(name) or name in (SEARCH, HELDOUT):
            raise DataError(f"--extra {item!r}: the set name must be a word (letters, digits, _ or -) other than "
                            f"'{SEARCH}' and '{HELDOUT}'; write NAME=SOURCE, e.g. code=pycode")
        if name in out:
            raise DataError(f"--extra names the set {name!r} twice")
        validate_data_ref(source)
        out[name] = source
    return out


def study_sets(spec: StudySpec, heldout_windows: int | None = None, extra: dict[str, str] | None = None,
               extra_windows: int | None = None) -> list[EvalSet]:
    """The search set, the held-out set after it, and the extra sets (windows of the search length)."""
    source, split = eval_source(spec.data, spec.calib_data)
    searched = spec.eval_windows
    n_held = heldout_windows or searched.count
    n_extra = extra_windows or n_held
    if n_held < 2 or n_extra < 2:
        raise DataError("validation needs at least 2 windows per set (for a bootstrap interval)")
    sets = [EvalSet(SEARCH, source, split, searched.count, searched.seq_len),
            EvalSet(HELDOUT, source, split, n_held, searched.seq_len, skip=searched.count)]
    for name, ref in (extra or {}).items():
        sets.append(EvalSet(name, ref, EVAL_SPLIT if is_named_dataset(ref) else "all", n_extra, searched.seq_len))
    return sets
