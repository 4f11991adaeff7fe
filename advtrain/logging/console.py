"""Console output: the resolved config, a progress display, and the results table.

On a terminal the progress is a rich bar over batches with loss, accuracy, images per second and ETA; elsewhere
(cluster logs, pipes) it is a plain line every `log_every_s` seconds, so logs stay readable and small.
"""
from __future__ import annotations

import sys
import time
from typing import Mapping

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.syntax import Syntax
from rich.table import Table

console = Console(highlight=False)
# Cluster logs and pipes are read with grep and tail: one record per line, never wrapped at rich's default 80 columns.
console.soft_wrap = not console.is_terminal


def print_config(yaml_text: str) -> None:
    if console.is_terminal:
        console.print(Syntax(yaml_text, "yaml", background_color="default"))
    else:
        console.print(yaml_text, markup=False)


def print_results(results: Mapping) -> None:
    table = Table(title=f"{results['method']} on {results['dataset']} ({results['arch']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for view, scores in results.get("views", {"": results["eval"]}).items():
        for name, value in scores.items():
            label = name if name == "n" else f"{name} accuracy"
            table.add_row(f"{view}: {label}" if view else label, f"{value}" if name == "n" else percent(value))
    table.add_row("train time", f"{results['train_time_s']:.1f} s")
    table.add_row("images / s", f"{results['images_per_s']:.1f}")
    table.add_row("passes / example", f"{results['passes_per_example']:.2f}")
    console.print(table)
    for warning in results.get("eval_warnings", ()):
        console.print(f"warning: AutoAttack: {warning}", markup=False, style="bold yellow")


def percent(fraction: float | None) -> str:
    """An accuracy as papers print it, "97.50%": results.json keeps fractions, people read percent."""
    return "–" if fraction is None else f"{100 * fraction:.2f}%"


def metrics_text(metrics: Mapping[str, float]) -> str:
    """Metrics on one line, accuracies in percent, the rest as they are: train/acc 81.23%  eval/n 1000  lr 0.1"""
    return SEP.join(f"{key} {_value_text(key, value)}" for key, value in metrics.items())


SEP = "  "  # between metrics: _fit drops whole ones at it


def _value_text(key: str, value: float) -> str:
    name = key.rpartition("/")[2]
    # an evaluation's scores are accuracies but for its count, "eval/n" (or "eval/<view>/n"); training's say "acc"
    if (key.startswith("eval/") and name != "n") or name == "acc" or name.endswith("_acc"):
        return percent(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"  # counts whole: 10000, not 1e+04


class TrainProgress:
    """Progress over one run: `epoch()` per epoch, `step()` per batch, `show()` when fresh metrics are known."""

    def __init__(self, epochs: int, batches: int, mode: str = "auto", log_every_s: float = 30.0):
        if mode == "auto":
            mode = "bar" if console.is_terminal else "lines"
        self.mode, self.epochs, self.batches, self.log_every_s = mode, epochs, batches, log_every_s
        self._bar: Progress | None = None
        self._task = None
        self._last_line = time.perf_counter()
        self._epoch = 0
        self._done = 0

    def __enter__(self):
        if self.mode == "bar":
            self._bar = _bar()
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.batches, metrics="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._epoch, self._done = epoch, start_batch
        if self._bar is not None:
            self._bar.reset(self._task, total=self.batches, completed=start_batch,
                            description=f"epoch {epoch + 1}/{self.epochs}")

    def step(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)

    def due(self) -> bool:
        """True when the display wants fresh metrics (costs the caller a device sync, so ask sparingly)."""
        if self.mode == "bar":
            return self._done % max(self.batches // 20, 1) == 0
        return self.mode == "lines" and time.perf_counter() - self._last_line >= self.log_every_s

    def show(self, metrics: Mapping[str, float]) -> None:
        text = metrics_text(metrics)
        if self._bar is not None:
            self._bar.update(self._task, metrics=_fit(self._bar, self._task, text))
        elif self.mode == "lines":
            self._last_line = time.perf_counter()
            self.print(f"epoch {self._epoch + 1}/{self.epochs} batch {self._done}/{self.batches}  {text}")

    def print(self, line: str) -> None:
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.console.print(line, markup=False)
        else:
            console.print(line, markup=False)
            sys.stdout.flush()


BAR_WIDTH = 24  # characters of the bar itself; the metrics get what a terminal has left


def _bar() -> Progress:
    """description, bar, done/total, metrics, elapsed, ETA: every column but the metrics at its natural width (see
    _fit), so a narrow terminal loses metrics, never the count or the time left."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=BAR_WIDTH), MofNCompleteColumn(),
                    TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)


def _fit(bar: Progress, task_id, text: str) -> str:
    """`text` cut at a metric boundary to what the terminal leaves beside the other columns (rich would otherwise
    squeeze them all: "377/6…", "0:00:…")."""
    t = next(t for t in bar.tasks if t.id == task_id)
    total = int(t.total or 0)
    fixed = len(t.description) + BAR_WIDTH + 2 * len(str(total)) + 1 + 2 * len("0:00:00") + 5  # 5 column gaps
    budget = console.width - fixed - 1
    parts = text.split(SEP)
    while parts and len(SEP.join(parts)) > budget:
        parts.pop()
    return SEP.join(parts)


class EvalProgress:
    """The final evaluation as it runs (its hooks are advtrain.engine.evaluate's `watch`): on a terminal a bar over
    the work (every example once clean and once per attack) with the attack under way, the running accuracies,
    elapsed time and ETA; elsewhere the per-batch lines, AutoAttack's stages as they finish, and a line naming the
    attack under way when `log_every_s` passed without one."""

    def __init__(self, mode: str = "auto", log_every_s: float = 30.0):
        self.mode = ("bar" if console.is_terminal else "lines") if mode == "auto" else mode
        self.log_every_s = log_every_s
        self._bar: Progress | None = None
        self._task = None
        self._label, self._last_line = "eval", time.perf_counter()

    def __enter__(self):
        if self.mode == "bar":
            self._bar = _bar()
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def view(self, name: str, examples: int, done: int, attacks: list[str]) -> None:
        """A view's evaluation starts (or resumes with `done` examples evaluated)."""
        self._label = f"eval {name}" if name else "eval"
        if self._bar is not None:
            passes = 1 + len(attacks)
            self._task = self._bar.add_task(self._label, total=examples * passes, completed=done * passes,
                                            metrics="")

    def attacking(self, attack: str, batch: int, batches: int) -> None:
        where = f"{attack}, batch {batch + 1}/{batches}"
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self._label}: {where}")
        elif self.mode == "lines" and time.perf_counter() - self._last_line >= self.log_every_s:
            self.line(f"{self._label}: running {where}")

    def stage(self, attack: str, part: str, robust_pct: float, elapsed_s: float) -> None:
        """One of AutoAttack's attacks finished on the batch under attack."""
        self.line(f"{self._label}: {attack} {part} done on this batch, {robust_pct:.2f}% of it still robust "
                  f"({elapsed_s:.0f} s)")

    def step(self, examples: int, accuracies: Mapping[str, float] | None = None) -> None:
        """`examples` more went through one pass (clean or an attack); `accuracies` the running ones, if new."""
        if self._bar is not None:
            self._bar.advance(self._task, examples)
            if accuracies:
                text = SEP.join(f"{name} {percent(value)}" for name, value in accuracies.items())
                self._bar.update(self._task, metrics=_fit(self._bar, self._task, text))

    def line(self, text: str) -> None:
        """A record of the evaluation (a batch done, a stage, a resume): printed in every mode, "off" included, as
        the evaluation's lines always were; "off" turns off the bar and the reminders of the attack under way."""
        self._last_line = time.perf_counter()
        (self._bar.console if self._bar is not None else console).print(text, markup=False)
        sys.stdout.flush()
