"""Tests that need an optional engine skip without it, and fail instead where CI installs it."""

from __future__ import annotations

import importlib.util
import os

import pytest


def llama_cpp_or_skip(module_level: bool = False) -> None:
    """Skip without llama-cpp-python (a 10-15 minute source build); fail instead under
    ``AUTOCOMP_REQUIRE_LLAMA_CPP=1`` (CI installs it)."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return
    if os.environ.get("AUTOCOMP_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail("llama-cpp-python is not installed (AUTOCOMP_REQUIRE_LLAMA_CPP=1)", pytrace=False)
    pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')", allow_module_level=module_level)
