"""The paper's experiments as grids of runs over seeds: any registered kind (harness/kinds/:
ablate, compare, robustness, sensitivity) says what its grid varies; this module resolves
each model's parameters, runs the cells and renders the reports. Each experiment is an Optuna
study in the tuning storage, one trial per cell (model or variant x dataset x noise x params x
seed), no sampler or pruner: trials are made with ask/tell, so the dashboard browses them and
`harness report` reads them.

Resumable: a cell is identified by everything that defines its run; cells already COMPLETE
are skipped, a cell whose worker died is marked FAILED and run again, so a crash loses at
most the cell in flight. Each finished cell stores its per-user ranks as an artifact, which
is all the report needs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from harness import faults, kinds, stopping
from harness.errors import HarnessError, first_line
from harness.runs import NOISE_ON, TRAINER_KEYS, RunSpec, run, train_identity
from harness.stopping import RunStopped
from harness.store import (artifact_store, check_writable, claim_lock, heartbeat, open_storage, recover, store_record,
                           this_worker)
from harness.studies import load_study_file, study_file_for

@dataclass(frozen=True)
class Cell:
    model: str
    dataset: str
    seed: int
    params: tuple[tuple[str, Any], ...] = ()
    noise: float = 0.0
    noise_on: str = "all"  # which histories carry the noise (RunSpec.noise_on); only with noise
    # the model's own trainer budget (its study file's [trainer], e.g. patience 40) where it
    # differs from the experiment's trainer flags; empty for most models
    train: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        from harness.report import label

        return label(self.model)

    def key(self, train: dict) -> str:
        """Everything that defines the run (trainer settings included: the cell's own override
        the experiment's, so a cell without any keeps the key it always had)."""
        key = {"model": self.model, "dataset": self.dataset, "seed": self.seed,
               "params": dict(self.params), "noise": self.noise, "train": {**train, **dict(self.train)}}
        if self.noise and self.noise_on != "all":  # the default stays out: keys of older studies hold
            key["noise_on"] = self.noise_on
        return json.dumps(key, sort_keys=True)

    def run_spec(self, base: RunSpec) -> RunSpec:
        """The cell's run: `base` (trainer flags, data, cache) with its model, data, noise, seed,
        parameters and own trainer budget."""
        spec = base.with_values(dict(self.params), model=self.model, dataset=self.dataset, noise=self.noise,
                                noise_seed=self.seed, noise_on=self.noise_on, seed=self.seed)
        if self.train:
            spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, **dict(self.train)))
        return spec


# ------------------------------------------------------------------------------------ params

def _study_fixed(model: str) -> dict[str, Any]:
    """The [fixed] values of the model's study file: part of every trial's configuration."""
    try:
        return dict(load_study_file(study_file_for(model)).fixed)
    except HarnessError:
        return {}


def default_params(model: str) -> dict[str, Any]:
    """The paper's defaults: the study file's [fixed] values and its first enqueued trial, if
    any (a model without a study file runs at its config's defaults)."""
    try:
        sf = load_study_file(study_file_for(model))
    except HarnessError:
        return {}
    return {**sf.fixed, **(sf.enqueue[0] if sf.enqueue else {})}


