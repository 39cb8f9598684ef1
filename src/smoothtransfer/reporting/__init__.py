"""Tables (paper-style ``(clean)certified`` markdown) and plots of certification results.

The results are read by :mod:`smoothtransfer.smoothing.results` (``load_run``, ``Run``, ``SigmaResult``,
``read_tsv``, re-exported here).
"""

from smoothtransfer.reporting.jobs import Report, ReportConfig, report
from smoothtransfer.reporting.plots import plot_certified_accuracy
from smoothtransfer.reporting.tables import (
    DEFAULT_RADII,
    Run,
    SigmaResult,
    certified_rows,
    certified_table,
    format_cell,
    load_run,
    markdown_table,
    read_tsv,
)

__all__ = [
    "DEFAULT_RADII",
    "Report",
    "ReportConfig",
    "Run",
    "SigmaResult",
    "certified_rows",
    "certified_table",
    "format_cell",
    "load_run",
    "markdown_table",
    "plot_certified_accuracy",
    "read_tsv",
    "report",
]
