"""The `harness` command line through click's CliRunner: help, models, a short train, errors."""
from __future__ import annotations

import datetime as _dt
import json
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harness import runs
from harness.cli import cli
from harness.metrics import METRIC_NAMES, metrics_from_ranks

# small and quick: the default SASRec on the tiny synthetic set (300 users, 120 items)
TRAIN = ["train", "--model", "sasrec", "--dataset", "synthetic", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine has 2 busy cores: one torch thread is several times faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for command in ("train", "bench", "data", "models"):
        assert f"  {command} " in r.output, command
    r = invoke("data", "--help")
    assert r.exit_code == 0
    for command in ("list", "stats", "fetch", "synth"):
        assert f"  {command} " in r.output, command


def test_models_lists_variants():
    r = invoke("models")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.output.strip().splitlines()]
    assert names == sorted(["sasrec", "igr-sr", "igr-sr/wo-lid", "igr-sr/concat", "igr-sr/wo-icr",
                            "gru4rec", "bert4rec", "rearec-erl", "rearec-prl", "iclrec", "icsrec", "lares-ssl",
                            "lares", "mostpop"])


def test_data_list(tmp_path):
    r = invoke("--data-dir", str(tmp_path), "data", "list")
    assert r.exit_code == 0
    lines = r.output.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["toys", "missing"], ["instrument", "missing"], ["cds_and_vinyl", "missing"], ["beauty", "missing"]]
    assert str(tmp_path / "toys" / "Toys_and_Games.txt") in lines[0]


def test_train_writes_record(tmp_path):
    results = tmp_path / "results"
    r = invoke("--results-dir", str(results), *TRAIN, "--epochs", "2")
    assert r.exit_code == 0, r.output
    # the metrics table: a header with every metric, a valid and a test row of 4 numbers
    for name in METRIC_NAMES:
        assert name in r.output
    rows = {line.split()[1]: line for line in r.output.splitlines() if line[:1] == "│"}
    assert set(rows) >= {"valid", "test"}
    records = sorted((results / "runs").glob("*.json"))
    assert len(records) == 1
    assert f"run record: {records[0]}" in r.output
    rec = json.loads(records[0].read_text())
    for key in ("model_config", "train_config", "seed", "data_hash", "environment", "result"):
        assert key in rec, key
    assert rec["model"] == "sasrec" and rec["dataset"] == "synthetic" and rec["seed"] == 2020
    assert rec["train_config"]["epochs"] == 2 and rec["train_config"]["device"] == "cpu"
    assert len(rec["data_hash"]) == 64
    assert rec["environment"]["versions"]["torch"] == torch.__version__
    assert rec["result"]["epochs_run"] == 2 and 1 <= rec["result"]["best_epoch"] <= 2
    assert len(rec["result"]["curves"]) == 2
    ranks = np.load(records[0].with_suffix(".npz"))
    assert ranks["test_ranks"].shape == (300,) and ranks["valid_ranks"].shape == (300,)
    assert ranks["test_ranks"].min() >= 0 and ranks["test_ranks"].max() <= 119
    # the record's metrics are those of its saved ranks, and they are what the table shows
    assert rec["result"]["test"] == pytest.approx(metrics_from_ranks(ranks["test_ranks"]))
    assert f"{rec['result']['test']['ndcg@10']:.4f}" in rows["test"]
    assert f"{rec['result']['valid']['recall@20']:.4f}" in rows["valid"]


