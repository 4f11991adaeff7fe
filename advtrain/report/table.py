"""Runs -> one row per (method, dataset, arch): accuracy mean ± std over seeds, training cost, cost vs PGD-AT."""
from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED = ("method", "dataset", "arch", "seed", "train_time_s", "passes_per_example", "eval")


def collect(root: Path) -> list[dict]:
    """Every readable results.json at or below `root`, with its folder as "path"; the others are skipped, named."""
    paths = [root] if root.is_file() else sorted(root.rglob("results.json"))
    runs = []
    for path in paths:
        try:
            run = json.loads(path.read_text())
            if not isinstance(run, dict) or not isinstance(run.get("eval"), dict):
                raise ValueError("no 'eval' mapping")
            if missing := [key for key in REQUIRED if key not in run]:
                raise ValueError(f"missing {', '.join(missing)}")
            costs, accs = [run["train_time_s"], run["passes_per_example"]], list(run["eval"].values())
            if not all(isinstance(x, (int, float)) for x in costs) or any(
                    x is not None and not isinstance(x, (int, float)) for x in accs):
                raise ValueError("train_time_s, passes_per_example and eval must hold numbers")
        except (OSError, ValueError) as e:  # JSON and Unicode decode errors are ValueErrors
            print(f"advtrain-report: skipping {path}: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        runs.append({**run, "path": str(path.parent)})
    return runs


def metric_names(runs: list[dict]) -> list[str]:
    """Accuracies any run reports: clean first, then the attacks in sorted order."""
    names = {name for run in runs for name in run["eval"] if name != "n"}
    return sorted(names, key=lambda name: (name != "clean", name))


def default_metric(metrics: list[str]) -> str | None:
    attacks = [name for name in metrics if name != "clean"]
    return "autoattack" if "autoattack" in attacks else (attacks[0] if attacks else None)


@dataclass
class Row:
    method: str
    dataset: str
    arch: str
    runs: int
    acc_pct: dict[str, tuple[float | None, float | None]]  # metric -> (mean, std over seeds; None with one seed)
    train_time_s: float  # mean over seeds
    passes_per_example: float  # forward+backward passes per training example, mean over seeds
    time_vs_pgd: float | None = field(default=None)  # train_time_s / that of method "pgd" on the same dataset+arch


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None  # stdev: ddof=1


def aggregate(runs: list[dict], metrics: list[str]) -> list[Row]:
    groups = defaultdict(list)
    for run in runs:
        groups[(str(run["dataset"]), str(run["arch"]), str(run["method"]))].append(run)
    rows = []
    for (dataset, arch, method), group in sorted(groups.items()):
        acc = {m: _mean_std([100 * r["eval"][m] for r in group if r["eval"].get(m) is not None]) for m in metrics}
        rows.append(Row(method, dataset, arch, len(group), acc,
                        statistics.mean(r["train_time_s"] for r in group),
                        statistics.mean(r["passes_per_example"] for r in group)))
    pgd_time_s = {(r.dataset, r.arch): r.train_time_s for r in rows if r.method == "pgd"}
    for row in rows:
        if pgd_time_s.get((row.dataset, row.arch)):
            row.time_vs_pgd = row.train_time_s / pgd_time_s[(row.dataset, row.arch)]
    return rows


# Machine-readable: one column per mean and per std, accuracies in %, empty where undefined.
def csv_columns(metrics: list[str]) -> list[str]:
    acc = [f"{m}_{stat}_pct" for m in metrics for stat in ("mean", "std")]
    return ["method", "dataset", "arch", "runs", *acc, "train_time_s", "passes_per_example", "time_vs_pgd"]


def csv_values(row: Row, metrics: list[str]) -> list:
    acc = [value for m in metrics for value in row.acc_pct[m]]
    return [row.method, row.dataset, row.arch, row.runs, *acc, row.train_time_s, row.passes_per_example,
            row.time_vs_pgd]


def write_csv(rows: list[Row], metrics: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_columns(metrics))
        writer.writerows([["" if v is None else v for v in csv_values(row, metrics)] for row in rows])


# For people: the console table and report.md show the same cells.
def display_columns(metrics: list[str]) -> list[str]:
    return ["method", "dataset", "arch", "runs", *[f"{m} (%)" for m in metrics], "train time (s)",
            "passes/example", "time / PGD-AT"]


def display_cells(row: Row, metrics: list[str]) -> list[str]:
    def pm(mean, std):
        return "" if mean is None else f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"

    return [row.method, row.dataset, row.arch, str(row.runs), *[pm(*row.acc_pct[m]) for m in metrics],
            f"{row.train_time_s:.1f}", f"{row.passes_per_example:.2f}",
            "" if row.time_vs_pgd is None else f"{row.time_vs_pgd:.2f}"]


def write_markdown(rows: list[Row], metrics: list[str], path: Path) -> None:
    columns = display_columns(metrics)
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(display_cells(row, metrics)) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")
