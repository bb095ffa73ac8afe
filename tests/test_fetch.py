"""Raw Amazon files -> sequence files: ordering, id assignment, core filter, errors, download.

Every expectation below is worked out by hand from the raw lines, not by re-running the code.
"""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from harness.data.fetch import amazon2014_to_sequences, amazon2023_to_sequences, download, fetch
from harness.data.sequences import load_sequences
from harness.errors import HarnessError


def _review(user: str, item: str, t: int, loose: bool = False) -> str:
    if loose:
        # Python dict literal, as in some 2014 dumps: single quotes, an apostrophe inside text.
        return (f"{{'reviewerID': '{user}', 'asin': '{item}', 'overall': 5.0, "
                f"'reviewText': \"it's fine\", 'unixReviewTime': {t}}}")
    return json.dumps({"reviewerID": user, "asin": item, "helpful": [0, 0], "overall": 4.0,
                       "reviewTime": "01 1, 2014", "unixReviewTime": t})


# (user, item, unixReviewTime, loose?) in file order.
# - First appearance of users: C, A, X, B, D, E. X has 4 reviews -> dropped by the user-5 rule.
# - Z is reviewed once (by A) -> dropped by the item-5 rule; A keeps 5 items.
# - W is reviewed by C, X, B, D, E: 5 at first, 4 once X is gone -> dropped on the 2nd pass only.
# - Ties: C's i3 and i1 share t=300 (file order i3, i1); A's i2 and i3 share t=200;
#   all of E's i* share t=1000 (file order i2, i1, i4, i3, i5). B's lines are in reverse time order.
RAW_2014 = [
    ("C", "i3", 300, False), ("A", "i1", 500, True), ("X", "i1", 100, False), ("A", "Z", 100, True),
    ("A", "i2", 200, True), ("B", "W", 100, False), ("C", "i1", 300, False), ("A", "i3", 200, False),
    ("A", "i4", 50, True), ("A", "i5", 600, False), ("C", "i2", 100, True), ("C", "i4", 400, False),
    ("C", "W", 50, False), ("C", "i5", 500, False), ("X", "i2", 200, False), ("X", "i3", 300, True),
    ("X", "W", 400, False),
    ("B", "i5", 50, False), ("B", "i4", 40, False), ("B", "i3", 30, True), ("B", "i2", 20, False),
    ("B", "i1", 10, False),
    ("D", "W", 1, False), ("D", "i5", 2, False), ("D", "i4", 3, False), ("D", "i3", 4, False),
    ("D", "i2", 5, False), ("D", "i1", 6, False),
    ("E", "i2", 1000, False), ("E", "i1", 1000, True), ("E", "W", 999, False), ("E", "i4", 1000, False),
    ("E", "i3", 1000, False), ("E", "i5", 1000, False),
]
# Chronological, after the filter, users by first appearance (C, A, B, D, E):
#   C: i2 i3 i1 i4 i5 | A: i4 i2 i3 i1 i5 | B: i1 i2 i3 i4 i5 | D: i5 i4 i3 i2 i1 | E: i2 i1 i4 i3 i5
# Item ids by first appearance reading that top to bottom: i2=1 i3=2 i1=3 i4=4 i5=5
# (the raw file's first item is i3, so numbering in raw-file order would differ).
EXPECTED_2014 = [
    [1, 2, 3, 4, 5],
    [4, 1, 2, 3, 5],
    [3, 1, 2, 4, 5],
    [5, 4, 2, 1, 3],
    [1, 3, 4, 2, 5],
]

CSV_2023 = """user_id,parent_asin,rating,timestamp
u2,P1,5.0,1600000000002
u1,P2,4.0,1600000000005
u1,P3,3.0,1600000000001
u2,P2,1.0,1600000000001
u1,P1,5.0,1600000000005
u3,P1,2.0,1600000000009
u2,P3,2.0,1600000000003
"""
# u2: P2 P1 P3 | u1: P3 P2 P1 (P2/P1 tie keeps file order) | u3: P1  ->  P2=1 P1=2 P3=3.
# u3 has one rating and stays: the 2023 5-core is used as is, with no extra filter.
EXPECTED_2023 = [[1, 2, 3], [3, 1, 2], [2]]


def _write_2014(path: Path, rows=RAW_2014) -> Path:
    text = "\n".join(_review(*r) for r in rows) + "\n\n"  # trailing blank line is tolerated
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_amazon2014_order_ties_ids_and_core_filter(tmp_path):
    raw = _write_2014(tmp_path / "reviews_Toys_and_Games_5.json")
    assert amazon2014_to_sequences(raw) == EXPECTED_2014


def test_amazon2014_gzip_matches_plain(tmp_path):
    raw = _write_2014(tmp_path / "reviews_Toys_and_Games_5.json.gz")
    assert amazon2014_to_sequences(raw) == EXPECTED_2014


def test_amazon2014_filter_is_noop_on_a_5core(tmp_path):
    # Drop X, Z and W from the raw rows: what is left is already a 5-core, so nothing changes.
    rows = [r for r in RAW_2014 if r[0] != "X" and r[1] not in ("Z", "W")]
    raw = _write_2014(tmp_path / "r.json", rows)
    seqs = amazon2014_to_sequences(raw)
    assert seqs == EXPECTED_2014
    assert sum(map(len, seqs)) == len(rows)


