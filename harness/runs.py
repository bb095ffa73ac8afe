"""One training run end to end: dataset -> model (with what it requires pre-trained first: IGR-SR's
LID, LARES's stage 1) -> shared trainer -> run record (JSON + per-user ranks) under results/runs/.

Used by `harness train` and by every command that trains (tune, ablate, ...).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import config as config_mod
from harness.data import registry as datasets
from harness.data.split import LeaveOneOut
from harness.errors import HarnessError
from harness.progress import Progress, resolve
from harness.train import (EpochCallback, FitResult, TrainConfig, fit, resolve_device, resolve_precision,
                           seed_everything)

NOISE_ON = ("all", "train", "eval")
PRETRAIN_EVERY = 10  # a pre-training's plain progress: every 10th epoch and the last
TRAINER_KEYS = ("lr", "weight_decay", "batch_size")  # TrainConfig fields a study or cell may set
# Where and in what slices a run computes, not what it computes: kept out of a run's identity
# (a study resumed on a GPU machine, or with a bigger evaluation batch, holds the same runs).
NOT_IDENTITY = ("device", "eval_batch_size")


def train_identity(train: TrainConfig, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The trainer settings that define a run's numbers (run keys, study definitions, cell keys,
    the LID's recipe, resume checkpoints): every TrainConfig field but NOT_IDENTITY and `drop`."""
    return {k: v for k, v in dataclasses.asdict(train).items() if k not in NOT_IDENTITY and k not in drop}


@dataclass
class RunSpec:
    model: str
    dataset: str
    train: TrainConfig = field(default_factory=TrainConfig)
    params: dict[str, Any] = field(default_factory=dict)  # model config overrides (raw or typed)
    data_dir: Path = Path("data")
    cache_dir: Path = Path.home() / ".cache" / "harness"
    # pre-training recipe of what a model requires (the LID encoder, LARES's stage 1): its own
    # epoch cap and early stopping
    lid_epochs: int = 200
    lid_patience: int = 10
    noise: float = 0.0  # fraction of training items replaced at random (robustness experiment)
    noise_seed: int = 0
    # which histories carry the noise: "all" (the perturbed file is the dataset: training samples
    # and the validation/test histories), "train" (evaluation reads the clean histories) or
    # "eval" (training on clean data, evaluation reads the perturbed histories)
    noise_on: str = "all"
    # where the pre-trained models a run requires are kept (default: the cache directory); a
    # run folder (`harness paper --run-dir`) keeps them inside itself, so it continues anywhere
    pretrained_dir: Path | None = None
    # whether a finished run stored in a study keeps its best weights as an artifact (a run
    # folder keeps per-user ranks and records only: tables never need the weights)
    keep_weights: bool = True
    # where runs in flight keep their per-epoch checkpoints (default <cache>/inflight): a run
    # stopped by a deadline or a signal continues from there
    checkpoint_dir: Path | None = None

    @property
    def pretrained_root(self) -> Path:
        return self.pretrained_dir if self.pretrained_dir is not None else self.cache_dir

    @property
    def checkpoint_root(self) -> Path:
        return self.checkpoint_dir if self.checkpoint_dir is not None else self.cache_dir / "inflight"

    def with_values(self, values: dict[str, Any], **changes: Any) -> "RunSpec":
        """This spec with parameter values set: trainer keys (lr, weight_decay, batch_size) go to
        the TrainConfig, every other key to the model's config; `changes` replace fields (model,
        dataset, noise...) and `seed` the trainer's seed."""
        train = {k: v for k, v in values.items() if k in TRAINER_KEYS}
        if "seed" in changes:
            train["seed"] = changes.pop("seed")
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **train),
                                   params={**self.params, **{k: v for k, v in values.items() if k not in TRAINER_KEYS}},
                                   **changes)


@dataclass
class RunRecord:
    model: str
    dataset: str
    data_hash: str
    seed: int
    model_config: dict
    train_config: dict
    result: dict
    lid: dict | None
    environment: dict
    started: str
    seconds: float
    valid_ranks: np.ndarray | None = None
    test_ranks: np.ndarray | None = None
    state: dict | None = None  # the best checkpoint's weights (saved beside the record)
    stage1: dict | None = None  # LARES: its pre-trained stage 1's info (metrics, curves, cache key)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("valid_ranks", "test_ranks", "state")}


def load_data(spec: RunSpec) -> LeaveOneOut:
    if spec.noise_on not in NOISE_ON:
        raise HarnessError(f"noise on {spec.noise_on!r}: choose from {', '.join(NOISE_ON)}")
    seqs = datasets.load(spec.dataset, spec.data_dir, spec.cache_dir)
    if spec.noise == 0:
        return LeaveOneOut(seqs, max_len=spec.train.max_len)
    from harness.data.noise import noisy_file

    noisy = datasets.load(str(noisy_file(seqs, spec.noise, spec.noise_seed, spec.cache_dir)),
                          spec.data_dir, spec.cache_dir)
    train, evaluated = {"all": (noisy, None), "train": (noisy, seqs), "eval": (seqs, noisy)}[spec.noise_on]
    return LeaveOneOut(train, max_len=spec.train.max_len, eval_data=evaluated)


