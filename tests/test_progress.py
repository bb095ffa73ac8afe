"""Live progress (harness/progress.py): plain lines when the output is not a terminal (a
CliRunner's is not), bars on one, nothing but the summary under --quiet. No timing is asserted:
only which lines appear, that each is whole, and that the bars open and close."""
from __future__ import annotations

import io
import re

from click.testing import CliRunner

from harness.cli import cli
from harness.progress import SILENT, Bars, Plain, choose, duration, resolve

from test_tune import SMALL, tune_args

MAX_LINE = 200
EPOCH_LINE = re.compile(r"^trial (\d+) \((\d+)/(\d+)\): epoch (\d+)/(\d+) valid ndcg@10 \d\.\d{4} \(best \d\.\d{4}\), "
                        r"loss \S+, \S+ s train \+ \S+ s eval, (ETA trial <= .+|.+ in all)$")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_plain(output: str) -> list[str]:
    """Every line whole and short: no bar glyphs, no terminal escapes, none over MAX_LINE."""
    lines = output.splitlines()
    assert "\x1b[" not in output and "\r" not in output, output
    assert not any(re.search(r"[━╺╸] *(trial|epoch|batch) \d+/\d+", line) for line in lines), output  # no bar
    assert all(len(line) <= MAX_LINE for line in lines), max(lines, key=len)
    return lines


def small_study(tmp_path):
    study = tmp_path / "small.toml"
    study.write_text(SMALL)
    return study


def test_tune_prints_a_line_per_trial_event_and_epoch_when_not_a_terminal(tmp_path):
    r = invoke(*tune_args(tmp_path, small_study(tmp_path), "--epochs", "2", "--trials", "2"))
    assert r.exit_code == 0, r.output
    lines = assert_plain(r.output)
    started = [line for line in lines if re.match(r"^trial \d+ \(\d/2\) started: layers=\d lr=", line)]
    assert [s.split(" (")[0] for s in started] == ["trial 0", "trial 1"], r.output
    epochs = [EPOCH_LINE.match(line) for line in lines if re.match(r"^trial \d+ \(\d/2\): epoch", line)]
    assert all(epochs), r.output  # whole: each epoch line carries its status and its ETA (or time in all)
    # at most one line per epoch: trial 0's two, then trial 1's two, each "i/N" finished + this one of the target
    assert [(m.group(1), m.group(2), m.group(4), m.group(5)) for m in epochs] == [
        ("0", "1", "1", "2"), ("0", "1", "2", "2"), ("1", "2", "1", "2"), ("1", "2", "2", "2")], r.output
    assert epochs[-1].group(6).endswith("in all") and epochs[0].group(6).startswith("ETA trial <= ")
    # the events keep their order: started, its epochs, its one finished line, the next trial
    order = [i for i, line in enumerate(lines) if line.startswith("trial 0 ")]
    assert lines[order[-1]].startswith("trial 0 complete: valid ndcg@10") and order == list(range(order[0], order[-1] + 1))
    assert any(line.startswith("study sasrec-synthetic in") for line in lines)


def test_tune_quiet_prints_only_the_summary(tmp_path):
    r = invoke(*tune_args(tmp_path, small_study(tmp_path), "--epochs", "1", "--trials", "1", "--quiet"))
    assert r.exit_code == 0, r.output
    lines = assert_plain(r.output)
    assert lines[0].startswith("study sasrec-synthetic in "), r.output  # not "created study", no trial line
    assert not any(re.match(r"^(trial \d|created|pre-training|epoch \d)", line) for line in lines), r.output
    assert lines[-1].startswith("outputs in ")


