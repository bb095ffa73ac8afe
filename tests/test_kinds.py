"""Experiment kinds are a registry: the four of the paper are registered, and a new kind or a
new model is one file (tests/fixtures/toy_kind.py, tests/fixtures/toy_model.py) that gets a
command, a grid, stored cells and a report with no other edit."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from harness import kinds


def test_the_papers_kinds_are_registered():
    assert {"ablate", "compare", "robustness", "sensitivity"} <= set(kinds.names())
    with pytest.raises(KeyError, match="unknown experiment kind 'nope'"):
        kinds.get("nope")
    axes = kinds.get("sensitivity").axes(ks=[2, 4], ms=[1])
    assert axes.models == ["igr-sr"] and axes.extra == [{"k": 2, "m": 1}, {"k": 4, "m": 1}]
    assert kinds.get("robustness").axes(noise=0.3, noise_on="eval", models_="sasrec").noise == (0.0, 0.3)


@pytest.fixture
def toys():
    """Register the toy kind and model for one test, and take them out again after it."""
    import importlib
    import sys

    import models.registry

    for name in ("fixtures.toy_kind", "fixtures.toy_model"):
        sys.modules.pop(name, None)
        importlib.import_module(name)
    yield
    kinds._KINDS.pop("toy", None)
    models.registry._REGISTRY.pop("toy-mean", None)


def test_a_toy_kind_and_a_toy_model_each_in_one_file(tmp_path, toys):
    from harness.cli import _experiment_command, cli

    group = click.Group(commands={**cli.commands, "toy": _experiment_command(kinds.get("toy"))})
    group.callback, group.params = cli.callback, cli.params
    args = ["--results-dir", str(tmp_path / "res"), "toy", "--dataset", "synthetic", "--models", "sasrec,toy-mean",
            "--seeds", "2", "--epochs", "1", "--device", "cpu", "--params", "paper",
            "--storage", str(tmp_path / "s.journal")]
    result = CliRunner().invoke(group, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "toy-synthetic: 0 of 4 cells already done; running 4" in result.output
    tex = (tmp_path / "res" / "report" / "toy-synthetic.tex").read_text()
    assert r"\toprule" in tex and "SASRec" in tex and "toy-mean" in tex and "tab:toy" in tex
    again = CliRunner().invoke(group, args, catch_exceptions=False)  # resumable like every kind
    assert "4 of 4 cells already done; running 0" in again.output
