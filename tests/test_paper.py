"""`harness paper` on a small synthetic file with tiny budgets: the plan comes first (and alone
with --dry-run), --hours cuts and says what, bad input is one line, a run writes the manifest and
every table, a stage already done runs nothing, an interrupted stage resumes, and the
manifest's command-equivalents are the very studies the pipeline fills."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from harness import faults
from harness.cli import cli

# 2 models, 2 trials of at most 2 epochs, 1 lr trial per variant, 1 seed, a 1-cell sensitivity
# grid, robustness of SASRec only: 17 runs of a few hundred samples each
TINY = ["--models", "sasrec,igr-sr", "--trials", "2", "--epochs", "2", "--min-epochs", "1", "--lr-trials", "1",
        "--seeds", "1", "--final-epochs", "2", "--patience", "1", "--k", "2", "--m", "1",
        "--robustness-models", "sasrec", "--lid-epochs", "1", "--device", "cpu", "--no-bench"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """60 users over 40 items with planted intents (as conftest's small_split), as a file."""
    from harness.data.sequences import write_sequences
    from harness.data.synthetic import SyntheticSpec, generate

    path = tmp_path_factory.mktemp("data") / "small.txt"
    write_sequences(path, generate(SyntheticSpec(users=60, items=40, intents=4, mean_length=10, seed=1)))
    return path


def paper(root: Path, dataset: Path, *extra: str, env: dict | None = None):
    # --cache-dir explicitly: a module-scoped run starts before conftest's per-test cache is set
    args = ["--results-dir", str(root / "res"), "--cache-dir", str(root / "cache"), "paper", "--dataset",
            str(dataset), "--storage", str(root / "s.journal"), *TINY, *extra]
    return CliRunner().invoke(cli, args, terminal_width=200, env=env)


def trials_in(storage: Path) -> dict[str, int]:
    from harness.store import open_storage

    s = open_storage(str(storage))
    return {name: len(optuna.load_study(study_name=name, storage=s).get_trials())
            for name in optuna.study.get_all_study_names(s)}


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- the plan -------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, small):
    r = paper(tmp_path, small, "--dry-run")
    assert r.exit_code == 0, r.output
    for stage in ("tune", "compare", "ablate", "sensitivity", "robustness", "report"):
        assert f"  {stage} " in r.output, stage
    assert "0 / 2" in r.output and "lr of wo-icr" in r.output and "ETA " in r.output
    assert "2 trials per model, at most 2 epochs each, hyperband from epoch 1" in r.output
    assert "rough default" in r.output  # --no-bench and nothing cached
    assert not (tmp_path / "s.journal").exists()  # not even an empty store
    assert not (tmp_path / "res" / "paper").exists()


def test_hours_cuts_trials_then_the_epoch_cap_and_says_so(tmp_path, small):
    r = paper(tmp_path, small, "--dry-run", "--trials", "8", "--epochs", "6", "--hours", "1e-6")
    assert r.exit_code == 0, r.output
    assert "--hours 1e-06 cut: trials per model 8 -> 1" in r.output
    assert "tuning epoch cap 6 -> 1 (never below the first rung, 1)" in r.output
    assert "does not fit" in r.output  # the experiments are not cut, and the plan says so
    roomy = paper(tmp_path, small, "--dry-run", "--hours", "1000")
    assert roomy.exit_code == 0 and "--hours 1000: the plan fits, nothing cut" in roomy.output