def test_train_shows_pretraining_every_tenth_epoch_and_its_last(tmp_path):
    args = ["--results-dir", str(tmp_path / "res"), "train", "--model", "igr-sr", "--dataset", "synthetic",
            "--device", "cpu", "--precision", "fp32", "--epochs", "1", "--lid-epochs", "11",
            "--param", "d_l=16", "--param", "k=2", "--param", "m=1"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    lines = assert_plain(r.output)
    assert any(line.startswith("pre-training the LID encoder (SASRec, d_l=16) on synthetic, up to 11 epochs")
               for line in lines), r.output
    pre = [line for line in lines if line.startswith("pre-training the LID encoder d_l=16: epoch ")]
    assert [line.split()[6] for line in pre] == ["10/11", "11/11"], r.output
    assert pre[-1].endswith(" in all") and "valid ndcg@10" in pre[-1] and "ETA <= " in pre[0]
    (main,) = [line for line in lines if line.startswith("epoch ")]
    assert main.startswith("epoch 1/1 valid ndcg@10 ") and main.endswith(" in all"), r.output
    # cached now: the same run again pre-trains nothing, and --quiet prints the summary alone
    r = invoke(*args, "--quiet")
    assert r.exit_code == 0, r.output
    lines = assert_plain(r.output)
    assert not any(re.match(r"^(pre-training|epoch \d|warning)", line) for line in lines), r.output
    assert lines[0].startswith("igr-sr on synthetic (seed 2020") and lines[-1].startswith("run record: "), r.output


def console(out: io.StringIO, terminal: bool):
    from rich.console import Console

    return Console(file=out, force_terminal=terminal, width=120, color_system=None)


def test_plain_lines_every_nth_epoch_the_last_and_events(tmp_path):
    out = io.StringIO()
    plain = Plain(console(out, terminal=False))
    view = plain.view("pre-training X", every=10)
    task = view.start(25)
    for epoch in range(1, 14):
        task.steps(3)
        task.step(1.0)  # batches: bars only
        task.update(epoch, f"valid ndcg@10 0.{epoch:04d}", last=epoch == 13, note="early-stopped" if epoch == 13 else "")
    task.finish()
    view.line("an event")
    plain.once("warning: said once")
    plain.once("warning: said once")
    lines = out.getvalue().splitlines()
    assert [line.split(", ")[0] for line in lines] == [
        "pre-training X: epoch 10/25 valid ndcg@10 0.0010",
        "pre-training X: epoch 13/25 (early-stopped) valid ndcg@10 0.0013",
        "an event", "warning: said once"], lines
    # a tune worker: its events only, with its prefix
    out = io.StringIO()
    worker = Plain(console(out, terminal=False), tasks=False).view("trial 3 (4/10)", prefix="[w2] ")
    task = worker.start(5)
    task.update(1, "valid ndcg@10 0.1")
    task.finish()
    worker.line("trial 3 (4/10) started: lr=0.001")
    assert out.getvalue().splitlines() == ["[w2] trial 3 (4/10) started: lr=0.001"]


def test_bars_open_while_a_task_runs_and_print_events_above(tmp_path):
    out = io.StringIO()
    bars = Bars(console(out, terminal=True))
    trials = bars.start(3, 1, label="trials", unit="trial", lines=False)
    trial = bars.view("trial 1 (2/3)", eta_scope="trial ")
    task = trial.start(4)
    assert bars._shared.rich is not None and bars._shared.open == 2
    for epoch in (1, 2):
        task.steps(5)
        for _ in range(5):
            task.step(0.5)
        task.update(epoch, "valid ndcg@10 0.1000 (best 0.1000)", detail="loss 0.5")
    trial.line("trial 1 pruned")
    task.finish()
    task.finish()  # twice (a finally after an explicit finish): harmless
    trials.update(2)
    trials.finish()
    assert bars._shared.rich is None and bars._shared.open == 0  # nothing holds the terminal between tasks
    assert "trial 1 pruned" in out.getvalue()
    # `harness train`'s own run logs each epoch above its bars
    out = io.StringIO()
    root = Bars(console(out, terminal=True))
    task = root.start(2)
    task.update(1, "valid ndcg@10 0.2000 (best 0.2000)", detail="loss 0.4")
    task.finish()
    assert "epoch 1/2 valid ndcg@10 0.2000 (best 0.2000), loss 0.4, ETA <= " in out.getvalue()


def test_choose_and_the_silent_progress(monkeypatch):
    assert choose(quiet=True) is SILENT and resolve(False) is SILENT and resolve(None) is SILENT
    assert isinstance(choose(), Plain) and isinstance(resolve(True), Plain)  # captured output: not a terminal
    assert isinstance(choose(worker=True), Plain) and not choose(worker=True).tasks
    said: list[str] = []
    echo = SILENT.echo(said.append)  # --quiet: problems only
    for line in ("created study 'x'", "trial 3 complete: ...", "warning: storage call failed", "[w1] warning: x",
                 "trial 4 failed: KeyError", "  failed: out of memory"):
        echo(line)
    assert said == ["warning: storage call failed", "[w1] warning: x", "trial 4 failed: KeyError", "  failed: out of memory"]
    task = SILENT.view("x").start(3)
    task.steps(2), task.step(1.0), task.update(1, "s"), task.finish()
    assert [duration(s) for s in (0.4, 42, 89.4, 600, 5340, 11000)] == ["0 s", "42 s", "89 s", "10 min", "89 min",
                                                                        "3 h 03 min"]
