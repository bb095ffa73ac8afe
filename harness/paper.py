"""`harness paper`: the paper's whole pipeline on one dataset, as one resumable command.

Stages, each made of what the single commands run (the same functions, the same storage):
- tune: every model's study (the 8 systems of Table 2 and IGR-SR), each from its own study file
  but under one budget: the same number of trials, epoch cap, pruner and first rung (the files'
  own trial counts, caps and first rungs are overridden, and the manifest says so);
- compare (Table 2): each model at its best trial over S seeds, trained to early stop;
- ablate (Figure 2): first one small lr-only study per variant (the full model included), then
  the variants over S seeds, each at IGR-SR's best parameters and its own tuned lr;
- sensitivity (Figure 3): IGR-SR at its best parameters over a k x m grid (--sensitivity-seeds,
  1 by default: the grid is the pipeline's largest stage otherwise);
- robustness (Table 3): clean and noisy cells of the listed models;
the clean robustness cells, and the sensitivity cell at IGR-SR's tuned k and m, are the very runs
compare made (same key: model, data, parameters, seed, trainer): they are copied, not retrained;
- report: every table and figure, the tuning overview and a manifest under the output folder.

Resumable because the stores are: a tune study holding its target of finished trials runs
nothing, an experiment grid runs only the cells not COMPLETE. The only file of the pipeline's
own is the manifest (commit, data hash, versions, budgets, each stage's command and wall time),
rewritten after every stage; nothing is read back from it to decide what to run.

Equal budget, precisely: a model's parameters are those of its best COMPLETE trial among the
first N finished (COMPLETE + PRUNED, by trial number) trials of its study, so that workers or
machines overshooting the target never give one model more trials than another. The study
file's [fixed] values are part of them (the tuning trials ran with them).

The plan (job, checks, costs, ETA, the --hours cut) is harness/paper_plan.py; this file runs it.
The ETA comes from each model's measured cost on this machine (`harness bench` in a child
process, cached under the cache directory per model, data, precision, device and threads), or,
with --no-bench and nothing cached, from rough defaults (the README's Toys figures scaled by
the dataset's size). --hours H cuts the trials first, then the epoch cap (never below the first
rung), to fit the whole pipeline, done runs included (so that a rerun makes the same cut).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness import stopping
from harness.errors import HarnessError
from harness.paper_plan import (PROPOSED, LR_RANGE, VARIANT_POLICY, PaperJob, Budget, Cost, Item, StagePlan,
                                first_params, tuned, untuned,
                                _split, _ints, variants, check, measure_costs, _study_file,
                                default_first_rung, _patience, build_plan, total_seconds, fit_budget,
                                format_duration, format_plan, _write_text, _n)


def fill_done(job: PaperJob, plans: list[StagePlan], budget: Budget) -> None:
    """Runs already in the stores, per item (nothing opened or created when no store exists)."""
    import optuna

    from harness.experiments import completed_cells
    from harness.store import DEFAULT_STORAGE, open_storage

    url = job.storage or DEFAULT_STORAGE
    if "://" not in url and not Path(url).exists():
        return
    storage = open_storage(job.storage)
    stored = set(optuna.study.get_all_study_names(storage))
    lr_names = lr_study_names(job, budget, storage, stored) if any(p.name == "ablate" for p in plans) else {}
    for plan in plans:
        for item in plan.items:
            if item.study is None and item.tuning:
                item.study = lr_names.get(item.model)
            if item.study is None or item.study not in stored:
                continue
            study = optuna.load_study(study_name=item.study, storage=storage)
            if item.tuning:
                item.done = min(finished(study), item.runs)
            elif "experiment" in study.user_attrs:
                if plan.name == "select":  # two candidates per model, one where they are the same
                    item.runs = len(set(study.user_attrs["experiment"]["cells"]))
                item.done = min(len(completed_cells(study)), item.runs)


_FINISHED_RUN = re.compile(r"^(\[w\d+\] )?trial \d+ (complete|pruned)|^  test recall@10 ")


_COPIED = re.compile(r"^\S+: (\d+) cells? copied from")


class Progress:
    """One line per finished run: the stage, runs done / total (stage and all), ETA. The ETA
    rescales the plan's estimate of what is left by how long this invocation's runs took
    against their estimate."""

    def __init__(self, plans: list[StagePlan], workers: int, console):
        self.plans, self.workers, self.console = plans, workers, console
        self.started: float | None = None
        self.planned_done = 0.0
        self.last: tuple | None = None  # what the last line said: a line repeats only with news

    def eta(self) -> float:
        left = sum(p.remaining_seconds() for p in self.plans)
        if self.planned_done > 0 and self.started is not None:
            return left * (time.monotonic() - self.started) / self.planned_done
        return left / self.workers

    def echo(self, plan: StagePlan, item: Item, echo: Callable[[str], None]) -> Callable[[str], None]:
        if self.started is None:
            self.started = time.monotonic()

        def line(text: str) -> None:
            echo(text)
            copied = _COPIED.match(text)
            if copied:
                item.done = min(item.done + int(copied.group(1)), item.runs)
                self.show(plan, item)
            elif _FINISHED_RUN.match(text) and item.done < item.runs:
                item.done += 1
                self.planned_done += item.per_run
                self.show(plan, item)

        return line

    def show(self, plan: StagePlan, item: Item | None = None) -> None:
        index = next(i for i, p in enumerate(self.plans, 1) if p is plan)
        state = (plan.name, plan.done, sum(p.done for p in self.plans))
        if state == self.last:
            return
        self.last = state
        part = f" {item.label}" if item is not None and item.label != plan.name else ""
        self.console.print(
            f"[bold cyan]paper[/] stage {index}/{len(self.plans)} [bold]{plan.name}[/]{part}: "
            f"{plan.done}/{plan.runs} runs; all stages {sum(p.done for p in self.plans)}/"
            f"{sum(p.runs for p in self.plans)}; ETA {format_duration(self.eta())}", soft_wrap=True, highlight=False)


def finished(study) -> int:
    from harness.studies import budget_trials

    return len(budget_trials(study))


def best_of_first(storage, name: str, n: int):
    """The best COMPLETE trial among the study's first `n` budget trials (studies.budget_trials)."""
    import optuna

    from harness.studies import best_of, budget_trials

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise HarnessError(f"study {name!r} does not exist: run the tune stage first") from None
    first = budget_trials(study, n)
    if len(first) < n:
        raise HarnessError(f"study {name!r} has {len(first)} of {n} finished trials: run the tune stage first")
    best = best_of(first)
    if best is None:
        raise HarnessError(f"study {name!r}: none of its first {n} trials completed (pruned or failed); raise --trials")
    return best


