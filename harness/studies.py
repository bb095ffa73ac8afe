"""Study files -> Optuna studies: search space, sampler, pruner, the objective.

A study file (TOML, one per model, under studies/) says what `harness tune` searches:

    model = "igr-sr"               registered model (required)
    description = "..."            free text
    metric = "valid_ndcg@10"       the only one allowed: the protocol fixes model selection and
    direction = "maximize"         pruning on validation NDCG@10 (the trainer's early stopping)
    trials = 50                    target COMPLETE + PRUNED trials in the study (--trials)
    sampler = "tpe"                "tpe" | "random", or { name = "tpe", seed = 0, ... } (arguments)
    pruner = "hyperband"           "hyperband" | "median" | "none", or { name = ..., ... } (--pruner)
    [trainer]                      the model's own training budget where its code differs from the
                                   harness's: patience, epochs (e.g. patience = 40). Defaults, not
                                   fixed values: they replace the trainer flags' defaults in `tune`
                                   and in every experiment (compare, ...), and a flag given on the
                                   command line wins; captions say when a model's differ
    [fixed]                        values every trial uses: model config fields or trainer keys
    [space]                        name = { type = "int"|"float"|"categorical", low, high, log,
                                   step, choices, when = { other = value } }, suggested in file order
    [[enqueue]]                    parameter sets run first, once, when the study is created

Trainer keys (lr, weight_decay, batch_size) go to TrainConfig; every other key must be a field
of the model's config. Every error names the file and the key.

Storage, worker liveness, retries and artifacts live in harness/store.py.

The objective: suggest -> RunSpec -> harness.runs.run, reporting validation NDCG@10 each epoch
to the pruner; a finished trial keeps its run record in user attrs and its checkpoint and
per-user ranks as Optuna artifacts (results/artifacts/).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial

from harness import faults
from harness.errors import HarnessError, first_line
from harness.runs import TRAINER_KEYS
from harness.stopping import RunStopped
from harness.store import (is_storage_error, quiet_experimental, requeue, store_record, this_worker,
                           when_storage_answers)


STUDY_DIRS = (Path("studies"), Path(__file__).resolve().parent.parent / "studies")
METRIC = "valid_ndcg@10"
TOP_KEYS = ("model", "description", "metric", "direction", "trials", "sampler", "pruner", "trainer", "fixed",
            "space", "enqueue")
# TrainConfig fields a study file's [trainer] may set: a model's training budget (how long it
# may train, how long it may go without a better validation NDCG@10), not what it computes
TRAINER_DEFAULT_KEYS = ("patience", "epochs")
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices", "when")
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
PRUNERS = {"hyperband": optuna.pruners.HyperbandPruner, "median": optuna.pruners.MedianPruner,
           "none": optuna.pruners.NopPruner}


# ---------------------------------------------------------------------------------------------
# Study files
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str  # "int", "float" or "categorical"
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple = ()
    when: dict[str, Any] = field(default_factory=dict)  # suggested only if these values hold

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(k) == v for k, v in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.type == "float" or isinstance(value, int))

    def describe(self) -> str:
        """One line, also the stored form the resume check compares: `log-float [0.05, 1.0]`."""
        if self.type == "categorical":
            text = "{" + ", ".join(json.dumps(c) for c in self.choices) + "}"
        else:
            text = f"{'log-' if self.log else ''}{self.type} [{self.low!r}, {self.high!r}]"
            text += f" step {self.step!r}" if self.step else ""
        if self.when:
            text += " when " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in self.when.items())
        return text


@dataclass(frozen=True)
class StudyFile:
    path: Path
    model: str
    space: tuple[SearchParam, ...]
    fixed: dict[str, Any]
    context: dict[str, Any]  # values `when` conditions see: config defaults, then fixed ones
    description: str = ""
    metric: str = METRIC
    direction: str = "maximize"
    trials: int = 50
    sampler: tuple[str, dict] = ("tpe", {})
    pruner: tuple[str, dict] = ("hyperband", {})
    enqueue: tuple[dict, ...] = ()
    trainer: dict[str, Any] = field(default_factory=dict)  # [trainer]: the model's budget defaults

    def trainer_defaults(self, given: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
        """[trainer] values, less those whose flag the user gave on the command line."""
        return {k: v for k, v in self.trainer.items() if k not in given}


def study_file_for(model: str) -> Path:
    """studies/<model>.toml in the working directory, else in the repository."""
    name = model.replace("/", "_") + ".toml"
    for directory in STUDY_DIRS:
        if (directory / name).is_file():
            return directory / name
    raise HarnessError(f"no study file for model {model!r}: looked for {STUDY_DIRS[0] / name} and "
                       f"{STUDY_DIRS[1] / name}; write one (see studies/igr-sr.toml) and pass --study FILE")


def pick_study_file(path: str | None, model: str | None, extra_fixed: dict[str, str]) -> StudyFile:
    """--study FILE, else studies/<--model>.toml (default igr-sr); both must agree."""
    sf = load_study_file(path if path else study_file_for(model or "igr-sr"), extra_fixed)
    if model and sf.model != model:
        raise HarnessError(f"--model {model}: the study file {sf.path} tunes {sf.model}")
    return sf


def load_study_file(path: Path | str, extra_fixed: dict[str, str] | None = None) -> StudyFile:
    """Parse and check a study file; `extra_fixed` are `--param KEY=VALUE` strings."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"study file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"{path}: not valid TOML ({e})") from None
    for key in raw:
        if key not in TOP_KEYS:
            raise HarnessError(f"{path}: {key}: unknown key; known: {', '.join(TOP_KEYS)}")
    model = _typed(raw, "model", str, path, None)
    if model is None:
        raise HarnessError(f'{path}: model: missing (the registered model to tune, e.g. "igr-sr")')
    metric = _typed(raw, "metric", str, path, METRIC)
    if metric != METRIC:
        raise HarnessError(f"{path}: metric: {metric!r} is not supported; the protocol selects and prunes "
                           f"on {METRIC!r}")
    direction = _typed(raw, "direction", str, path, "maximize")
    if direction != "maximize":
        raise HarnessError(f"{path}: direction: {METRIC} is maximized, got {direction!r}")
    trials = _typed(raw, "trials", int, path, 50)
    if trials < 1:
        raise HarnessError(f"{path}: trials: expected a positive integer, got {trials}")
    space_raw = _typed(raw, "space", dict, path, {})
    if not space_raw:
        raise HarnessError(f"{path}: space: missing or empty (at least one parameter to search)")
    space = tuple(_parse_param(path, name, spec) for name, spec in space_raw.items())
    sf = StudyFile(path=path, model=model, space=space, fixed=dict(_typed(raw, "fixed", dict, path, {})),
                   context={}, description=_typed(raw, "description", str, path, ""), metric=metric,
                   direction=direction, trials=trials,
                   sampler=_parse_choice(raw, "sampler", SAMPLERS, path),
                   pruner=_parse_choice(raw, "pruner", PRUNERS, path),
                   enqueue=tuple(_typed(raw, "enqueue", list, path, [])),
                   trainer=_parse_trainer(raw, path))
    return _check_against_model(sf, extra_fixed or {})


