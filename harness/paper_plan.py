"""The plan of `harness paper` (harness/paper.py): the job and its checks, each model's measured
cost (a `harness bench` child process, cached), the stages' runs with their estimated seconds,
the budget --hours leaves, and the plan table printed before anything runs.

Nothing here trains or writes to a study: the plan is made from the job, the costs and (in
paper.py's `fill_done`) what the stores already hold.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError

STAGES = ("tune", "select", "compare", "ablate", "sensitivity", "robustness", "report")


PROPOSED = "igr-sr"


# Rough seconds per training epoch when nothing is measured: docs/results.md's bf16 epoch of each
# model on Toys at 1 thread (CPU time, `harness bench --precision bf16 --clock cpu`, fa5e42d),
# scaled by interactions / Toys' interactions. lares (stage 2) is costed as its stage 1.
ROUGH_SECONDS_PER_EPOCH = {"gru4rec": 9.8, "sasrec": 11.7, "bert4rec": 23.2, "iclrec": 35.1, "rearec-prl": 42.9,
                           "igr-sr": 55.5, "rearec-erl": 74.9, "icsrec": 112.2, "lares-ssl": 304.3, "lares": 304.3}
ROUGH_EVAL_SECONDS = 2.0


TOYS_INTERACTIONS = 167_597


LR_RANGE = (1e-4, 1e-2)  # the lr studies' range when IGR-SR's study file does not search lr


LID_EPOCHS_GUESS = 50  # an early-stopped LID pre-training, for the ETA only


VARIANT_POLICY = ("every variant (the full model alike) takes IGR-SR's best tuned parameters except the "
                  "learning rate, which is tuned per variant in an lr-only study of its own (the same trials, "
                  "epoch cap and pruner for each; the full model's tuned lr enqueued first): one lr tuned for "
                  "the full model stalls the variants without ICR")


@dataclass
class PaperJob:
    dataset: str
    base: Any  # harness.runs.RunSpec: trainer flags (device, precision, seed, patience, lid_epochs), data, cache
    results_dir: Path = Path("results")
    models: list[str] | None = None  # None: the registry's models (no variants), IGR-SR last
    trials: int = 12
    epochs: int = 30  # the tuning trials' epoch cap
    min_epochs: int | None = None  # the first rung; None: the largest of the study files', capped at epochs
    pruner: str = "hyperband"
    lr_trials: int = 6
    seeds: int = 3
    sensitivity_seeds: int = 1  # Figure 3's grid: k x m cells are many, each a run to early stop
    final_epochs: int = 200  # epoch cap of the experiments' runs (early stopping decides)
    hours: float | None = None
    workers: int = 1
    storage: str | None = None
    prefix: str = "paper"
    out: Path | None = None  # default <results>/paper/<dataset>
    stages: tuple[str, ...] = STAGES
    ks: str = "2,4,8,16,32"
    ms: str = "1,2,3,4,5"
    noise: float = 0.2
    noise_on: str = "all"
    robustness_models: str = "sasrec,igr-sr"
    bench: bool = True
    bench_batches: int = 20
    dry_run: bool = False
    worker: int | None = None  # a worker process of an experiment stage (started by the parent)
    given: frozenset[str] = frozenset()  # options given on the command line ("patience", "final_epochs")
    argv: tuple[str, ...] = ()  # the paper command's own options as given, for the manifest
    # one self-contained folder for the whole run (--run-dir): the study journal, finished runs'
    # records and per-user ranks (no weights), the pre-trained models runs need, checkpoints of
    # runs in flight, the report; relative paths, so the folder continues on any machine
    run_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.run_dir is None:
            return
        if self.storage is not None:
            raise HarnessError("--storage: --run-dir keeps the study journal inside the run folder "
                               f"({self.run_dir / 'optuna.journal'}); give one or the other")
        self.storage = str(self.run_dir / "optuna.journal")
        self.results_dir = self.run_dir
        if self.out is None:
            self.out = self.run_dir / "report"
        self.base = dataclasses.replace(self.base, pretrained_dir=self.run_dir / "pretrained",
                                        checkpoint_dir=self.run_dir / "inflight", keep_weights=False)

    @property
    def data_name(self) -> str:
        return Path(self.dataset).stem if "/" in self.dataset else self.dataset

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.results_dir / "paper" / self.data_name

    def study(self, what: str) -> str:
        return f"{self.prefix}-{what.replace('/', '_')}-{self.data_name}"

    def tune_base(self, budget: "Budget"):
        return dataclasses.replace(self.base, train=dataclasses.replace(self.base.train, epochs=budget.epochs))

    def final_base(self):
        """The experiments' runs: the final epoch cap, and seeds after the tuning seed (--seed + 1,
        + 2, ...), so that no reported run shares the seed its parameters were selected on."""
        return dataclasses.replace(self.base, train=dataclasses.replace(self.base.train, epochs=self.final_epochs,
                                                                        seed=self.final_seeds[0]))

    @property
    def final_seeds(self) -> list[int]:
        return [self.base.train.seed + 1 + i for i in range(self.seeds)]

    @property
    def tune_given(self) -> frozenset[str]:
        """The trainer flags every tuning job treats as given: the epoch cap always (a study
        file's [trainer] epochs must not unequal the budget), patience when the user gave it."""
        return frozenset({"epochs", *({"patience"} & self.given)})

    @property
    def final_given(self) -> frozenset[str]:
        return frozenset(({"epochs"} if "final_epochs" in self.given else set()) | ({"patience"} & self.given))


@dataclass
class Budget:
    trials: int
    lr_trials: int
    epochs: int
    first_rung: int
    pruner: str
    requested: dict[str, int] = field(default_factory=dict)  # trials, lr_trials, epochs before --hours
    cut: list[str] = field(default_factory=list)  # what --hours cut, one line each
    fits: bool | None = None  # --hours: does the (cut) plan fit


@dataclass(frozen=True)
class Cost:
    seconds_per_epoch: float  # training
    eval_seconds: float  # one validation (run after every epoch)
    source: str

    @property
    def epoch(self) -> float:
        return self.seconds_per_epoch + self.eval_seconds


@dataclass
class Item:
    """A part of a stage: one tuning study, or one experiment grid."""

    label: str
    study: str | None
    runs: int
    epochs: int  # per run: the cap (tuning) or the estimate to early stop (experiments)
    per_run: float  # estimated seconds of one run on one worker
    done: int = 0
    tuning: bool = False  # a tuning study (runs = trials), else an experiment grid (runs = cells)
    model: str = ""  # a tuning study's model or variant
    free: int = 0  # runs copied from an earlier stage's runs (robustness's clean cells), not trained

    @property
    def left(self) -> int:
        """Runs still to train (copies are made first, so `done` covers them once made)."""
        return max(self.runs - max(self.done, self.free), 0)


@dataclass
class StagePlan:
    name: str
    items: list[Item]
    overhead: float = 0.0  # seconds outside the runs (LID pre-training)
    note: str = ""

    @property
    def runs(self) -> int:
        return sum(i.runs for i in self.items)

    @property
    def done(self) -> int:
        return sum(min(i.done, i.runs) for i in self.items)

    def remaining_seconds(self) -> float:
        return sum(i.left * i.per_run for i in self.items) + (self.overhead if self.done < self.runs else 0)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(option: str, value: str) -> list[int]:
    try:
        out = [int(v) for v in _split(value)]
    except ValueError:
        raise HarnessError(f"{option} {value}: expected comma-separated integers") from None
    if not out:
        raise HarnessError(f"{option}: give at least one value")
    return out


def untuned(model: str) -> bool:
    """A model with nothing to tune (no config field: MostPop, the popularity floor): Table 2
    shows it, the tune and select stages skip it."""
    import models

    return not dataclasses.fields(models.get(model).config_cls)


def tuned(names: list[str]) -> list[str]:
    return [m for m in names if not untuned(m)]


def default_models() -> tuple[list[str], list[str]]:
    """Table 2's systems: every registered model but the ablation variants that has a study
    file (its search space) or nothing to tune (MostPop), IGR-SR last; and the models left out
    for want of a study file."""
    import models
    from harness.studies import study_file_for

    names, without = [], []
    for name in models.names():
        if "/" in name or name == PROPOSED:
            continue
        if untuned(name):
            names.append(name)
            continue
        try:
            study_file_for(name)
            names.append(name)
        except HarnessError:
            without.append(name)
    return [*names, PROPOSED], without


def variants() -> list[str]:
    from harness.kinds.ablate import VARIANTS

    return list(VARIANTS)


def check(job: PaperJob) -> list[str]:
    """One-line errors for bad input, before anything is measured or stored; returns the models."""
    import models
    from harness.studies import study_file_for

    if job.hours is not None and not (job.hours > 0 and math.isfinite(job.hours)):
        raise HarnessError(f"--hours {job.hours:g}: expected a positive number of hours")
    unknown = [s for s in job.stages if s not in STAGES]
    if unknown or not job.stages:
        raise HarnessError(f"--stages {','.join(job.stages)}: choose from {', '.join(STAGES)}")
    names = list(dict.fromkeys(job.models)) if job.models else default_models()[0]
    for name in names:
        try:
            models.get(name)
        except KeyError as e:
            raise HarnessError(f"--models: {e.args[0]}") from None
        if "/" in name:
            raise HarnessError(f"--models {name}: an ablation variant; the ablate stage runs the variants")
        if untuned(name):
            continue
        try:
            study_file_for(name)
        except HarnessError as e:
            raise HarnessError(f"--models {name}: {e}") from None
    if PROPOSED not in names and {"ablate", "sensitivity"} & set(job.stages):
        raise HarnessError(f"--models: the ablate and sensitivity stages need {PROPOSED}'s tuned parameters; "
                           f"add {PROPOSED} or leave those out of --stages")
    if "robustness" in job.stages:
        for name in _split(job.robustness_models):
            if name not in names:
                raise HarnessError(f"--robustness-models {name}: not among --models (its parameters come from "
                                   "its tuning study)")
    _ints("--k", job.ks)
    _ints("--m", job.ms)
    if job.min_epochs is not None and job.min_epochs > job.epochs:
        raise HarnessError(f"--min-epochs {job.min_epochs}: above the epoch cap --epochs {job.epochs}")
    return names


@contextmanager
def _threads_env(threads: int):
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: str(threads) for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def first_params(model: str) -> dict[str, Any]:
    """A model's study file's fixed values and first enqueued trial: its authors' settings (the
    select stage's other candidate), and what its bench times."""
    if untuned(model):
        return {}
    sf = _study_file(model)
    return {**sf.fixed, **(sf.enqueue[0] if sf.enqueue else {})}


def measure_costs(job: PaperJob, names: list[str], data, threads: int,
                  echo: Callable[[str], None]) -> dict[str, Cost]:
    """Seconds per epoch and per validation of each model: the cached bench figure, a bench
    run now (unless --no-bench), or the rough default."""
    from harness.bench import bench_in_subprocess
    from harness.train import resolve_device

    device = str(resolve_device(job.base.train.device))
    scale = data.n_interactions / TOYS_INTERACTIONS
    folder = cost_folder(job)
    costs: dict[str, Cost] = {}
    for model in names:
        params = first_params(model)
        key = {"model": model, "data": data.content_hash, "precision": job.base.train.precision, "device": device,
               "threads": threads, "batches": job.bench_batches, "params": params, "code": _training_code_hash()}
        path = folder / (hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
                         + ".json")
        if path.is_file():
            try:
                got = json.loads(path.read_text())
                costs[model] = Cost(got["seconds_per_epoch"], got["eval_seconds"], f"bench, cached {got['when']}")
                continue
            except (OSError, ValueError, KeyError):
                pass  # a torn cache file: measure again
        rough = Cost(ROUGH_SECONDS_PER_EPOCH.get(model, max(ROUGH_SECONDS_PER_EPOCH.values())) * scale,
                     ROUGH_EVAL_SECONDS * scale, "rough default")
        if not job.bench:
            costs[model] = rough
            continue
        echo(f"measuring {model}'s cost: harness bench, {job.bench_batches} batches at {threads} thread(s) "
             f"(once; cached in {folder})")
        spec = dataclasses.replace(job.base.with_values(params, model=model, dataset=job.dataset), lid_epochs=1)
        try:
            with _threads_env(threads):
                report = bench_in_subprocess(spec, job.bench_batches, "cpu" if threads == 1 else "wall")
        except HarnessError as e:
            echo(f"warning: {e}; the ETA uses a rough default for {model}")
            costs[model] = dataclasses.replace(rough, source="rough default (bench failed)")
            continue
        when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        costs[model] = Cost(report["seconds_per_epoch"], report["eval_seconds"], "bench, measured now")
        folder.mkdir(parents=True, exist_ok=True)
        _write_text(path, json.dumps({**key, "seconds_per_epoch": report["seconds_per_epoch"],
                                      "eval_seconds": report["eval_seconds"], "when": when}, indent=1, default=str))
    return costs


def cost_folder(job: PaperJob) -> Path:
    """Where measured costs are cached: in the run folder with --run-dir (a resumed run on
    another machine of the same kind plans with the same figures), else the cache directory."""
    return job.run_dir / "costs" if job.run_dir is not None else job.base.cache_dir / "paper-bench"


@functools.lru_cache(maxsize=None)
def _training_code_hash() -> str:
    """The content of the code an epoch's cost depends on (models/, the trainer, the batches):
    a cached cost is measured again once a model is made faster, and only then."""
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "models").glob("*.py")) + [root / "harness" / "train.py", root / "harness" / "data" / "split.py"]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _study_file(model: str):
    """studies/<model>.toml, parsed once per process (the plan is rebuilt many times by --hours)."""
    from harness.studies import load_study_file, study_file_for

    return load_study_file(study_file_for(model))


