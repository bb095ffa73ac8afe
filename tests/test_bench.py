"""`harness bench` runs end to end and its FLOP accounting adds up (no timing asserted)."""
from __future__ import annotations

from click.testing import CliRunner

from harness.bench import benchmark
from harness.cli import cli
from harness.runs import RunSpec
from harness.train import TrainConfig


def test_bench_counts_output_layer_flops_exactly(tmp_path):
    spec = RunSpec(model="sasrec", dataset="synthetic", data_dir=tmp_path, cache_dir=tmp_path / "c",
                   train=TrainConfig(device="cpu", batch_size=64), params={"hidden": "16", "inner": "32"})
    r = benchmark(spec, n_batches=3, warmup=1)
    assert r.n_batches == 3 and r.samples > 0
    # forward + backward of the (samples x d) @ (d x items+1) output layer is 6 * samples * d * (items+1),
    # which the counted total must contain, leaving a positive remainder for the encoder
    assert r.flops["output_layer"] == 6 * r.samples * 16 * 121
    assert r.flops["total"] > r.flops["output_layer"] > 0
    assert r.peak_flops > 0 and r.eval_seconds > 0
    assert r.top_ops and abs(sum(s for _, s in r.top_ops)) <= 1.0 + 1e-9


def test_bench_command_prints_the_report(tmp_path):
    result = CliRunner().invoke(cli, ["--cache-dir", str(tmp_path), "bench", "--model", "igr-sr", "--dataset",
                                      "synthetic", "--batches", "2", "--device", "cpu", "--lid-epochs", "1",
                                      "--param", "d_l=8", "--param", "k=2", "--param", "m=1"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    for row in ("samples/s", "seconds per epoch", "MFU", "measured matmul peak", "time: backward", "op time"):
        assert row in result.output


def test_bench_counts_the_per_epoch_kmeans_in_the_epoch_time(tmp_path):
    """ICLRec's k-means runs once per epoch, outside the batches: it belongs in s/epoch."""
    spec = RunSpec(model="iclrec", dataset="synthetic", data_dir=tmp_path, cache_dir=tmp_path / "c",
                   train=TrainConfig(device="cpu", batch_size=64),
                   params={"hidden": "16", "inner": "32", "num_intents": "4", "kmeans_redo": "1"})
    r = benchmark(spec, n_batches=2, warmup=1)
    assert r.epoch_start_seconds > 0
    batches_only = r.train_seconds / r.samples * r.epoch_samples
    assert r.seconds_per_epoch == batches_only + r.epoch_start_seconds


def test_bench_many_models_table_and_json(tmp_path):
    import json

    args = ["--cache-dir", str(tmp_path), "bench", "--models", "sasrec,gru4rec", "--dataset", "synthetic",
            "--batches", "2", "--device", "cpu", "--precision", "fp32", "--param", "max_len=20"]
    # a model-specific --param applies to every model only if each knows it: max_len is the trainer's
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and "max_len" in result.output
    args = args[:-2]
    result = CliRunner().invoke(cli, [*args, "--json", "--clock", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.strip().splitlines()[-1])
    assert all(r["clock"] == "cpu" for r in rows)
    assert [(r["model"], r["precision"]) for r in rows] == [("sasrec", "fp32"), ("gru4rec", "fp32")]
    for r in rows:
        assert r["seconds_per_epoch"] > 0 and r["flops_per_epoch"] > 0 and 0 < r["mfu"] < 1
        assert r["peak_memory"] > 0 and r["eval_seconds"] > 0
    table = CliRunner().invoke(cli, args, terminal_width=200)
    assert table.exit_code == 0, table.output
    for head in ("s/epoch fp32", "eval s", "TFLOP/epoch", "MFU fp32", "peak mem fp32", "gru4rec"):
        assert head in table.output


def test_bench_wants_one_of_model_or_models(tmp_path):
    result = CliRunner().invoke(cli, ["--cache-dir", str(tmp_path), "bench", "--dataset", "synthetic"])
    assert result.exit_code != 0 and "--model" in result.output
