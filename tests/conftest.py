import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# offline before any Hugging Face library is imported (they read these at import time)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import ARCHS, build_tiny_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    train_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="session")
def tiny_models(tiny_root) -> dict[str, Path]:
    return {arch: build_tiny_model(arch, tiny_root / arch, tiny_root / "tokenizer") for arch in ARCHS}


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """The tiny models' tensors are small: intra-op threads only add overhead (about 10x on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "autocomp-cache"
    monkeypatch.setenv("AUTOCOMP_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield
