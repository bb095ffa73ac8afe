"""Table 3: clean against noisy data, Recall@10 and its relative drop (intervals in the CSV)."""
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


METRICS = ("recall@10", "ndcg@10")  # the paper's Table 3 metric (the LaTeX's), then the primary one


def robustness_frame(runs, store):
    """Per dataset, model, noise rate and metric: clean and noisy means (over the seeds both
    have) with 95% intervals, the relative drop in % with its 95% interval and the p-value of
    noisy against clean (harness.stats.compare: the same users, paired; seeds not paired, which
    is conservative when only the evaluation is noisy and seed s trains one model for both),
    the seeds used and whether a clean or noisy run hit the epoch cap."""
    import pandas as pd

    from harness.report import SHOWN, UserValues, cell_stats, common_seeds
    from harness.stats import compare

    values = UserValues(store)
    rows = []
    for (dataset, label), g in runs.groupby(["dataset", "label"], sort=False):
        clean_runs = g[g["noise"] == 0]
        for rate in sorted(r for r in g["noise"].unique() if r > 0):
            noisy_runs = g[g["noise"] == rate]
            seeds = common_seeds([clean_runs, noisy_runs])
            if not seeds:
                continue
            clean_g, noisy_g = clean_runs[clean_runs["seed"].isin(seeds)], noisy_runs[noisy_runs["seed"].isin(seeds)]
            for metric in METRICS:
                clean, noisy = values(clean_g, metric), values(noisy_g, metric)
                c, n, test = cell_stats(clean), cell_stats(noisy), compare(noisy, clean)
                rows.append({"dataset": dataset, "model": label, "noise": rate, "metric": SHOWN[metric],
                             "clean": c["mean"], "noisy": n["mean"], "drop_pct": 0.0 - test.gain_pct.value,
                             "drop_ci95_low": -test.gain_pct.high, "drop_ci95_high": -test.gain_pct.low,
                             "p": test.pvalue, "clean_ci95_low": c["ci95_low"], "clean_ci95_high": c["ci95_high"],
                             "noisy_ci95_low": n["ci95_low"], "noisy_ci95_high": n["ci95_high"],
                             "n_seeds": len(seeds), "seeds_dropped": len(set(g["seed"]) - set(seeds)),
                             "clean_max_epochs": bool(clean_g["capped"].any()),
                             "noisy_max_epochs": bool(noisy_g["capped"].any())})
    return pd.DataFrame(rows)


def report(runs, ctx: ReportContext):
    import pandas as pd

    from harness.tables import latex_table, protocol_caption, rich_table

    frame = robustness_frame(runs, ctx.store)
    if frame.empty:  # no noisy cell with a clean one of the same seed finished yet: no table
        return []
    shown = frame[frame["metric"] == "Recall@10"]
    seeds = int(shown["n_seeds"].max())
    dagger = r"$^\dagger$"
    cells = pd.DataFrame({
        "Clean": [f"{r.clean:.4f}" + (dagger if r.clean_max_epochs else "") for r in shown.itertuples()],
        "Noisy": [rf"{r.noisy:.4f}{dagger if r.noisy_max_epochs else ''} ($\downarrow${r.drop_pct:.1f}\%, "
                  rf"+{100 * r.noise:.0f}\% noise)" for r in shown.itertuples()]},
        index=pd.MultiIndex.from_arrays([shown["dataset"], shown["model"]], names=["Dataset", "Method"]))
    capped = bool(frame[["clean_max_epochs", "noisy_max_epochs"]].to_numpy().any())
    protocol = protocol_caption(seeds=seeds, mask_history=ctx.mask_history, max_len=ctx.max_len, stars=False,
                                marks=False, primary=True, intervals=True, users_only=seeds < 2, daggers=capped)
    dropped = (" Means and drops use the seeds a model's clean and noisy runs both have; some seeds left out."
               if frame["seeds_dropped"].any() else "")
    caption = (f"Robustness: Recall@10 on clean and noisy data (relative drop). {protocol} The CSV also holds "
               f"each drop's 95\\% interval and p-value (noisy against clean, the same users paired), and the "
               f"same for NDCG@10.{dropped} {NOISE_CAPTIONS[ctx.experiment.get('noise_on', 'all')]} "
               f"{ctx.note}").rstrip()
    ctx.base.with_suffix(".tex").write_text(latex_table(cells, caption, "tab:robustness"))
    frame.to_csv(ctx.base.with_suffix(".csv"), index=False)
    terminal = shown.set_index(["dataset", "model"])[["noise", "clean", "noisy", "drop_pct", "drop_ci95_low",
                                                      "drop_ci95_high"]]
    return [(ctx.name, ctx.base.with_suffix(".tex"),
             rich_table(terminal, ctx.name, {"noise": ".2f", "drop_pct": ".1f", "drop_ci95_low": ".1f",
                                             "drop_ci95_high": ".1f"}))]


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
