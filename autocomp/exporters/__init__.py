"""Export formats: what a compressed configuration is written as, behind one registry.

Each format is an :class:`ExportFormat` registered by name with :func:`register_format`; ``autocomp
export`` / ``compress`` look it up with :func:`get_format`. A format

* ``check(applied, options)`` refuses, before anything is written, a configuration it cannot hold
  (PlanError naming the layers and what to change);
* ``write(folder, applied, loaded, options)`` writes the model into an empty ``folder`` and returns
  what it wrote (bytes on disk, notes) for ``autocomp.json``;
* ``load(folder)`` reloads the written model in the engine it is meant for, as a torch module whose
  logits the export contract (tests/contracts) compares with the model the trial scored.

The built-in formats are imported explicitly below (no package walking); importing any module of
the package imports the package first, so the registry always holds them.
"""

from autocomp.exporters import compressed_tensors, gguf_file, hf_float, packed  # noqa: F401  (registers the built-in formats)
from autocomp.exporters.registry import (DEFAULT_FORMAT, ExportFormat, ExportOptions, available_formats, get_format,
                                         register_format)

__all__ = ["DEFAULT_FORMAT", "ExportFormat", "ExportOptions", "available_formats", "get_format", "register_format"]