def tuned_params(job: PaperJob, budget: Budget, storage, model: str) -> tuple[dict[str, Any], Any]:
    """A model's parameters for the experiments: its study file's [fixed] values and its best
    trial's (the trials ran with both)."""
    best = best_of_first(storage, job.study(model), budget.trials)
    return {**_study_file(model).fixed, **best.params}, best


SELECT_RULE = ("each model's configuration is the better, by validation NDCG@10 of a run trained to early stop "
               "(the model's own patience) on the tuning seed, of its authors' settings (its study file's first "
               "enqueued trial) and its best tuning trial (among the first N of its study); ties go to the authors' "
               "settings. So no model ends below its authors' settings because the tuning cap was short")


def selection_candidates(job: PaperJob, budget: Budget, storage, model: str) -> dict[str, dict[str, Any]]:
    """"authors" and "tuned" parameters of a model (one entry when they are the same)."""
    authors = first_params(model)
    best, _ = tuned_params(job, budget, storage, model)
    return {"authors": authors} if best == authors else {"authors": authors, "tuned": best}


def selection(job: PaperJob, budget: Budget, storage, model: str) -> dict[str, Any]:
    """The select stage's outcome for one model: which candidate won, both validation NDCG@10,
    the margin, and the winner's parameters. Raises until the stage has run its cells."""
    import optuna

    from harness.experiments import completed_cells

    name = job.study("select")
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise HarnessError(f"study {name!r} does not exist: run the select stage first") from None
    by_params = {json.dumps(t.user_attrs.get("cell_info", {}).get("params", {}), sort_keys=True): t
                 for t in completed_cells(study) if t.user_attrs.get("cell_info", {}).get("model") == model}
    found: dict[str, Any] = {}
    for which, params in selection_candidates(job, budget, storage, model).items():
        kept = _kept_params(model, params)
        trial = by_params.get(json.dumps(kept, sort_keys=True))
        if trial is None:
            raise HarnessError(f"{model}: the select stage has not run its {which} candidate yet: run it first")
        found[which] = (params, trial)
    winner = "tuned" if "tuned" in found and found["tuned"][1].value > found["authors"][1].value else "authors"
    out = {"chosen": winner, "params": found[winner][0],
           **{f"valid_ndcg@10_{w}": t.value for w, (_, t) in found.items()},
           **{f"test_ndcg@10_{w}": t.user_attrs.get("test", {}).get("ndcg@10") for w, (_, t) in found.items()},
           **{f"stopped_{w}": t.user_attrs.get("stopped") for w, (_, t) in found.items()}}
    if "tuned" in found:
        out["margin"] = found["tuned"][1].value - found["authors"][1].value
    else:
        out["note"] = "the best tuning trial is the authors' settings"
    return out


