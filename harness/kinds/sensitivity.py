"""Figure 3: IGR-SR over a grid of prefix (k) and intent (m) token counts."""
from __future__ import annotations

import click

from harness.kinds import Axes, ExperimentKind, ReportContext, register


def _ints(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def report(runs, ctx: ReportContext):
    from harness.report import sensitivity_figure
    from harness.tables import Table, protocol_caption, rich_table

    grid = runs.groupby(["k", "m"])["recall@10"].mean().unstack("m")
    grid.to_csv(ctx.base.with_suffix(".csv"))
    seeds = int(runs.groupby(["k", "m"])["seed"].nunique().max())
    table = Table(mean=grid.rename(index=lambda k: f"k={k}", columns=lambda m: f"m={m}"), highlight="all",
                  caption="Recall@10 (test) over prefix tokens k and intent tokens m. "
                  + protocol_caption(ctx.note, seeds=seeds, mask_history=ctx.mask_history, max_len=ctx.max_len,
                                     stars=False), label="tab:sensitivity")
    ctx.base.with_suffix(".tex").write_text(table.to_latex())
    sensitivity_figure(grid, ctx.base.with_name(ctx.base.name + "-figure"))
    return [(ctx.name, ctx.base.with_suffix(".tex"), rich_table(grid, ctx.name))]


register(ExperimentKind(
    name="sensitivity",
    help="""Figure 3: IGR-SR over a grid of prefix (k) and intent (m) token counts (resumable).

    \b
    Example:
      harness sensitivity --dataset toys --k 2,8,32 --m 1,3,5 --seeds 1
    """,
    options=(click.option("--k", "ks", default="2,4,8,16,32", show_default=True, callback=_ints,
                          help="Prefix token counts."),
             click.option("--m", "ms", default="1,2,3,4,5", show_default=True, callback=_ints,
                          help="Intent token counts.")),
    axes=lambda ks, ms: Axes(models=["igr-sr"], extra=[{"k": k, "m": m} for k in ks for m in ms]),
    report=report,
))
