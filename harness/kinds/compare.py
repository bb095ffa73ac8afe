"""Table 2: every listed model over seeds, with seed-aware tests of IGR-SR against every other
model on NDCG@10 (Holm over the models) and its relative gains with intervals in the CSV
(harness.report.comparison_table)."""
from __future__ import annotations

import click

from harness.kinds import Axes, ExperimentKind, ReportContext, register, split


def report(runs, ctx: ReportContext):
    from harness.report import comparison_table, cost_note
    from harness.tables import latex_escape, rich_table

    note = " ".join(n for n in (ctx.note, latex_escape(cost_note(runs))) if n)
    table = comparison_table(runs, ctx.store, "compare", ctx.mask_history, ctx.max_len, note)
    ctx.base.with_suffix(".tex").write_text(table.to_latex())
    table.to_csv(ctx.base.with_suffix(".csv"))
    # many models: one row per model, so the terminal table fits an 80-column screen
    shown = table.mean.T if table.mean.shape[1] > 5 else table.mean
    return [(ctx.name, ctx.base.with_suffix(".tex"), rich_table(shown, ctx.name))]


register(ExperimentKind(
    name="compare",
    help="""Table 2: every listed model over seeds, with seed-aware significance tests (resumable).

    \b
    Example:
      harness compare --dataset toys,instrument --models sasrec,igr-sr --seeds 5
    """,
    options=(click.option("--models", "models_", default="sasrec,igr-sr", show_default=True),),
    axes=lambda models_: Axes(models=split(models_)),
    report=report,
    dataset_help="One or more, comma-separated.",
))
