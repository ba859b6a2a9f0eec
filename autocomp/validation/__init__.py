"""Re-scoring a finished study's front on data the search never saw: held-out windows, extra
domains, lm-eval tasks, with bootstrap confidence intervals (see :mod:`autocomp.validation.runner`)."""