def test_train_twice_never_overwrites(tmp_path, monkeypatch):
    # freeze the clock so both runs get the same time stamp, hence the same file name
    fixed = _dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=_dt.timezone.utc)

    class Frozen(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return fixed

    monkeypatch.setattr(runs, "dt", types.SimpleNamespace(datetime=Frozen, timezone=_dt.timezone))
    results = tmp_path / "results"
    small = [*TRAIN, "--epochs", "1", "--param", "hidden=8", "--param", "inner=16", "--param", "layers=1"]
    r1 = invoke("--results-dir", str(results), *small)
    assert r1.exit_code == 0, r1.output
    (first,) = (results / "runs").glob("*.json")
    before = first.read_text()
    before_npz = first.with_suffix(".npz").read_bytes()
    r2 = invoke("--results-dir", str(results), *small, "--seed", "2020", "--lr", "0.01")
    assert r2.exit_code == 0, r2.output
    records = sorted((results / "runs").glob("*.json"))
    assert len(records) == 2
    assert first.read_text() == before
    assert first.with_suffix(".npz").read_bytes() == before_npz
    (second,) = [p for p in records if p != first]
    assert second.name == first.stem + "-2.json"
    assert second.with_suffix(".npz").is_file()
    assert json.loads(second.read_text())["train_config"]["lr"] == 0.01


def test_unknown_model():
    assert_one_line_error(invoke("train", "--model", "nosuch", "--dataset", "synthetic", "--device", "cpu"), "unknown model 'nosuch'", "sasrec")


def test_unknown_dataset():
    assert_one_line_error(invoke("train", "--model", "sasrec", "--dataset", "nosuch", "--device", "cpu"),
                          "unknown dataset 'nosuch'")


def test_unknown_param():
    assert_one_line_error(invoke(*TRAIN, "--param", "nosuch=1"), "--param nosuch", "unknown parameter")


def test_malformed_param():
    assert_one_line_error(invoke(*TRAIN, "--param", "hidden"), "expected key=value")


def test_param_of_wrong_type_for_igr_sr():
    assert_one_line_error(invoke("train", "--model", "igr-sr", "--dataset", "synthetic", "--device", "cpu",
                                 "--param", "d_l=abc"), "--param d_l", "expected int", "'abc'")


def test_param_fixed_by_variant():
    # igr-sr/wo-lid pins use_lid=False; overriding it is an error (capped epochs in case it is not)
    assert_one_line_error(invoke("train", "--model", "igr-sr/wo-lid", "--dataset", "synthetic", "--device", "cpu",
                                 "--epochs", "1", "--param", "use_lid=1"), "igr-sr/wo-lid fixes use_lid")


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="cuda:7 exists on this machine")
def test_unavailable_device():
    assert_one_line_error(invoke("train", "--model", "sasrec", "--dataset", "synthetic", "--device", "cuda:7"),
                          "--device cuda:7")


def test_malformed_dataset_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 4 5 6\n2 1 2 3\n3 7 eight 9\n")
    assert_one_line_error(invoke("train", "--model", "sasrec", "--dataset", str(bad), "--device", "cpu"),
                          f"{bad}:3:", "'eight'")


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    # never touch the network: should anything try to download the raw file, it fails
    import harness.data.fetch

    def offline(url, dest):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(harness.data.fetch, "download", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    line = assert_one_line_error(invoke("train", "--model", "sasrec", "--dataset", "instrument",
                                        "--data-dir", str(empty), "--device", "cpu", "--epochs", "1"),
                                 str(empty / "instrument" / "Musical_Instruments.txt"),
                                 "harness data fetch instrument")
    assert "HARNESS_DATA_DIR" in line


def test_bad_option_values_are_usage_errors():
    r = invoke(*TRAIN, "--epochs", "0")
    assert r.exit_code == 2
    assert "Traceback" not in r.output


# ---- what a new user meets (issue 29): one line naming the file, line or option ----------------

@pytest.mark.parametrize("model, param, expected", [
    ("igr-sr", "m=0", "Error: --param m=0: igr-sr's m must be >= 1"),
    ("igr-sr", "m=-1", "Error: --param m=-1: igr-sr's m must be >= 1"),
    ("igr-sr", "k=0", "Error: --param k=0: igr-sr's k must be >= 1"),
    ("sasrec", "attn_dropout=-0.5", "Error: --param attn_dropout=-0.5: sasrec's attn_dropout must be in [0, 1)"),
    ("igr-sr", "fusion=sum", "Error: --param fusion=sum: igr-sr's fusion must be one of 'cross', 'concat'"),
    ("igr-sr", "d_l=9", "Error: igr-sr's d_l (9) must be a multiple of heads (2)"),  # the LID: d_l wide, same heads
    ("sasrec", "heads=3", "Error: sasrec's hidden (64) must be a multiple of heads (3)"),
])
def test_params_outside_the_models_declared_ranges_are_one_line(tmp_path, model, param, expected):
    r = invoke("train", "--model", model, "--dataset", "synthetic", "--device", "cpu", "--epochs", "1",
               "--lid-epochs", "1", "--param", param, "--results-dir", str(tmp_path / "res"))
    assert assert_one_line_error(r) == expected
    assert not (tmp_path / "res").exists()


def test_sensitivity_and_paper_grids_are_checked_before_anything_runs(tmp_path):
    journal = tmp_path / "s.journal"
    for args, expected in [(("sensitivity", "--k", "0"), "Error: --k 0: igr-sr's k must be >= 1"),
                           (("sensitivity", "--k", "2", "--m", "1,-1"), "Error: --m -1: igr-sr's m must be >= 1"),
                           (("paper", "--k", "2,0", "--dry-run"), "Error: --k 0: igr-sr's k must be >= 1")]:
        r = invoke(*args, "--dataset", "synthetic", "--storage", str(journal))
        assert assert_one_line_error(r) == expected
    assert list(tmp_path.iterdir()) == []  # no journal, no lock


def test_a_directory_given_as_dataset_is_said_to_be_one(tmp_path):
    line = assert_one_line_error(invoke("train", "--model", "sasrec", "--dataset", str(tmp_path), "--device", "cpu"),
                                 f"dataset {tmp_path} is a directory, not a file")
    assert "does not exist" not in line


def test_the_missing_dataset_hint_runs_as_printed(tmp_path, monkeypatch):
    """`harness data fetch toys --data-dir X`, the command the error prints, takes --data-dir."""
    import re

    import harness.data.fetch

    seen = {}

    def fetch(dataset, data_dir, raw=None, force=False):  # never the network
        seen.update(dataset=dataset, data_dir=data_dir)
        return data_dir / "toys" / "Toys_and_Games.txt", {"users": 1, "items": 2, "interactions": 3}

    monkeypatch.setattr(harness.data.fetch, "fetch", fetch)
    monkeypatch.setenv("HARNESS_AUTO_FETCH", "0")
    line = assert_one_line_error(invoke("train", "--model", "sasrec", "--dataset", "toys", "--device", "cpu",
                                        "--data-dir", str(tmp_path / "d")), "harness data fetch toys")
    hint = re.search(r"`harness (data fetch [^`]*)`", line).group(1)
    r = invoke(*hint.split())
    assert r.exit_code == 0, r.output
    assert seen == {"dataset": "toys", "data_dir": tmp_path / "d"}
    r = invoke("data", "list", "--data-dir", str(tmp_path / "d"))
    assert r.exit_code == 0 and str(tmp_path / "d" / "toys" / "Toys_and_Games.txt") in r.output


def test_results_dir_after_the_subcommand_and_lines_whole_when_not_a_terminal(tmp_path):
    r = invoke(*TRAIN, "--epochs", "1", "--param", "hidden=8", "--param", "inner=16",
               "--results-dir", str(tmp_path / "res"))
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "res" / "runs").glob("*.json"))) == 1
    # not a terminal (captured): the epoch line (over 80 columns) and the title stay whole
    (epoch,) = [line for line in r.output.splitlines() if line.startswith("epoch ")]
    assert "loss" in epoch and epoch.startswith("epoch 1/1 valid ndcg@10 ") and epoch.endswith(" in all"), r.output
    assert len(epoch) > 80, r.output
    assert any(line.startswith("sasrec on synthetic (seed 2020") and line.endswith("best epoch 1 of 1)")
               for line in r.output.splitlines()), r.output


