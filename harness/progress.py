"""Live progress of long work (a run's epochs, a pre-training, a study's trials), chosen once per
command and passed down explicitly:

- `Bars`: rich progress bars on a terminal (stderr and stdout both terminals); event lines
  (a trial started, finished) print above them; the bars vanish when the work ends.
- `Plain`: anywhere else (a pipe, nohup, CI, a test's captured output): one whole line per event,
  never wrapped, at most one per epoch (a pre-training's every 10th epoch and its last), e.g.
  `trial 3 (4/10): epoch 12/30 valid ndcg@10 0.0412 (best 0.0450), loss 7.1234, 30.1 s train +
  5.0 s eval, ETA trial <= 10 min`. `Plain(tasks=False)` prints the event lines only: a tune
  worker process, whose siblings share the terminal.
- `Progress` itself is silent: --quiet, and runs inside loops that report on their own
  (experiment cells, `harness paper`'s stages).

The interface is small: `view(label)` names the work below it (a trial, a pre-training),
`line(text)` prints an event, `start(total)` opens a task that takes `update(done, status)`
per epoch (and, for the bars only, `steps(n)`/`step(loss)` per batch) and ends with `finish()`.
An ETA counts the epochs left to the cap: early stopping and pruning only shorten it, hence
"<=". Nothing here imports rich until a bar is drawn, so `harness --help` stays fast."""
from __future__ import annotations

import copy
import re
import sys
import time
from typing import Any, Callable

# the event lines --quiet still lets through: problems
PROBLEM = re.compile(r"^(\[w\d+\] )?(warning|error)\b|\bfailed\b", re.IGNORECASE)


def duration(seconds: float) -> str:
    """'42 s', '12 min', '3 h 05 min': how every plan, ETA and stop line says a duration."""
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class Task:
    """One piece of work of known size (a run's epochs, a study's trials). This one is silent."""

    def steps(self, total: int) -> None:
        """A new unit (an epoch) of `total` steps (batches) starts; bars only."""

    def step(self, loss: float | None = None) -> None:
        """One step of the unit done; bars only."""

    def update(self, done: int, status: str = "", last: bool = False, note: str = "", detail: str = "") -> None:
        """`done` units finished; `status` says how it goes (on the bar too), `detail` more (in
        lines only); `last` when no unit follows (`note` says why: "early-stopped")."""

    def finish(self) -> None:
        """The work ended (done, stopped or failed): its bar goes."""


class Progress:
    """The silent progress, and the interface of the others. A view shares its parent's output
    and names its tasks `label`: lines every `every` units (plain), each unit logged above the
    bars too (`log`: `harness train`'s own run), the ETA scoped ("trial ")."""

    label = ""
    prefix = ""  # before every line and label ("[w1] " in a worker process)
    every = 1
    log = True
    eta_scope = ""

    def view(self, label: str = "", *, every: int = 1, log: bool = False, eta_scope: str = "",
             prefix: str | None = None) -> "Progress":
        view = copy.copy(self)
        view.label, view.every, view.log, view.eta_scope = label, max(1, every), log, eta_scope
        if prefix is not None:
            view.prefix = prefix
        return view

    def line(self, text: str) -> None:
        """An event: a trial started, a pre-training starts."""

    def once(self, text: str) -> None:
        """An event said once per command (a dataset warning every trial would repeat)."""

    def echo(self, fallback: Callable[[str], None]) -> Callable[[str], None]:
        """Where a command's own event lines go (`tune`'s "trial 3 complete"): silent, only
        problems (warnings, errors, failures), through `fallback`."""
        return lambda text: fallback(text) if PROBLEM.search(text) else None

    def start(self, total: int, done: int = 0, *, label: str | None = None, unit: str = "epoch",
              lines: bool = True) -> Task:
        """A task of `total` units, `done` of them already (a resumed run); `lines`: whether
        plain output prints its updates (a study's trials: no, their events say it)."""
        return Task()


SILENT = Progress()