def _parse_trainer(raw: dict, path: Path) -> dict[str, Any]:
    trainer = _typed(raw, "trainer", dict, path, {})
    for key, value in trainer.items():
        if key not in TRAINER_DEFAULT_KEYS:
            hint = " (learning rate, batch size, weight decay: [fixed] or [space])" if key in TRAINER_KEYS else ""
            raise HarnessError(f"{path}: trainer.{key}: not a training-budget setting; known: "
                               f"{', '.join(TRAINER_DEFAULT_KEYS)}{hint}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HarnessError(f"{path}: trainer.{key}: expected a positive integer, got {value!r}")
    return dict(trainer)


def _typed(raw: dict, key: str, kind: type, path: Path, default: Any) -> Any:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise HarnessError(f"{path}: {key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table",
            list: "a list of tables"}.get(kind, kind.__name__)


def _parse_param(path: Path, name: str, raw: Any) -> SearchParam:
    where = f"{path}: space.{name}"
    if not isinstance(raw, dict):
        raise HarnessError(f'{where}: expected a table like {{ type = "int", low = 1, high = 5 }}, got {raw!r}')
    for key in raw:
        if key not in PARAM_KEYS:
            raise HarnessError(f"{where}.{key}: unknown key; known: {', '.join(PARAM_KEYS)}")
    kind = raw.get("type")
    if kind not in ("int", "float", "categorical"):
        raise HarnessError(f'{where}.type: expected "int", "float" or "categorical", got {kind!r}')
    when = raw.get("when", {})
    if not isinstance(when, dict):
        raise HarnessError(f"{where}.when: expected a table like {{ use_icr = true }}, got {when!r}")
    if kind == "categorical":
        for key in ("low", "high", "log", "step"):
            if key in raw:
                raise HarnessError(f"{where}.{key}: not used by a categorical parameter (give choices)")
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise HarnessError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        for choice in choices:
            if not isinstance(choice, (bool, int, float, str)):
                raise HarnessError(f"{where}.choices: {choice!r} is not a number, string or boolean")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise HarnessError(f"{where}.choices: repeated values in {choices!r}")
        return SearchParam(name, kind, choices=tuple(choices), when=dict(when))
    if "choices" in raw:
        raise HarnessError(f"{where}.choices: only for type = \"categorical\"")
    number = int if kind == "int" else (int, float)
    for key in ("low", "high"):
        if key not in raw:
            raise HarnessError(f"{where}.{key}: missing")
        if isinstance(raw[key], bool) or not isinstance(raw[key], number):
            raise HarnessError(f"{where}.{key}: expected {_kind_name(int if kind == 'int' else float)}, "
                               f"got {raw[key]!r}")
    low, high = raw["low"], raw["high"]
    if low > high:
        raise HarnessError(f"{where}: low ({low}) > high ({high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise HarnessError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise HarnessError(f"{where}.low: a log range needs low > 0, got {low}")
    step = raw.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise HarnessError(f"{where}.step: expected a positive {kind}, got {step!r}")
        if log:
            raise HarnessError(f"{where}.step: cannot be combined with log = true")
    if kind == "float":
        low, high, step = float(low), float(high), None if step is None else float(step)
    return SearchParam(name, kind, low, high, log, step, when=dict(when))


def _parse_choice(raw: dict, key: str, known: dict[str, Callable], path: Path) -> tuple[str, dict]:
    """`key = "name"` or `key = { name = "...", arg = value }`; args are checked by name only."""
    value = raw.get(key, next(iter(known)))
    options: dict = {}
    if isinstance(value, dict):
        options = {k: v for k, v in value.items() if k != "name"}
        value = value.get("name")
    if value not in known:
        raise HarnessError(f"{path}: {key}: expected one of {', '.join(known)}, got {value!r}")
    accepted = inspect.signature(known[value]).parameters
    for option in options:
        if option not in accepted:
            raise HarnessError(f"{path}: {key}.{option}: not an argument of the {value} {key}; "
                               f"known: {', '.join(accepted) or 'none'}")
    return value, options


def _check_against_model(sf: StudyFile, extra_fixed: dict[str, str]) -> StudyFile:
    import models
    from harness import config as config_mod
    from harness.train import TrainConfig

    try:
        spec = models.get(sf.model)
    except KeyError as e:
        raise HarnessError(f"{sf.path}: model: {e.args[0]}") from None
    model_fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    hints = typing.get_type_hints(spec.config_cls)  # its fields' (not the RANGES class attribute's)
    types = {**{k: hints[k] for k in model_fields}, **{k: typing.get_type_hints(TrainConfig)[k] for k in TRAINER_KEYS}}

    def check_key(key: str, where: str) -> type:
        if key in spec.fixed:
            raise HarnessError(f"{where}: {sf.model} fixes {key} = {spec.fixed[key]!r}")
        if key == "max_len":
            raise HarnessError(f"{where}: the history length is a trainer setting; use --max-len")
        if key not in types:
            raise HarnessError(f"{where}: not a parameter of {sf.model}; known: "
                               f"{', '.join([*model_fields, *TRAINER_KEYS])}")
        return types[key]

    fixed = {}
    for key, value in sf.fixed.items():
        fixed[key] = _check_value(value, check_key(key, f"{sf.path}: fixed.{key}"), f"{sf.path}: fixed.{key}")
        config_mod.check_range(sf.model, spec.config_cls, key, fixed[key], where=f"{sf.path}: fixed.{key} = {value!r}")
    searched = {p.name for p in sf.space}
    for key, value in config_mod.coerce(spec.config_cls, extra_fixed, where="--param", model=sf.model).items():
        if key in searched:
            raise HarnessError(f"--param {key}: {sf.path} searches {key}; edit the study file or drop the flag")
        check_key(key, f"--param {key}")
        fixed[key] = value
    context = {**{k: f.default for k, f in model_fields.items() if f.default is not dataclasses.MISSING},
               **spec.fixed, **fixed}
    # hidden a multiple of heads...: where neither is searched, every trial has these values
    config_mod.check_multiples(sf.model, spec.config_cls, {k: v for k, v in context.items() if k not in searched},
                               where=f"{sf.path}: ")
    seen: dict[str, SearchParam] = {}
    for p in sf.space:
        where = f"{sf.path}: space.{p.name}"
        if p.name in fixed:
            raise HarnessError(f"{where}: also in [fixed]; a parameter is either searched or fixed")
        kind = check_key(p.name, where)
        expected = "int" if kind is int else "float" if kind is float else "categorical"
        if p.type != "categorical" and p.type != expected:
            raise HarnessError(f'{where}: {sf.model}\'s {p.name} takes {_kind_name(kind)}; use type = "{expected}"')
        for choice in p.choices:
            _check_value(choice, kind, f"{where}.choices")
            config_mod.check_range(sf.model, spec.config_cls, p.name, choice, where=f"{where}.choices: {choice!r}")
        if p.type != "categorical":
            config_mod.check_range(sf.model, spec.config_cls, p.name, p.low, p.high, where=where)
        for key, value in p.when.items():
            if key in seen:
                if not seen[key].contains(value):
                    raise HarnessError(f"{where}.when.{key}: {value!r} is never suggested for {key}")
            elif key in searched:
                raise HarnessError(f"{where}.when.{key}: {key} must come before {p.name} in [space]")
            elif key not in context:
                raise HarnessError(f"{where}.when.{key}: not a parameter of {sf.model}")
        seen[p.name] = p
    for i, params in enumerate(sf.enqueue):
        if not isinstance(params, dict):
            raise HarnessError(f"{sf.path}: enqueue[{i}]: expected a table of parameter values")
        for key, value in params.items():
            if key not in seen:
                raise HarnessError(f"{sf.path}: enqueue[{i}].{key}: not in [space]")
            if not seen[key].contains(value):
                raise HarnessError(f"{sf.path}: enqueue[{i}].{key}: {value!r} is outside {seen[key].describe()}")
    for key, make in (("sampler", make_sampler), ("pruner", make_pruner)):
        try:  # check the arguments' values now rather than in the first trial
            make(sf, None, 200)
        except (TypeError, ValueError) as e:
            raise HarnessError(f"{sf.path}: {key}: {e}") from None
    return dataclasses.replace(sf, fixed=fixed, context=context)


def _check_value(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise HarnessError(f"{where}: expected {_kind_name(kind)}, got {value!r}")


def suggest(trial: optuna.Trial, sf: StudyFile) -> dict[str, Any]:
    """The trial's parameters; a conditional one is absent when its `when` does not hold."""
    params: dict[str, Any] = {}
    for p in sf.space:
        if p.active({**sf.context, **params}):
            params[p.name] = p.suggest(trial)
    return params


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose random stream is a function of the study's seed and the trial's number.

    Why: a seeded Optuna sampler draws from one stream per process, so a study resumed in a new
    process (after a stop, on another machine) or run by several workers proposes other points
    than one uninterrupted run would. Here every trial gets a fresh sampler seeded with
    (seed, trial number), made when the trial is created (`before_trial`), so what trial n
    proposes depends only on the seed and the finished trials it sees: a stopped and resumed
    study proposes what the uninterrupted one did, and workers never propose alike."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self.seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make((self.seed * 1_000_003 + trial.number) % 2**32)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        pass  # the stream is the trial's, by design


def sampler_seed(sf: StudyFile, default: int) -> int:
    """The study file's sampler seed, else `default` (the run seed): every study is seeded."""
    seed = sf.sampler[1].get("seed")
    return int(seed) if seed is not None else int(default)


def make_sampler(sf: StudyFile, worker: int | None, epoch_cap: int,
                 seed: int = 2020) -> optuna.samplers.BaseSampler:
    """The study file's sampler, seeded per trial (TrialSeededSampler) from its own seed or
    `seed`; `worker` no longer shifts the seed, since trial numbers already differ."""
    name, options = sf.sampler
    options = {k: v for k, v in options.items() if k != "seed"}
    if name == "tpe":
        # grouped multivariate TPE models the conditional space (p_mask only with use_icr) jointly
        options = {"multivariate": True, "group": True, **options}

    def make(trial_seed: int) -> optuna.samplers.BaseSampler:
        with quiet_experimental():
            return SAMPLERS[name](**options, seed=trial_seed)

    return TrialSeededSampler(make, sampler_seed(sf, seed))


def make_pruner(sf: StudyFile, override: str | None, epoch_cap: int,
                min_epochs: int | None = None) -> optuna.pruners.BasePruner:
    """The study file's pruner (or `override`), with epochs as the resource. `min_epochs`, when
    given, is the fewest epochs a trial trains before it may be pruned: Hyperband's min_resource,
    the Median pruner's warm-up. A study file written for a 200-epoch cap asks for a first rung
    that a short, capped session would barely reach; this is the knob that rescales it."""
    name, options = sf.pruner
    if override is not None and override != name:
        name, options = override, {}  # the file's arguments belong to its own pruner
    options = dict(options)
    if name == "median":
        options = {"n_startup_trials": 5, "n_warmup_steps": 0, **options}
        if min_epochs is not None:
            options["n_warmup_steps"] = min_epochs  # epochs are reported as steps 1, 2, ...
    if name == "hyperband":
        # resource = epochs; the largest bracket runs to the per-trial epoch cap
        options.setdefault("max_resource", epoch_cap)
        if min_epochs is not None:
            options["min_resource"] = min_epochs
        options["min_resource"] = min(options.get("min_resource", 1), options["max_resource"])
    return PRUNERS[name](**options)


# ---------------------------------------------------------------------------------------------
# The objective: one trial = one run
# ---------------------------------------------------------------------------------------------

@dataclass
class TuneJob:
    study_file: StudyFile
    dataset: str
    base: Any  # harness.runs.RunSpec: trainer flags (--epochs is the per-trial cap), data and cache
    results_dir: Path = Path("results")
    storage_url: str | None = None
    study_name: str | None = None
    trials: int | None = None  # None: the study file's budget
    timeout: float | None = None
    new_study: bool = False
    workers: int = 1
    pruner: str | None = None  # overrides the study file's
    min_epochs: int | None = None  # overrides the pruner's first rung / warm-up
    heartbeat: int = 60  # RDB storages only
    given_flags: frozenset[str] = frozenset()  # options given on the command line
    # seconds per epoch (training + validation) from a cost model, for --stop-after's "does the
    # next trial fit" when the study has no finished trial to measure yet
    epoch_seconds: float | None = None

    def __post_init__(self) -> None:
        # the study file's [trainer] budget replaces the flags' defaults (a given flag wins), so
        # trials, the study's stored definition and its captions all see the model's own budget
        defaults = self.study_file.trainer_defaults(self.given_flags)
        if defaults:
            self.base = dataclasses.replace(self.base, train=dataclasses.replace(self.base.train, **defaults))

    @property
    def target(self) -> int:
        return self.trials or self.study_file.trials

    @property
    def pruner_name(self) -> str:
        return self.pruner or self.study_file.pruner[0]

    def default_study_name(self) -> str:
        dataset = Path(self.dataset).stem if "/" in self.dataset else self.dataset
        return f"{self.study_file.model}-{dataset}"

    @property
    def sampler_seed(self) -> int:
        return sampler_seed(self.study_file, self.base.train.seed)

    def trial_checkpoint(self, trial: optuna.Trial, spec) -> Path:
        """The in-flight checkpoint of one trial: named by study, trial number and the run's
        identity, so a stale file of another study or parameter set is never resumed."""
        import hashlib

        from harness.runs import train_identity

        key = json.dumps({"study": trial.study.study_name, "trial": trial.number, "model": spec.model,
                          "params": spec.params, "train": train_identity(spec.train)}, sort_keys=True, default=str)
        folder = self.base.checkpoint_root
        name = trial.study.study_name.replace("/", "_")
        return folder / f"{name}-t{trial.number}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def trial_spec(job: TuneJob, params: dict[str, Any]):
    """RunSpec of one trial: the study file's fixed values, then the trial's."""
    return job.base.with_values({**job.study_file.fixed, **params}, model=job.study_file.model, dataset=job.dataset)


def make_objective(job: TuneJob, store, progress=None) -> Callable[[optuna.Trial], float]:
    """suggest -> RunSpec -> run, pruning on validation NDCG@10; a failure's reason is kept.
    `progress` (harness.progress; None: silent) shows each trial's start, epochs and pre-training."""

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(trial, job, store, progress)
        except optuna.TrialPruned:
            raise
        except RunStopped as e:
            suspend(trial, str(e))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            requeue(trial.study, frozen(trial))  # a resumed study runs it again
            raise
        except Exception as e:
            if is_storage_error(e):
                # the database went away mid-trial (a restart): the run itself was fine, so once
                # the storage answers again the trial is failed for that reason and retried
                reason = f"storage lost mid-trial ({type(e).__name__}: {first_line(e)})"
                when_storage_answers(lambda: trial.set_user_attr("fail_reason", reason))
                when_storage_answers(lambda: requeue(trial.study, frozen(trial)))
                raise
            # bad input says what to fix; anything else names its type too
            trial.set_user_attr("fail_reason", first_line(e) if isinstance(e, HarnessError)
                                else f"{type(e).__name__}: {first_line(e)}")
            # the trial's own outcome (it diverged, ran out of memory) spends its share of the
            # budget; the setup's (a full disk, bad input) does not: the same trial would work
            from harness.train import TrainingDiverged

            own = isinstance(e, TrainingDiverged) or not isinstance(e, HarnessError)
            trial.set_user_attr("counts_toward_budget", own)
            raise

    return objective


def run_trial(trial: optuna.Trial, job: TuneJob, store, progress=None) -> float:
    from harness.progress import resolve
    from harness.runs import run

    cap = job.base.train.epochs
    faults.point("trial")
    trial.set_user_attr("worker", this_worker())
    trial.set_user_attr("epoch_cap", cap)
    stored = frozen(trial).user_attrs
    if stored.get("suspended"):
        trial.set_user_attr("suspended", None)  # resumed: running again from its checkpoint
    else:
        trial.set_user_attr("epochs", 0)
    retry_of = frozen(trial).system_attrs.get("failed_trial")
    if retry_of is not None:
        trial.set_user_attr("retry_of", retry_of)
    params = suggest(trial, job.study_file)
    spec = trial_spec(job, params)
    # "trial 3 (4/10)": its number, and where the study stands (finished + this one, of the target)
    i = len(budget_trials(trial.study)) + 1
    label = f"trial {trial.number} ({i}/{max(job.target, i)})"
    view = resolve(progress).view(label, eta_scope="trial ")
    note = (f" (retry of trial {retry_of})" if retry_of is not None else "") + (
        f"; resumes after epoch {stored.get('epochs', 0)}" if stored.get("suspended") else "")
    view.line(f"{label} started: " + (" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in params.items()) or "no parameters") + note)

    def on_epoch(epoch: int, row: dict) -> None:
        value = row[METRIC]
        trial.report(value, epoch)
        trial.set_user_attr("epochs", epoch)
        faults.point("epoch")
        if epoch < cap and trial.should_prune():  # at the cap it is done: pruning would only lose it
            reason = f"pruned at epoch {epoch} of {cap} by the {job.pruner_name} pruner (valid ndcg@10 {value:.4f})"
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)

    checkpoint = job.trial_checkpoint(trial, spec)
    try:
        record = run(spec, on_epoch=on_epoch, progress=view, checkpoint=checkpoint)
    except RunStopped:
        raise  # the checkpoint stays: the resumed trial continues from it
    except BaseException:
        checkpoint.unlink(missing_ok=True)  # pruned or failed: nothing to continue
        raise
    store_record(trial, record, store, weights=job.base.keep_weights)
    return record.result["valid"]["ndcg@10"]


def budget_trials(study: optuna.Study, n: int | None = None) -> list[FrozenTrial]:
    """The trials that spend a study's budget, by number, the first `n` of them (all: None):
    COMPLETE and PRUNED ones, and FAILED ones that failed by themselves and were not run again.
    A trial that diverged or ran out of memory used its share of the budget and is reported as
    such; one whose worker died was retried under a new number (the retry is what counts); one
    that failed for the setup's sake (a full disk, bad input) spent nothing. The one
    rule for "a study's first N trials": the tune target, the equal-budget selection of
    `harness paper` and `--params best`."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried and t.user_attrs.get("counts_toward_budget"))]
    counted.sort(key=lambda t: t.number)
    return counted if n is None else counted[:n]


def best_of(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best COMPLETE trial of `trials` (None when none completed)."""
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: t.value) if complete else None


def suspend(trial: optuna.Trial, reason: str) -> None:
    """Put a trial stopped at an epoch boundary (checkpoint saved) back to WAITING, marked
    `suspended`: the next worker on the study takes it first (Optuna's ask pops waiting
    trials), with its number, parameters, reported epochs and pruner rungs intact, and its run
    continues from the checkpoint. Neither a dead-worker check (RUNNING trials only) nor a
    heartbeat check touches a waiting trial."""
    trial.set_user_attr("suspended", reason)
    trial.set_user_attr("stops", int(frozen(trial).user_attrs.get("stops", 0)) + 1)
    trial.storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.WAITING)


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """The stored state of a live trial (its system attrs: is it a retry?)."""
    return trial.study.get_trials(deepcopy=False)[trial.number]