def build_model(spec: RunSpec, data: LeaveOneOut, progress: Progress | bool = True):
    """The model with everything it requires (a pre-trained LID or LARES stage 1), and that
    requirement's info. A pre-training shows on `progress` as a task of its own."""
    import models

    progress = resolve(progress)
    try:
        model_spec = models.get(spec.model)
    except KeyError as e:
        raise HarnessError(str(e.args[0])) from None
    typed = config_mod.coerce(model_spec.config_cls, spec.params, model=spec.model)
    if typed.get("max_len", spec.train.max_len) != spec.train.max_len:
        raise HarnessError("--param max_len: the history length is a trainer setting; use --max-len")
    if any(f.name == "max_len" for f in dataclasses.fields(model_spec.config_cls)):
        typed["max_len"] = spec.train.max_len
    try:
        model_cfg = model_spec.make_config(**typed)
    except ValueError as e:
        raise HarnessError(f"--param: {e}") from None
    # before anything is pre-trained (IGR-SR's LID is d_l wide with the same heads)
    config_mod.check_multiples(spec.model, model_spec.config_cls, dataclasses.asdict(model_cfg))
    deps, info = {}, None
    if "lid" in model_spec.needs(model_cfg):
        deps["lid"], info = pretrained_lid_for(spec, data, model_cfg, progress)
    if "lares-stage1" in model_spec.needs(model_cfg):
        deps["stage1"], info = pretrained_lares_stage1_for(spec, data, model_cfg, progress)
    if "erl-kernel" in model_spec.needs(model_cfg):
        from harness import native

        native.install(spec.cache_dir)
    seed_everything(spec.train.seed)  # the model's own init does not depend on pre-training
    try:
        model = model_spec.build(model_cfg, data.n_items, **deps)
    except ValueError as e:
        raise HarnessError(f"{spec.model}: {e}") from None
    return model, model_cfg, info


