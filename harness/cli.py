"""The `harness` command line. Thin: parse, call one function, print. torch is imported lazily
so that `harness --help` stays fast."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from harness.errors import HarnessError


# Commands that train: SIGTERM, SIGUSR1 and a first Ctrl-C stop them after the epoch in flight
# (harness/stopping.py); the rest (dashboard, report...) keep Python's own signal handling.
STOPPABLE = {"train", "tune", "paper"}


# Exit status of a command aborted by Ctrl-C (a second one while a run stops): 128 + SIGINT, as a shell
EXIT_ABORTED = 130


class HarnessGroup(click.Group):
    """Turns HarnessError (bad input, missing data) into one line and exit code 1, a run
    stopped by --stop-after or a signal into one line and exit code 75 (retry later), and an
    abort (KeyboardInterrupt: Ctrl-C twice while training, once elsewhere) into "aborted" and
    exit code 130 (not click's "Aborted!" and 1)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["harness.argv"] = list(args)  # the command line, for "continue with: ..."
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        import signal

        from harness import stopping

        argv = ctx.meta.get("harness.argv", [])
        command = next((a for a in argv if a in self.commands), None)
        stoppable = command in STOPPABLE or command in _experiment_kinds()
        saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)} if stoppable else {}
        if stoppable:
            if "--worker" not in argv:
                stopping.reset()  # a worker inherits its parent's deadline (HARNESS_DEADLINE)
            stopping.install_signal_handlers(lambda line: click.echo(line, err=True))
        try:
            return super().invoke(ctx)
        except HarnessError as e:
            raise click.ClickException(str(e)) from None
        except stopping.RunStopped as e:
            import shlex

            click.echo(f"{e}; continue with: {shlex.join(['harness', *argv])}", err=True)
            ctx.exit(stopping.EXIT_STOPPED)
        except KeyboardInterrupt:
            click.echo("aborted", err=True)
            ctx.exit(EXIT_ABORTED)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _experiment_kinds() -> set[str]:
    from harness import kinds

    return set(kinds.names())