def _kept_params(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a cell stores of `params` (experiments.params_for keeps config fields and trainer keys)."""
    import models

    from harness.runs import TRAINER_KEYS

    spec = models.get(model)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    return {k: v for k, v in params.items() if (k in fields or k in TRAINER_KEYS) and k not in spec.fixed}


def selected_params(job: PaperJob, budget: Budget, storage, model: str) -> dict[str, Any]:
    """A model's parameters for the experiments: the select stage's winner ({} for a model
    with nothing to tune)."""
    if untuned(model):
        return {}
    if "select" not in job.stages:  # --stages without select: the best tuning trial, as the captions say
        return tuned_params(job, budget, storage, model)[0]
    return selection(job, budget, storage, model)["params"]


def stage_select(ctx: Context) -> None:
    """Per tuned model: its authors' settings and its best tuning trial, each trained to early
    stop (final epoch cap, the model's patience) on the tuning seed, outside the final seeds."""
    from harness.experiments import grid
    from harness.runs import train_identity

    job, budget = ctx.job, ctx.budget
    storage = ctx.storage()
    base = dataclasses.replace(job.final_base(), train=dataclasses.replace(job.final_base().train,
                                                                           seed=job.base.train.seed))
    cells, notes = [], []
    names = tuned(ctx.names)
    for model in names:
        for which, params in selection_candidates(job, budget, storage, model).items():
            path = write_params(job, f"select-{model}-{which}", params)
            more, _ = grid([model], [job.dataset], 1, str(path), storage, first_seed=job.base.train.seed,
                           train=train_identity(base.train, drop=("seed",)), given=job.final_given)
            cells += more
            notes.append(f"{model} on {job.dataset}: {which} candidate ({SELECT_RULE})")
    plan = ctx.plan("select")
    item = plan.items[0]
    item.runs = len(cells)
    _run_grid(ctx, plan, item, "select", cells, notes, names, [*_group_argv(job), "paper", "--stages", "select"],
              base=base)
    chosen = {m: selection(job, budget, storage, m) for m in names}
    for model, result in chosen.items():
        margin = f" by {result['margin']:+.4f}" if "margin" in result else ""
        ctx.echo(f"{model}: {result['chosen']} settings chosen{margin} (valid ndcg@10 "
                 + ", ".join(f"{w} {result[f'valid_ndcg@10_{w}']:.4f}" for w in ("authors", "tuned")
                             if f"valid_ndcg@10_{w}" in result) + ")")
    if ctx.manifest is not None:
        ctx.manifest.data["selection"] = {"rule": SELECT_RULE, "seed": job.base.train.seed,
                                          "models": {m: {k: v for k, v in r.items() if k != "params"}
                                                     for m, r in chosen.items()}}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise HarnessError(f"cannot write {value!r} into a study file")


def lr_study_file(job: PaperJob, budget: Budget, variant: str, full: dict[str, Any],
                  write: bool = True) -> tuple[Path, str]:
    """The study file of one variant's lr study: IGR-SR's best parameters fixed (less the
    variant's pinned ones), lr searched over IGR-SR's lr range, the tuned lr enqueued first.
    Its study name carries a hash of those parameters: a changed best makes a new study."""
    import models

    base = _study_file(PROPOSED)
    pinned = models.get(variant).fixed
    lr_param = next((p for p in base.space if p.name == "lr"), None)
    low, high = (lr_param.low, lr_param.high) if lr_param is not None and lr_param.type == "float" else LR_RANGE
    fixed = {k: v for k, v in full.items() if k != "lr" and k not in pinned}
    lr = full.get("lr", job.base.train.lr)
    digest = hashlib.sha256(json.dumps({"fixed": fixed, "lr": [low, high]}, sort_keys=True).encode()).hexdigest()[:8]
    sampler = base.sampler[0] if not base.sampler[1] else {"name": base.sampler[0], **base.sampler[1]}
    pruner = base.pruner[0] if not base.pruner[1] else {"name": base.pruner[0], **base.pruner[1]}
    lines = [f"# Written by `harness paper` (the ablation's lr study of {variant}): {VARIANT_POLICY}.",
             f"model = {_toml_value(variant)}",
             f"description = {_toml_value(f'{variant}: lr only, at the best parameters of {job.study(PROPOSED)}')}",
             f"trials = {budget.lr_trials}", f"sampler = {_toml_value(sampler)}", f"pruner = {_toml_value(pruner)}",
             "", "[fixed]", *(f"{k} = {_toml_value(v)}" for k, v in fixed.items()),
             "", "[space]", f'lr = {{ type = "float", low = {low!r}, high = {high!r}, log = true }}']
    if low <= lr <= high:
        lines += ["", "[[enqueue]]", f"lr = {lr!r}"]
    path = job.out_dir / "studies" / f"{variant.replace('/', '_')}-lr.toml"
    if write:
        _write_text(path, "\n".join(lines) + "\n")
    return path, f"{job.study(variant)}-lr-{digest}"


def lr_study_names(job: PaperJob, budget: Budget, storage, stored: set[str]) -> dict[str, str]:
    """variant -> its lr study's name, once IGR-SR's tuning study holds its budget."""
    if job.study("select") not in stored or job.study(PROPOSED) not in stored:
        return {}
    try:
        full = selected_params(job, budget, storage, PROPOSED)
    except HarnessError:
        return {}
    return {v: lr_study_file(job, budget, v, full, write=False)[1] for v in variants()}


def write_params(job: PaperJob, name: str, params: dict[str, Any]) -> Path:
    """A flat parameter file (`--params FILE` of the experiment commands) for one model."""
    path = job.out_dir / "params" / f"{name.replace('/', '_')}.json"
    _write_text(path, json.dumps(params, indent=1, sort_keys=True) + "\n")
    return path


def _group_argv(job: PaperJob) -> list[str]:
    return ["--data-dir", str(job.base.data_dir), "--cache-dir", str(job.base.cache_dir),
            "--results-dir", str(job.results_dir)]


def _trainer_argv(job: PaperJob, final: bool) -> list[str]:
    train = job.base.train
    seed = job.final_seeds[0] if final else train.seed
    argv = ["--device", train.device, "--precision", train.precision, "--seed", str(seed),
            "--lid-epochs", str(job.base.lid_epochs)]
    if "patience" in job.given:
        argv += ["--patience", str(train.patience)]
    if final and "final_epochs" in job.given:
        argv += ["--epochs", str(job.final_epochs)]
    return argv


def _storage_argv(job: PaperJob) -> list[str]:
    return ["--storage", job.storage] if job.storage else []


def tune_argv(job: PaperJob, budget: Budget, study_name: str, model: str | None, study_path: Path | None,
              trials: int) -> list[str]:
    """`harness tune` for one study of the pipeline (without the program name)."""
    which = ["--model", model] if model else ["--study", str(study_path)]
    return [*_group_argv(job), "tune", "--dataset", job.dataset, *which, "--study-name", study_name,
            "--trials", str(trials), "--epochs", str(budget.epochs), "--pruner", budget.pruner,
            "--min-epochs", str(budget.first_rung), *_storage_argv(job), *_trainer_argv(job, final=False)]


def _command(argv: list[str]) -> str:
    from harness.store import safe_url

    return shlex.join(["harness", *(safe_url(a) if "://" in a else a for a in argv)])


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """results/paper/NAME/manifest.json: what ran, how and how long; rewritten after each stage."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("stages", {})

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {"wall_seconds": 0.0, "sessions": []})

    def save(self) -> None:
        ordered = {**{k: v for k, v in self.data.items() if k != "stages"}, "stages": self.data["stages"]}
        _write_text(self.path, json.dumps(ordered, indent=2, default=str) + "\n")


def _environment(job: PaperJob, data, threads: int) -> dict:
    from harness.runs import environment

    env = environment()
    env["threads_per_worker"] = threads
    return {"commit": env.pop("git_commit"), "dataset": job.dataset, "data_hash": data.content_hash,
            "data": {"users": data.n_users, "items": int(data.n_items), "interactions": data.n_interactions},
            "environment": env, "precision": job.base.train.precision, "device": job.base.train.device}


@dataclass
class Context:
    job: PaperJob
    names: list[str]
    budget: Budget
    plans: list[StagePlan]
    progress: Progress
    manifest: Manifest | None
    echo: Callable[[str], None]
    worker_argv: Callable[[str, int, dict], list[str]] | None
    costs: dict[str, Cost] = field(default_factory=dict)  # each model's measured cost (the plan's)
    commands: list[str] = field(default_factory=list)  # the running stage's command-equivalents
    outputs: list[str] = field(default_factory=list)

    def plan(self, name: str) -> StagePlan:
        return next(p for p in self.plans if p.name == name)

    def storage(self):
        from harness.store import open_storage

        return open_storage(self.job.storage)


def _tune_one(ctx: Context, plan: StagePlan, item: Item, study_file, model: str | None, path: Path | None,
              trials: int) -> None:
    from harness.studies import TuneJob
    from harness.tune import tune as run_tune

    job, budget = ctx.job, ctx.budget
    argv = tune_argv(job, budget, item.study, model, path, trials)
    ctx.commands.append(_command(argv))
    tj = TuneJob(study_file=study_file, dataset=job.dataset,
                 base=dataclasses.replace(job.tune_base(budget), model=study_file.model),
                 results_dir=job.results_dir, storage_url=job.storage, study_name=item.study, trials=trials,
                 workers=job.workers, pruner=budget.pruner, min_epochs=budget.first_rung,
                 given_flags=job.tune_given,
                 epoch_seconds=ctx.costs[study_file.model].epoch if study_file.model in ctx.costs else None)

    def worker(name: str, index: int) -> list[str]:
        return [sys.executable, "-m", "harness", *argv, "--worker", str(index)]

    while True:
        try:
            summary = run_tune(tj, worker, None, echo=ctx.progress.echo(plan, item, ctx.echo))
        except HarnessError as e:
            if "different definition" not in str(e):
                raise
            # a study file (search space, fixed values) changed since the study was made
            raise HarnessError(f"{str(e).split('; rerun with --new-study')[0]}; for harness paper: give another "
                               "--prefix to start fresh studies beside the old ones") from None
        if not settle(ctx, item.study, trials):
            break  # else a dead worker's trial waits for its retry: tune again, which runs it
    if summary.finished < trials:
        raise HarnessError(f"tune {study_file.model}: study {item.study!r} has {summary.finished} of {trials} "
                           f"finished trials ({'; '.join(summary.problems) or 'stopped early'}); rerun to continue")
    item.done = min(summary.finished, item.runs)
    best = summary.best
    ctx.echo(f"{study_file.model}: {_n(summary.finished, 'trial')} finished ({summary.counts.get('complete', 0)} complete, "
             f"{summary.counts.get('pruned', 0)} pruned)" + (f"; best trial {best['number']}, valid ndcg@10 "
                                                            f"{best['value']:.4f}" if best else ""))


WAIT = 10.0  # seconds between looks at trials another machine runs


def settle(ctx: Context, name: str, trials: int) -> bool:
    """Wait until no trial numbered below the study's `trials`-th finished one still runs (on
    another machine: this one's tune waits for its own workers), since such a trial, once
    finished, would be one of the first `trials` and might change the best. True when a dead
    worker's trial was enqueued again instead, which tune must run."""
    import optuna
    from optuna.trial import TrialState

    from harness.store import pending_retries, recover

    study = optuna.load_study(study_name=name, storage=ctx.storage())
    said = False
    while True:
        recover(study)
        if pending_retries(study):
            return True
        done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                      key=lambda t: t.number)
        if len(done) < trials:
            return False
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number < done[trials - 1].number]
        if not running:
            return False
        if not said:
            ctx.echo(f"{name}: waiting for {_n(len(running), 'earlier trial')} still running elsewhere "
                     f"({', '.join(str(t.number) for t in running)}): they count among the first {trials}")
            said = True
        _sleep(WAIT)