def test_console_never_wraps_when_not_a_terminal(monkeypatch):
    import io

    from rich.table import Table

    from harness.console import console

    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    table = Table(title="a title much longer than the narrow table under it, " * 3)
    table.add_column("x")
    table.add_row("1")
    console(file=out).print("word " * 40, table)
    lines = out.getvalue().splitlines()
    assert lines[0].strip() == ("word " * 40).strip() and lines[1].strip() == table.title.strip()


def test_read_only_commands_refuse_a_journal_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("report", "--storage", "studies/optuna.journl"),
                          "--storage studies/optuna.journl: no such file")
    assert_one_line_error(invoke("report"), "no study journal at studies/optuna.journal yet")
    r = invoke("studies")  # nothing stored yet, nothing asked for: said, not refused
    assert r.exit_code == 0 and "no studies in studies/optuna.journal yet" in r.output
    assert list(tmp_path.iterdir()) == []  # no journal, lock or report folder


def test_ctrl_c_twice_aborts_with_130_and_one_line(tmp_path, monkeypatch):
    """The first SIGINT asks for a clean stop (harness/stopping.py), the second aborts: exit 130
    and "aborted", not click's "Aborted!" and exit 1. Both signals are sent from inside the run,
    so the test waits on nothing."""
    import os
    import signal

    from harness import stopping

    def interrupted(spec, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # handled before the next statement: a stop is asked for
        os.kill(os.getpid(), signal.SIGINT)  # the second raises KeyboardInterrupt here
        raise AssertionError("not reached")

    monkeypatch.setattr(runs, "run", interrupted)
    before = signal.getsignal(signal.SIGINT)
    try:
        r = invoke(*TRAIN, "--results-dir", str(tmp_path / "res"))
    finally:
        stopping.reset()
    assert signal.getsignal(signal.SIGINT) is before  # the command's handlers are gone
    assert r.exit_code == 130, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("SIGINT: stopping after the epoch in flight") and lines[-1] == "aborted", r.output
    assert "Aborted!" not in r.output and "Traceback" not in r.output


def test_keyboard_interrupt_anywhere_is_130(monkeypatch):
    import harness.tune

    def interrupted(url):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.tune, "list_studies", interrupted)
    r = invoke("studies")
    assert r.exit_code == 130 and r.output.strip() == "aborted", r.output
