"""Compressors: one module per method, each registered by name in :mod:`.registry`.

Importing this package registers the built-in methods (explicitly, in this file); importing any of
its modules imports the package first, so the registry always holds them. Applying a whole
:class:`~autocomp.config.plan.LayerPlan` to a weight is :mod:`autocomp.pipeline.layer`.
"""

from autocomp.compressors import ggml, gptq, magnitude, rtn, sparsegpt, wanda  # noqa: F401  (registration side effect)
from autocomp.compressors.registry import available_compressors, get_compressor, register_compressor

__all__ = ["available_compressors", "get_compressor", "register_compressor"]