_sleep = time.sleep  # tests replace it


def stage_tune(ctx: Context) -> None:
    from harness.studies import pick_study_file

    plan = ctx.plan("tune")
    waiting: list[str] = []
    for item, model in zip(plan.items, tuned(ctx.names)):
        try:
            _tune_one(ctx, plan, item, pick_study_file(None, model, {}), model, None, ctx.budget.trials)
        except stopping.NoRoom as e:
            # this model's next trial does not fit before the deadline: a shorter one of the
            # next model's may (short runs near the deadline); the rest waits for the resume
            ctx.echo(f"{model}: {e}")
            waiting.append(model)
    if waiting:
        raise stopping.NoRoom(f"tune: the next trial of {', '.join(waiting)} would not finish before the deadline")


def _run_grid(ctx: Context, plan: StagePlan, item: Item, kind: str, cells: list, notes: list[str],
              models_: list[str], command: list[str], reuse: tuple[str, ...] = (), base=None) -> None:
    """Run one experiment grid as its command would (check, claim and run the missing cells;
    with --workers, that many processes fill it), and insist that it is whole."""
    from types import SimpleNamespace

    from harness.experiments import check_runnable, completed_cells, run_experiment
    from harness.runs import train_identity
    from harness.tune import run_worker_processes

    job = ctx.job
    base = base or job.final_base()
    ctx.commands.append(_command(command))
    check_runnable(cells, base, job.results_dir, "paper", models_)
    echo = ctx.progress.echo(plan, item, ctx.echo)
    if job.workers > 1 and job.worker is None and ctx.worker_argv is not None:
        overrides = {"trials": ctx.budget.trials, "epochs": ctx.budget.epochs, "lr_trials": ctx.budget.lr_trials,
                     "min_epochs": ctx.budget.first_rung, "no_bench": True}
        problems = run_worker_processes(SimpleNamespace(workers=job.workers, base=job.base),
                                        lambda i: ctx.worker_argv(plan.name, i, overrides), echo)
        for problem in problems:
            echo(f"warning: {problem}; the cells it left are run here")
    study = run_experiment(kind, item.study, cells, base, job.storage, job.results_dir, notes, echo, reuse=reuse,
                           estimate=lambda cell: item.per_run)
    train = train_identity(base.train, drop=("seed",))
    keys = {c.key(train) for c in cells}
    done = len(completed_cells(study))
    item.done = min(done, item.runs)
    if done < len(keys):
        from optuna.trial import TrialState

        reasons = [t.user_attrs.get("fail_reason", "?") for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if t.user_attrs.get("cell") in keys]
        raise HarnessError(f"{plan.name}: {len(keys) - done} of {len(keys)} cells of study {item.study!r} failed"
                           + (f" (last: {reasons[-1]})" if reasons else "") + "; rerun to run them again")


