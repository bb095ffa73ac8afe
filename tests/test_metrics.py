"""Ranks and metrics, computed by hand: pessimistic ties, padding, history masking, NaN."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from harness.data.sequences import load_sequences
from harness.data.split import LeaveOneOut
from harness.metrics import METRIC_NAMES, metrics_from_ranks, per_user_ndcg, per_user_recall, target_ranks
from harness.train import evaluate

NAN = float("nan")


def ranks(scores, target, exclude=None) -> list[int]:
    s = torch.tensor(scores, dtype=torch.float32)
    t = torch.tensor(target)
    if exclude is not None:
        exclude = (torch.tensor(exclude[0]), torch.tensor(exclude[1]))
    return target_ranks(s, t, exclude).tolist()


# one row, 4 real items: scores of items 1..4 are 0.1, 0.9, 0.5, 0.3 (column 0 = padding)
ROW = [0.0, 0.1, 0.9, 0.5, 0.3]


@pytest.mark.parametrize("target, rank", [(2, 0), (3, 1), (4, 2), (1, 3)])
def test_ranks_by_hand(target, rank):
    assert ranks([ROW], [target]) == [rank]


def test_batch_of_rows():
    assert ranks([ROW, [0.0, 4.0, 3.0, 2.0, 1.0]], [4, 2]) == [2, 1]


def test_ties_are_pessimistic():
    # items 1 and 3 tie at 0.5, below item 2 (0.9): both get rank 2, not 1
    row = [0.0, 0.5, 0.9, 0.5, 0.1]
    assert ranks([row, row], [1, 3]) == [2, 2]
    # a constant score: every other real item ties with the target -> rank n_items - 1
    assert ranks([[0.0] + [7.0] * 4] * 4, [1, 2, 3, 4]) == [3, 3, 3, 3]


def test_constant_model_scores_zero():
    n_items = 100
    r = target_ranks(torch.ones(8, n_items + 1), torch.arange(1, 9))
    assert r.tolist() == [n_items - 1] * 8
    m = metrics_from_ranks(r.numpy())
    assert set(m) == set(METRIC_NAMES)
    assert all(v == 0.0 for v in m.values())


def test_oracle_scores_one():
    n_items, target = 50, torch.tensor([3, 50, 1, 17])
    scores = torch.rand(4, n_items + 1)
    scores[torch.arange(4), target] = 2.0  # strictly above every other item
    r = target_ranks(scores, target)
    assert r.tolist() == [0, 0, 0, 0]
    assert metrics_from_ranks(r.numpy()) == {name: 1.0 for name in METRIC_NAMES}


def test_padding_column_never_ranked():
    assert ranks([[100.0, 0.1, 0.9, 0.5, 0.3]], [2]) == [0]
    # a padding score tied with the target does not count against it either
    assert ranks([[0.9, 0.1, 0.9, 0.5, 0.3]], [2]) == [0]
    # nor when every real item ties: still n_items - 1, not n_items
    assert ranks([[5.0, 5.0, 5.0, 5.0, 5.0]], [1]) == [3]


def test_history_masking_excludes_given_items():
    # target 4 (0.3) is behind items 2 (0.9) and 3 (0.5); masking them puts it first
    assert ranks([ROW], [4], exclude=([0, 0], [2, 3])) == [0]
    assert ranks([ROW], [4], exclude=([0], [3])) == [1]
    # pairs of another row do not touch this one
    assert ranks([ROW, ROW], [4, 4], exclude=([1, 1], [2, 3])) == [2, 0]


def test_history_masking_never_excludes_the_target():
    # the target is in the history (a repeat): it keeps its own score and rank
    assert ranks([ROW], [2], exclude=([0, 0], [2, 3])) == [0]
    assert ranks([ROW], [4], exclude=([0, 0], [4, 2])) == [1]  # only item 2 is masked
    # in another row, the same item id is masked as usual
    assert ranks([ROW, ROW], [2, 4], exclude=([0, 1], [3, 2])) == [0, 1]


def test_input_scores_not_modified():
    s = torch.tensor([ROW])
    target_ranks(s, torch.tensor([4]), (torch.tensor([0]), torch.tensor([2])))
    assert s.tolist() == [[pytest.approx(v) for v in ROW]]


def test_nan_never_ranks_first():
    # a NaN target ranks last among the real items
    assert ranks([[0.0, 0.1, NAN, 0.5, 0.3]], [2]) == [3]
    # an all-NaN row: last, not first
    assert ranks([[NAN] * 5], [1]) == [3]
    # NaN on other items does not push the target down
    assert ranks([[0.0, NAN, 0.2, NAN, 0.1]], [2]) == [0]
    assert ranks([[0.0, NAN, 0.2, NAN, 0.1]], [4]) == [1]


def test_minus_inf_target_ranks_last_among_real_items():
    inf = float("inf")
    assert ranks([[0.0, 1.0, -inf, 2.0, 3.0]], [2]) == [3]
    # two real items at -inf: pessimistic tie between them, padding never counted
    assert ranks([[0.0, -inf, -inf, 2.0, 3.0]], [2]) == [3]


def test_plus_inf_scores():
    inf = float("inf")
    assert ranks([[0.0, 1.0, inf, 2.0, 3.0]], [2]) == [0]
    assert ranks([[0.0, inf, inf, 2.0, 3.0]], [2]) == [1]  # a tie at +inf is pessimistic too


def test_half_precision_scores():
    s = torch.tensor([ROW], dtype=torch.bfloat16)
    assert target_ranks(s, torch.tensor([4])).tolist() == [2]


def test_metrics_by_hand():
    r = np.array([0, 3, 15, 25])
    m = metrics_from_ranks(r)
    assert m["recall@10"] == 0.5
    assert m["recall@20"] == 0.75
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(17)) / 4)
    assert list(m) == ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]


def test_per_user_values():
    assert per_user_ndcg(np.array([0]), 10).tolist() == [1.0]
    assert per_user_ndcg(np.array([3]), 10)[0] == pytest.approx(1 / math.log2(5))
    assert per_user_ndcg(np.array([1]), 10)[0] == pytest.approx(1 / math.log2(3))
    assert per_user_ndcg(np.array([9, 10]), 10).tolist() == [pytest.approx(1 / math.log2(11)), 0.0]
    assert per_user_recall(np.array([9, 10, 0]), 10).tolist() == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------- evaluate() with stub models


class Stub(nn.Module):
    """Scores from a function of the batch; n_items + 1 columns."""

    def __init__(self, n_items: int, fn):
        super().__init__()
        self.n_items, self.fn = n_items, fn

    def scores(self, batch):
        return self.fn(batch, torch.zeros(batch.size, self.n_items + 1))


def test_evaluate_constant_and_oracle(tiny_file):
    data = LeaveOneOut(load_sequences(tiny_file), max_len=3)  # 3 users, n_items 12
    const = evaluate(Stub(12, lambda b, s: s + 1.0), data, "test", torch.device("cpu"), batch_size=2)
    assert const.tolist() == [11, 11, 11]

    def oracle(b, s):
        s[torch.arange(b.size), b.target] = 1.0
        return s

    model = Stub(12, oracle)
    model.train()
    for split in ("valid", "test"):
        assert evaluate(model, data, split, torch.device("cpu"), batch_size=2).tolist() == [0, 0, 0]
    assert model.training  # restored after evaluation


def _history_first(b, s):
    """Every item in the row's (truncated) history scores 2, the target 1, the rest 0."""
    s[torch.arange(b.size), b.target] = 1.0
    rows = torch.arange(b.size)[:, None].expand_as(b.items)
    s[rows[b.items > 0], b.items[b.items > 0]] = 2.0
    return s