def test_amazon2023_order_ties_and_ids(tmp_path):
    raw = tmp_path / "Musical_Instruments.csv"
    raw.write_text(CSV_2023)
    assert amazon2023_to_sequences(raw) == EXPECTED_2023
    gz = tmp_path / "Musical_Instruments.csv.gz"
    gz.write_bytes(gzip.compress(CSV_2023.encode()))
    assert amazon2023_to_sequences(gz) == EXPECTED_2023


def test_malformed_2014_names_file_and_line(tmp_path):
    raw = tmp_path / "reviews.json"
    lines = [_review("A", "i1", 1), _review("A", "i2", 2), json.dumps({"reviewerID": "A", "unixReviewTime": 3})]
    raw.write_text("\n".join(lines) + "\n")
    with pytest.raises(HarnessError, match=r"reviews\.json:3: missing key 'asin'"):
        amazon2014_to_sequences(raw)

    raw.write_text(_review("A", "i1", 1) + "\n{not json at all\n")
    with pytest.raises(HarnessError, match=r"reviews\.json:2: not a JSON object"):
        amazon2014_to_sequences(raw)

    raw.write_text(_review("A", "i1", 1) + "\n" + json.dumps(
        {"reviewerID": "A", "asin": "i2", "unixReviewTime": "yesterday"}) + "\n")
    with pytest.raises(HarnessError, match=r"reviews\.json:2: unixReviewTime 'yesterday'"):
        amazon2014_to_sequences(raw)


def test_malformed_2023_names_file_and_line(tmp_path):
    raw = tmp_path / "r.csv"
    raw.write_text("user_id,parent_asin,rating,timestamp\nu1,P1,5.0,1\nu1,P2,5.0,soon\n")
    with pytest.raises(HarnessError, match=r"r\.csv:3: timestamp 'soon'"):
        amazon2023_to_sequences(raw)
    raw.write_text("user,item,rating,time\nu1,P1,5.0,1\n")
    with pytest.raises(HarnessError, match=r"r\.csv:1: .*lacks column"):
        amazon2023_to_sequences(raw)


def test_fetch_with_raw_writes_loadable_file(tmp_path):
    raw = _write_2014(tmp_path / "reviews_Toys_and_Games_5.json")
    data_dir = tmp_path / "data"
    path, report = fetch("Toys_and_Games", data_dir, raw=raw)  # alias, any case
    assert path == data_dir / "toys" / "Toys_and_Games.txt"
    assert (report["users"], report["items"], report["interactions"]) == (5, 5, 25)
    # Tiny data, so all three Table 1 figures differ and are reported.
    assert len(report["mismatches"]) == 3
    assert any(m.startswith("users 5 != 19,412") for m in report["mismatches"])

    data = load_sequences(path)
    assert data.n_users == 5 and data.n_items == 5 and data.n_interactions == 25
    assert data.user_ids.tolist() == [1, 2, 3, 4, 5]
    assert [data.sequence(u).tolist() for u in range(data.n_users)] == EXPECTED_2014
    assert data.warnings == []


def test_fetch_2023_dataset(tmp_path):
    raw = tmp_path / "Musical_Instruments.csv"
    raw.write_text(CSV_2023)
    path, report = fetch("instruments", tmp_path, raw=raw)
    assert path == tmp_path / "instrument" / "Musical_Instruments.txt"
    assert path.read_text() == "1 1 2 3\n2 3 1 2\n3 2\n"
    assert (report["users"], report["items"], report["interactions"]) == (3, 3, 7)


def test_fetch_refuses_to_overwrite_without_force(tmp_path):
    raw = _write_2014(tmp_path / "r.json")
    path, _ = fetch("toys", tmp_path, raw=raw)
    path.write_text("1 1 2 3\n")
    with pytest.raises(HarnessError, match="already exists.*--force"):
        fetch("toys", tmp_path, raw=raw)
    assert path.read_text() == "1 1 2 3\n"  # untouched
    # The refusal comes before any download is attempted (this URL would fail).
    with pytest.raises(HarnessError, match="--force"):
        fetch("toys", tmp_path, url="http://127.0.0.1:9/x")
    fetch("toys", tmp_path, raw=raw, force=True)
    assert load_sequences(path).n_interactions == 25


def test_fetch_unknown_name_lists_known(tmp_path):
    with pytest.raises(HarnessError, match="unknown dataset 'movielens'.*cds_and_vinyl.*instrument.*toys"):
        fetch("movielens", tmp_path)


def test_fetch_downloads_into_raw_dir(tmp_path):
    src = _write_2014(tmp_path / "reviews_Toys_and_Games_5.json.gz")
    data_dir = tmp_path / "data"
    path, report = fetch("toys", data_dir, url=src.as_uri())
    raw = data_dir / "toys" / "raw" / "reviews_Toys_and_Games_5.json.gz"
    assert raw.read_bytes() == src.read_bytes()
    assert report["raw"] == str(raw)
    assert [load_sequences(path).sequence(u).tolist() for u in range(5)] == EXPECTED_2014


def test_download_file_url(tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(bytes(range(256)) * 5000)
    dest = tmp_path / "out" / "copy.bin"
    assert download(src.as_uri(), dest) == dest
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]  # no .part left behind


def test_download_unreachable_fails_fast(tmp_path):
    dest = tmp_path / "x"
    start = time.monotonic()
    with pytest.raises(HarnessError) as err:
        download("http://127.0.0.1:9/x", dest)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "http://127.0.0.1:9/x" in msg and "--raw FILE" in msg and "\n" not in msg
    assert not dest.exists() and list(tmp_path.iterdir()) == []
