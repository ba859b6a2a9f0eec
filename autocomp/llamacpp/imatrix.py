"""llama.cpp's importance matrix, computed by autocomp from its own calibration statistics.

llama.cpp's ``llama-imatrix`` records, for every matmul weight, the mean over calibration tokens
of each input column's squared activation (``sum_t x_tj^2 / n``), and its quantizer weights each
column's rounding error by it. autocomp's dense calibration pass
(:func:`~autocomp.pipeline.calibration.collect_input_stats`) accumulates exactly that sum for Wanda,
so the matrix is that pass divided by the token count, keyed by GGUF tensor name and handed to
``llama_model_quantize`` in memory (no ``imatrix.gguf`` file, no llama.cpp tool). The activations are
the torch model's (float32) on the study's calibration windows; llama.cpp's tool would see those of
the F16 file in llama.cpp, which differ by its rounding only. A tied embedding gets its LM-head
statistics (the same matrix in llama.cpp), as ``llama-imatrix`` records them.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from autocomp.exporters.gguf_file import GGUFLayout
from autocomp.inputs.targets import find_targets
from autocomp.pipeline.calibration import collect_input_stats


def importance_matrix(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 ``[in_features]`` mean squared input, from ``windows`` (``[n, seq]``)."""
    layout = GGUFLayout.of(model)
    targets = [t for t in find_targets(model) if t.stats_module is not None]
    stats = collect_input_stats(model, targets, windows)
    out: dict[str, np.ndarray] = {}
    for target in targets:
        name = layout.gguf_name(f"{target.name}.weight")
        if name is None:
            continue
        s = stats[target.name]
        out[name] = (s.input_sq_norm / max(s.n_tokens, 1)).to(torch.float32).numpy()
    return out


def digest(matrix: dict[str, np.ndarray]) -> str:
    """Identifies an importance matrix (for the names of the files quantized with it)."""
    h = hashlib.sha256()
    for name in sorted(matrix):
        h.update(name.encode())
        h.update(np.ascontiguousarray(matrix[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]
