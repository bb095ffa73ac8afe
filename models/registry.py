"""Name -> model factory, in the manner of Optuna's samplers: a small spec per model, entries
register by name, variants are entries of their own with some config fields fixed.

The harness asks a spec, never the model or its config, what it needs:
- `requires(config)`: what must be built before the factory can run; "lid" is a pre-trained,
  frozen SASRec of width `config.d_l` (the harness pre-trains and caches it; models do no I/O);
  "lares-stage1" is LARES's stage-1 model (`lares-ssl` at `config.stage1()`, pre-trained and
  cached the same way) that its GRPO stage starts from; "erl-kernel" is the fused CPU kernel of
  ReaRec-ERL's objective (harness/native.py builds it and hands it to `models.losses`; without
  it the same objective runs eagerly);
- `label`: the model's name in tables and figures;
- `study`: whose study file and tuning study give its parameters (a variant takes its base
  model's, so `--params best` gives an ablation variant IGR-SR's tuned values).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from models.bert4rec import BERT4Rec, BERT4RecConfig
from models.gru4rec import GRU4Rec, GRU4RecConfig
from models.iclrec import ICLRec, ICLRecConfig
from models.icsrec import ICSRec, ICSRecConfig
from models.igr_sr import IGRSR, IGRSRConfig
from models.lares import LARES, LARESConfig
from models.lares_rl import LARESGRPO, LARESGRPOConfig
from models.mostpop import MostPop, MostPopConfig
from models.rearec import ReaRecERL, ReaRecERLConfig, ReaRecPRL, ReaRecPRLConfig
from models.sasrec import SASRec, SASRecConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    factory: Callable[..., nn.Module]
    fixed: dict[str, Any] = field(default_factory=dict)  # config fields a variant pins
    requires: Callable[[Any], tuple[str, ...]] = lambda config: ()
    description: str = ""
    label: str = ""  # default: the name
    study: str = ""  # default: the name

    def make_config(self, **overrides: Any):
        clash = set(overrides) & set(self.fixed)
        if clash:
            raise ValueError(f"{self.name} fixes {', '.join(sorted(clash))}")
        return self.config_cls(**{**self.fixed, **overrides})

    def needs(self, config) -> tuple[str, ...]:
        return tuple(self.requires(config))

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def study_model(self) -> str:
        return self.study or self.name

    def build(self, config, n_items: int, **deps: Any) -> nn.Module:
        return self.factory(config, n_items, **deps)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def _igr_sr(cfg: IGRSRConfig, n_items: int, lid: nn.Module | None = None) -> nn.Module:
    return IGRSR(cfg, n_items, lid_encoder=lid)


def _lares(cfg: LARESGRPOConfig, n_items: int, stage1: nn.Module | None = None) -> nn.Module:
    return LARESGRPO(cfg, n_items, stage1=stage1)


def _lid_unless_off(cfg: IGRSRConfig) -> tuple[str, ...]:
    return ("lid",) if cfg.use_lid else ()


register(ModelSpec("sasrec", SASRecConfig, lambda cfg, n_items: SASRec(cfg, n_items), label="SASRec",
                   description="SASRec, full-softmax CE (RecBole-equivalent)"))
register(ModelSpec("igr-sr", IGRSRConfig, _igr_sr, requires=_lid_unless_off, label="IGR-SR",
                   description="IGR-SR: frozen-SASRec LID + projection + dual-attention IDR + ICR"))
register(ModelSpec("igr-sr/wo-lid", IGRSRConfig, _igr_sr, fixed={"use_lid": False}, requires=_lid_unless_off,
                   label="w/o LID", study="igr-sr",
                   description="ablation: no Latent Intent Distiller (IDR without intents)"))
register(ModelSpec("igr-sr/concat", IGRSRConfig, _igr_sr, fixed={"fusion": "concat"}, requires=_lid_unless_off,
                   label="w/o cross-attn (concat)", study="igr-sr",
                   description="ablation: intents concatenated to the sequence, no cross-attention"))
register(ModelSpec("igr-sr/wo-icr", IGRSRConfig, _igr_sr, fixed={"use_icr": False}, requires=_lid_unless_off,
                   label="w/o ICR", study="igr-sr", description="ablation: no Intent Consistency Regularization"))
register(ModelSpec("gru4rec", GRU4RecConfig, lambda cfg, n_items: GRU4Rec(cfg, n_items), label="GRU4Rec",
                   description="GRU4Rec, full-softmax CE (RecBole-equivalent)"))
register(ModelSpec("bert4rec", BERT4RecConfig, lambda cfg, n_items: BERT4Rec(cfg, n_items), label="BERT4Rec",
                   description="BERT4Rec: bidirectional transformer, cloze objective (RecBole-style)"))
register(ModelSpec("rearec-erl", ReaRecERLConfig, lambda cfg, n_items: ReaRecERL(cfg, n_items), label="ReaRec-ERL",
                   requires=lambda cfg: ("erl-kernel",) if cfg.kl_weight != 0 else (),
                   description="ReaRec-ERL: SASRec + K reasoning steps, ensemble of steps + KL diversity"))
register(ModelSpec("rearec-prl", ReaRecPRLConfig, lambda cfg, n_items: ReaRecPRL(cfg, n_items), label="ReaRec-PRL",
                   description="ReaRec-PRL: SASRec + K reasoning steps, progressive temperatures + noisy InfoNCE"))
register(ModelSpec("iclrec", ICLRecConfig, lambda cfg, n_items: ICLRec(cfg, n_items), label="ICLRec",
                   description="ICLRec: SASRec + augmented-view InfoNCE + k-means intent contrast"))
register(ModelSpec("lares-ssl", LARESConfig, lambda cfg, n_items: LARES(cfg, n_items), label="LARES (stage 1)",
                   description="LARES stage 1 (pre-LN pre-block + randomly deep shared core block; CE, same-target "
                               "trajectory and step alignment)"))
register(ModelSpec("lares", LARESGRPOConfig, _lares, requires=lambda cfg: ("lares-stage1",), label="LARES",
                   description="LARES: the cached lares-ssl checkpoint post-trained by GRPO (ranking rewards, "
                               "KL to a frozen reference)"))
register(ModelSpec("icsrec", ICSRecConfig, lambda cfg, n_items: ICSRec(cfg, n_items), label="ICSRec",
                   description="ICSRec: SASRec on subsequences + same-target and k-means intent contrastive terms"))
register(ModelSpec("mostpop", MostPopConfig, lambda cfg, n_items: MostPop(cfg, n_items), label="MostPop",
                   description="MostPop: items scored by their training-data counts, alike for every user "
                               "(no personalisation; nothing to tune)"))