def test_evaluate_history_masking(tiny_file):
    # test histories (max_len 3): user 0: 9 4 7 -> 6, user 1: 1 2 -> 3, user 2: 1 4 12 -> 2
    data = LeaveOneOut(load_sequences(tiny_file), max_len=3)
    model = Stub(12, _history_first)
    plain = evaluate(model, data, "test", torch.device("cpu"))
    assert plain.tolist() == [3, 2, 3]
    masked = evaluate(model, data, "test", torch.device("cpu"), mask_history=True)
    assert masked.tolist() == [0, 0, 0]


def test_evaluate_masking_keeps_a_repeated_target(tmp_path):
    # user 1: 5 6 5 -> the test target 5 is also in the history; user 2: 1 2 3 4
    path = tmp_path / "rep.txt"
    path.write_text("1 5 6 5\n2 1 2 3 4\n")
    data = LeaveOneOut(load_sequences(path), max_len=50)
    model = Stub(6, _history_first)
    # unmasked: user 1's target 5 is itself a history item (score 2) tied with item 6 -> rank 1;
    # user 2's target 4 is behind 1, 2, 3 -> rank 3
    assert evaluate(model, data, "test", torch.device("cpu")).tolist() == [1, 3]
    # masked: item 6 is excluded, the target 5 is not -> rank 0 for both users
    assert evaluate(model, data, "test", torch.device("cpu"), mask_history=True).tolist() == [0, 0]