def pretrained_lid_for(spec: RunSpec, data: LeaveOneOut, model_cfg, progress: Progress):
    from harness.cache import lid_encoder_config, pretrained_lid

    enc_cfg = lid_encoder_config(model_cfg.d_l, model_cfg)
    # The LID's own recipe: SASRec's defaults, never the IGR-SR run's lr / batch size / weight
    # decay (a tuning trial that samples lr must not pre-train, and cache, its own encoder).
    # The run's precision is the LID's too (a bf16 encoder is another encoder: it is in the key).
    lid_train = TrainConfig(epochs=spec.lid_epochs, patience=spec.lid_patience, seed=spec.train.seed,
                            device=spec.train.device, eval_batch_size=spec.train.eval_batch_size,
                            max_len=spec.train.max_len, mask_history=False, precision=spec.train.precision)
    # `init_seed`: the encoder's initial weights come from the run's seed (before 2026-12, from
    # whatever the process had drawn before; cached encoders of that time are not reused)
    recipe = {**train_identity(lid_train), "init_seed": spec.train.seed}
    # pre-trained on the training data alone, early-stopped on that data's own validation
    # histories, so one encoder serves every evaluation reading of the same training data
    lid_data = data.training_only()

    def pretrain(encoder, checkpoint: Path) -> dict:
        view = progress.view(f"pre-training the LID encoder d_l={model_cfg.d_l}", every=PRETRAIN_EVERY)
        view.line(f"pre-training the LID encoder (SASRec, d_l={model_cfg.d_l}) on {spec.dataset}, up to "
                  f"{lid_train.epochs} epochs (early-stopped); cached for later runs")
        result = fit(encoder, lid_data, lid_train, progress=view, checkpoint=checkpoint)
        return {"valid": result.valid, "test": result.test, "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run, "seconds": _seconds(result.curves)}

    encoder, info, cached = pretrained_lid(spec.pretrained_root, lid_data.data.content_hash, enc_cfg, data.n_items,
                                           recipe, pretrain, seed=spec.train.seed)
    return encoder, {**info, "cached": cached, "d_l": model_cfg.d_l}


def pretrained_lares_stage1_for(spec: RunSpec, data: LeaveOneOut, model_cfg, progress: Progress):
    """LARES's stage 1: `lares-ssl` at the run's stage-1 config, trained as `harness train
    --model lares-ssl` would train it with the trainer's defaults (lr, batch size, weight decay:
    never the stage-2 run's, so tuning stage 2 reuses one stage-1 model), the run's seed,
    precision, history length and ranking protocol, up to `lid_epochs` with `lid_patience`. On
    the training data alone, as the LID."""
    from harness.cache import pretrained_lares_stage1
    from models.lares import LARES

    cfg1 = model_cfg.stage1()
    stage1_train = TrainConfig(epochs=spec.lid_epochs, patience=spec.lid_patience, seed=spec.train.seed,
                               device=spec.train.device, eval_batch_size=spec.train.eval_batch_size,
                               max_len=spec.train.max_len, mask_history=spec.train.mask_history,
                               precision=spec.train.precision)
    stage1_data = data.training_only()

    def build() -> LARES:
        seed_everything(spec.train.seed)  # the init a `lares-ssl` run of this seed has
        return LARES(cfg1, data.n_items)

    def pretrain(model, checkpoint: Path) -> dict:
        view = progress.view("pre-training LARES stage 1", every=PRETRAIN_EVERY)
        view.line(f"pre-training LARES stage 1 (lares-ssl) on {spec.dataset}, up to {stage1_train.epochs} epochs "
                  "(early-stopped); cached for later runs")
        result = fit(model, stage1_data, stage1_train, progress=view, checkpoint=checkpoint)
        return {"valid": result.valid, "test": result.test, "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run, "stopped": result.stopped, "curves": result.curves,
                "seconds": _seconds(result.curves)}

    model, info, cached = pretrained_lares_stage1(spec.pretrained_root, stage1_data.data.content_hash, cfg1,
                                                  train_identity(stage1_train), build, pretrain)
    return model, {**info, "cached": cached}


def _seconds(curves: list[dict]) -> float:
    """Training and validation seconds of a fit's epochs (what its compute costs, resumed
    segments included: each epoch's own times are kept in the curves)."""
    return round(sum(c.get("train_seconds", 0.0) + c.get("eval_seconds", 0.0) for c in curves), 1)


def run(spec: RunSpec, on_epoch: EpochCallback | None = None, progress: Progress | bool = True,
        resume: bool = False, checkpoint: Path | None = None) -> RunRecord:
    """Train one model. With `resume`, per-epoch training state is kept in the cache under a
    key of everything that defines the run, so the same command after an interruption goes on
    where it stopped instead of starting over; `checkpoint` names that file instead (a tune
    trial's or an experiment cell's own, so two identical runs in flight never share one).
    Either way the run may stop at an epoch boundary (harness.stopping.RunStopped). `progress`
    (harness.progress) shows its epochs and any pre-training; True picks one here, False none."""
    progress = resolve(progress)
    started = dt.datetime.now(dt.timezone.utc)
    env = environment()  # now: the code that runs is the code checked out at the start
    resolve_precision(spec.train.precision, resolve_device(spec.train.device))  # bad --device/--precision: fail first
    data = load_data(spec)
    for warning in data.data.warnings:
        progress.once(f"warning: {warning}")
    import models

    model, model_cfg, pretrained_info = build_model(spec, data, progress)
    needs = models.get(spec.model).needs(model_cfg)
    if checkpoint is None and resume:
        checkpoint = resume_path(spec, data, model_cfg)
    result: FitResult = fit(model, data, spec.train, on_epoch=on_epoch, progress=progress, checkpoint=checkpoint)
    return RunRecord(
        model=spec.model, dataset=spec.dataset, data_hash=data.content_key, seed=spec.train.seed,
        model_config=dataclasses.asdict(model_cfg), train_config=dataclasses.asdict(spec.train),
        result=result.summary(), lid=pretrained_info if "lid" in needs else None,
        stage1=pretrained_info if "lares-stage1" in needs else None, environment=env,
        started=started.isoformat(timespec="seconds"),
        seconds=(dt.datetime.now(dt.timezone.utc) - started).total_seconds(),
        valid_ranks=result.valid_ranks, test_ranks=result.test_ranks,
        state={k: v.detach().cpu() for k, v in model.state_dict().items()})


def resume_path(spec: RunSpec, data: LeaveOneOut, model_cfg) -> Path:
    import hashlib

    key = json.dumps({"model": spec.model, "data": data.content_key, "config": dataclasses.asdict(model_cfg),
                      "train": train_identity(spec.train),
                      "lid": [spec.lid_epochs, spec.lid_patience]}, sort_keys=True)
    return spec.cache_dir / "resume" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"  # data hash covers noise


def save_record(record: RunRecord, results_dir: Path) -> Path:
    """Write `<stamp>-<model>-<dataset>-s<seed>.json`, `.npz` (per-user ranks) and `.pt` (best
    checkpoint); never overwrites an earlier run's files."""
    out = results_dir / "runs"
    out.mkdir(parents=True, exist_ok=True)
    stamp = record.started.replace(":", "").replace("-", "")[:15]
    name = f"{stamp}-{record.model.replace('/', '_')}-{Path(record.dataset).stem}-s{record.seed}"
    path, n = out / f"{name}.json", 1
    while path.exists():
        n += 1
        path = out / f"{name}-{n}.json"
    np.savez_compressed(path.with_suffix(".npz"), valid_ranks=record.valid_ranks, test_ranks=record.test_ranks)
    if record.state is not None:
        import torch

        torch.save(record.state, path.with_suffix(".pt"))
    path.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    return path


def environment() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for pkg in ("optuna", "pandas"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    return {"git_commit": git_commit(), "versions": versions, "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def git_commit() -> str:
    try:
        repo = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
