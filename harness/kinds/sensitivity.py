"""Figure 3: IGR-SR over a grid of prefix (k) and intent (m) token counts (intervals in the CSV)."""
from __future__ import annotations

import click

from harness.kinds import Axes, ExperimentKind, ReportContext, register


def _ints(ctx, param, value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not ctx.resilient_parsing:
        check_token_counts(param.name[:-1], counts)
    return counts


def check_token_counts(key: str, counts: list[int]) -> None:
    """IGR-SR's declared range for k or m, before any cell is made (`--k 0`: one line)."""
    from harness.config import check_range
    from models.igr_sr import IGRSRConfig

    for n in counts:
        check_range("igr-sr", IGRSRConfig, key, n, where=f"--{key} {n}")


METRICS = ("recall@10", "ndcg@10")  # the paper's Figure 3 metric (the LaTeX's and the figure's), then the primary one


def sensitivity_frame(runs, store):
    """One row per (k, m) cell and metric: mean over seeds and users, std over seeds, 95% interval
    (harness.stats.mean_interval: test users and seeds), the seeds and whether a run hit the
    epoch cap."""
    import pandas as pd

    from harness.report import SHOWN, UserValues, cell_stats

    values = UserValues(store)
    rows = []
    for (k, m), g in runs.groupby(["k", "m"]):
        for metric in METRICS:
            rows.append({"k": k, "m": m, "metric": SHOWN[metric], **cell_stats(values(g, metric)),
                         "max_epochs": bool(g["capped"].any())})
    return pd.DataFrame(rows)


def report(runs, ctx: ReportContext):
    from harness.report import sensitivity_figure
    from harness.tables import Table, protocol_caption, rich_table

    frame = sensitivity_frame(runs, ctx.store)
    frame.to_csv(ctx.base.with_suffix(".csv"), index=False)
    shown = frame[frame["metric"] == "Recall@10"]
    grid = shown.pivot(index="k", columns="m", values="mean")
    capped = shown.pivot(index="k", columns="m", values="max_epochs").eq(True)
    seeds = int(shown["n_seeds"].max())
    name = {"index": lambda k: f"k={k}", "columns": lambda m: f"m={m}"}
    caption = ("Recall@10 (test) over prefix tokens k and intent tokens m. "
               + protocol_caption(ctx.note, seeds=seeds, mask_history=ctx.mask_history, max_len=ctx.max_len,
                                  stars=False, primary=True, intervals=True, users_only=seeds < 2,
                                  daggers=bool(capped.to_numpy().any())))
    table = Table(mean=grid.rename(**name), daggers=capped.rename(**name), highlight="all", caption=caption,
                  label="tab:sensitivity")
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
