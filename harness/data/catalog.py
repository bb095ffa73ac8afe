"""The registered datasets: where each lies under the data directory, its paper (Table 1)
figures, and where its raw file comes from. Data only: the loader (registry.py) and the
downloader (fetch.py) both read it, so neither needs the other to know what a name means."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    path: str  # relative to the data directory
    users: int
    items: int  # distinct item ids (the paper's Table 1 counts one more: the padding id)
    interactions: int
    raw_format: str  # "amazon2014-json" or "amazon2023-csv"
    raw_url: str
    description: str


_SNAP = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
_HF = "https://huggingface.co/datasets/McAuley-Lab/Amazon-Reviews-2023/resolve/main/benchmark/5core/rating_only"

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    DatasetInfo("toys", "toys/Toys_and_Games.txt", 19412, 11924, 167597, "amazon2014-json",
                f"{_SNAP}/reviews_Toys_and_Games_5.json.gz", "Amazon 2014 Toys_and_Games 5-core"),
    DatasetInfo("instrument", "instrument/Musical_Instruments.txt", 57439, 24587, 511836, "amazon2023-csv",
                f"{_HF}/Musical_Instruments.csv", "Amazon 2023 Musical_Instruments 5-core"),
    DatasetInfo("cds_and_vinyl", "cds_and_vinyl/CDs_and_Vinyl.txt", 75258, 64443, 1097592, "amazon2014-json",
                f"{_SNAP}/reviews_CDs_and_Vinyl_5.json.gz", "Amazon 2014 CDs_and_Vinyl 5-core"),
    DatasetInfo("beauty", "beauty/Beauty.txt", 22363, 12101, 198502, "amazon2014-json",
                f"{_SNAP}/reviews_Beauty_5.json.gz", "Amazon 2014 Beauty 5-core"),
]}
ALIASES = {"cds": "cds_and_vinyl", "instruments": "instrument", "toys_and_games": "toys"}


def canonical_name(name: str) -> str:
    return ALIASES.get(name.lower(), name.lower())