class _Timed(Task):
    """What both outputs need: where the task is, seconds per unit and the ETA, measured on the
    units done since it started (a resumed run's earlier epochs took no time here)."""

    def __init__(self, owner: Progress, total: int, done: int, label: str | None, unit: str, lines: bool):
        self.owner, self.total, self.done, self.unit, self.lines = owner, max(total, 1), done, unit, lines
        self.label = owner.prefix + (owner.label if label is None else label)
        self.base, self.t0, self.fraction, self.n_steps, self.steps_done = done, time.monotonic(), 0.0, 0, 0
        self.status = self.detail = ""

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def eta(self) -> float | None:
        progressed = self.done - self.base + self.fraction
        return None if progressed <= 0 else self.elapsed() / progressed * max(self.total - self.done - self.fraction, 0)

    def eta_text(self) -> str:
        eta = self.eta()
        # epochs: to the cap (early stopping and pruning only shorten it); trials: their mean so far
        bound = "<= " if self.unit == "epoch" else "~"
        return "" if eta is None else f"ETA {self.owner.eta_scope}{bound}{duration(eta)}"

    def text(self, last: bool = False, note: str = "") -> str:
        """The one-line form: `LABEL: epoch 12/30 (note) STATUS, ETA <= 10 min`."""
        head = f"{self.label}: " if self.label else ""
        parts = [f"{head}{self.unit} {self.done}/{self.total}" + (f" ({note})" if note else "")]
        if self.status:
            parts[0] += f" {self.status}"
        if self.detail:
            parts.append(self.detail)
        if last:
            parts.append(f"{duration(self.elapsed())} in all")
        elif self.eta_text():
            parts.append(self.eta_text())
        return ", ".join(parts)

    def steps(self, total: int) -> None:
        self.n_steps, self.steps_done, self.fraction = max(total, 1), 0, 0.0

    def step(self, loss: float | None = None) -> None:
        self.steps_done += 1
        self.fraction = min(self.steps_done / self.n_steps, 1.0) if self.n_steps else 0.0

    def update(self, done: int, status: str = "", last: bool = False, note: str = "", detail: str = "") -> None:
        self.done, self.status, self.detail, self.fraction = done, status, detail, 0.0

    def shown(self, last: bool) -> bool:
        """Whether plain output prints this update: every `every`-th unit and the last."""
        return last or self.done % self.owner.every == 0 or self.done >= self.total


class _Shared:
    """What every view of one Plain or Bars output shares."""

    def __init__(self, console: Any):
        self.console = console
        self.said: set[str] = set()
        self.rich: Any = None  # Bars: the rich Progress while any task is open
        self.open = 0


