"""Re-scoring a finished study's front on data the search never saw: held-out windows, extra
domains, lm-eval tasks, with bootstrap confidence intervals (see :mod:`autocomp.validation.runner`).

The names below are shared with readers of stored validations (the report); importing them loads
nothing heavy."""

SEARCH, HELDOUT = "search", "heldout"     # the two evaluation sets every validation has
VALIDATION_VERSION = 1                    # the layout of a stored validation
