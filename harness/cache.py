"""Content-addressed cache of pre-trained LID encoders (frozen SASRecs of width d_l).

Key: the dataset's content hash, the encoder config, the pre-training recipe and the seed, so
every trial and worker with the same key shares one encoder. A file lock keeps two processes
from pre-training the same encoder at once: the second waits, then loads the first's file.
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

from harness.locks import FileLock
from models.sasrec import SASRec, SASRecConfig


def lid_encoder_config(d_l: int, igr_cfg) -> SASRecConfig:
    """The LID's SASRec: the main SASRec recipe at width d_l (FFN 4 x d_l)."""
    return SASRecConfig(hidden=d_l, inner=4 * d_l, layers=igr_cfg.layers, heads=igr_cfg.heads,
                        max_len=igr_cfg.max_len)


def cache_key(data_hash: str, enc_cfg: SASRecConfig, recipe: dict) -> str:
    blob = json.dumps({"data": data_hash, "encoder": dataclasses.asdict(enc_cfg), "recipe": recipe},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pretrained_lid(cache_dir: Path, data_hash: str, enc_cfg: SASRecConfig, n_items: int, recipe: dict,
                   pretrain: Callable[[SASRec], dict]) -> tuple[SASRec, dict, bool]:
    """Load the cached encoder for this key, or pre-train it with `pretrain(model) -> info`.

    Returns (encoder, info, was_cached)."""
    key = cache_key(data_hash, enc_cfg, recipe)
    path = cache_dir / "lid" / f"sasrec-d{enc_cfg.hidden}-{key}.pt"
    with FileLock(path.with_suffix(".lock")):
        encoder = SASRec(enc_cfg, n_items)
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                encoder.load_state_dict(blob["state"])
                return encoder, json.loads(blob["info"]), True
            except Exception as e:  # truncated or corrupt (a crash mid-copy, a full disk): pre-train again
                print(f"warning: cached LID encoder {path} is unreadable ({type(e).__name__}); "
                      "pre-training it again", file=sys.stderr)
                encoder = SASRec(enc_cfg, n_items)
        info = pretrain(encoder)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save({"state": {k: v.cpu() for k, v in encoder.state_dict().items()},
                    "info": json.dumps({**info, "key": key, "recipe": recipe})}, tmp)
        tmp.replace(path)
        return encoder, {**info, "key": key}, False