def default_first_rung(names: list[str], epochs: int) -> int:
    """The largest first rung (Hyperband's min_resource) of the models' study files, capped at
    the epoch cap: a slow starter's rung is every model's, so none is pruned before its own."""
    rungs = [int(_study_file(m).pruner[1].get("min_resource", 1)) for m in tuned(names)]
    return min(max(rungs, default=1), epochs)


def _patience(job: PaperJob, model: str) -> int:
    import models

    if "patience" in job.given:
        return job.base.train.patience
    if untuned(model):
        return job.base.train.patience
    own = _study_file(models.get(model).study_model).trainer
    return int(own.get("patience", job.base.train.patience))


def build_plan(job: PaperJob, names: list[str], budget: Budget, costs: dict[str, Cost]) -> list[StagePlan]:
    """Stages, their runs and estimated seconds (nothing done yet; `fill_done` adds that)."""
    from harness.studies import SearchParam

    def cost(model: str) -> Cost:
        if untuned(model):
            return Cost(0.0, ROUGH_EVAL_SECONDS, "nothing to train")
        return costs.get(model) or costs[PROPOSED]

    def final_epochs(model: str) -> int:  # to early stop: about the tuning cap's best epoch + patience
        return min(job.final_epochs, job.epochs + _patience(job, model))

    def grid_item(label: str, study: str, models_: list[str], per_model: int, free: int = 0) -> Item:
        runs = per_model * len(models_)
        seconds = sum(final_epochs(m) * cost(m).epoch for m in models_) / max(len(models_), 1)
        return Item(label, study, runs, round(sum(final_epochs(m) for m in models_) / max(len(models_), 1)), seconds,
                    free=free)

    plans: list[StagePlan] = []
    if "tune" in job.stages:
        items = [Item(m, job.study(m), budget.trials, budget.epochs, budget.epochs * cost(m).epoch, tuning=True, model=m)
                 for m in tuned(names)]
        overhead = 0.0
        if PROPOSED in names:
            d_l = next((p for p in _study_file(PROPOSED).space if p.name == "d_l"), None)
            n_lid = len(d_l.choices) if isinstance(d_l, SearchParam) and d_l.type == "categorical" else 1
            lid_cost = costs.get("sasrec") or Cost(cost(PROPOSED).seconds_per_epoch / 2, cost(PROPOSED).eval_seconds, "")
            overhead = n_lid * min(job.base.lid_epochs, LID_EPOCHS_GUESS) * lid_cost.epoch
        plans.append(StagePlan("tune", items, overhead, f"{_n(budget.trials, 'trial')} per model, at most "
                                                        f"{budget.epochs} epochs each, {budget.pruner} from epoch "
                                                        f"{budget.first_rung}"))
    if "select" in job.stages:
        plans.append(StagePlan("select", [grid_item("select", job.study("select"), tuned(names), 2)],
                               note="per model, its authors' settings and its best tuned trial, each trained to early "
                                    f"stop on the tuning seed {job.base.train.seed}; the better by validation NDCG@10 "
                                    "is what the experiments use (one run where the two are the same)"))
    if "compare" in job.stages:
        plans.append(StagePlan("compare", [grid_item("compare", job.study("compare"), names, job.seeds)],
                               note=f"{_n(len(names), 'model')} x {_n(job.seeds, 'seed')}, to early stop"))
    if "ablate" in job.stages:
        items = [Item(f"lr of {v.split('/')[-1]}", None, budget.lr_trials, budget.epochs,
                      budget.epochs * cost(v).epoch, tuning=True, model=v) for v in variants()]
        items.append(grid_item("ablate", job.study("ablate"), variants(), job.seeds))
        plans.append(StagePlan("ablate", items, note=f"{len(variants())} lr studies x {_n(budget.lr_trials, 'trial')}, "
                                                     f"then {len(variants())} variants x {_n(job.seeds, 'seed')}"))
    if "sensitivity" in job.stages:
        ks, ms = _ints("--k", job.ks), _ints("--m", job.ms)
        plans.append(StagePlan("sensitivity", [grid_item("sensitivity", job.study("sensitivity"), [PROPOSED],
                                                         len(ks) * len(ms) * job.sensitivity_seeds)],
                               note=f"k {job.ks} x m {job.ms} x {_n(job.sensitivity_seeds, 'seed')} (--sensitivity-seeds); "
                                    "a cell at IGR-SR's tuned k and m is copied from compare"))
    if "robustness" in job.stages:
        rob = _split(job.robustness_models)
        reused = job.seeds * len(rob) if "compare" in job.stages else 0
        plans.append(StagePlan("robustness", [grid_item("robustness", job.study("robustness"), rob, 2 * job.seeds,
                                                        free=reused)],
                               note=f"{_n(len(rob), 'model')} x (clean, {job.noise:g} noise on {job.noise_on}) x "
                                    f"{_n(job.seeds, 'seed')}" + ("; the clean cells are compare's runs, copied"
                                                                   if reused else "")))
    if "report" in job.stages:
        plans.append(StagePlan("report", [], note="every table and figure, the tuning overview, the manifest"))
    return plans


