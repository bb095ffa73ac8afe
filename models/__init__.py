"""Torch modules only: sequential recommenders behind one registry (no I/O, no CLI)."""
from models.base import SequentialRecommender
from models.igr_sr import IGRSR, IGRSRConfig, LatentIntentDistiller
from models.registry import ModelSpec, get, names, register
from models.sasrec import SASRec, SASRecConfig

__all__ = ["SequentialRecommender", "SASRec", "SASRecConfig", "IGRSR", "IGRSRConfig",
           "LatentIntentDistiller", "ModelSpec", "get", "names", "register"]