def trainer_defaults(model: str, train: dict[str, Any], given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The model's own trainer budget: its (base model's) study file's [trainer] values that
    differ from `train` (the experiment's trainer settings), less the flags given on the
    command line (a given --patience wins). Empty without a study file."""
    import models

    try:
        sf = load_study_file(study_file_for(models.get(model).study_model))
    except (HarnessError, KeyError):
        return {}
    return {k: v for k, v in sf.trainer_defaults(given).items() if train.get(k) != v}


def best_params(model: str, dataset: str, storage) -> tuple[dict[str, Any], str] | None:
    """Params of the best COMPLETE trial among the first N trials of the `<model>-<dataset>`
    tuning study (N: the trial target its last `harness tune` had; studies.budget_trials, the
    rule `harness paper` uses, so that a study tuned on past its target gives no model more
    trials than another), with the study file's [fixed] values the trial was trained with (a
    trial's params hold only the searched keys); and where they came from."""
    from harness.studies import best_of, budget_trials

    name = f"{model}-{Path(dataset).stem if '/' in dataset else dataset}"
    if name not in optuna.study.get_all_study_names(storage):
        return None
    study = optuna.load_study(study_name=name, storage=storage)
    target = study.user_attrs.get("target")
    first = budget_trials(study, target)
    best = best_of(first)
    if best is None:
        return None
    failed = sum(t.state == TrialState.FAIL for t in first)
    origin = (f"best of the first {len(first)} trials of study {name}"
              + (f" (its target {target})" if target is not None and target != len(first) else "")
              + (f", {failed} of them failed" if failed else ""))
    return {**_study_fixed(model), **best.params}, origin


def params_for(model: str, dataset: str, source: str, storage) -> tuple[dict[str, Any], str]:
    """(params, where they came from) for `--params best|paper|FILE`; a variant keeps only
    the parameters it does not pin."""
    import models

    base_model = models.get(model).study_model  # a variant: its base model's study
    if source == "best":
        found = best_params(base_model, dataset, storage)
        params, origin = found if found is not None else (
            default_params(base_model), f"paper defaults (no tuning study {base_model}-{dataset} yet)")
    elif source == "paper":
        params, origin = default_params(base_model), "paper defaults"
    else:
        params = _read_params(source)
        params, origin = params.get(model, params.get(base_model, params)), f"file {source}"
    spec = models.get(model)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    kept = {k: v for k, v in params.items() if (k in fields or k in TRAINER_KEYS) and k not in spec.fixed}
    return kept, origin


def check_runnable(cells: list[Cell], base: RunSpec, results_dir: Path, source: str, models_: list[str]) -> None:
    """Refuse, before the first cell, settings that would fail every cell: a device this machine
    lacks, a results directory that cannot be written, a parameter file key that no model of the
    experiment has, a value a model's config rejects."""
    import models

    from harness import config as config_mod
    from harness.train import resolve_device

    resolve_device(base.train.device)
    check_writable(results_dir)
    if source not in ("best", "paper"):
        known = set(TRAINER_KEYS)
        for model in models_:
            known |= {f.name for f in dataclasses.fields(models.get(model).config_cls)}
        raw = _read_params(source)
        for section in [raw[m] for m in raw if isinstance(raw[m], dict)] or [raw]:
            unknown = sorted(k for k in section if k not in known)
            if unknown:
                raise HarnessError(f"--params {source}: {unknown[0]}: not a parameter of "
                                   f"{', '.join(models_)} (nor a trainer setting)")
    for model, params in dict.fromkeys((c.model, c.params) for c in cells):
        spec = models.get(model)
        values = {k: v for k, v in params if k not in TRAINER_KEYS}
        try:
            spec.make_config(**config_mod.coerce(spec.config_cls, values, where=f"{model}:"))
        except ValueError as e:
            raise HarnessError(f"{model}: {first_line(e)} (parameters from {source})") from None


def _read_params(source: str) -> dict:
    path = Path(source)
    try:
        return json.loads(path.read_text()) if path.suffix == ".json" else _toml(path)
    except (OSError, ValueError) as e:
        raise HarnessError(f"--params {source}: cannot read a parameter file ({first_line(e)})") from None


def _toml(path: Path) -> dict:
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def grid(models_: list[str], datasets: list[str], seeds: int, source: str, storage,
         noise: tuple[float, ...] = (0.0,), extra: list[dict] | None = None,
         first_seed: int = 2020, noise_on: str = "all", train: dict[str, Any] | None = None,
         given: frozenset[str] = frozenset()) -> tuple[list[Cell], list[str]]:
    """The cells: models x datasets x extra params x noise rates x seeds first_seed, first_seed + 1, ...;
    each model with its study file's trainer budget where it differs from `train` (the
    experiment's trainer settings) and the user did not give that flag (`given`)."""
    cells, notes = [], []
    own = {model: tuple(sorted(trainer_defaults(model, train or {}, given).items())) for model in models_}
    for dataset in datasets:
        for model in models_:
            params, origin = params_for(model, dataset, source, storage)
            notes.append(f"{model} on {dataset}: {origin}")
            for more in extra or [{}]:
                merged = tuple(sorted({**params, **more}.items()))
                for rate in noise:
                    cells += [Cell(model, dataset, first_seed + s, merged, rate, noise_on if rate else "all",
                                   own[model]) for s in range(seeds)]
    return cells, notes


# ------------------------------------------------------------------------------------ running

HEARTBEAT = 30  # seconds between a database-stored cell's heartbeats; silent 3x as long = dead
WAIT = 5.0  # seconds between looks at cells another live process is running


def run_experiment(kind: str, name: str, cells: list[Cell], base: RunSpec, storage_url: str | None,
                   results_dir: Path, notes: list[str], echo: Callable[[str], None] = print,
                   reuse: tuple[str, ...] = (),
                   estimate: Callable[[Cell], float | None] | None = None) -> optuna.Study:
    """Run every cell of study `name` that is not COMPLETE; return the study once all are.

    Under --stop-after no cell starts that cannot finish before the deadline (`estimate(cell)`
    seconds, else what this study's cells of the same model took); a cell in flight at the
    deadline or a signal stops after its epoch and runs on from its checkpoint when the grid
    is resumed (RunStopped).

    `reuse`: other experiment studies whose COMPLETE cells of the same key (the same run:
    model, data, noise, parameters, seed, trainer) are copied in instead of trained again, e.g.
    robustness's clean cells from the comparison of the same parameters. A copy is the donor
    trial's result and artifacts, marked `reused_from` = "STUDY#NUMBER".

    Several processes (or machines, on a database) may fill one grid: each claims the next
    free cell under a lock and marks it RUNNING, so no cell runs twice. A RUNNING cell whose
    process died (pid on this host, heartbeat on a database) is failed and claimed again in
    the same invocation; one that a live process runs is waited for, so that the command
    returns only when the grid is whole."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created": the grid line says it
    storage = open_storage(storage_url, heartbeat=HEARTBEAT, retry=False, echo=echo)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    train = train_identity(base.train, drop=("seed",))  # the seed is the cell's
    keys = [c.key(train) for c in cells]
    by_key = dict(zip(keys, cells))
    noise_on = next((c.noise_on for c in cells if c.noise), "all")  # the noisy cells' reading, for captions
    definition = {"kind": kind, "cells": keys, "notes": notes, "train": train, "noise_on": noise_on}
    own = {c.model: dict(c.train) for c in cells if c.train}
    if own:  # models trained with their own budget (study files' [trainer]), for captions
        definition["train_by_model"] = own
    study.set_user_attr("experiment", definition)
    store = artifact_store(results_dir)
    # the parameters a grid varies per model (sensitivity's k and m), named in each cell's line
    values: dict[str, dict[str, set]] = {}
    for c in cells:
        for k, v in c.params:
            values.setdefault(c.model, {}).setdefault(k, set()).add(json.dumps(v))
    varying = {m: tuple(k for k, vs in params.items() if len(vs) > 1) for m, params in values.items()}
    tried: set[str] = set()  # cells that failed in this invocation with an error: not retried here
    if reuse:
        with claim_lock(storage, name, storage_url):
            _copy_done_cells(study, keys, reuse, storage, echo)
    announced = False
    while True:
        with claim_lock(storage, name, storage_url):
            for number in recover(study, retry=False):
                echo(f"trial {number}: its worker died; the cell runs again")
            done, busy = _cell_states(study)
            todo = [k for k in dict.fromkeys(keys) if k not in done and k not in busy and k not in tried]
            if not announced:
                echo(f"{name}: {len(set(keys) & done)} of {len(set(keys))} cells already done; running "
                     f"{len(todo)}" + (f" ({len(set(keys) & busy)} running elsewhere)" if set(keys) & busy else ""))
                announced = True
            trial = None
            if todo:
                key = todo[0]
                if not stopping.room_for(cell_seconds(study, by_key[key], estimate)):
                    why = stopping.stop_due()
                    kind_ = RunStopped if why else stopping.NoRoom
                    why = why or "the next cell would not finish before the --stop-after deadline"
                    raise kind_(f"{name} stopped ({why}): {len(set(keys) & done)} / {len(set(keys))} cells done, "
                                f"{len(set(keys) - done)} left")
                trial = study.ask()
                trial.set_user_attr("cell", key)
                trial.set_user_attr("worker", this_worker())
        if trial is None:
            if not set(keys) & busy:
                return study
            time.sleep(WAIT)  # another live process runs the rest: the grid is whole when it is done
            continue
        try:
            ok = _run_cell(study, trial, by_key[key], key, base, store, echo,
                           f"[{len(set(keys) & done) + 1}/{len(set(keys))}]", varying.get(by_key[key].model, ()))
        except RunStopped as e:
            raise RunStopped(f"{name} stopped ({e}): {len(set(keys) & done)} / {len(set(keys))} cells done, "
                             f"{len(set(keys) - done)} left (the one in flight continues from its checkpoint)") from None
        if not ok:
            tried.add(key)


def cell_seconds(study: optuna.Study, cell: Cell, estimate: Callable[[Cell], float | None] | None) -> float | None:
    """The median time this study's finished cells of the same model took, else `estimate`."""
    took = sorted(t.user_attrs["seconds"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if t.user_attrs.get("seconds") and (t.user_attrs.get("cell_info") or {}).get("model") == cell.model
                  and not t.user_attrs.get("reused_from"))
    if took:
        return took[len(took) // 2]
    return estimate(cell) if estimate is not None else None


def _copy_done_cells(study: optuna.Study, keys: list[str], donors: tuple[str, ...], storage,
                     echo: Callable[[str], None]) -> None:
    done, busy = _cell_states(study)
    wanted = set(keys) - done - busy
    stored = set(optuna.study.get_all_study_names(storage))
    copied = 0
    for donor in donors:
        if not wanted or donor not in stored or donor == study.study_name:
            continue
        source = optuna.load_study(study_name=donor, storage=storage)
        for t in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            key = t.user_attrs.get("cell")
            if key in wanted and t.user_attrs.get("artifact_ranks"):
                attrs = {**t.user_attrs, "reused_from": f"{donor}#{t.number}"}
                study.add_trial(optuna.trial.create_trial(value=t.value, user_attrs=attrs, state=TrialState.COMPLETE))
                wanted.discard(key)
                copied += 1
    if copied:
        echo(f"{study.study_name}: {copied} cell{'s' * (copied != 1)} copied from runs already done "
             f"({', '.join(donors)}), not trained again")


def _cell_states(study: optuna.Study) -> tuple[set[str], set[str]]:
    """Cell keys COMPLETE, and RUNNING in some live process."""
    done, busy = set(), set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        key = t.user_attrs.get("cell")
        if key is not None:
            (done if t.state == TrialState.COMPLETE else busy).add(key)
    return done, busy - done


def _run_cell(study: optuna.Study, trial: optuna.Trial, cell: Cell, key: str, base: RunSpec, store,
              echo: Callable[[str], None], counter: str, shown: tuple[str, ...] = ()) -> bool:
    """Train one claimed cell and tell its result; False if it failed with an error."""
    # the cell as a user attr, not params: one-choice categoricals that differ between
    # trials of one study are refused by Optuna ("dynamic value space")
    info = {"model": cell.model, "dataset": cell.dataset, "seed": cell.seed, "noise": cell.noise,
            "noise_on": cell.noise_on, "params": dict(cell.params)}
    if cell.train:
        info["train"] = dict(cell.train)
    trial.set_user_attr("cell_info", info)
    spec = cell.run_spec(base)
    params = dict(cell.params)
    echo(f"{counter} {cell.label} on {cell.dataset}" + "".join(f" {k}={params[k]}" for k in shown)
         + f" seed {cell.seed}"
         + (f" noise {cell.noise:g}" if cell.noise else "")
         + (f" ({cell.noise_on} histories only)" if cell.noise and cell.noise_on != "all" else ""))
    checkpoint = cell_checkpoint(study.study_name, key, spec)
    try:
        with heartbeat(study, trial):
            record = run(spec, progress=False, on_epoch=lambda epoch, row: faults.point("epoch"), checkpoint=checkpoint)
            store_record(trial, record, store, weights=base.keep_weights)
            faults.point("cell")
    except BaseException as e:
        reason = first_line(e) if isinstance(e, HarnessError) else f"{type(e).__name__}: {first_line(e)}"
        if isinstance(e, KeyboardInterrupt):
            reason = "interrupted"
        if isinstance(e, RunStopped):
            # the cell runs again when the grid is resumed, from this checkpoint (the cell's key
            # names it), so it ends as the uninterrupted run would have
            trial.set_user_attr("suspended", reason)
        else:
            checkpoint.unlink(missing_ok=True)
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(e, (HarnessError, KeyboardInterrupt, RunStopped)):
            raise
        echo(f"  failed: {reason}")
        return False
    study.tell(trial, record.result["valid"]["ndcg@10"])
    t = record.result["test"]
    echo(f"  test recall@10 {t['recall@10']:.4f} ndcg@10 {t['ndcg@10']:.4f} "
         f"(best epoch {record.result['best_epoch']}, {record.seconds:.0f} s)")
    return True


def cell_checkpoint(study_name: str, key: str, spec: RunSpec) -> Path:
    """The in-flight checkpoint of an experiment cell: named by its study and its key (the
    run's whole identity), so the cell's rerun, in any process, finds it."""
    import hashlib

    digest = hashlib.sha256(json.dumps([study_name, key]).encode()).hexdigest()[:16]
    return spec.checkpoint_root / f"{study_name.replace('/', '_')}-{digest}.pt"


def experiment_studies(storage) -> list[tuple[str, dict]]:
    """(study name, experiment definition) of every experiment study in the storage."""
    out = []
    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        exp = summary.user_attrs.get("experiment")
        if isinstance(exp, dict) and exp.get("kind") in kinds.names():
            out.append((summary.study_name, exp))
    return out


def completed_cells(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The COMPLETE trial of each cell of the study's latest definition (latest if repeated)."""
    order = study.user_attrs["experiment"]["cells"]
    wanted = set(order)
    by_cell: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("cell") in wanted:
            by_cell[t.user_attrs["cell"]] = t
    # in the definition's order (the --models / --variants order), not the order they finished
    return [by_cell[k] for k in dict.fromkeys(order) if k in by_cell]

def experiment(kind: str, datasets: list[str], seeds: int, source: str, base: RunSpec, storage_url: str | None,
               results_dir: Path, echo: Callable[[str], None] = print, name: str | None = None,
               given: frozenset[str] = frozenset(), **options: Any) -> tuple[str, list]:
    """Build the grid of one experiment (`options` are its kind's command options), run its
    missing cells, then write its report. `given`: the trainer options the user gave on the
    command line (`patience`, `epochs`...), which win over a model's study-file budget. Returns
    the study name and the report's (name, tex path, rich table) entries."""
    import models

    try:
        axes = kinds.get(kind).axes(**options)
    except KeyError as e:
        raise HarnessError(e.args[0]) from None
    for model in axes.models:
        try:
            models.get(model)
        except KeyError as e:
            raise HarnessError(f"--models: {e.args[0]}") from None
    if axes.noise_on not in NOISE_ON:
        raise HarnessError(f"--noise-on {axes.noise_on!r}: choose from {', '.join(NOISE_ON)}")
    storage = open_storage(storage_url)
    # --seed is the first seed: `--seeds 1 --seed 2021` runs one seed's cells (e.g. on a second
    # machine) that a later `--seeds 2` finds done
    cells, notes = grid(axes.models, datasets, seeds, source, storage, noise=axes.noise, extra=axes.extra,
                        first_seed=base.train.seed, noise_on=axes.noise_on,
                        train=train_identity(base.train, drop=("seed",)), given=given)
    check_runnable(cells, base, results_dir, source, axes.models)
    for note in notes:
        echo(f"params: {note}")
    for model, own in dict.fromkeys((c.model, c.train) for c in cells if c.train):
        echo(f"trainer: {model}: " + ", ".join(f"{k} {v}" for k, v in own)
             + " (its study file's [trainer]; give the flag to override)")
    name = name or f"{kind}-{'+'.join(Path(d).stem if '/' in d else d for d in datasets)}"
    run_experiment(kind, name, cells, base, storage_url, results_dir, notes, echo)
    return name, report_experiments(storage_url, results_dir, results_dir / "report", only=name)


def report_experiments(storage_url: str | None, results_dir: Path, out: Path,
                       only: str | None = None) -> list[kinds.Output]:
    """Every experiment study in the storage (or the one named `only`) -> its kind's .tex,
    .csv and figures under `out`, from the stored runs. Returns (study name, tex path, rich
    renderable) per table."""
    from harness.report import runs_frame

    storage = open_storage(storage_url)
    store = artifact_store(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    made: list[kinds.Output] = []
    for name, exp in experiment_studies(storage):
        if only is not None and name != only:
            continue
        runs = runs_frame(completed_cells(optuna.load_study(study_name=name, storage=storage)))
        if runs.empty:
            continue
        ctx = kinds.ReportContext(name=name, base=out / name.replace("/", "_"), store=store, experiment=exp)
        made += kinds.get(exp["kind"]).report(runs, ctx)
    return made
