"""Table 3: clean against noisy data, Recall@10 and its relative drop."""
from __future__ import annotations

import click

from harness.kinds import Axes, ExperimentKind, ReportContext, register, split

NOISE_CAPTIONS = {
    "all": "Noise: that fraction of the items before each user's validation target replaced by random "
           "items, in the training samples and in the histories read at validation and test; targets untouched.",
    "train": "Noise: that fraction of the items before each user's validation target replaced by random "
             "items in the training samples only; validation and test read the clean histories and targets.",
    "eval": "Noise: training on clean data; that fraction of the items before each user's validation target "
            "replaced by random items in the histories read at validation and test; targets untouched.",
}


def robustness_frame(runs):
    """Per dataset, model and noise rate: clean and noisy Recall@10 (means over seeds), drop in %."""
    import numpy as np
    import pandas as pd

    rows = []
    for (dataset, label), g in runs.groupby(["dataset", "label"], sort=False):
        clean = g.loc[g["noise"] == 0, "recall@10"].mean()
        for rate in sorted(r for r in g["noise"].unique() if r > 0):
            noisy = g.loc[g["noise"] == rate, "recall@10"].mean()
            rows.append({"dataset": dataset, "model": label, "noise": rate, "clean": clean, "noisy": noisy,
                         "drop_pct": 100 * (clean - noisy) / clean if clean else np.nan})
    return pd.DataFrame(rows)


def report(runs, ctx: ReportContext):
    import pandas as pd

    from harness.tables import latex_table, protocol_caption, rich_table

    frame = robustness_frame(runs)
    seeds = int(runs.groupby(["dataset", "label", "noise"])["seed"].nunique().max()) if len(runs) else 0
    cells = pd.DataFrame({
        "Clean": [f"{r.clean:.4f}" for r in frame.itertuples()],
        "Noisy": [rf"{r.noisy:.4f} ($\downarrow${r.drop_pct:.1f}\%, +{100 * r.noise:.0f}\% noise)"
                  for r in frame.itertuples()]},
        index=pd.MultiIndex.from_arrays([frame["dataset"], frame["model"]], names=["Dataset", "Method"]))
    caption = (f"Robustness: Recall@10 on clean and noisy data (relative drop). "
               f"{protocol_caption(seeds=seeds, mask_history=ctx.mask_history, max_len=ctx.max_len, stars=False, marks=False)} "
               f"{NOISE_CAPTIONS[ctx.experiment.get('noise_on', 'all')]} {ctx.note}").rstrip()
    ctx.base.with_suffix(".tex").write_text(latex_table(cells, caption, "tab:robustness"))
    frame.to_csv(ctx.base.with_suffix(".csv"), index=False)
    return [(ctx.name, ctx.base.with_suffix(".tex"),
             rich_table(frame.set_index(["dataset", "model"]), ctx.name, {"noise": ".2f", "drop_pct": ".1f"}))]


register(ExperimentKind(
    name="robustness",
    help="""Table 3: clean vs noisy data, Recall@10 and its relative drop (resumable).

    \b
    Example:
      harness robustness --dataset toys --noise 0.2 --models sasrec,igr-sr --seeds 1
    """,
    options=(
        click.option("--noise", type=click.FloatRange(0, 1, min_open=True), default=0.2, show_default=True),
        click.option("--noise-on", type=click.Choice(["all", "train", "eval"]), default="all", show_default=True,
                     help="Which histories are perturbed: all (training samples and the validation/test "
                          "histories), train (evaluation reads clean histories) or eval (clean training, "
                          "perturbed evaluation histories). Targets are never perturbed."),
        click.option("--models", "models_", default="sasrec,igr-sr", show_default=True),
    ),
    axes=lambda noise, noise_on, models_: Axes(models=split(models_), noise=(0.0, noise), noise_on=noise_on),
    report=report,
))
