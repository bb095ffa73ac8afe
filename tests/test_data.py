"""Sequence files, the leave-one-out split and its batches, the dataset registry, synthetic data.

Expectations are worked out by hand from the fixture files (see conftest.TINY_LINES):
  user 10 (index 0): 5 3 8 2 9 4 7 6   -> train items 5 3 8 2 9, valid target 7, test target 6
  user 20 (index 1): 1 2 3             -> train item 1, valid target 2, test target 3
  user 30 (index 2): 6 1 4 12 2        -> train items 6 1 4, valid target 12, test target 2
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.data import registry
from harness.data.sequences import SequenceData, load_sequences, stats, write_sequences
from harness.data.split import LeaveOneOut, parse_layout
from harness.data.synthetic import SyntheticSpec, generate, spec_for
from harness.errors import HarnessError


def write(tmp_path: Path, text: str, name: str = "seqs.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- loading


def test_tiny_file_parses(tiny_file):
    d = load_sequences(tiny_file)
    assert d.n_users == 3
    assert d.user_ids.tolist() == [10, 20, 30]
    assert d.offsets.tolist() == [0, 8, 11, 16]
    assert d.items.tolist() == [5, 3, 8, 2, 9, 4, 7, 6, 1, 2, 3, 6, 1, 4, 12, 2]
    assert d.sequence(2).tolist() == [6, 1, 4, 12, 2]
    assert d.n_items == 12
    assert d.n_interactions == 16
    assert d.warnings == []
    assert d.source == str(tiny_file)
    assert len(d.content_hash) == 64


def test_stats_by_hand(tiny_file):
    s = stats(load_sequences(tiny_file))
    # distinct ids {1..9, 12} = 10 (not the largest id 12); density 16 / (3 * 10)
    assert s["users"] == 3
    assert s["items"] == 10
    assert s["interactions"] == 16
    assert s["sparsity"] == pytest.approx(1 - 16 / 30)
    assert s["avg_length"] == pytest.approx(16 / 3)


@pytest.mark.parametrize("text, line, what", [
    ("1 4 5 6\n2 7 x 9\n", 2, "'x'"),
    ("1 4 5 6\n2 7 8 1.5\n", 2, "'1.5'"),
    ("1 4 5 6\n\n2 7 0 9\n", 3, "item id 0"),  # the blank line still counts as a line
    ("1 4 5 6\n2 7 -3 9\n", 2, "item id -3"),
    ("7 4 5 6\n8 1 2 3\n7 9 10 11\n", 3, "user 7"),
    ("7 4 5\n7 1 2 3\n", 2, "user 7"),  # a duplicate is an error even if the first line is short
])
def test_bad_lines_name_file_and_line(tmp_path, text, line, what):
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as e:
        load_sequences(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}:"), msg
    assert what in msg
    assert "\n" not in msg


def test_underscore_token_is_rejected(tmp_path):
    path = write(tmp_path, "1 4 5 6\n2 7 4_5 9\n")
    with pytest.raises(HarnessError, match=re.escape(f"{path}:2:")):
        load_sequences(path)


def test_duplicate_user_names_first_line(tmp_path):
    path = write(tmp_path, "7 4 5 6\n8 1 2 3\n7 9 10 11\n")
    with pytest.raises(HarnessError, match=r"user 7 already has a line \(1\)"):
        load_sequences(path)


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as e:
        load_sequences(path)
    assert str(e.value).startswith(f"{path}: file is empty")


def test_only_short_users_is_an_error(tmp_path):
    path = write(tmp_path, "1 4 5\n2 6\n")
    with pytest.raises(HarnessError, match="has no user with >= 3 items"):
        load_sequences(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(HarnessError, match="no such file"):
        load_sequences(tmp_path / "nope.txt")
    path = tmp_path / "bin.txt"
    path.write_bytes(b"1 2 3 4\n\xff\xfe 5\n")
    with pytest.raises(HarnessError, match="not a UTF-8 text file"):
        load_sequences(path)


def test_short_users_dropped_with_counted_warning(tmp_path):
    path = write(tmp_path, "1 4 5 6\n2 7 8\n3 9\n4 1 2 3 4\n\n\n")
    d = load_sequences(path)
    assert d.user_ids.tolist() == [1, 4]
    assert d.items.tolist() == [4, 5, 6, 1, 2, 3, 4]
    assert d.offsets.tolist() == [0, 3, 7]
    assert len(d.warnings) == 1
    w = d.warnings[0]
    assert "dropped 2 user(s) with fewer than 3 items" in w
    assert "lines 2, 3" in w
    assert str(path) in w


def test_blank_lines_are_fine(tmp_path):
    d = load_sequences(write(tmp_path, "\n1 4 5 6\n   \n2 1 2 3\n\n\n"))
    assert d.user_ids.tolist() == [1, 2]
    assert d.items.tolist() == [4, 5, 6, 1, 2, 3]
    assert d.warnings == []


def test_write_then_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    write_sequences(path, [[3, 1, 2], np.array([9, 8, 7, 6])])
    assert path.read_text() == "1 3 1 2\n2 9 8 7 6\n"
    d = load_sequences(path)
    assert d.user_ids.tolist() == [1, 2]
    assert d.items.tolist() == [3, 1, 2, 9, 8, 7, 6]
    assert d.n_items == 9


# ------------------------------------------------------------------------------- leave-one-out


def in_memory(seqs: list[np.ndarray], n_items: int) -> SequenceData:
    lengths = [len(s) for s in seqs]
    return SequenceData(items=np.concatenate(seqs).astype(np.int64),
                        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        user_ids=np.arange(1, len(seqs) + 1), n_items=n_items)


def samples_of(batches) -> Counter:
    """(user index, history, target) of every position with a loss, checking the padding."""
    out: Counter = Counter()
    for b in batches:
        items, targets, lengths = b.items.numpy(), b.targets.numpy(), b.lengths.numpy()
        for i in range(b.size):
            n = int(lengths[i])
            assert (items[i, :n] > 0).all() and (items[i, n:] == 0).all()
            assert (targets[i, n:] == 0).all()
            for j in np.flatnonzero(targets[i]):
                out[(int(b.users[i]), tuple(int(x) for x in items[i, : j + 1]), int(targets[i, j]))] += 1
    return out


# every training prefix of the tiny file, histories cut to the last max_len items
EXPECTED_TRAIN = {
    3: {
        (0, (5,), 3), (0, (5, 3), 8), (0, (5, 3, 8), 2), (0, (3, 8, 2), 9), (0, (8, 2, 9), 4),
        (2, (6,), 1), (2, (6, 1), 4),
    },
    50: {
        (0, (5,), 3), (0, (5, 3), 8), (0, (5, 3, 8), 2), (0, (5, 3, 8, 2), 9), (0, (5, 3, 8, 2, 9), 4),
        (2, (6,), 1), (2, (6, 1), 4),
    },
}


@pytest.mark.parametrize("layout", ["sequence", "prefix"])
@pytest.mark.parametrize("max_len", [3, 50])
@pytest.mark.parametrize("batch_size", [1, 2, 100])
def test_train_samples_are_all_prefixes(tiny_file, layout, max_len, batch_size):
    split = LeaveOneOut(load_sequences(tiny_file), max_len=max_len)
    got = samples_of(split.train_batches(layout, batch_size, np.random.default_rng(0)))
    assert set(got) == EXPECTED_TRAIN[max_len]
    assert all(c == 1 for c in got.values())  # each sample exactly once per epoch
    assert split.n_train_samples() == 7


@pytest.mark.parametrize("layout", ["sequence", "prefix"])
@pytest.mark.parametrize("copies", [2, 5])
def test_a_layout_with_copies_draws_every_sample_that_many_times(tiny_file, layout, copies):
    split = LeaveOneOut(load_sequences(tiny_file), max_len=3)
    batches = split.train_batches(f"{layout}*{copies}", 2, np.random.default_rng(0))
    got = samples_of(batches)
    assert set(got) == EXPECTED_TRAIN[3] and all(c == copies for c in got.values())
    assert sum(b.targets.gt(0).sum().item() for b in batches) == copies * split.n_train_samples()


def test_one_copy_is_the_plain_layout_and_bad_spellings_are_refused(tiny_file):
    split = LeaveOneOut(load_sequences(tiny_file), max_len=3)
    plain = split.train_batches("prefix", 2, np.random.default_rng(4))
    once = split.train_batches("prefix*1", 2, np.random.default_rng(4))
    assert [b.items.tolist() for b in plain] == [b.items.tolist() for b in once]  # same RNG draws
    assert parse_layout("prefix*10") == ("prefix", 10) and parse_layout("sequence") == ("sequence", 1)
    for bad in ("bogus*2", "prefix*0", "prefix*", "prefix*x"):
        with pytest.raises(ValueError, match="unknown layout"):
            split.train_batches(bad, 2, np.random.default_rng(0))


def test_row_counts_by_hand(tiny_file):
    split = LeaveOneOut(load_sequences(tiny_file), max_len=3)
    # prefix: one row per sample. sequence: a head row for users 0 and 2, plus one row for each
    # of user 0's two samples whose history is longer than 3 (targets 9 and 4).
    assert len(split.train_rows("prefix")) == 7
    seq = split.train_rows("sequence")
    assert len(seq) == 4
    assert sorted(seq.samples.tolist()) == [1, 1, 2, 3]
    assert sorted(zip(seq.user.tolist(), seq.length.tolist(), seq.loss_from.tolist())) == [
        (0, 3, 0), (0, 3, 2), (0, 3, 2), (2, 2, 0)]
    with pytest.raises(ValueError):
        split.train_rows("bogus")


def test_train_batch_target_is_item_after_row(tiny_file):
    split = LeaveOneOut(load_sequences(tiny_file), max_len=3)
    for b in split.train_batches("prefix", 2, np.random.default_rng(1)):
        last = b.lengths.numpy() - 1
        assert b.target.tolist() == b.targets.numpy()[np.arange(b.size), last].tolist()


def test_valid_and_test_targets_never_trained_on(tiny_file):
    split = LeaveOneOut(load_sequences(tiny_file), max_len=3)
    held_out = {0: {7, 6}, 1: {2, 3}, 2: {12, 2}}
    for layout in ("sequence", "prefix"):
        for user, hist, target in samples_of(split.train_batches(layout, 3, np.random.default_rng(2))):
            assert target not in held_out[user]
            assert not set(hist) & held_out[user]


def test_layouts_same_multiset_on_synthetic():
    seqs = generate(SyntheticSpec(users=40, items=30, intents=3, mean_length=9, seed=3))
    lengths = [len(s) for s in seqs]
    split = LeaveOneOut(in_memory(seqs, 30), max_len=4)
    rng = np.random.default_rng(0)
    a = samples_of(split.train_batches("sequence", 16, rng))
    b = samples_of(split.train_batches("prefix", 16, rng))
    assert a == b
    assert sum(a.values()) == split.n_train_samples() == sum(n - 3 for n in lengths)
    assert all(len(h) <= 4 for _, h, _ in a)


def test_eval_batches_by_hand(tiny_file):
    split = LeaveOneOut(load_sequences(tiny_file), max_len=3)
    expected = {
        "valid": {0: ((2, 9, 4), 7), 1: ((1,), 2), 2: ((6, 1, 4), 12)},
        "test": {0: ((9, 4, 7), 6), 1: ((1, 2), 3), 2: ((1, 4, 12), 2)},
    }
    for which, exp in expected.items():
        for bs in (1, 2, 1024):
            got = {}
            for b in split.eval_batches(which, bs):
                assert b.items.shape[1] == int(b.lengths.max())
                assert (b.targets == 0).all()
                for i in range(b.size):
                    n = int(b.lengths[i])
                    assert (b.items[i, n:] == 0).all()
                    u = int(b.users[i])
                    assert u not in got
                    got[u] = (tuple(b.items[i, :n].tolist()), int(b.target[i]))
            assert got == exp, (which, bs)
    with pytest.raises(ValueError):
        next(split.eval_batches("train"))


def test_history_index_is_untruncated(tiny_file):
    split = LeaveOneOut(load_sequences(tiny_file), max_len=3)
    rows, items = split.history_index(np.array([2, 0]), "valid")
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert items.tolist() == [6, 1, 4, 5, 3, 8, 2, 9, 4]
    rows, items = split.history_index(np.array([0, 1]), "test")
    assert rows.tolist() == [0] * 7 + [1, 1]
    assert items.tolist() == [5, 3, 8, 2, 9, 4, 7, 1, 2]


@pytest.mark.parametrize("layout", ["sequence", "prefix"])
def test_batches_padded_to_own_longest_row(layout):
    seqs = generate(SyntheticSpec(users=60, items=40, intents=4, mean_length=10, seed=5))
    max_len, bs = 6, 32
    split = LeaveOneOut(in_memory(seqs, 40), max_len=max_len)
    batches = split.train_batches(layout, bs, np.random.default_rng(7))
    sizes = []
    for b in batches:
        assert b.items.shape[1] == int(b.lengths.max())
        assert b.targets.shape == b.items.shape
        assert int(b.lengths.max()) <= max_len
        sizes.append(int((b.targets > 0).sum()))
    n = split.n_train_samples()
    assert sum(sizes) == n
    if layout == "prefix":
        # one sample per row: every batch holds exactly bs samples but one holding the rest
        assert sorted(sizes) == sorted([bs] * (n // bs) + ([n % bs] if n % bs else []))
    else:
        # rows hold up to max_len samples: a batch is within max_len - 1 of bs (one may be short)
        assert all(s <= bs + max_len - 1 for s in sizes)
        assert sum(s < bs - max_len + 1 for s in sizes) <= 1


# ------------------------------------------------------------------------------- registry


def test_missing_named_dataset_says_where_and_how(tmp_path):
    with pytest.raises(HarnessError) as e:
        registry.resolve("toys", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "toys" / "Toys_and_Games.txt") in msg
    assert "harness data fetch toys" in msg
    # aliases resolve to the same dataset
    with pytest.raises(HarnessError, match=re.escape(str(tmp_path / "instrument" / "Musical_Instruments.txt"))):
        registry.resolve("instruments", tmp_path)


def test_unknown_name(tmp_path):
    with pytest.raises(HarnessError, match="unknown dataset 'nosuch'"):
        registry.resolve("nosuch", tmp_path)
    with pytest.raises(HarnessError, match="does not exist"):
        registry.resolve(str(tmp_path / "missing.txt"), tmp_path)


def test_a_directory_is_said_to_be_a_directory(tmp_path, tiny_file, monkeypatch):
    folder = tmp_path / "mydata"
    folder.mkdir()
    with pytest.raises(HarnessError, match=f"^dataset {folder} is a directory, not a file") as e:
        registry.resolve(str(folder), tmp_path)
    assert "does not exist" not in str(e.value) and "\n" not in str(e.value)
    (folder / "seqs.txt").write_text(tiny_file.read_text())
    with pytest.raises(HarnessError, match=f"such as {folder / 'seqs.txt'}"):  # what it holds
        registry.resolve(str(folder) + "/", tmp_path)
    monkeypatch.chdir(tmp_path)  # a bare name that is a directory here, not a registered dataset
    with pytest.raises(HarnessError, match="^dataset mydata is a directory"):
        registry.resolve("mydata", tmp_path)


def test_named_dataset_found_in_data_dir(tmp_path, tiny_file):
    (tmp_path / "data" / "toys").mkdir(parents=True)
    target = tmp_path / "data" / "toys" / "Toys_and_Games.txt"
    target.write_text(tiny_file.read_text())
    assert registry.resolve("Toys", tmp_path / "data") == target


def test_relative_path_starting_with_synthetic(tmp_path, tiny_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("synthetic-mine.txt").write_text(tiny_file.read_text())
    assert registry.resolve("synthetic-mine.txt", tmp_path / "data", tmp_path / "cache") == Path("synthetic-mine.txt")


def test_path_dataset_loads(tmp_path, tiny_file):
    d = registry.load(str(tiny_file), tmp_path / "unused", tmp_path / "cache")
    assert d.user_ids.tolist() == [10, 20, 30]
    assert d.items.tolist()[:8] == [5, 3, 8, 2, 9, 4, 7, 6]


def test_cache_round_trip_and_content_key(tmp_path):
    cache = tmp_path / "cache"
    path = write(tmp_path, "1 4 5 6\n2 7\n")
    first = registry.load(str(path), tmp_path, cache)
    cached = cache / "datasets" / f"{first.content_hash[:16]}.npz"
    assert cached.is_file()
    again = registry.load(str(path), tmp_path, cache)  # served from the cache
    assert again.items.tolist() == [4, 5, 6]
    assert again.user_ids.tolist() == [1]
    assert again.n_items == 6
    assert again.warnings == first.warnings and "dropped 1 user(s)" in again.warnings[0]
    # same path, new content: new data, not the stale cached arrays
    path.write_text("1 4 5 6\n2 7 8 9 11\n")
    changed = registry.load(str(path), tmp_path, cache)
    assert changed.content_hash != first.content_hash
    assert changed.items.tolist() == [4, 5, 6, 7, 8, 9, 11]
    assert changed.n_items == 11
    assert changed.warnings == []
    assert len(list((cache / "datasets").glob("*.npz"))) == 2


def test_available_lists_present_files(tmp_path):
    assert registry.available(tmp_path) == []
    (tmp_path / "toys").mkdir()
    (tmp_path / "toys" / "Toys_and_Games.txt").write_text("1 1 2 3\n")
    assert registry.available(tmp_path) == ["toys"]


# ------------------------------------------------------------------------------- synthetic

SMALL = SyntheticSpec(users=50, items=40, intents=4, mean_length=8, seed=11)


def test_synthetic_deterministic_per_seed():
    a, b = generate(SMALL), generate(SMALL)
    assert [s.tolist() for s in a] == [s.tolist() for s in b]
    c = generate(SyntheticSpec(**{**SMALL.__dict__, "seed": 12}))
    assert [s.tolist() for s in a] != [s.tolist() for s in c]


def test_synthetic_shape_and_ids():
    seqs = generate(SMALL)
    assert len(seqs) == 50
    assert min(len(s) for s in seqs) >= 5
    flat = np.concatenate(seqs)
    assert flat.min() >= 1 and flat.max() <= 40
    # no repeats within a user while fewer than half the items have been seen
    for s in seqs:
        head = s[: SMALL.items // 2]
        assert len(set(head.tolist())) == len(head)


def test_synthetic_names(tmp_path):
    assert spec_for("synthetic") == SyntheticSpec()
    assert spec_for("synthetic@7").seed == 7
    assert spec_for("synthetic-toys").users == 19412
    with pytest.raises(HarnessError, match="unknown synthetic scale"):
        spec_for("synthetic-huge")
    with pytest.raises(HarnessError, match="seed after '@' must be an integer"):
        spec_for("synthetic@x")
    p1 = registry.resolve("synthetic@1", tmp_path, tmp_path / "cache")
    p2 = registry.resolve("synthetic@2", tmp_path, tmp_path / "cache")
    assert p1 != p2 and p1.read_text() != p2.read_text()
    d = load_sequences(p1)
    assert d.n_users == 300 and d.lengths().min() >= 5 and d.items.min() >= 1 and d.n_items <= 120
    # generated once, then reused
    assert registry.resolve("synthetic@1", tmp_path, tmp_path / "cache") == p1


def test_cli_data_synth_writes_file(tmp_path):
    out = tmp_path / "s.txt"
    r = CliRunner().invoke(cli, ["data", "synth", "--seed", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = load_sequences(out)
    assert d.n_users == 300
    assert f"{d.n_users:,} users, {d.n_interactions:,} interactions" in r.output


# ------------------------------------------------------------------------------- real data


def test_toys_stats_match_paper(shared_data):
    r = CliRunner().invoke(cli, ["--data-dir", str(shared_data), "data", "stats", "toys"])
    assert r.exit_code == 0, r.output
    assert re.search(r"#users\s+19,412\b", r.output)
    assert re.search(r"#items\s+11,924\b", r.output)
    assert re.search(r"#interactions\s+167,597\b", r.output)
    assert re.search(r"sparsity\s+99\.93%", r.output)
    assert "matches the paper's Table 1" in r.output
    assert "MISMATCH" not in r.output


def test_concurrent_writers_of_one_file_never_publish_a_torn_mix(tmp_path):
    """Two processes generating the same synthetic set at once (a grid filled by two commands)
    each write a temporary file of their own, so the file that appears is always whole."""
    import threading

    from harness.data.sequences import load_sequences, write_sequences

    path = tmp_path / "s.txt"
    seqs = [list(range(1, 200))] * 300
    threads = [threading.Thread(target=write_sequences, args=(path, seqs)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = load_sequences(path)
    assert data.n_users == 300 and data.items.size == 300 * 199
    assert not list(tmp_path.glob("*.tmp"))
