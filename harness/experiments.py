"""The paper's experiments as grids of runs over seeds (DESIGN §3): ablate, compare,
robustness and sensitivity. Each experiment is an Optuna study in the tuning storage, one
trial per cell (model or variant x dataset x noise x params x seed), no sampler or pruner:
trials are made with ask/tell, so the dashboard browses them and `harness report` reads them.

Resumable: a cell is identified by everything that defines its run; cells already COMPLETE
are skipped, a cell whose worker died is marked FAILED and run again, so a crash loses at
most the cell in flight. Each finished cell stores its per-user ranks as an artifact, which
is all the report needs.
"""
from __future__ import annotations

import dataclasses
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from harness.errors import HarnessError
from harness.runs import NOISE_ON, RunSpec, run
from harness.studies import (TRAINER_KEYS, artifact_store, first_line, load_study_file, open_storage,
                             process_alive, store_record, study_file_for, this_worker)

PROPOSED = "igr-sr"
VARIANTS = ("igr-sr", "igr-sr/wo-lid", "igr-sr/concat", "igr-sr/wo-icr")
LABELS = {"igr-sr": "IGR-SR", "igr-sr/wo-lid": "w/o LID", "igr-sr/concat": "w/o cross-attn (concat)",
          "igr-sr/wo-icr": "w/o ICR", "sasrec": "SASRec", "gru4rec": "GRU4Rec", "bert4rec": "BERT4Rec",
          "iclrec": "ICLRec", "icsrec": "ICSRec", "rearec-erl": "ReaRec-ERL", "rearec-prl": "ReaRec-PRL",
          "lares": "LARES", "lares-ssl": "LARES (stage 1)"}
KINDS = ("ablate", "compare", "robustness", "sensitivity")


@dataclass(frozen=True)
class Cell:
    model: str
    dataset: str
    seed: int
    params: tuple[tuple[str, Any], ...] = ()
    noise: float = 0.0
    noise_on: str = "all"  # which histories carry the noise (RunSpec.noise_on); only with noise

    @property
    def label(self) -> str:
        return LABELS.get(self.model, self.model)

    def key(self, train: dict) -> str:
        """Everything that defines the run (trainer settings included)."""
        key = {"model": self.model, "dataset": self.dataset, "seed": self.seed,
               "params": dict(self.params), "noise": self.noise, "train": train}
        if self.noise and self.noise_on != "all":  # the default stays out: keys of older studies hold
            key["noise_on"] = self.noise_on
        return json.dumps(key, sort_keys=True)


# ------------------------------------------------------------------------------------ params

def default_params(model: str) -> dict[str, Any]:
    """The paper's defaults: the first enqueued trial of the model's study file, if any."""
    path = study_file_for(model)
    try:
        sf = load_study_file(path)
    except HarnessError:
        return {}
    return dict(sf.enqueue[0]) if sf.enqueue else {}


def best_params(model: str, dataset: str, storage) -> dict[str, Any] | None:
    """Params of the best COMPLETE trial of the `<model>-<dataset>` tuning study, if any."""
    name = f"{model}-{Path(dataset).stem if '/' in dataset else dataset}"
    if name not in optuna.study.get_all_study_names(storage):
        return None
    study = optuna.load_study(study_name=name, storage=storage)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return dict(max(done, key=lambda t: t.value).params) if done else None


def params_for(model: str, dataset: str, source: str, storage) -> tuple[dict[str, Any], str]:
    """(params, where they came from) for `--params best|paper|FILE`; a variant keeps only
    the parameters it does not pin."""
    import models

    base_model = PROPOSED if model.startswith(PROPOSED) else model
    if source == "best":
        found = best_params(base_model, dataset, storage)
        params, origin = (found, f"best trial of study {base_model}-{dataset}") if found is not None else (
            default_params(base_model), f"paper defaults (no tuning study {base_model}-{dataset} yet)")
    elif source == "paper":
        params, origin = default_params(base_model), "paper defaults"
    else:
        path = Path(source)
        try:
            params = json.loads(path.read_text()) if path.suffix == ".json" else _toml(path)
        except (OSError, ValueError) as e:
            raise HarnessError(f"--params {source}: cannot read a parameter file ({first_line(e)})") from None
        params, origin = params.get(base_model, params), f"file {source}"
    spec = models.get(model)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    kept = {k: v for k, v in params.items() if (k in fields or k in TRAINER_KEYS) and k not in spec.fixed}
    return kept, origin


def _toml(path: Path) -> dict:
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def grid(models_: list[str], datasets: list[str], seeds: int, source: str, storage,
         noise: tuple[float, ...] = (0.0,), extra: list[dict] | None = None,
         first_seed: int = 2020, noise_on: str = "all") -> tuple[list[Cell], list[str]]:
    """The cells: models x datasets x extra params x noise rates x seeds first_seed, first_seed + 1, ..."""
    cells, notes = [], []
    for dataset in datasets:
        for model in models_:
            params, origin = params_for(model, dataset, source, storage)
            notes.append(f"{model} on {dataset}: {origin}")
            for more in extra or [{}]:
                merged = tuple(sorted({**params, **more}.items()))
                for rate in noise:
                    cells += [Cell(model, dataset, first_seed + s, merged, rate, noise_on if rate else "all")
                              for s in range(seeds)]
    return cells, notes


# ------------------------------------------------------------------------------------ running