def stop_after_option(f):
    """--stop-after: stop cleanly before a deadline; the same command continues (exit 75)."""

    def start(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        from harness import stopping

        if value is None or ctx.resilient_parsing:
            return value
        try:
            seconds = stopping.parse_duration(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        if seconds <= 0:
            raise click.BadParameter(f"{value!r}: expected a positive duration")
        if ctx.params.get("worker_index") is None and "--worker" not in ctx.find_root().meta.get("harness.argv", []):
            stopping.set_deadline(seconds)
        return value

    return click.option("--stop-after", default=None, metavar="DURATION", callback=start, expose_value=False,
                        help="Stop cleanly by then (e.g. 2h30m, 45m, 90s): start no run that cannot finish "
                             "before it, let runs in flight finish their epoch and save a checkpoint, print "
                             "what is left and exit 75; the same command continues. SIGTERM, SIGUSR1 and a "
                             "first Ctrl-C stop the same way at once.")(f)


def _console():
    from harness.console import console

    return console()


quiet_option = click.option("--quiet", "-q", is_flag=True,
                            help="Print only the final summary and errors: no progress bars or lines.")


@click.group(cls=HarnessGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", envvar="HARNESS_DATA_DIR", default="data", show_default=True,
              type=click.Path(file_okay=False), help="Directory holding the datasets (env HARNESS_DATA_DIR).")
@click.option("--cache-dir", envvar="HARNESS_CACHE_DIR", default=None, type=click.Path(file_okay=False),
              help="Cache of parsed datasets and pre-trained LID encoders (env HARNESS_CACHE_DIR; "
                   "default ~/.cache/harness).")
@click.option("--results-dir", envvar="HARNESS_RESULTS_DIR", default="results", show_default=True,
              type=click.Path(file_okay=False), help="Where run records, tables and figures go.")
@click.pass_context
def cli(ctx: click.Context, data_dir: str, cache_dir: str | None, results_dir: str) -> None:
    """Tune, ablate and reproduce IGR-SR and its baselines.

    \b
    Example:
      harness train --model sasrec --dataset toys --data-dir ../shared/data
    """
    from harness.data.registry import cache_dir as default_cache

    ctx.obj = {"data_dir": Path(data_dir), "cache_dir": default_cache(cache_dir),
               "results_dir": Path(results_dir)}


def trainer_options(f):
    """The trainer flags every command that trains accepts."""
    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True, help="Maximum epochs."),
        click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Stop after this many epochs without a better validation NDCG@10."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Training samples per batch."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True),
        click.option("--seed", type=int, default=2020, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
                     help="Training precision: bf16 autocast (fp32 weights and optimizer) or fp32; auto picks "
                          "what the hardware does best. Evaluation always ranks in fp32."),
        click.option("--mask-history", is_flag=True, help="Exclude each user's history items from the ranking."),
        click.option("--max-len", type=click.IntRange(min=1), default=50, show_default=True,
                     help="History length (most recent items)."),
        click.option("--data-dir", "cmd_data_dir", type=click.Path(file_okay=False), default=None,
                     help="Overrides the group's --data-dir."),
        click.option("--lid-epochs", type=click.IntRange(min=1), default=200, show_default=True,
                     help="Epoch cap for pre-training IGR-SR's LID encoder and LARES's stage 1 (early-stopped; cached)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def data_dir_option(f):
    """--data-dir after a `data` subcommand too (as every command that trains takes it)."""

    def override(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None and not ctx.resilient_parsing:
            ctx.obj["data_dir"] = Path(value)

    return click.option("--data-dir", type=click.Path(file_okay=False), default=None, expose_value=False,
                        callback=override, help="Overrides the group's --data-dir.")(f)


def results_dir_option(f):
    """--results-dir after the subcommand too, for the commands that write results. Passed on as
    `cmd_results_dir` (a worker process gets it back on its command line) and put in ctx.obj."""

    def override(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not ctx.resilient_parsing:
            ctx.obj["results_dir"] = Path(value)
        return value

    return click.option("--results-dir", "cmd_results_dir", type=click.Path(file_okay=False), default=None,
                        callback=override, help="Overrides the group's --results-dir.")(f)


def train_config(kw: dict):
    from harness.train import TrainConfig, resolve_precision

    # the resolved precision ("fp32"/"bf16", never "auto") is what run records and study keys store
    return TrainConfig(epochs=kw["epochs"], patience=kw["patience"], batch_size=kw["batch_size"], lr=kw["lr"],
                       weight_decay=kw["weight_decay"], seed=kw["seed"], device=kw["device"],
                       mask_history=kw["mask_history"], max_len=kw["max_len"],
                       precision=resolve_precision(kw["precision"], kw["device"]))


def run_spec(ctx: click.Context, model: str, dataset: str, params: tuple[str, ...], kw: dict):
    from harness.config import parse_params
    from harness.runs import RunSpec

    return RunSpec(model=model, dataset=dataset, train=train_config(kw), params=parse_params(params),
                   data_dir=Path(kw["cmd_data_dir"]) if kw["cmd_data_dir"] else ctx.obj["data_dir"],
                   cache_dir=ctx.obj["cache_dir"], lid_epochs=kw["lid_epochs"])


@cli.command()
@click.option("--model", required=True, help="A registered model, e.g. sasrec, igr-sr, igr-sr/wo-icr.")
@click.option("--dataset", required=True, help="toys, instrument, cds_and_vinyl, synthetic[-SCALE] or a file path.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Model config override (repeatable).")
@stop_after_option
@trainer_options
@results_dir_option
@quiet_option
@click.pass_context
def train(ctx: click.Context, model: str, dataset: str, params: tuple[str, ...], quiet: bool, **kw) -> None:
    """Train one model and print validation and test metrics.

    \b
    Example:
      harness train --model igr-sr --dataset toys --param d_l=32 --param k=8 --param m=3
    """
    from harness.progress import choose
    from harness.runs import run, save_record

    spec = run_spec(ctx, model, dataset, params, kw)
    record = run(spec, progress=choose(quiet), resume=True)  # bars on a terminal, else a line per epoch
    path = save_record(record, ctx.obj["results_dir"])
    _print_result(record)
    click.echo(f"run record: {path}")


def _print_result(record) -> None:
    from rich.table import Table

    from harness.metrics import METRIC_NAMES

    res = record.result
    table = Table(title=f"{record.model} on {record.dataset} (seed {record.seed}, "
                        f"{record.train_config.get('precision', 'fp32')}, best epoch "
                        f"{res['best_epoch']} of {res['epochs_run']})")
    table.add_column("split")
    for name in METRIC_NAMES:
        table.add_column(name, justify="right")
    for split in ("valid", "test"):
        table.add_row(split, *(f"{res[split][m]:.4f}" for m in METRIC_NAMES))
    _console().print(table)
    curves = res["curves"]
    if curves:
        mean_train = sum(c["train_seconds"] for c in curves) / len(curves)
        mean_eval = sum(c["eval_seconds"] for c in curves) / len(curves)
        click.echo(f"{mean_train:.1f} s per training epoch, {mean_eval:.1f} s per validation; "
                   f"{res['stopped']}; total {record.seconds:.0f} s")
    other = res.get("other_protocol")
    if other:
        label = "with" if other["mask_history"] else "without"
        click.echo(f"same checkpoint, test {label} history masking (reference only): " + ", ".join(
            f"{m} {other['test'][m]:.4f}" for m in METRIC_NAMES))


@cli.command()
@click.option("--model", default=None, help="One model: the detailed report (phases, FLOPs, top ops).")
@click.option("--models", "models_", default=None,
              help="Comma-separated models, or 'all': one table row per model, fp32 and bf16 (where native), "
                   "each benchmark in its own process.")
@click.option("--dataset", required=True)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE")
@click.option("--batches", type=click.IntRange(min=1), default=200, show_default=True,
              help="Training batches to time.")
@click.option("--json", "as_json", is_flag=True, help="Print the report(s) as JSON (for scripts).")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="cpu: time with this process's CPU time (robust to other jobs; with 1 thread = idle wall time).")
@trainer_options
@click.pass_context
def bench(ctx: click.Context, model: str | None, models_: str | None, dataset: str, params: tuple[str, ...],
          batches: int, as_json: bool, clock: str, **kw) -> None:
    """Time training batches and one full evaluation; print FLOPs, FLOP/s and MFU.

    \b
    Examples:
      harness bench --model sasrec --dataset toys --data-dir ../shared/data
      harness bench --models all --dataset toys --batches 50 --lid-epochs 1
    """
    import json

    from harness.bench import benchmark, bench_models, format_models_table, format_report, report_dict

    if (model is None) == (models_ is None):
        raise click.UsageError("give --model NAME or --models LIST|all")
    if model is not None:
        report = benchmark(run_spec(ctx, model, dataset, params, kw), n_batches=batches, clock=clock)
        if as_json:
            click.echo(json.dumps(report_dict(report)))
        else:
            _console().print(format_report(report))
        return
    import models as registry
    from harness.train import bf16_available, resolve_device

    names = [n for n in registry.names() if "/" not in n] if models_ == "all" else [m for m in models_.split(",") if m]
    if kw["precision"] == "auto":
        precisions = ["fp32", "bf16"] if bf16_available(resolve_device(kw["device"])) else ["fp32"]
    else:
        precisions = [kw["precision"]]
    rows = bench_models(run_spec(ctx, names[0], dataset, params, kw), names, precisions, batches,
                        echo=lambda m: click.echo(m, err=True), clock=clock)
    if as_json:
        click.echo(json.dumps(rows))
    else:
        from harness.console import console

        console(width=max(_console().width, 200)).print(format_models_table(rows))  # never fold the columns


@cli.group()
def data() -> None:
    """Datasets: list, stats, fetch, synthetic."""


@data.command("list")
@data_dir_option
@click.pass_context
def data_list(ctx: click.Context) -> None:
    """Known datasets and whether their files are present."""
    from harness.data.registry import DATASETS

    for name, info in DATASETS.items():
        path = ctx.obj["data_dir"] / info.path
        state = "present" if path.is_file() else "missing"
        click.echo(f"{name:15s} {state:8s} {path}  ({info.description})")


@data.command("stats")
@click.argument("dataset")
@data_dir_option
@click.pass_context
def data_stats(ctx: click.Context, dataset: str) -> None:
    """Print the paper's Table 1 columns for DATASET, checked against the paper.

    \b
    Example:
      harness --data-dir ../shared/data data stats toys
    """
    from harness.data.registry import DATASETS, canonical_name, load
    from harness.data.sequences import stats

    seqs = load(dataset, ctx.obj["data_dir"], ctx.obj["cache_dir"])
    for w in seqs.warnings:
        click.echo(f"warning: {w}", err=True)
    s = stats(seqs)
    click.echo(f"dataset       {dataset} ({seqs.source})")
    click.echo(f"#users        {s['users']:,}")
    click.echo(f"#items        {s['items']:,}")
    click.echo(f"#interactions {s['interactions']:,}")
    click.echo(f"sparsity      {100 * s['sparsity']:.2f}%")
    click.echo(f"avg length    {s['avg_length']:.2f}")
    info = DATASETS.get(canonical_name(dataset))
    if info is not None:
        expected = {"users": info.users, "items": info.items, "interactions": info.interactions}
        bad = [f"{k} {s[k]:,} != {v:,}" for k, v in expected.items() if s[k] != v]
        if bad:
            click.echo(f"MISMATCH with the paper's Table 1: {'; '.join(bad)}", err=True)
            sys.exit(1)
        click.echo(f"matches the paper's Table 1 (the paper lists {info.items + 1:,} items: it counts "
                   "the padding id 0 as max_item + 1 code does)")


@data.command("fetch")
@click.argument("dataset")
@click.option("--raw", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Use this already-downloaded raw file instead of downloading.")
@click.option("--force", is_flag=True, help="Overwrite an existing processed file.")
@data_dir_option
@click.pass_context
def data_fetch(ctx: click.Context, dataset: str, raw: str | None, force: bool) -> None:
    """Download DATASET's official raw file and preprocess it into the data directory.

    \b
    Example:
      harness --data-dir data data fetch toys
    """
    from harness.data.fetch import fetch

    path, report = fetch(dataset, ctx.obj["data_dir"], raw=Path(raw) if raw else None, force=force)
    click.echo(f"wrote {path}: {report['users']:,} users, {report['items']:,} items, "
               f"{report['interactions']:,} interactions")
    for m in report.get("mismatches", []):
        click.echo(f"warning: differs from the paper's Table 1: {m}", err=True)


@data.command("synth")
@click.option("--scale", type=click.Choice(["tiny", "toys", "instrument", "cds"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def data_synth(scale: str, seed: int, out: str) -> None:
    """Write a synthetic dataset with planted intents (sized like a real one with --scale)."""
    from dataclasses import replace

    from harness.data.sequences import write_sequences
    from harness.data.synthetic import SCALES, generate

    seqs = generate(replace(SCALES[scale], seed=seed))
    write_sequences(out, seqs)
    click.echo(f"wrote {out}: {len(seqs):,} users, {sum(len(s) for s in seqs):,} interactions")


@cli.command("models")
def list_models() -> None:
    """List the registered models."""
    import models

    for name in models.names():
        click.echo(f"{name:16s} {models.get(name).description}")


# =============================================================================================
# Tuning: `harness tune`, `harness studies`, `harness dashboard`. The logic lives in
# harness/studies.py (study files, storage, objective) and harness/tune.py (studies, workers,
# summary); both are imported inside the commands so that `harness --help` stays fast.
# =============================================================================================

_STORAGE_HELP = ("Journal file (default studies/optuna.journal), sqlite:///FILE.db or "
                 "postgresql://USER@HOST:PORT/DB (env HARNESS_STORAGE).")


def _given_options(ctx: click.Context, **overrides) -> list[str]:
    """The options of `ctx` the user gave on the command line, as argv, with `overrides`
    (None drops one): a worker process re-runs this same command line."""
    from click.core import ParameterSource

    argv: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or not param.expose_value:
            continue  # --stop-after: workers inherit the deadline itself (HARNESS_DEADLINE)
        if param.name in overrides:
            value = overrides[param.name]
        elif ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
            value = ctx.params[param.name]
        else:
            continue
        flag = max(param.opts, key=len)
        if value is None or value is False:
            continue
        if param.is_flag:
            argv.append(flag)
        else:
            for v in value if param.multiple else [value]:
                argv += [flag, str(v)]
    return argv


@cli.command()
@click.option("--dataset", required=True, help="toys, instrument, cds_and_vinyl, synthetic[-SCALE] or a file path.")
@click.option("--study", "study_path", type=click.Path(dir_okay=False), default=None,
              help="Study file (TOML): model, fixed params, search space, budget. Default studies/<model>.toml.")
@click.option("--model", default=None, help="Picks studies/<MODEL>.toml when --study is not given (default igr-sr).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Target number of finished (complete + pruned) trials in the study, counting those "
                   "already stored. Default: the study file's budget.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Start no new trial after this many seconds (per worker).")
@click.option("--storage", envvar="HARNESS_STORAGE", default=None, help=_STORAGE_HELP)
@click.option("--study-name", default=None, help="Default <model>-<dataset>; a stored study of that name is resumed.")
@click.option("--new-study", is_flag=True,
              help="If the named study exists, start a fresh one beside it (<name>-2, ...); the old one is kept.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes on the study; the cores are split between them.")
@click.option("--pruner", type=click.Choice(["hyperband", "median", "none"]), default=None,
              help="Overrides the study file's pruner.")
@click.option("--min-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs a trial trains before it may be pruned (Hyperband's first rung, Median's "
                   "warm-up); overrides the study file. Scale it with a short --epochs cap.")
@click.option("--heartbeat", type=click.IntRange(min=1), default=60, show_default=True,
              help="Database storages: seconds between a running trial's heartbeats; a trial silent for "
                   "3x this long is failed and retried.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="An extra fixed model parameter for every trial (part of the study's definition).")
@click.option("--worker", "worker_index", type=int, default=None, hidden=True)
@stop_after_option
@trainer_options
@results_dir_option
@quiet_option
@click.pass_context
def tune(ctx: click.Context, dataset: str, study_path: str | None, model: str | None, trials: int | None,
         timeout: float | None, storage: str | None, study_name: str | None, new_study: bool, workers: int,
         pruner: str | None, min_epochs: int | None, heartbeat: int, params: tuple[str, ...], worker_index: int | None,
         quiet: bool, **kw) -> None:
    """Tune a model's hyperparameters: an Optuna study (TPE + pruning on validation NDCG@10)
    over the search space of a study file. --epochs is the per-trial epoch cap. Running it
    again resumes the study.

    \b
    Examples:
      harness tune --dataset toys                       # studies/igr-sr.toml, embedded storage
      harness tune --dataset toys --model sasrec --trials 20 --workers 2
      harness tune --dataset toys --storage postgresql://me@dbhost:5432/optuna   # on each machine
    """
    from click.core import ParameterSource

    from harness.config import parse_params
    from harness.progress import choose
    from harness.studies import TuneJob, pick_study_file
    from harness.tune import format_summary
    from harness.tune import tune as run_tune

    study_file = pick_study_file(study_path, model, parse_params(params))
    given = frozenset(name for name in ctx.params if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE)
    job = TuneJob(study_file=study_file, dataset=dataset, base=run_spec(ctx, study_file.model, dataset, (), kw),
                  results_dir=ctx.obj["results_dir"], storage_url=storage, study_name=study_name, trials=trials,
                  timeout=timeout, new_study=new_study, workers=workers, pruner=pruner, min_epochs=min_epochs, heartbeat=heartbeat,
                  given_flags=given)

    def worker_argv(name: str, index: int) -> list[str]:
        return [sys.executable, "-m", "harness", *_given_options(ctx.parent), ctx.info_name,
                *_given_options(ctx, study_name=name, new_study=None, workers=None, worker_index=index)]

    # bars on a terminal, else a line per event and epoch; a worker process: its events only
    progress = choose(quiet, worker=worker_index is not None)
    summary = run_tune(job, worker_argv, worker_index, echo=progress.echo(click.echo), progress=progress)
    if summary is not None:
        _console().print(format_summary(summary), soft_wrap=True)  # paths stay whole, copy-pastable
        if summary.problems and summary.finished < summary.target:
            sys.exit(1)  # a worker gave up or died and the others did not make up for it


@cli.command("studies")
@click.option("--storage", envvar="HARNESS_STORAGE", default=None, help=_STORAGE_HELP)
def studies_command(storage: str | None) -> None:
    """List the stored studies: trials per state and the best validation NDCG@10.

    \b
    Example:
      harness studies --storage postgresql://me@dbhost:5432/optuna
    """
    from harness.tune import format_studies, list_studies

    _console().print(format_studies(list_studies(storage), storage))


@cli.command()
@click.option("--storage", envvar="HARNESS_STORAGE", default=None, help=_STORAGE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@results_dir_option
@click.pass_context
def dashboard(ctx: click.Context, storage: str | None, host: str, port: int, cmd_results_dir: str | None) -> None:
    """Serve optuna-dashboard on the studies (and the trials' artifacts) while they run.

    \b
    Example:
      harness dashboard --port 8080      # then open http://127.0.0.1:8080/dashboard/
    """
    from harness.tune import serve_dashboard

    serve_dashboard(storage, host, port, ctx.obj["results_dir"], echo=click.echo)


# ---- experiments: one command per registered kind (harness/kinds/), and report -------------

_SEEDS = click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
                      help="Seeds per cell: --seed, --seed + 1, ... (2020, 2021, ... by default).")
_PARAMS = click.option("--params", "params_source", default="best", show_default=True,
                       help="best (the best of the first N trials of the dataset's tune study, N its --trials target, "
                            "as harness paper selects; else the paper's defaults), paper, or a TOML/JSON file.")
_STORAGE = click.option("--storage", envvar="HARNESS_STORAGE", default=None,
                        help="Study storage (default studies/optuna.journal).")


def _experiment_command(kind) -> click.Command:
    """`harness KIND`: the shared experiment options, the kind's own, the trainer flags."""
    own = {p.name for p in _params_of(kind.options)}

    @click.pass_context
    def command(ctx: click.Context, dataset: str, seeds: int, params_source: str, storage: str | None, quiet: bool,
                **kw) -> None:
        from click.core import ParameterSource

        from harness.experiments import experiment
        from harness.progress import choose

        options = {k: kw.pop(k) for k in list(kw) if k in own}
        base = run_spec(ctx, "sasrec", dataset.split(",")[0], (), kw)
        # a trainer flag the user gave wins over a model's study-file budget ([trainer] patience)
        given = frozenset(k for k in kw if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE)
        name, made = experiment(kind.name, [d for d in dataset.split(",") if d], seeds, params_source, base, storage,
                                ctx.obj["results_dir"], echo=choose(quiet).echo(click.echo) if quiet else click.echo,
                                given=given, **options)
        for _, tex, table in made:
            _console().print(table)
            click.echo(f"LaTeX: {tex}  (CSV and figures beside it)")
        click.echo(f"study {name!r} in {storage or 'studies/optuna.journal'}; `harness report` rebuilds every table")

    command = results_dir_option(trainer_options(command))
    for option in reversed([click.option("--dataset", required=True, help=kind.dataset_help), *kind.options,
                            _SEEDS, _PARAMS, _STORAGE, stop_after_option, quiet_option]):
        command = option(command)
    return click.command(kind.name, help=kind.help)(command)


def _params_of(decorators) -> list[click.Parameter]:
    def probe():
        pass

    for decorator in decorators:
        probe = decorator(probe)
    return getattr(probe, "__click_params__", [])


def _add_experiment_commands() -> None:
    from harness import kinds

    for name in kinds.names():
        cli.add_command(_experiment_command(kinds.get(name)))


_add_experiment_commands()


@cli.command()
@_STORAGE
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default <results-dir>/report.")
@results_dir_option
@click.pass_context
def report(ctx: click.Context, storage: str | None, out: str | None, cmd_results_dir: str | None) -> None:
    """Write every experiment's LaTeX table, CSV and figures from the stored runs (no retraining).

    \b
    Example:
      harness report --out results/report
    """
    from harness.experiments import report_experiments
    from harness.store import require_existing

    require_existing(storage)  # a mistyped --storage creates no journal, lock or output folder
    target = Path(out) if out else ctx.obj["results_dir"] / "report"
    made = report_experiments(storage, ctx.obj["results_dir"], target)
    for _, tex, table in made:
        _console().print(table)
        click.echo(f"LaTeX: {tex}")
    click.echo(f"{len(made)} experiment(s) reported under {target}" if made else
               "no experiment studies stored yet: run harness ablate / compare / robustness / sensitivity")


# ---- the whole pipeline: harness/paper.py --------------------------------------------------

def _token_counts(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """paper --k/--m: inside IGR-SR's declared ranges, checked before any stage runs (the value
    goes on as given; one that is not comma-separated integers is the plan's to refuse)."""
    from harness.kinds.sensitivity import check_token_counts

    try:
        counts = [int(v) for v in value.split(",") if v]
    except ValueError:
        return value
    if not ctx.resilient_parsing:
        check_token_counts(param.name[:-1], counts)
    return value


@cli.command()
@click.option("--dataset", required=True, help="toys, instrument, cds_and_vinyl, synthetic[-SCALE] or a file path.")
@click.option("--models", "models_", default=None,
              help="Comma-separated models to tune and compare. Default: Table 2's 8 systems and igr-sr.")
@click.option("--trials", type=click.IntRange(min=1), default=12, show_default=True,
              help="Finished trials per model's tuning study (every model the same).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Epoch cap of every tuning trial (every model the same).")
@click.option("--min-epochs", type=click.IntRange(min=1), default=None,
              help="The pruner's first rung for every study. Default: the largest of the study files' "
                   "(ICLRec's and ICSRec's 15), capped at --epochs.")
@click.option("--pruner", type=click.Choice(["hyperband", "median", "none"]), default="hyperband", show_default=True)
@click.option("--lr-trials", type=click.IntRange(min=1), default=6, show_default=True,
              help="Trials of each ablation variant's lr-only study.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Seeds per experiment cell: --seed, --seed + 1, ...")
@click.option("--sensitivity-seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Seeds per cell of the sensitivity grid (k x m cells, each trained to early stop).")
@click.option("--final-epochs", type=click.IntRange(min=1), default=200, show_default=True,
              help="Epoch cap of the experiments' runs, trained to early stop.")
@click.option("--patience", type=click.IntRange(min=1), default=None,
              help="Early-stopping patience of every run. Default: 10, or a study file's [trainer] patience.")
@click.option("--hours", type=float, default=None,
              help="Fit the whole pipeline into this many hours: cut trials, then the epoch cap (not below "
                   "the first rung); the plan says what was cut.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local processes per stage (tune workers, or processes filling a grid).")
@click.option("--storage", envvar="HARNESS_STORAGE", default=None, help=_STORAGE_HELP)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Tables, figures and manifest. Default <results-dir>/paper/<dataset>, or RUN_DIR/report.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="One self-contained folder for the whole run: study journal, run records and per-user "
                   "ranks (no weights), pre-trained encoders, checkpoints of runs in flight, report. Copy it "
                   "anywhere and run the same command there to continue; the report rebuilds from it alone.")
@click.option("--prefix", default="paper", show_default=True, help="Study names: PREFIX-MODEL-DATASET, PREFIX-compare-DATASET...")
@click.option("--stages", default="tune,select,compare,ablate,sensitivity,robustness,report", show_default=True,
              help="The stages to run, in this order; each resumes from the stores.")
@click.option("--k", "ks", default="2,4,8,16,32", show_default=True, callback=_token_counts,
              help="Sensitivity: prefix token counts.")
@click.option("--m", "ms", default="1,2,3,4,5", show_default=True, callback=_token_counts,
              help="Sensitivity: intent token counts.")
@click.option("--noise", type=click.FloatRange(0, 1, min_open=True), default=0.2, show_default=True)
@click.option("--noise-on", type=click.Choice(["all", "train", "eval"]), default="all", show_default=True,
              help="Robustness: which histories carry the noise (see harness robustness --help).")
@click.option("--robustness-models", default="sasrec,igr-sr", show_default=True)
@click.option("--no-bench", is_flag=True, help="Do not measure costs for the ETA: cached figures, else rough defaults.")
@click.option("--bench-batches", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan and exit.")
@click.option("--seed", type=int, default=2020, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--lid-epochs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--worker", "worker_index", type=int, default=None, hidden=True)
@stop_after_option
@results_dir_option
@click.pass_context
def paper(ctx: click.Context, dataset: str, models_: str | None, storage: str | None, out: str | None,
          run_dir: str | None, stages: str, cmd_results_dir: str | None,
          patience: int | None, seed: int, device: str, precision: str, lid_epochs: int, worker_index: int | None,
          no_bench: bool, **kw) -> None:
    """The paper's pipeline on one dataset, resumable: tune every model under one budget, then
    compare, ablate, sensitivity, robustness and report (tables, figures, manifest). Prints the
    plan (runs, epochs, ETA) first; rerunning the same command continues where it stopped.

    \b
    Example:
      harness paper --dataset toys --trials 12 --epochs 30 --seeds 3 --dry-run
    """
    from click.core import ParameterSource

    from harness.paper import PaperJob, run_paper

    train = {"epochs": 200, "patience": patience or 10, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.0,
             "seed": seed, "device": device, "precision": precision, "mask_history": False, "max_len": 50,
             "cmd_data_dir": None, "lid_epochs": lid_epochs}
    given = frozenset(n for n in ctx.params if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE)
    job = PaperJob(dataset=dataset, base=run_spec(ctx, "igr-sr", dataset, (), train),
                   results_dir=ctx.obj["results_dir"], models=[m for m in (models_ or "").split(",") if m] or None,
                   storage=storage, out=Path(out) if out else None, stages=tuple(s for s in stages.split(",") if s),
                   bench=not no_bench, worker=worker_index, given=given, run_dir=Path(run_dir) if run_dir else None,
                   argv=tuple(_given_options(ctx, worker_index=None)), **kw)

    def worker_argv(stage: str, index: int, overrides: dict) -> list[str]:
        return [sys.executable, "-m", "harness", *_given_options(ctx.parent), ctx.info_name,
                *_given_options(ctx, stages=stage, worker_index=index, workers=None, hours=None, dry_run=None,
                                **overrides)]

    made = run_paper(job, worker_argv, echo=click.echo, console=_console())
    for _, tex, table in made:
        _console().print(table)
        click.echo(f"LaTeX: {tex}")
