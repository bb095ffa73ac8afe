"""Golden figures: the metrics of a few seeded synthetic runs (train, tune, ablate), pinned to
the digit. A refactor that changes no number keeps these; a change that moves low digits on
purpose (a new precision, a fused kernel) re-pins them deliberately:

    python tests/test_golden.py > tests/golden.json    # then say why in the commit

Runs in-process through the CLI on one torch thread (conftest), CPU, fp32."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

GOLDEN = Path(__file__).with_name("golden.json")
CPU = ["--device", "cpu"]
STUDY = """
model = "sasrec"
trials = 3
pruner = "none"
sampler = { name = "tpe", seed = 0 }
[fixed]
hidden = 16
inner = 32
[space]
layers = { type = "int", low = 1, high = 2 }
lr = { type = "float", low = 1e-3, high = 1e-2, log = true }
"""
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def _precision_flag() -> list[str]:
    """fp32 explicitly where the trainer has a precision option (goldens are fp32 figures)."""
    from harness.cli import trainer_options

    probe = trainer_options(lambda **kw: None)
    names = {p.name for p in getattr(probe, "__click_params__", [])}
    return ["--precision", "fp32"] if "precision" in names else []


def _invoke(*args: str) -> str:
    from click.testing import CliRunner

    from harness.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _record(results: Path) -> dict:
    (path,) = sorted((results / "runs").glob("*.json"))
    return json.loads(path.read_text())


def scenario_train(tmp: Path, model: str, *params: str) -> dict:
    results = tmp / f"train-{model.replace('/', '_')}"
    _invoke("--results-dir", str(results), "train", "--model", model, "--dataset", "synthetic", "--epochs", "3",
            "--lid-epochs", "2", *CPU, *_precision_flag(), *(x for p in params for x in ("--param", p)))
    res = _record(results)["result"]
    return {"valid": {k: res["valid"][k] for k in METRICS}, "test": {k: res["test"][k] for k in METRICS},
            "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"]}


def scenario_tune(tmp: Path) -> dict:
    from harness.store import open_storage

    study_file = tmp / "golden.toml"
    study_file.write_text(STUDY)
    journal = tmp / "tune.journal"
    _invoke("--results-dir", str(tmp / "tune-results"), "tune", "--dataset", "synthetic", "--study",
            str(study_file), "--storage", str(journal), "--epochs", "3", *CPU, *_precision_flag())
    study = optuna.load_study(study_name="sasrec-synthetic", storage=open_storage(str(journal)))
    return {str(t.number): {"state": t.state.name, "params": t.params, "value": t.value,
                            "test_ndcg@10": t.user_attrs.get("test", {}).get("ndcg@10")}
            for t in study.get_trials()}


def scenario_ablate(tmp: Path) -> dict:
    from harness.store import open_storage

    journal = tmp / "ablate.journal"
    _invoke("--results-dir", str(tmp / "ablate-results"), "ablate", "--dataset", "synthetic", "--seeds", "1",
            "--epochs", "2", "--lid-epochs", "2", "--params", "paper", "--storage", str(journal),
            *CPU, *_precision_flag())
    study = optuna.load_study(study_name="ablate-synthetic", storage=open_storage(str(journal)))
    out = {}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        out[t.user_attrs["cell_info"]["model"]] = {k: t.user_attrs["test"][k] for k in METRICS}
    return out


SCENARIOS = {
    "train-sasrec": lambda tmp: scenario_train(tmp, "sasrec", "hidden=16", "inner=32"),
    "train-igr-sr": lambda tmp: scenario_train(tmp, "igr-sr", "d_l=16", "k=4", "m=2"),
    "tune-sasrec": scenario_tune,
    "ablate": scenario_ablate,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_golden(name, tmp_path):
    expected = json.loads(GOLDEN.read_text())[name]
    got = json.loads(json.dumps(SCENARIOS[name](tmp_path)))  # same JSON round trip as the pinned file
    assert got == expected


if __name__ == "__main__":  # re-pin: print every scenario's figures as JSON
    import torch

    torch.set_num_threads(1)
    out = {}
    for name, make in SCENARIOS.items():
        with tempfile.TemporaryDirectory() as tmp:
            # an empty cache, as each test gets (conftest): a cached LID pre-trained by older code
            # would otherwise be reused and pin the old figures
            os.environ["HARNESS_CACHE_DIR"] = str(Path(tmp) / "cache")
            out[name] = json.loads(json.dumps(make(Path(tmp))))
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