def total_seconds(plans: list[StagePlan], workers: int) -> float:
    return sum(p.remaining_seconds() for p in plans) / workers


def fit_budget(job: PaperJob, names: list[str], costs: dict[str, Cost], first_rung: int) -> Budget:
    """The budget; with --hours, trials (and lr trials with them) cut first, then the epoch cap
    down to the first rung, until the whole pipeline's estimate fits."""
    budget = Budget(job.trials, job.lr_trials, job.epochs, first_rung, job.pruner,
                    requested={"trials": job.trials, "lr_trials": job.lr_trials, "epochs": job.epochs})
    if job.hours is None:
        return budget
    target = job.hours * 3600

    def fits() -> bool:
        return total_seconds(build_plan(job, names, budget, costs), job.workers) <= target

    while not fits() and budget.trials > 1:
        budget.trials -= 1
        budget.lr_trials = max(1, math.ceil(job.lr_trials * budget.trials / job.trials))
    while not fits() and budget.epochs > first_rung:
        budget.epochs -= 1
    budget.fits = fits()
    if budget.trials != job.trials:
        budget.cut.append(f"trials per model {job.trials} -> {budget.trials}")
    if budget.lr_trials != job.lr_trials:
        budget.cut.append(f"lr trials per ablation variant {job.lr_trials} -> {budget.lr_trials}")
    if budget.epochs != job.epochs:
        budget.cut.append(f"tuning epoch cap {job.epochs} -> {budget.epochs} (never below the first rung, "
                          f"{first_rung})")
    return budget