def run_experiment(kind: str, name: str, cells: list[Cell], base: RunSpec, storage_url: str | None,
                   results_dir: Path, notes: list[str], echo: Callable[[str], None] = print) -> optuna.Study:
    """Run every cell not yet COMPLETE in study `name`; return the study."""
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    train = {k: v for k, v in dataclasses.asdict(base.train).items() if k not in ("device", "eval_batch_size", "seed")}
    keys = [c.key(train) for c in cells]
    noise_on = next((c.noise_on for c in cells if c.noise), "all")  # the noisy cells' reading, for captions
    study.set_user_attr("experiment", {"kind": kind, "cells": keys, "notes": notes, "train": train,
                                       "noise_on": noise_on})
    _fail_dead_trials(study, echo)
    done = {t.user_attrs.get("cell") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    todo = [(c, k) for c, k in zip(cells, keys) if k not in done]
    echo(f"{name}: {len(cells) - len(todo)} of {len(cells)} cells already done; running {len(todo)}")
    store = artifact_store(results_dir)
    for i, (cell, key) in enumerate(todo, 1):
        trial = study.ask()
        trial.set_user_attr("cell", key)
        trial.set_user_attr("worker", this_worker())
        # the cell as a user attr, not params: one-choice categoricals that differ between
        # trials of one study are refused by Optuna ("dynamic value space")
        trial.set_user_attr("cell_info", {"model": cell.model, "dataset": cell.dataset, "seed": cell.seed,
                                          "noise": cell.noise, "noise_on": cell.noise_on,
                                          "params": dict(cell.params)})
        values = dict(cell.params)
        spec = dataclasses.replace(
            base, model=cell.model, dataset=cell.dataset, noise=cell.noise, noise_seed=cell.seed,
            noise_on=cell.noise_on,
            train=dataclasses.replace(base.train, seed=cell.seed, **{k: v for k, v in values.items() if k in TRAINER_KEYS}),
            params={k: v for k, v in values.items() if k not in TRAINER_KEYS})
        echo(f"[{i}/{len(todo)}] {cell.label} on {cell.dataset} seed {cell.seed}"
             + (f" noise {cell.noise:g}" if cell.noise else "")
             + (f" ({cell.noise_on} histories only)" if cell.noise and cell.noise_on != "all" else ""))
        try:
            record = run(spec, progress=False)
            store_record(trial, record, store)
        except BaseException as e:
            reason = first_line(e) if isinstance(e, HarnessError) else f"{type(e).__name__}: {first_line(e)}"
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            if isinstance(e, (HarnessError, KeyboardInterrupt)):
                raise
            echo(f"  failed: {reason}")
            continue
        study.tell(trial, record.result["valid"]["ndcg@10"])
        t = record.result["test"]
        echo(f"  test recall@10 {t['recall@10']:.4f} ndcg@10 {t['ndcg@10']:.4f} "
             f"(best epoch {record.result['best_epoch']}, {record.seconds:.0f} s)")
    return study


def _fail_dead_trials(study: optuna.Study, echo: Callable[[str], None]) -> None:
    """A RUNNING cell whose process on this host is gone was lost in a crash: mark it FAILED
    (its cell is simply run again, since only COMPLETE cells count as done)."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") == host and not process_alive(worker["pid"], worker.get("start")):
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "worker died")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            echo(f"trial {trial.number}: its worker died; the cell runs again")


def experiment_studies(storage) -> list[tuple[str, dict]]:
    """(study name, experiment definition) of every experiment study in the storage."""
    out = []
    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        exp = summary.user_attrs.get("experiment")
        if isinstance(exp, dict) and exp.get("kind") in KINDS:
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

def experiment(kind: str, datasets: list[str], models_: list[str], seeds: int, source: str, base: RunSpec,
               storage_url: str | None, results_dir: Path, echo: Callable[[str], None] = print,
               noise: float = 0.2, ks: list[int] | None = None, ms: list[int] | None = None,
               name: str | None = None, noise_on: str = "all") -> tuple[str, list]:
    """Build the grid of one experiment, run its missing cells, then write its report.
    Returns the study name and the report's (name, tex path, rich table) entries."""
    import models

    from harness.report import build_report

    if kind not in KINDS:
        raise HarnessError(f"unknown experiment {kind!r}")
    for model in models_:
        try:
            models.get(model)
        except KeyError as e:
            raise HarnessError(f"--models: {e.args[0]}") from None
    storage = open_storage(storage_url)
    rates = (0.0, noise) if kind == "robustness" else (0.0,)
    extra = [{"k": k, "m": m} for k in ks or [] for m in ms or []] if kind == "sensitivity" else None
    # --seed is the first seed: `--seeds 1 --seed 2021` runs one seed's cells (e.g. on a second
    # machine) that a later `--seeds 2` finds done
    if noise_on not in NOISE_ON:
        raise HarnessError(f"--noise-on {noise_on!r}: choose from {', '.join(NOISE_ON)}")
    cells, notes = grid(models_, datasets, seeds, source, storage, noise=rates, extra=extra,
                        first_seed=base.train.seed, noise_on=noise_on)
    for note in notes:
        echo(f"params: {note}")
    name = name or f"{kind}-{'+'.join(Path(d).stem if '/' in d else d for d in datasets)}"
    run_experiment(kind, name, cells, base, storage_url, results_dir, notes, echo)
    made = [m for m in build_report(storage_url, results_dir, results_dir / "report") if m[0] == name]
    return name, made