def _cells(ctx: Context, kind: str, params: dict[str, Path], storage, seeds: int | None = None,
           **options) -> tuple[list, list[str]]:
    """The grid of `kind` as its command builds it (experiments.grid), each model with its own
    parameter file."""
    from harness import kinds
    from harness.experiments import grid
    from harness.runs import train_identity

    job = ctx.job
    base = job.final_base()
    axes = kinds.get(kind).axes(**options)
    cells: list = []
    for model in axes.models:
        more, _ = grid([model], [job.dataset], seeds or job.seeds, str(params[model]), storage, noise=axes.noise,
                       extra=axes.extra, first_seed=base.train.seed, noise_on=axes.noise_on,
                       train=train_identity(base.train, drop=("seed",)), given=job.final_given)
        cells += more
    return cells, axes.models


def _experiment_argv(ctx: Context, kind: str, params: Path, *options: str, seeds: int | None = None) -> list[str]:
    job = ctx.job
    return [*_group_argv(job), kind, "--dataset", job.dataset, *options, "--seeds", str(seeds or job.seeds),
            "--params", str(params), *_storage_argv(job), *_trainer_argv(job, final=True)]


def _tuned_files(ctx: Context, storage, names: list[str]) -> tuple[dict[str, Path], Path]:
    """Each model's tuned parameters as a flat file, and all of them as one sectioned file."""
    job, budget = ctx.job, ctx.budget
    params, files = {}, {}
    for model in names:
        params[model] = selected_params(job, budget, storage, model)
        files[model] = write_params(job, model, params[model])
    path = job.out_dir / "params" / "tuned.json"
    _write_text(path, json.dumps(params, indent=1, sort_keys=True) + "\n")
    return files, path


def _tuned_origin(ctx: Context) -> str:
    b = ctx.budget
    text = (f"each model's best trial (by validation NDCG@10) among the first {_n(b.trials, 'finished trial')} of "
            f"its own tuning study, every study under one budget (at most {b.epochs} epochs per trial, {b.pruner} "
            f"pruning from epoch {b.first_rung})")
    if "select" in ctx.job.stages:
        text += (f", or its authors' settings where those did better trained to early stop on the tuning seed "
                 f"{ctx.job.base.train.seed} (the select stage)")
    else:
        text += " (the select stage, which weighs it against the authors' settings, was left out)"
    return text + (f"; runs on seeds {', '.join(map(str, ctx.job.final_seeds))}, disjoint from the tuning seed "
                   f"{ctx.job.base.train.seed}")


def stage_compare(ctx: Context) -> None:
    storage = ctx.storage()
    files, combined = _tuned_files(ctx, storage, ctx.names)
    cells, models_ = _cells(ctx, "compare", files, storage, models_=",".join(ctx.names))
    notes = [f"{m} on {ctx.job.dataset}: {_tuned_origin(ctx)}" for m in models_]
    plan = ctx.plan("compare")
    _run_grid(ctx, plan, plan.items[0], "compare", cells, notes, models_,
              _experiment_argv(ctx, "compare", combined, "--models", ",".join(ctx.names)))


def stage_ablate(ctx: Context) -> None:
    from harness.studies import load_study_file

    job, budget = ctx.job, ctx.budget
    storage = ctx.storage()
    full = selected_params(job, budget, storage, PROPOSED)
    plan = ctx.plan("ablate")
    files: dict[str, Path] = {}
    chosen: dict[str, dict] = {}
    for item, variant in zip(plan.items, variants()):
        path, item.study = lr_study_file(job, budget, variant, full)
        _tune_one(ctx, plan, item, load_study_file(path), None, path, budget.lr_trials)
        best = best_of_first(storage, item.study, budget.lr_trials)
        chosen[variant] = {**{k: v for k, v in full.items() if k != "lr"}, **best.params}
        files[variant] = write_params(job, f"ablate-{variant}", chosen[variant])
        ctx.echo(f"{variant}: lr {best.params['lr']:.3g} (valid ndcg@10 {best.value:.4f}, trial {best.number} of "
                 f"{item.study})")
    cells, models_ = _cells(ctx, "ablate", files, storage, variants=",".join(variants()))
    b = budget
    origin = (f"IGR-SR's best tuning trial (the best by validation NDCG@10 among the first {_n(b.trials, 'finished trial')}"
              f" of its study: at most {b.epochs} epochs per trial, {b.pruner} pruning from epoch {b.first_rung}) but "
              f"its learning rate, which is tuned per variant, the full model alike, in an lr-only study of "
              f"{_n(b.lr_trials, 'trial')} under the same budget (the full model's tuned lr enqueued first), since "
              "one lr tuned for the full model stalls the variants without ICR")
    notes = [f"{v} on {job.dataset}: {origin}" for v in models_]
    command = [*_group_argv(job), "ablate", "--dataset", job.dataset, "--variants", ",".join(variants()),
               "--seeds", str(job.seeds), "--params", str(job.out_dir / "params" / "ablate-VARIANT.json"),
               *_storage_argv(job), *_trainer_argv(job, final=True)]
    ctx.outputs.append(f"ablate: `harness ablate` reads one parameter set for all variants; the pipeline builds "
                       f"the same grid with each variant's own file ({job.out_dir / 'params'}/ablate-*.json)")
    _run_grid(ctx, plan, plan.items[-1], "ablate", cells, notes, models_, command)


def stage_sensitivity(ctx: Context) -> None:
    storage = ctx.storage()
    files, _ = _tuned_files(ctx, storage, [PROPOSED])
    ks, ms = _ints("--k", ctx.job.ks), _ints("--m", ctx.job.ms)
    seeds = ctx.job.sensitivity_seeds
    cells, models_ = _cells(ctx, "sensitivity", files, storage, seeds=seeds, ks=ks, ms=ms)
    notes = [f"{PROPOSED} on {ctx.job.dataset}: {_tuned_origin(ctx)}; k and m as the grid says"]
    plan = ctx.plan("sensitivity")
    _run_grid(ctx, plan, plan.items[0], "sensitivity", cells, notes, models_,
              _experiment_argv(ctx, "sensitivity", files[PROPOSED], "--k", ",".join(map(str, ks)),
                               "--m", ",".join(map(str, ms)), seeds=seeds),
              reuse=(ctx.job.study("compare"),))


