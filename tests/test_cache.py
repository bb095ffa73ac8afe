"""harness/cache.py: LID encoders cached by content key; a damaged file is pre-trained again."""
from __future__ import annotations

from harness.cache import cache_key, pretrained_lid
from models.sasrec import SASRecConfig

CFG = SASRecConfig(hidden=8, inner=16, layers=1, max_len=20)


def test_key_depends_on_data_encoder_and_recipe():
    key = cache_key("h", CFG, {"lr": 1e-3})
    assert key == cache_key("h", SASRecConfig(hidden=8, inner=16, layers=1, max_len=20), {"lr": 1e-3})
    assert key != cache_key("other", CFG, {"lr": 1e-3})
    assert key != cache_key("h", CFG, {"lr": 2e-3})
    assert key != cache_key("h", SASRecConfig(hidden=16, inner=16, layers=1, max_len=20), {"lr": 1e-3})


def test_cached_once_and_a_corrupt_file_is_pretrained_again(tmp_path, capsys):
    calls = []

    def pretrain(encoder, checkpoint):
        calls.append(1)
        return {"epochs": 0}

    _, _, cached = pretrained_lid(tmp_path, "h", CFG, 30, {"r": 1}, pretrain)
    assert not cached and len(calls) == 1
    _, _, cached = pretrained_lid(tmp_path, "h", CFG, 30, {"r": 1}, pretrain)
    assert cached and len(calls) == 1
    (path,) = (tmp_path / "lid").glob("*.pt")
    path.write_bytes(path.read_bytes()[:50])  # truncated (a crash mid-copy, a full disk)
    _, _, cached = pretrained_lid(tmp_path, "h", CFG, 30, {"r": 1}, pretrain)
    assert not cached and len(calls) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is unreadable" in err[0] and str(path) in err[0]