class Plain(Progress):
    """One whole line per event on stderr, never wrapped (harness.console). `tasks=False`: the
    events only, no epoch lines (a tune worker's)."""

    def __init__(self, console: Any = None, tasks: bool = True):
        if console is None:
            from harness.console import console as make

            console = make(stderr=True)
        self._shared, self.tasks = _Shared(console), tasks

    def line(self, text: str) -> None:
        self._shared.console.print(self.prefix + text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def once(self, text: str) -> None:
        if text not in self._shared.said:
            self._shared.said.add(text)
            self.line(text)

    def echo(self, fallback: Callable[[str], None]) -> Callable[[str], None]:
        return fallback

    def start(self, total: int, done: int = 0, *, label: str | None = None, unit: str = "epoch",
              lines: bool = True) -> Task:
        return _PlainTask(self, total, done, label, unit, lines and self.tasks)


class _PlainTask(_Timed):
    def update(self, done: int, status: str = "", last: bool = False, note: str = "", detail: str = "") -> None:
        super().update(done, status, last, note, detail)
        if self.lines and self.shown(last):
            self.owner._shared.console.print(self.text(last, note), markup=False, highlight=False, emoji=False,
                                             soft_wrap=True)


class Bars(Progress):
    """rich progress bars on stderr: a row per open task (a study's trials, the trial's or
    run's epochs, a pre-training's, the epoch's batches), drawn only while a task is open, so
    nothing holds the terminal between tasks; event lines print above the bars."""

    def __init__(self, console: Any):
        self._shared = _Shared(console)

    def line(self, text: str) -> None:
        target = self._shared.rich.console if self._shared.rich is not None else self._shared.console
        target.print(self.prefix + text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def once(self, text: str) -> None:
        if text not in self._shared.said:
            self._shared.said.add(text)
            self.line(text)

    def echo(self, fallback: Callable[[str], None]) -> Callable[[str], None]:
        return self.line

    def start(self, total: int, done: int = 0, *, label: str | None = None, unit: str = "epoch",
              lines: bool = True) -> Task:
        shared = self._shared
        if shared.rich is None:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
            from rich.table import Column

            def text(field: str, **kw: Any) -> TextColumn:
                return TextColumn(field, markup=False, table_column=Column(no_wrap=True, overflow="ellipsis", **kw))

            shared.rich = RichProgress(text("{task.description}", max_width=48), BarColumn(bar_width=24),
                                       text("{task.fields[count]}"), text("{task.fields[status]}"),
                                       TimeElapsedColumn(), text("{task.fields[eta]}"),
                                       console=shared.console, transient=True, refresh_per_second=4)
            shared.rich.start()
        shared.open += 1
        return _BarTask(self, total, done, label, unit, lines)

    def _closed(self) -> None:
        shared = self._shared
        shared.open -= 1
        if shared.open <= 0 and shared.rich is not None:
            shared.rich.stop()
            shared.rich, shared.open = None, 0


class _BarTask(_Timed):
    def __init__(self, owner: Bars, total: int, done: int, label: str | None, unit: str, lines: bool):
        super().__init__(owner, total, done, label, unit, lines)
        self.rich = owner._shared.rich
        self.id = self.rich.add_task(self.label or "training", total=self.total, completed=done,
                                     count=self._count(), status="", eta="")
        self.batches = None
        self.closed = False

    def _count(self) -> str:
        return f"{self.unit} {min(self.done + 1, self.total)}/{self.total}"

    def steps(self, total: int) -> None:
        super().steps(total)
        if self.batches is None:
            self.batches = self.rich.add_task("", total=self.n_steps, count=f"batch 0/{self.n_steps}", status="",
                                              eta="")
        else:
            self.rich.reset(self.batches, total=self.n_steps, count=f"batch 0/{self.n_steps}", status="", eta="")

    def step(self, loss: float | None = None) -> None:
        super().step(loss)
        if self.batches is not None:
            self.rich.update(self.batches, completed=self.steps_done, count=f"batch {self.steps_done}/{self.n_steps}",
                             status="" if loss is None else f"loss {loss:.4f}")
        self.rich.update(self.id, completed=self.done + self.fraction, eta=self.eta_text())

    def update(self, done: int, status: str = "", last: bool = False, note: str = "", detail: str = "") -> None:
        super().update(done, status, last, note, detail)
        self.rich.update(self.id, completed=done, count=self._count(), status=status, eta=self.eta_text())
        # above the bars: every unit of `harness train`'s own run; a pre-training's last line
        if self.lines and (self.owner.log or (last and self.owner.every > 1)):
            self.rich.console.print(self.text(last, note), markup=False, highlight=False, emoji=False, soft_wrap=True)

    def finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in (self.batches, self.id):
            if task is not None:
                self.rich.remove_task(task)
        self.owner._closed()


def choose(quiet: bool = False, worker: bool = False) -> Progress:
    """The progress of one command: silent with --quiet, event lines only in a worker process,
    bars when stderr and stdout are both a terminal, plain lines otherwise."""
    if quiet:
        return SILENT
    from harness.console import console

    err = console(stderr=True)
    if worker:
        return Plain(err, tasks=False)
    if err.is_terminal and not err.is_dumb_terminal and sys.stdout.isatty():
        return Bars(err)
    return Plain(err)


def resolve(progress: "Progress | bool | None") -> Progress:
    """A Progress from what a caller passed: True (a run of its own: chosen here), False or
    None (silent), or one the command chose."""
    if isinstance(progress, Progress):
        return progress
    return choose() if progress else SILENT