def stage_robustness(ctx: Context) -> None:
    job = ctx.job
    storage = ctx.storage()
    rob = _split(job.robustness_models)
    files, combined = _tuned_files(ctx, storage, rob)
    cells, models_ = _cells(ctx, "robustness", files, storage, noise=job.noise, noise_on=job.noise_on,
                            models_=",".join(rob))
    notes = [f"{m} on {job.dataset}: {_tuned_origin(ctx)}" for m in models_]
    plan = ctx.plan("robustness")
    _run_grid(ctx, plan, plan.items[0], "robustness", cells, notes, models_,
              _experiment_argv(ctx, "robustness", combined, "--models", ",".join(rob), "--noise", f"{job.noise:g}",
                               "--noise-on", job.noise_on),
              reuse=(job.study("compare"),))


def stage_report(ctx: Context) -> list:
    """Every experiment table and figure of the pipeline, the tuning studies' top-trial tables
    and a tuning overview, under the output folder."""
    import optuna

    from harness.experiments import report_experiments

    job = ctx.job
    out = job.out_dir
    out.mkdir(parents=True, exist_ok=True)
    storage = ctx.storage()
    stored = set(optuna.study.get_all_study_names(storage))
    ctx.commands.append(_command([*_group_argv(job), "report", "--out", str(out), *_storage_argv(job)])
                        + f"  (the pipeline renders only its own studies: {job.prefix}-*-{job.data_name})")
    made = []
    for kind in ("compare", "ablate", "sensitivity", "robustness"):
        if job.study(kind) in stored:
            made += report_experiments(job.storage, job.results_dir, out, only=job.study(kind))
    tuning = tuning_overview(ctx, storage, stored)
    tuning += compute_summary(ctx, storage, stored)
    for _, tex, _ in made:
        ctx.outputs.append(str(tex))
    ctx.outputs += tuning
    return made


def _trial_seconds(t) -> float:
    """What a run cost: its epochs' own seconds where recorded (resumed parts included), else
    its wall time from start to end (a stopped and resumed trial's start is its last resume)."""
    if t.user_attrs.get("train_seconds") is not None:
        return float(t.user_attrs["train_seconds"])
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return 0.0


def compute_summary(ctx: Context, storage, stored: set[str]) -> list[str]:
    """compute.csv and the manifest's "compute": per model and stage, runs, epochs and hours,
    and the pre-trainings (IGR-SR's LID encoders, LARES's stage 1) apart, since the equal tuning
    budget does not cover them."""
    import optuna
    import pandas as pd
    from optuna.trial import TrialState

    job = ctx.job
    rows, pre = [], {}
    studies = [("tune", m, job.study(m)) for m in tuned(ctx.names)] + \
              [(kind, None, job.study(kind)) for kind in ("select", "compare", "ablate", "sensitivity", "robustness")]
    for stage, model, name in studies:
        if name not in stored:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()
                    and not t.user_attrs.get("reused_from")]
        by_model: dict[str, list] = {}
        for t in finished:
            by_model.setdefault(model or t.user_attrs.get("cell_info", {}).get("model", "?"), []).append(t)
            p = t.user_attrs.get("pretrain") or ({"key": t.user_attrs["lid_key"]} if t.user_attrs.get("lid_key") else None)
            if p and p.get("key"):
                pre.setdefault(p["key"], {**p, "model": model or t.user_attrs.get("cell_info", {}).get("model")})
        for m, trials in by_model.items():
            rows.append({"model": m, "stage": stage, "runs": len(trials),
                         "complete": sum(t.state == TrialState.COMPLETE for t in trials),
                         "epochs": sum(int(t.user_attrs.get("epochs") or 0) for t in trials),
                         "hours": round(sum(_trial_seconds(t) for t in trials) / 3600, 3)})
    for key, p in pre.items():
        rows.append({"model": p.get("model"), "stage": "pre-training", "runs": 1, "complete": 1,
                     "epochs": p.get("epochs_run"), "hours": None if p.get("seconds") is None
                     else round(p["seconds"] / 3600, 3), "key": key})
    if not rows:
        return []
    frame = pd.DataFrame(rows)
    path = job.out_dir / "compute.csv"
    frame.to_csv(path, index=False)
    if ctx.manifest is not None:
        totals = frame[frame["stage"] != "pre-training"].groupby("model")[["epochs", "hours"]].sum()
        ctx.manifest.data["compute"] = {
            "note": "per model: epochs and hours trained in this run's stages (copied cells not counted); "
                    "pre-trainings apart (hours unknown for ones made before their seconds were recorded)",
            "models": {m: {"epochs": int(r.epochs), "hours": round(float(r.hours), 2)} for m, r in totals.iterrows()},
            "pretraining": [{k: v for k, v in r.items() if v is not None and v == v}
                            for r in frame[frame["stage"] == "pre-training"].to_dict("records")]}
    return [str(path)]


