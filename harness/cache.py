"""Content-addressed cache of pre-trained models a run starts from: IGR-SR's LID encoders
(frozen SASRecs of width d_l) and LARES's stage-1 models (`lares-ssl`, which `lares`
post-trains).

Key: the dataset's content hash, the model's config, the pre-training recipe and the seed, so
every trial and worker with the same key shares one model. A file lock keeps two processes
from pre-training the same model at once: the second waits, then loads the first's file.
Pre-training keeps its per-epoch training state beside the cached file (`<name>.resume.pt`), so
a pre-training that was killed (LARES's stage 1 takes hours on a CPU) goes on where it stopped
the next time any run needs that model, and ends as the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from harness.locks import FileLock
from models.lares import LARES, LARESConfig
from models.sasrec import SASRec, SASRecConfig


def lid_encoder_config(d_l: int, igr_cfg) -> SASRecConfig:
    """The LID's SASRec: the main SASRec recipe at width d_l (FFN 4 x d_l)."""
    return SASRecConfig(hidden=d_l, inner=4 * d_l, layers=igr_cfg.layers, heads=igr_cfg.heads,
                        max_len=igr_cfg.max_len)


def cache_key(data_hash: str, enc_cfg, recipe: dict) -> str:
    blob = json.dumps({"data": data_hash, "encoder": dataclasses.asdict(enc_cfg), "recipe": recipe},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pretrained_lid(cache_dir: Path, data_hash: str, enc_cfg: SASRecConfig, n_items: int, recipe: dict,
                   pretrain: Callable[[SASRec, Path], dict], seed: int | None = None) -> tuple[SASRec, dict, bool]:
    """Load the cached encoder for this key, or pre-train it with `pretrain(model, checkpoint)
    -> info`, where `checkpoint` is the resume file to hand to `fit`. With `seed`, the untrained
    encoder is initialised from it (not from whatever the process drew before: a tune worker's
    second trial, a test run after others).

    Returns (encoder, info, was_cached)."""
    key = cache_key(data_hash, enc_cfg, recipe)
    path = cache_dir / "lid" / f"sasrec-d{enc_cfg.hidden}-{key}.pt"

    def build() -> SASRec:
        if seed is not None:
            torch.manual_seed(seed)
        return SASRec(enc_cfg, n_items)

    return _load_or_pretrain(path, key, recipe, build, pretrain, "LID encoder")


def pretrained_lares_stage1(cache_dir: Path, data_hash: str, cfg: LARESConfig, recipe: dict,
                            build: Callable[[], LARES], pretrain: Callable[[LARES, Path], dict]) -> tuple[LARES, dict, bool]:
    """The same for LARES's stage-1 model: `build()` makes it untrained (seeded by the caller),
    `pretrain(model, checkpoint) -> info` trains it. Returns (model, info, was_cached)."""
    key = cache_key(data_hash, cfg, recipe)
    path = cache_dir / "lares-stage1" / f"lares-{key}.pt"
    return _load_or_pretrain(path, key, recipe, build, pretrain, "LARES stage-1 model")


def _load_or_pretrain(path: Path, key: str, recipe: dict, build: Callable[[], nn.Module],
                      pretrain: Callable[[nn.Module, Path], dict], what: str):
    with FileLock(path.with_suffix(".lock")):
        model = build()
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(blob["state"])
                return model, json.loads(blob["info"]), True
            except Exception as e:  # truncated or corrupt (a crash mid-copy, a full disk): pre-train again
                print(f"warning: cached {what} {path} is unreadable ({type(e).__name__}); "
                      "pre-training it again", file=sys.stderr)
                model = build()
        info = pretrain(model, path.with_name(path.stem + ".resume.pt"))  # fit removes it when done
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()},
                    "info": json.dumps({**info, "key": key, "recipe": recipe})}, tmp)
        tmp.replace(path)
        return model, {**info, "key": key}, False
