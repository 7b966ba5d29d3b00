"""Reporting: report.json plus an HTML report with plots and sample grids."""

from .report import write_reports

__all__ = ["write_reports"]