def tuning_overview(ctx: Context, storage, stored: set[str]) -> list[str]:
    """tuning.csv / tuning.tex: per model its study, trials, best trial and metrics; the
    variants' lr studies below; and each tuning study's own summary files copied beside."""
    import optuna
    import pandas as pd
    from optuna.trial import TrialState

    from harness.report import label
    from harness.tables import latex_escape, latex_table

    from harness.studies import best_of, budget_trials

    job, budget = ctx.job, ctx.budget
    rows, curves = [], []
    lr_names = lr_study_names(job, budget, storage, stored)
    studies = [(label(m), job.study(m), budget.trials) for m in ctx.names] + \
              [(f"{label(v)}: lr", lr_names[v], budget.lr_trials) for v in variants() if v in lr_names]
    for shown, name, n in studies:
        if name not in stored:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        first = budget_trials(study, n)
        best = best_of(first)  # so far, while the study is short of its n (the row says "k / n")
        every = study.get_trials(deepcopy=False)
        rows.append({"model": shown, "study": name, "trials": len(first), "target": n,
                     "complete": sum(t.state == TrialState.COMPLETE for t in first),
                     "pruned": sum(t.state == TrialState.PRUNED for t in first),
                     "failed": sum(t.state == TrialState.FAIL for t in first),
                     "retried": sum("retry_history" in t.system_attrs for t in every),
                     "stopped_and_resumed": sum(1 for t in every if t.user_attrs.get("stops")),
                     "epochs": sum(t.user_attrs.get("epochs", 0) for t in first),
                     "best_trial": None if best is None else best.number,
                     "valid_ndcg@10": None if best is None else best.value,
                     "test_ndcg@10": None if best is None else best.user_attrs.get("test", {}).get("ndcg@10"),
                     "test_recall@10": None if best is None else best.user_attrs.get("test", {}).get("recall@10"),
                     "params": json.dumps(best.params if best else {}, sort_keys=True)})
        running = float("nan")
        for i, t in enumerate(first, 1):
            if t.state == TrialState.COMPLETE:
                running = t.value if running != running else max(running, t.value)
            curves.append({"model": shown, "study": name, "n": i, "trial": t.number, "state": t.state.name.lower(),
                           "best_valid_ndcg@10": running})
        src = job.results_dir / "tune" / name.replace("/", "_")
        if src.is_dir():
            shutil.copytree(src, job.out_dir / "tune" / name.replace("/", "_"), dirs_exist_ok=True)
    if not rows:
        return []
    frame = pd.DataFrame(rows)
    csv, tex = job.out_dir / "tuning.csv", job.out_dir / "tuning.tex"
    frame.to_csv(csv, index=False)
    made = [str(csv), str(tex)]
    if curves:
        curve = pd.DataFrame(curves)
        curve.to_csv(job.out_dir / "tuning_curve.csv", index=False)
        made += [str(job.out_dir / "tuning_curve.csv"), *map(str, best_of_n_figure(curve, job.out_dir / "tuning_curve"))]
    fmt = lambda v: "--" if v is None or pd.isna(v) else f"{v:.4f}"  # noqa: E731
    cells = pd.DataFrame({"Study": frame["study"].map(latex_escape), "Trials (complete / pruned / failed)": [
        f"{r.trials}{'' if r.trials >= r.target else f' of {r.target}'} ({r.complete} / {r.pruned} / {r.failed})"
        for r in frame.itertuples()], "Epochs trained": frame["epochs"],
        "Best trial": frame["best_trial"].map(lambda v: "--" if pd.isna(v) else str(int(v))),
        "Valid NDCG@10": frame["valid_ndcg@10"].map(fmt), "Test NDCG@10": frame["test_ndcg@10"].map(fmt)})
    cells.index = pd.Index(frame["model"], name="Model")
    caption = (f"Tuning on {latex_escape(job.data_name)} under one budget: every model's study (its own search "
               f"space and sampler, its authors' settings enqueued first) ran {_n(budget.trials, 'trial')} of at "
               f"most {budget.epochs} epochs, {budget.pruner} pruning from epoch {budget.first_rung}, selected and "
               f"pruned on validation NDCG@10; each row is its best trial among the first {budget.trials} (complete, "
               f"pruned and failed ones count), the tuned candidate of the select stage. Rows ': lr' (lr-only studies, "
               f"{_n(budget.lr_trials, 'trial')} each): "
               f"{latex_escape(VARIANT_POLICY)}. Training in {job.base.train.precision} (scores ranked in fp32).")
    if (frame["trials"] < frame["target"]).any():
        caption += (" Rows with \\emph{k of n} trials are still tuning: their best is the best so far, not yet the "
                    "selected parameters.")
    tex.write_text(latex_table(cells, caption, "tab:tuning"))
    return made


