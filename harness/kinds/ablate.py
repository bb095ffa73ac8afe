"""Figure 2: IGR-SR against its ablation variants, over seeds: the comparison table (seed-aware
tests, intervals and gains in the CSV, harness.report.comparison_table) and its bar chart."""
from __future__ import annotations

import click

from harness.kinds import Axes, ExperimentKind, ReportContext, register, split

VARIANTS = ("igr-sr", "igr-sr/wo-lid", "igr-sr/concat", "igr-sr/wo-icr")


def report(runs, ctx: ReportContext):
    from harness.report import ablation_figure, comparison_table
    from harness.tables import rich_table

    table = comparison_table(runs, ctx.store, "ablate", ctx.mask_history, ctx.max_len, ctx.note)
    ctx.base.with_suffix(".tex").write_text(table.to_latex())
    table.to_csv(ctx.base.with_suffix(".csv"))
    first = runs["dataset"].iloc[0]
    frame = table.mean.loc[first].T
    if table.std is not None and table.std.notna().to_numpy().any():  # error bars from 2 seeds up
        frame = frame.join(table.std.loc[first].T.add_suffix(" std"))
    ablation_figure(frame, ctx.base.with_name(ctx.base.name + "-figure"), f"Ablation of IGR-SR on {first}")
    return [(ctx.name, ctx.base.with_suffix(".tex"), rich_table(table.mean, ctx.name))]


register(ExperimentKind(
    name="ablate",
    help="""Figure 2: IGR-SR and its ablation variants over seeds (resumable).

    \b
    Example:
      harness ablate --dataset toys --data-dir ../shared/data --seeds 2 --epochs 30
    """,
    options=(click.option("--variants", default=",".join(VARIANTS), show_default=True),),
    axes=lambda variants: Axes(models=split(variants)),
    report=report,
))
