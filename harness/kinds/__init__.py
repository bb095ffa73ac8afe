"""Experiment kinds, registered by name like the models: each kind is one small spec in one
file of this package (its command's options, the axes of its grid of cells, its tables and
figures). harness/experiments.py runs any kind's grid; the CLI makes one command per kind;
`harness report` renders every stored experiment through its kind. Adding a kind is adding a
file here: modules of this package are imported, and so registered, when it is.

A kind's `report` gets the experiment's finished cells as a frame (harness.report.runs_frame:
one row per cell, its model, label, dataset, seed, noise, parameters and test metrics) and a
ReportContext (where to write, the artifact store for per-user ranks, the stored definition).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Axes:
    """What a kind's grid varies besides datasets and seeds."""

    models: list[str]
    noise: tuple[float, ...] = (0.0,)
    noise_on: str = "all"
    extra: list[dict[str, Any]] | None = None  # parameter sets crossed with every model


@dataclass
class ReportContext:
    name: str  # the experiment's study name
    base: Path  # output path without suffix: <out>/<name>
    store: Any  # artifact store holding each cell's per-user ranks
    experiment: dict  # the stored definition: kind, cells, notes, train, noise_on (+ train_by_model)

    @property
    def train(self) -> dict:
        return self.experiment.get("train", {})

    @property
    def mask_history(self) -> bool:
        return bool(self.train.get("mask_history", False))

    @property
    def max_len(self) -> int:
        return int(self.train.get("max_len", 50))

    @property
    def note(self) -> str:
        """The caption's budget and parameter-origin sentences."""
        from harness.report import budget_note, params_note

        return " ".join(part for part in (budget_note(self.train), self.own_budget_note,
                                          params_note(self.experiment.get("notes", []))) if part)

    @property
    def own_budget_note(self) -> str:
        """Models trained with a budget of their own (their study files' [trainer], their code's
        patience): "ICLRec and ICSRec: early stop after 40 epochs without gain (their study files'
        trainer setting)." Empty when every model had the experiment's."""
        from harness.report import label
        from harness.tables import latex_escape

        groups: dict[tuple, list[str]] = {}
        for model, own in self.experiment.get("train_by_model", {}).items():
            groups.setdefault(tuple(sorted(own.items())), []).append(label(model))
        sentences = []
        for own, labels in groups.items():
            names = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
            parts = [f"early stop after {v} epoch{'s' * (v != 1)} without gain" if k == "patience"
                     else f"at most {v} epoch{'s' * (v != 1)}"
                     if k == "epochs" else f"{k} {v}" for k, v in own]
            whose = "its study file's trainer setting" if len(labels) == 1 else "their study files' trainer setting"
            sentences.append(f"{latex_escape(names)}: {', '.join(parts)} ({whose}).")
        return " ".join(sentences)


Output = tuple[str, Path, Any]  # (study name, .tex path, a rich renderable for the terminal)


@dataclass(frozen=True)
class ExperimentKind:
    """One experiment of the paper. `options` are click options of its command beyond the
    shared ones (--dataset, --seeds, --params, --storage, trainer flags); their values reach
    `axes` as keyword arguments."""

    name: str
    help: str
    axes: Callable[..., Axes]
    report: Callable[[Any, ReportContext], list[Output]]
    options: tuple[Callable, ...] = field(default=())
    dataset_help: str = "A dataset name or file."


_KINDS: dict[str, ExperimentKind] = {}


def register(kind: ExperimentKind) -> ExperimentKind:
    if kind.name in _KINDS:
        raise ValueError(f"experiment kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> ExperimentKind:
    _load()
    if name not in _KINDS:
        raise KeyError(f"unknown experiment kind {name!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def names() -> list[str]:
    _load()
    return list(_KINDS)


def _load() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def split(value: str) -> list[str]:
    return [v for v in value.split(",") if v]