def best_of_n_figure(curve, path: Path) -> list[Path]:
    """Best validation NDCG@10 after n trials, one line per study: does the tuning saturate
    within its budget (a curve still rising at n = N says more trials would have helped)?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for model, part in curve.groupby("model", sort=False):
        ax.plot(part["n"], part["best_valid_ndcg@10"], marker="o", markersize=3, label=model)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # n counts trials: no 1.5
    ax.set_xlabel("trials (in order; pruned and failed ones count)")
    ax.set_ylabel("best validation NDCG@10 so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = [path.with_suffix(".pdf"), path.with_suffix(".png")]
    for p in out:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return out


RUNNERS = {"tune": stage_tune, "select": stage_select, "compare": stage_compare, "ablate": stage_ablate, "sensitivity": stage_sensitivity,
           "robustness": stage_robustness, "report": stage_report}


def run_paper(job: PaperJob, worker_argv: Callable[[str, int, dict], list[str]] | None = None,
              echo: Callable[[str], None] = print, console=None) -> list:
    """`harness paper`: check, measure (cached), fit --hours, print the plan; unless --dry-run,
    run the stages in order, each resuming from the stores, then the manifest. Returns the
    report's (study, tex, rich table) entries."""
    from rich.console import Console

    import optuna

    from harness.data import registry as datasets
    from harness.tune import threads_per_worker

    console = console or Console(highlight=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = check(job)
    data = datasets.load(job.dataset, job.base.data_dir, job.base.cache_dir)  # a missing dataset: one line, now
    threads = threads_per_worker(job.workers)
    if job.worker is not None:  # a worker process of one experiment stage: no plan, no manifest
        first = job.min_epochs or default_first_rung(names, job.epochs)
        budget = Budget(job.trials, job.lr_trials, job.epochs, first, job.pruner)
        plans = build_plan(job, names, budget, {m: Cost(1, 0, "") for m in [*names, *variants()]})
        ctx = Context(job, names, budget, plans, Progress(plans, 1, console), None, echo, None)
        for stage in job.stages:
            if stage in ("tune", "report"):
                raise HarnessError(f"--worker: the {stage} stage has workers of its own")
            RUNNERS[stage](ctx)
        return []

    first = job.min_epochs or default_first_rung(names, job.epochs)
    cost_models = list(dict.fromkeys([*tuned(names), *([PROPOSED] if PROPOSED in names else []), *(
        ["sasrec"] if PROPOSED in names and "sasrec" not in names else [])]))
    costs = measure_costs(job, cost_models, data, threads, echo)
    for v in variants():
        costs.setdefault(v, costs.get(PROPOSED) or next(iter(costs.values())))
    budget = fit_budget(job, names, costs, first)
    plans = build_plan(job, names, budget, costs)
    fill_done(job, plans, budget)
    console.print(format_plan(job, plans, budget, costs, threads), soft_wrap=True)
    if job.dry_run:
        return []

    manifest = Manifest(job.out_dir / "manifest.json")
    manifest.data.update(_environment(job, data, threads))
    manifest.data.update({
        "command": _command([*_group_argv(job), "paper", *job.argv]),
        "storage": job.storage or "studies/optuna.journal", "results_dir": str(job.results_dir),
        "out": str(job.out_dir), "models": names, "workers": job.workers,
        "budget": {"trials_per_model": budget.trials, "epoch_cap": budget.epochs, "pruner": budget.pruner,
                   "first_rung": budget.first_rung, "lr_trials_per_variant": budget.lr_trials, "seeds": job.seeds,
                   "final_epoch_cap": job.final_epochs, "patience": {m: _patience(job, m) for m in names},
                   "requested": budget.requested, "hours": job.hours, "cut": budget.cut,
                   "overrides": "every study's trials, epoch cap, pruner and first rung are these, whatever its "
                                "study file says; each keeps its own search space, sampler, enqueued trials "
                                "and [trainer] patience",
                   "selection": "each model's best COMPLETE trial among the first N trials of its study (by trial "
                                "number; complete, pruned and failed-not-retried count), then the select stage: "
                                + SELECT_RULE},
        "study_files": {m: {"path": str(_study_file(m).path), "trials": _study_file(m).trials,
                            "pruner": [_study_file(m).pruner[0], _study_file(m).pruner[1]],
                            "enqueued": len(_study_file(m).enqueue)} for m in tuned(names)},
        "untuned": [m for m in names if untuned(m)],
        "seeds": {"tuning": job.base.train.seed, "final": job.final_seeds,
                  "sensitivity": job.final_seeds[:1] + [job.final_seeds[0] + i for i in range(1, job.sensitivity_seeds)],
                  "note": "every tuning trial runs on the tuning seed; every reported run (compare, ablate, "
                          "sensitivity, robustness) on the final seeds, disjoint from it"},
        "run_dir": None if job.run_dir is None else str(job.run_dir),
        "variant_parameters": VARIANT_POLICY,
        "noise_reading": _noise_reading(job.noise_on),
        "sensitivity_grid": {"k": _ints("--k", job.ks), "m": _ints("--m", job.ms)},
        "costs": {m: dataclasses.asdict(c) for m, c in costs.items()},
        "eta_seconds_at_start": round(total_seconds(plans, job.workers)),
    })
    manifest.save()
    progress = Progress(plans, job.workers, console)
    ctx = Context(job, names, budget, plans, progress, manifest, echo, worker_argv, costs=costs)
    try:
        return _run_stages(ctx, manifest)
    except stopping.RunStopped as e:
        raise type(e)(_stopped_line(ctx, manifest, str(e))) from None


def _stopped_line(ctx: Context, manifest: Manifest, why: str) -> str:
    """After a stop: the partial report (what is finished; pending cells marked), then one
    line: runs done / total, what is left, the ETA."""
    job = ctx.job
    if "report" in job.stages and job.worker is None:
        try:
            ctx.commands, ctx.outputs = [], []
            stage_report(ctx)
            manifest.stage("report").update({"outputs": ctx.outputs, "status": "partial", "last_checked": _now()})
            manifest.save()
        except (HarnessError, OSError, KeyError, ValueError) as e:  # the stores are what counts
            ctx.echo(f"warning: the partial report could not be written ({e})")
    fill_done(job, ctx.plans, ctx.budget)
    done = sum(p.done for p in ctx.plans)
    total = sum(p.runs for p in ctx.plans)
    stage = next((p.name for p in ctx.plans if p.done < p.runs), "report")
    return (f"paper stopped in stage {stage} ({why.splitlines()[0] if why else 'stopped'}): {done} / {total} runs "
            f"done, {total - done} left; ETA {format_duration(total_seconds(ctx.plans, job.workers))}")


def _run_stages(ctx: Context, manifest: Manifest) -> list:
    job, plans, progress = ctx.job, ctx.plans, ctx.progress
    made: list = []
    for plan in plans:
        ctx.commands, ctx.outputs = [], []
        entry = manifest.stage(plan.name)
        before, started, t0 = plan.done, _now(), time.monotonic()
        progress.show(plan)
        status = "done"
        try:
            result = RUNNERS[plan.name](ctx)
            if plan.name == "report":
                made = result
        except BaseException:
            status = "incomplete"
            raise
        finally:
            seconds = time.monotonic() - t0
            new = plan.done - before
            entry.update({"commands": ctx.commands, "runs": plan.runs, "runs_done": plan.done, "status": status,
                          "last_checked": _now()})
            if ctx.outputs:
                entry["outputs"] = ctx.outputs
            if new > 0 or plan.name == "report" or not entry["sessions"] or status != "done":
                from harness.runs import git_commit

                entry["sessions"].append({"started": started, "ended": _now(), "seconds": round(seconds, 1),
                                          "new_runs": new, "commit": git_commit()})
                entry["wall_seconds"] = round(entry["wall_seconds"] + seconds, 1)
            manifest.save()
        progress.show(plan)
    return made


def _noise_reading(noise_on: str) -> str:
    from harness.kinds.robustness import NOISE_CAPTIONS

    return NOISE_CAPTIONS[noise_on]
