"""Torch modules only: sequential recommenders behind one registry (no I/O, no CLI)."""
from models.base import SequentialRecommender
from models.igr_sr import IGRSR, IGRSRConfig, LatentIntentDistiller
from models.registry import ModelSpec, get, names, register
from models.sasrec import SASRec, SASRecConfig

__all__ = ["SequentialRecommender", "SASRec", "SASRecConfig", "IGRSR", "IGRSRConfig",
           "LatentIntentDistiller", "ModelSpec", "get", "names", "register"]

from models.bert4rec import BERT4Rec, BERT4RecConfig  # noqa: E402
from models.gru4rec import GRU4Rec, GRU4RecConfig  # noqa: E402
from models.iclrec import ICLRec, ICLRecConfig  # noqa: E402
from models.icsrec import ICSRec, ICSRecConfig  # noqa: E402
from models.lares import LARES, LARESConfig  # noqa: E402
from models.lares_rl import LARESGRPO, LARESGRPOConfig  # noqa: E402
from models.rearec import ReaRec, ReaRecERL, ReaRecERLConfig, ReaRecPRL, ReaRecPRLConfig  # noqa: E402

__all__ += ["GRU4Rec", "GRU4RecConfig", "BERT4Rec", "BERT4RecConfig", "ReaRec", "ReaRecERL",
            "ReaRecERLConfig", "ReaRecPRL", "ReaRecPRLConfig", "ICLRec", "ICLRecConfig", "ICSRec",
            "ICSRecConfig", "LARES", "LARESConfig", "LARESGRPO", "LARESGRPOConfig"]
