"""Compressors: one module per method, each registered by name in :mod:`.registry`.

Importing this package registers the built-in methods (explicitly, in this file).
"""

from autocomp.compressors import gptq, magnitude, rtn, sparsegpt, wanda  # noqa: F401  (registration side effect)
from autocomp.compressors.apply import CompressedWeight, compress_weight
from autocomp.compressors.registry import available_compressors, get_compressor, register_compressor

__all__ = ["CompressedWeight", "available_compressors", "compress_weight", "get_compressor", "register_compressor"]
