"""autocomp: automated compression search for causal language models.

``import autocomp`` is light: it imports neither torch-heavy modules nor Ray; the API functions
load what they need when called. See :mod:`autocomp.api` for the Python API.
"""

from autocomp._version import __version__

_API = ("search", "prepare", "worker", "pareto", "recommend", "validate", "recommend_validated", "report", "compress",
        "export", "remeasure", "load_deployed")
__all__ = ["__version__", *_API, "StudySpec", "SearchSpace", "CompressionPlan", "LayerPlan", "Budgets",
           "ValidationConfig", "LatencySpec"]


def __getattr__(name: str):
    if name in _API:
        from autocomp import api

        return getattr(api, name)
    if name == "ValidationConfig":
        from autocomp.validation.runner import ValidationConfig

        return ValidationConfig
    if name == "StudySpec":
        from autocomp.config.spec import StudySpec

        return StudySpec
    if name == "SearchSpace":
        from autocomp.config.space import SearchSpace

        return SearchSpace
    if name in ("CompressionPlan", "LayerPlan"):
        from autocomp.config import plan

        return getattr(plan, name)
    if name == "Budgets":
        from autocomp.config.objectives import Budgets

        return Budgets
    if name == "LatencySpec":
        from autocomp.latency.spec import LatencySpec

        return LatencySpec
    raise AttributeError(f"module 'autocomp' has no attribute {name!r}")
