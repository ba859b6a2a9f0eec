"""autocomp: automated compression search for causal language models.

``import autocomp`` is light: it imports neither torch-heavy modules nor Ray; the API functions
load what they need when called. See :mod:`autocomp.api` for the Python API.
"""

__version__ = "0.1.0"

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
        from autocomp.spec import StudySpec

        return StudySpec
    if name == "SearchSpace":
        from autocomp.space import SearchSpace

        return SearchSpace
    if name in ("CompressionPlan", "LayerPlan"):
        from autocomp import plan

        return getattr(plan, name)
    if name == "Budgets":
        from autocomp.objectives import Budgets

        return Budgets
    if name == "LatencySpec":
        from autocomp.evaluators.latency_spec import LatencySpec

        return LatencySpec
    raise AttributeError(f"module 'autocomp' has no attribute {name!r}")
