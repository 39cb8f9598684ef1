"""``smoothtransfer report DIR...``: paper-style ``(clean)certified`` markdown table + certified-accuracy plot.

Flags → :class:`~smoothtransfer.job_configs.ReportConfig` → :func:`smoothtransfer.reporting.report`, which writes
``report.md`` and ``certified_accuracy.png`` into the first DIR (or ``--out``); the table is printed.
"""

from __future__ import annotations

import argparse

from smoothtransfer.commands._flags import add_config_arguments, config_from_args
from smoothtransfer.job_configs import ReportConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, ReportConfig)


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.reporting import report  # matplotlib, numpy: not needed for --help

    rep = report(config_from_args(ReportConfig, args))
    print(rep.table, end="")
    print(f"wrote {rep.markdown} and {rep.plot}")
    return 0
