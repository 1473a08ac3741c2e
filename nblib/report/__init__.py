"""The compare stage's report, as a small package read in order:

- ``loading``: the runs to compare (every seed of every variant), refusing unmatched pairs;
- ``tables``: tables addressed by metric keys, cells carrying their spread (``Stat``);
- ``glance``: the at-a-glance lines, the verdicts and the details below the tables, each verdict an interval
  corrected over all the report's comparisons at once (``report_calls``, with ``nblib.stats``);
- ``figures``: the report's plots (drawn by ``nblib.plots``);
- ``render``: HTML (inline ``style.css``), Markdown and CSV;
- ``compose``: the whole report from the pieces.

Measurements made by the compare stage itself (generation and training speed side by side, the
cost at real scale) come from ``nblib.measure``. ``python -m nblib.report --publish-example``
copies ``reports/compare.*`` to the committed example.
"""
from nblib.report.compose import compose
from nblib.report.glance import Calls, at_a_glance, details, paired, report_calls, verdict_lines
from nblib.report.loading import Comparison, Group, MismatchError, MissingRunError, Run, load, load_group
from nblib.report.render import Report, new_report
from nblib.report.tables import (
    EMPTY_ANSWER, LABELS, Stat, conversion_table, cost_table, finetune_samples, finetune_table, format_table, format_value,
    measured_rows, paper_table, pretrain_table, runs_overview, with_ratios,
)

__all__ = [
    "Calls", "EMPTY_ANSWER", "LABELS", "Comparison", "Group", "MismatchError", "MissingRunError", "Report", "Run",
    "Stat", "at_a_glance", "compose", "conversion_table", "cost_table", "details", "finetune_samples", "finetune_table", "format_table",
    "format_value", "load", "load_group", "measured_rows", "new_report", "paired", "paper_table", "pretrain_table", "report_calls",
    "runs_overview", "verdict_lines", "with_ratios",
]
