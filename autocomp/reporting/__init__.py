"""A study as something to look at: an HTML page (plotly), PNG figures (matplotlib), CSV/JSON data,
and a live optuna-dashboard. plotly, matplotlib and optuna-dashboard are imported only when used."""

from autocomp.reporting.build import write_report

__all__ = ["write_report"]