def test_default_first_rung_is_the_largest_of_the_study_files(tmp_path, small):
    at = TINY.index("--min-epochs")
    args = TINY[:at] + TINY[at + 2:]
    r = CliRunner().invoke(cli, ["--cache-dir", str(tmp_path / "c"), "paper", "--dataset", str(small),
                                 "--storage", str(tmp_path / "s.journal"), *args, "--models", "sasrec,iclrec,igr-sr",
                                 "--epochs", "20", "--dry-run"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "at most 20 epochs each, hyperband from epoch 15" in r.output  # ICLRec's first rung, for all


@pytest.mark.parametrize("extra, needles", [
    (["--models", "sasrec,nosuch"], ["--models", "unknown model 'nosuch'"]),
    (["--models", "igr-sr/wo-icr"], ["--models igr-sr/wo-icr", "ablation variant"]),
    (["--models", "sasrec"], ["--models", "need igr-sr"]),
    (["--hours", "0"], ["--hours 0", "positive"]),
    (["--hours", "-2"], ["--hours -2", "positive"]),
    (["--stages", "tune,nosuch"], ["--stages tune,nosuch", "choose from"]),
    (["--robustness-models", "gru4rec"], ["--robustness-models gru4rec", "not among --models"]),
    (["--k", "2,x"], ["--k 2,x", "integers"]),
    (["--epochs", "2", "--min-epochs", "3"], ["--min-epochs 3", "--epochs 2"]),
])
def test_bad_input_is_one_line(tmp_path, small, extra, needles):
    assert_one_line_error(paper(tmp_path, small, "--dry-run", *extra), *needles)


def test_unknown_dataset_is_one_line(tmp_path):
    assert_one_line_error(paper(tmp_path, Path("nosuch"), "--dry-run"), "unknown dataset 'nosuch'")


# ---- costs ----------------------------------------------------------------------------------

def test_bench_figures_are_measured_once_and_cached(tmp_path, small, monkeypatch):
    import harness.bench
    from harness.data import registry
    from harness.paper_plan import PaperJob, measure_costs
    from harness.runs import RunSpec

    calls = []

    def fake(spec, n_batches, clock="wall"):
        calls.append((spec.model, n_batches, clock, spec.lid_epochs))
        return {"seconds_per_epoch": 3.0, "eval_seconds": 0.5}

    monkeypatch.setattr(harness.bench, "bench_in_subprocess", fake)
    base = RunSpec(model="sasrec", dataset=str(small), data_dir=tmp_path, cache_dir=tmp_path / "cache")
    job = PaperJob(dataset=str(small), base=base, bench_batches=7)
    data = registry.load(str(small), tmp_path, tmp_path / "cache")
    first = measure_costs(job, ["sasrec"], data, threads=1, echo=lambda line: None)
    assert calls == [("sasrec", 7, "cpu", 1)]  # 1 thread: CPU seconds; a 1-epoch LID is enough to time
    assert first["sasrec"].epoch == 3.5 and first["sasrec"].source == "bench, measured now"
    again = measure_costs(job, ["sasrec"], data, threads=1, echo=lambda line: None)
    assert len(calls) == 1 and again["sasrec"].source.startswith("bench, cached")
    measure_costs(job, ["sasrec"], data, threads=2, echo=lambda line: None)  # another key: measured
    assert calls[-1] == ("sasrec", 7, "wall", 1)


# ---- a whole run, its rerun, and a stage at a time ------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, small):
    """The first stage alone, then the whole pipeline, then the same command again."""
    root = tmp_path_factory.mktemp("paper")
    first = paper(root, small, "--stages", "tune")
    after_first = trials_in(root / "s.journal")
    full = paper(root, small)
    after_full = trials_in(root / "s.journal")
    again = paper(root, small)
    return {"root": root, "first": first, "full": full, "again": again, "after_first": after_first,
            "after_full": after_full, "after_again": trials_in(root / "s.journal"),
            "out": root / "res" / "paper" / small.stem}


def test_first_stage_alone_then_the_whole_pipeline_resumes(pipeline):
    first, full = pipeline["first"], pipeline["full"]
    assert first.exit_code == 0, first.output
    assert set(pipeline["after_first"]) == {"paper-sasrec-small", "paper-igr-sr-small"}
    assert pipeline["after_first"]["paper-sasrec-small"] == 2
    assert full.exit_code == 0, full.output
    # the tuning studies were found full: nothing tuned again, the rest ran
    assert "resuming study 'paper-sasrec-small'" in full.output
    assert full.output.count("nothing to run; raise --trials") >= 2
    for name in ("paper-sasrec-small", "paper-igr-sr-small"):
        assert pipeline["after_full"][name] == pipeline["after_first"][name]


def test_the_plan_comes_before_any_run(pipeline):
    out = pipeline["first"].output
    assert out.index("plan: harness paper") < out.index("created study 'paper-sasrec-small'")
    assert "paper stage 1/1 tune sasrec: 1/4 runs" in out  # a progress line per finished run


def test_full_run_writes_the_manifest_and_every_table(pipeline):
    out = pipeline["out"]
    for name in ("paper-compare-small", "paper-ablate-small", "paper-sensitivity-small", "paper-robustness-small"):
        assert (out / f"{name}.tex").is_file() and (out / f"{name}.csv").is_file(), name
    assert (out / "paper-ablate-small-figure.png").is_file()
    assert (out / "paper-sensitivity-small-figure.png").is_file()
    assert (out / "tuning.tex").is_file() and (out / "tune" / "paper-sasrec-small" / "top_trials.tex").is_file()
    ablate = (out / "paper-ablate-small.tex").read_text()
    assert "its learning rate, which is tuned per variant" in ablate  # the variants' parameters, in the caption
    assert "among the first 2 finished trials" in (out / "paper-compare-small.tex").read_text()
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["data_hash"]) == 64 and m["commit"] and m["environment"]["versions"]["torch"]
    assert m["precision"] in ("fp32", "bf16")
    assert m["budget"]["trials_per_model"] == 2 and m["budget"]["epoch_cap"] == 2 and m["budget"]["first_rung"] == 1
    assert "lr" in m["variant_parameters"] and "validation target" in m["noise_reading"]
    assert list(m["stages"]) == ["tune", "select", "compare", "ablate", "sensitivity", "robustness", "report"]
    for name, stage in m["stages"].items():
        assert stage["status"] == "done" and stage["runs_done"] == stage["runs"], name
        assert stage["commands"] and stage["commands"][0].startswith("harness "), name
        assert stage["sessions"] and stage["wall_seconds"] >= 0, name
    assert m["stages"]["compare"]["runs"] == 2 and m["stages"]["ablate"]["runs"] == 8
    # each variant's parameters: IGR-SR's best but its own lr, which its lr study chose
    for variant in ("igr-sr", "igr-sr_wo-icr"):
        params = json.loads((out / "params" / f"ablate-{variant}.json").read_text())
        assert "lr" in params and "k" in params


def test_second_identical_run_runs_nothing(pipeline):
    again = pipeline["again"]
    assert again.exit_code == 0, again.output
    assert pipeline["after_again"] == pipeline["after_full"]  # not one trial more, in any study
    assert "running 0" in again.output and "running 1" not in again.output
    assert re.search(r"ETA 0 s for the runs left \(0 of \d+ to train\)", again.output), again.output
    m = json.loads((pipeline["out"] / "manifest.json").read_text())
    assert len(m["stages"]["compare"]["sessions"]) == 1  # a stage with nothing new adds no session


def test_manifest_tune_command_is_the_same_study(pipeline):
    """The command-equivalent a user (or a tune worker, with --worker I) would run opens the
    pipeline's study as it is, definition and all, and finds nothing to do."""
    m = json.loads((pipeline["out"] / "manifest.json").read_text())
    for command in (m["stages"]["tune"]["commands"][1], m["stages"]["ablate"]["commands"][3]):
        argv = shlex.split(command)[1:]
        r = CliRunner().invoke(cli, argv, terminal_width=200)
        assert r.exit_code == 0, r.output
        assert "nothing to run" in r.output and "different definition" not in r.output
    assert trials_in(pipeline["root"] / "s.journal") == pipeline["after_full"]


def test_interrupted_stage_resumes_its_missing_cells(tmp_path, small, monkeypatch):
    """A cell that fails (the fault suite's disk-full write, at the moment a cell is told) leaves
    the stage incomplete: one line, exit 1, the manifest says so; the rerun runs that cell only."""
    stages = ["--stages", "tune,compare", "--models", "sasrec", "--trials", "1"]
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv("HARNESS_FAULT", "cell:1:enospc")
    broken = paper(tmp_path, small, *stages)
    assert broken.exit_code == 1, broken.output
    assert "Error: compare: 1 of 1 cells of study 'paper-compare-small' failed" in broken.output
    assert "rerun" in broken.output.strip().splitlines()[-1]
    manifest = tmp_path / "res" / "paper" / "small" / "manifest.json"
    assert json.loads(manifest.read_text())["stages"]["compare"]["status"] == "incomplete"
    monkeypatch.delenv("HARNESS_FAULT")
    fixed = paper(tmp_path, small, *stages)
    assert fixed.exit_code == 0, fixed.output
    assert "0 of 1 cells already done; running 1" in fixed.output
    assert "nothing to run" in fixed.output  # the tuning study was whole already
    m = json.loads(manifest.read_text())
    assert m["stages"]["compare"]["status"] == "done" and m["stages"]["compare"]["runs_done"] == 1


def test_workers_run_the_stage_command_lines(tmp_path, small, monkeypatch):
    """--workers: the parent starts each stage's workers with a command line (`harness tune ...
    --worker I` for a tuning study, `harness paper ... --stages S --worker I` for a grid). Here
    worker 1's command line runs in this process instead of a child, and it fills the very
    study the parent then finds whole."""
    import harness.tune

    started = []

    def run_here(job, argv_for, echo):
        argv = argv_for(1)
        assert argv[1:3] == ["-m", "harness"]
        started.append(argv[3:])
        r = CliRunner().invoke(cli, argv[3:], terminal_width=200)
        assert r.exit_code == 0, r.output
        return []

    monkeypatch.setattr(harness.tune, "run_worker_processes", run_here)
    r = paper(tmp_path, small, "--stages", "tune,compare", "--models", "sasrec", "--trials", "1", "--workers", "2")
    assert r.exit_code == 0, r.output
    tune_argv, grid_argv = started
    assert "tune" in tune_argv and tune_argv[-2:] == ["--worker", "1"]
    assert "paper" in grid_argv and "--no-bench" in grid_argv and "--workers" not in grid_argv
    assert grid_argv[grid_argv.index("--stages") + 1] == "compare"
    assert "0 of 1 cells already done" not in r.output  # the worker ran the cell, not the parent
    assert trials_in(tmp_path / "s.journal") == {"paper-sasrec-small": 1, "paper-compare-small": 1}


def test_best_waits_for_earlier_trials_running_elsewhere(tmp_path, small, monkeypatch):
    """A trial that another machine still runs, numbered below the last of the first N finished,
    will be one of those N: the pipeline waits for it before it reads the best trial."""
    import harness.paper
    from harness.store import open_storage

    storage = open_storage(str(tmp_path / "s.journal"))
    study = optuna.create_study(study_name="paper-sasrec-small", storage=storage, direction="maximize")
    elsewhere = study.ask()  # trial 0, RUNNING on another host
    elsewhere.set_user_attr("worker", {"host": "another-machine", "pid": 1, "start": None})
    waits = []

    def sleep(seconds):  # the other machine finishes its trial while this one waits
        waits.append(seconds)
        study.tell(elsewhere, 0.99)

    monkeypatch.setattr(harness.paper, "_sleep", sleep)
    r = paper(tmp_path, small, "--stages", "tune", "--models", "sasrec", "--trials", "1")
    assert r.exit_code == 0, r.output
    assert "waiting for 1 earlier trial still running elsewhere (0)" in r.output
    assert waits == [harness.paper.WAIT]
    best = harness.paper.best_of_first(storage, "paper-sasrec-small", 1)
    assert best.number == 0 and best.value == 0.99


def test_clean_robustness_cells_are_compare_runs_copied_not_retrained(pipeline):
    from harness.store import open_storage

    assert "paper-robustness-small: 1 cell copied from runs already done (paper-compare-small)" in pipeline["full"].output
    storage = open_storage(str(pipeline["root"] / "s.journal"))
    compare = {t.user_attrs["cell"]: t for t in optuna.load_study(study_name="paper-compare-small", storage=storage)
               .get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    robust = optuna.load_study(study_name="paper-robustness-small", storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    clean = [t for t in robust if json.loads(t.user_attrs["cell"])["noise"] == 0]
    noisy = [t for t in robust if json.loads(t.user_attrs["cell"])["noise"] > 0]
    assert len(clean) == len(noisy) == 1 and "reused_from" not in noisy[0].user_attrs
    (copy,) = clean
    donor = compare[copy.user_attrs["cell"]]
    assert copy.user_attrs["reused_from"] == f"paper-compare-small#{donor.number}"
    assert copy.value == donor.value and copy.user_attrs["artifact_ranks"] == donor.user_attrs["artifact_ranks"]
    # the plan counts it as copied, not as a run to train
    assert "(1 copied)" in pipeline["full"].output