def format_duration(seconds: float) -> str:
    """'42 s', '12 min', '3 h 05 min': the one duration format (harness.progress writes it)."""
    from harness.progress import duration

    return duration(seconds)


def _cost_sources(job: PaperJob, costs: dict[str, Cost]) -> str:
    """Where the costs came from, one phrase per kind: "bench, cached" with the span of dates."""
    cached = sorted(c.source.removeprefix("bench, cached ") for c in costs.values()
                    if c.source.startswith("bench, cached "))
    others = sorted({c.source for c in costs.values() if not c.source.startswith("bench, cached ")})
    parts = [f"{s} ({sum(c.source == s for c in costs.values())} figures)" for s in others]
    if cached:
        span = cached[0][:16] if cached[0][:16] == cached[-1][:16] else f"{cached[0][:16]} to {cached[-1][:16]}"
        parts.append(f"bench ({len(cached)} figures, cached {span.replace('T', ' ')} UTC in "
                     f"{cost_folder(job)}: delete to measure again)")
    return "; ".join(parts)


def format_plan(job: PaperJob, plans: list[StagePlan], budget: Budget, costs: dict[str, Cost], threads: int):
    from rich import box
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"plan: harness paper on {job.dataset}, {job.workers} worker{'s' * (job.workers > 1)}",
                  box=box.SIMPLE_HEAD)
    for name, justify in (("stage", "left"), ("part", "left"), ("runs done/all", "right"),
                          ("epochs", "right"), ("time left", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for plan in plans:
        if not plan.items:
            table.add_row(plan.name, "", "-", "-", "-")
        for i, item in enumerate(plan.items):
            epochs = f"<= {item.epochs}" if item.tuning else f"~{item.epochs}"
            copied = f" ({item.free} copied)" if item.free else ""
            table.add_row(plan.name if i == 0 else "", item.label, f"{item.done} / {item.runs}{copied}", epochs,
                          format_duration(item.left * item.per_run / job.workers))
        if plan.overhead and plan.done < plan.runs:
            table.add_row("", "LID encoders", "", "", f"<= {format_duration(plan.overhead)}")
    parts: list[Any] = [table, f"  storage {job.storage or 'studies/optuna.journal'}; outputs {job.out_dir}"]
    parts += [f"  {p.name}: {p.note}" for p in plans if p.note]
    sources = _cost_sources(job, costs)
    parts.append(f"ETA {format_duration(total_seconds(plans, job.workers))} for the runs left "
                 f"({sum(i.left for p in plans for i in p.items)} of {sum(p.runs for p in plans)} to train); per-epoch costs at "
                 f"{threads} thread(s), {job.base.train.precision}: {sources}. Tuning estimates assume "
                 "no trial is pruned; experiments' epochs are a guess (cap + patience).")
    if job.hours is not None:
        if budget.cut:
            parts.append(f"--hours {job.hours:g} cut: " + "; ".join(budget.cut))
        else:
            parts.append(f"--hours {job.hours:g}: the plan fits, nothing cut")
        if not budget.fits:
            parts.append(f"[yellow]warning: even cut to the floor (1 trial, epoch cap {budget.first_rung}) the plan "
                         f"does not fit in {job.hours:g} h: the experiments' runs are not cut (lower --seeds, the --k/--m grid or "
                         "--stages); it runs anyway, and a rerun resumes it[/yellow]")
    return Group(*parts)


def _write_text(path: Path, text: str) -> None:
    """Write only a change, and atomically: the stages' worker processes write the same files."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"
