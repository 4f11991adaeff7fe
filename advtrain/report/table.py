"""Runs -> one row per experiment: accuracy mean ± std over seeds, training cost, cost vs PGD-AT.

An experiment is everything that defines a run except its seed: dataset, architecture, method and its settings,
threat model, attacks and evaluation size, epochs, schedule, optimizer, batch size, precision and devices (from the
resolved config each results.json carries). Runs that differ in any of these are never averaged together: they make
separate rows, and the rows of one method name what differs between them. advtrain-eval's evaluations of
checkpoints are listed apart, as evaluations of the run that trained the checkpoint, never as runs.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED = ("method", "dataset", "arch", "seed", "train_time_s", "passes_per_example", "eval")

# Config keys that do not change what a run measures (where it ran from, how it logged, how often it checkpointed).
NOT_THE_EXPERIMENT = ("seed", "resume", "checkpoint", "experiment", "logger", "dataset.root", "dataset.download",
                      "dataset.check_md5", "trainer.progress", "trainer.log_every_s", "trainer.checkpoint_every",
                      "trainer.nan_check_every", "eval.batch_size", "eval.every", "eval.every_n")


def _flat(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(node)}


def experiment(run: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(the setting, the method's settings) as flat key -> JSON value. Records written before results.json carried
    the config give what their top-level fields hold."""
    config = run.get("config")
    if not isinstance(config, dict):
        settings = run.get("eval_settings") or {}
        config = {"trainer": {"epochs": run.get("epochs"), "batch_size": run.get("batch_size")},
                  "dataset": {"eps": run.get("eps")},
                  "eval": {"n": settings.get("n", (run["eval"] or {}).get("n"))}, "attack": settings.get("attacks")}
    flat = {k: v for k, v in _flat(config).items()
            if not any(k == x or k.startswith(x + ".") for x in NOT_THE_EXPERIMENT)}
    method = {k: v for k, v in flat.items() if k.startswith("method.")}
    return {k: v for k, v in flat.items() if k not in method}, method


def is_evaluation(run: dict) -> bool:
    """advtrain-eval's record of a checkpoint it evaluated (older records: a checkpoint outside the run's folder)."""
    if "kind" in run:
        return run["kind"] == "eval"
    checkpoint = run.get("checkpoint")
    return bool(checkpoint) and Path(checkpoint).parent.parent.resolve() != Path(run["path"]).resolve()


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
            if not all(math.isfinite(x) for x in costs):
                raise ValueError(f"train_time_s and passes_per_example must be finite, not {costs}")
        except (OSError, ValueError) as e:  # JSON and Unicode decode errors are ValueErrors
            print(f"advtrain-report: skipping {path}: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        missing = _drop_non_finite(run)
        if missing:
            print(f"advtrain-report: {path}: {', '.join(missing)}: not a finite number, shown as missing",
                  file=sys.stderr)
        runs.append({**run, "path": str(path.parent)})
    return runs


def _drop_non_finite(run: dict) -> list[str]:
    """Python's json reads NaN and Infinity (a run whose model diverged can record them); statistics cannot average
    them, so each becomes None, which the tables show as an empty cell. Returns the names of those it replaced."""
    scores = {"eval": run["eval"]}
    if isinstance(run.get("views"), dict):
        scores.update({f"views.{name}": view for name, view in run["views"].items() if isinstance(view, dict)})
    missing = []
    for where, values in scores.items():
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                values[key] = None
                missing.append(f"{where}.{key}={value}")
    return missing


def expand_views(runs: list[dict]) -> list[dict]:
    """A run of a method with named views (OAT's lambdas) becomes one entry per view, its "eval" that view's."""
    out = []
    for run in runs:
        views = run.get("views")
        if isinstance(views, dict) and views:
            flops = run.get("flops") if isinstance(run.get("flops"), dict) else {}
            out += [{**run, "eval": scores, "view": name, "view_flops": flops.get(name)}
                    for name, scores in views.items()]
        else:
            out.append(run)
    return out


def metric_names(runs: list[dict]) -> list[str]:
    """Accuracies any run reports: clean first, then the attacks in sorted order. The accuracy after each part of a
    composite attack ("autoattack/square") is a diagnostic kept in results.json, not a column."""
    names = {name for run in runs for name in run["eval"] if name != "n" and "/" not in name}
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
    time_vs_pgd: float | None = field(default=None)  # train_time_s / that of the one PGD-AT row of the same setting
    differs: str = ""  # what sets this row apart from the other rows of its method, e.g. "dataset.eps=0.1"
    view: str = ""     # the evaluation view (a method with several: OAT's lambdas), else ""
    time_with_companions_s: float | None = None  # mean, the frozen companions' training included (RRM's teacher)
    flops: float | None = None  # the view's forward multiply-adds per example, where views differ in cost (OATS)
    n: int | None = None  # test examples evaluated (eval.n is part of the setting, so every run of the row agrees)
    setting: tuple = field(default=(), repr=False)
    method_settings: tuple = field(default=(), repr=False)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None  # stdev: ddof=1


def aggregate(runs: list[dict], metrics: list[str], baseline: dict[str, str] | None = None,
              per_seed: bool = False) -> list[Row]:
    """Rows of `runs`. `baseline` (method key -> value as written, e.g. {"method.steps": "10"}) picks the PGD-AT row
    that times are relative to where a setting has several (PGD-10 and PGD-4 in one sweep); without it such a
    setting gets no ratio rather than an arbitrary one. per_seed: the seed is part of the setting, a row per run,
    for paired comparisons (methods run from the same seed share their initial weights and batch order)."""
    groups = defaultdict(list)
    for run in runs:
        setting, method_settings = experiment(run)
        if per_seed:
            setting["seed"] = json.dumps(run["seed"])
        key = (str(run["dataset"]), str(run["arch"]), str(run["method"]), tuple(sorted(setting.items())),
               tuple(sorted(method_settings.items())), str(run.get("view", "")))
        groups[key].append(run)
    rows = []
    for (dataset, arch, method, setting, method_settings, view), group in sorted(groups.items()):
        acc = {m: _mean_std([100 * r["eval"][m] for r in group if r["eval"].get(m) is not None]) for m in metrics}
        with_companions = [r.get("train_time_with_companions_s", r["train_time_s"]) for r in group]
        flops = [r["view_flops"] for r in group if isinstance(r.get("view_flops"), (int, float))]
        rows.append(Row(method, dataset, arch, len(group), acc,
                        statistics.mean(r["train_time_s"] for r in group),
                        statistics.mean(r["passes_per_example"] for r in group),
                        setting=setting, method_settings=method_settings, view=view,
                        time_with_companions_s=statistics.mean(with_companions),
                        flops=statistics.mean(flops) if flops else None, n=group[0]["eval"].get("n")))
    _name_differences(rows)
    pgd = defaultdict(list)
    for row in rows:
        if row.method == "pgd" and not row.view:
            pgd[(row.dataset, row.arch, row.setting)].append(row)
    for key, same in pgd.items():
        pgd[key] = [row for row in same if _matches(row, baseline)] if baseline else same
    for row in rows:
        same = pgd.get((row.dataset, row.arch, row.setting), [])
        if len(same) == 1 and same[0].train_time_s:  # several PGD-AT variants (steps) of one setting: no yardstick
            row.time_vs_pgd = row.train_time_s / same[0].train_time_s
    return rows


def _matches(row: Row, baseline: dict[str, str]) -> bool:
    settings = dict(row.method_settings)
    return all(key in settings and _short(settings[key]) == value for key, value in baseline.items())


def ambiguous_baselines(rows: list[Row]) -> list[list[Row]]:
    """The PGD-AT rows of each setting that has several of them and so no yardstick for "time / PGD-AT"."""
    pgd = defaultdict(list)
    for row in rows:
        if row.method == "pgd" and not row.view:
            pgd[(row.dataset, row.arch, row.setting)].append(row)
    return [same for same in pgd.values() if len(same) > 1]


def _name_differences(rows: list[Row]) -> None:
    families = defaultdict(list)
    for row in rows:
        families[(row.dataset, row.arch, row.method, row.view)].append(row)
    for family in families.values():
        if len(family) < 2:
            continue
        items = [dict(row.setting) | dict(row.method_settings) for row in family]
        keys = sorted({k for item in items for k in item if len({item.get(k) for item in items}) > 1})
        for row, item in zip(family, items):
            row.differs = ", ".join(f"{k}={_short(item.get(k))}" for k in keys)


def _short(value: str | None) -> str:
    if value is None:
        return "–"
    plain = json.loads(value)
    text = value if isinstance(plain, (dict, list)) else str(plain)
    return text if len(text) <= 40 else text[:37] + "..."


# Machine-readable: one column per mean and per std, accuracies in %, empty where undefined.
def csv_columns(metrics: list[str]) -> list[str]:
    acc = [f"{m}_{stat}_pct" for m in metrics for stat in ("mean", "std")]
    return ["method", "dataset", "arch", "runs", *acc, "train_time_s", "passes_per_example", "time_vs_pgd", "view",
            "setting", "train_time_with_companions_s", "forward_macs"]


def csv_values(row: Row, metrics: list[str]) -> list:
    acc = [value for m in metrics for value in row.acc_pct[m]]
    return [row.method, row.dataset, row.arch, row.runs, *acc, row.train_time_s, row.passes_per_example,
            row.time_vs_pgd, row.view, row.differs, row.time_with_companions_s, row.flops]


def write_csv(rows: list[Row], metrics: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_columns(metrics))
        writer.writerows([["" if v is None else v for v in csv_values(row, metrics)] for row in rows])


# For people: the console table and report.md show the same cells; the setting column only where rows differ.
def display_columns(metrics: list[str], rows: list[Row]) -> list[str]:
    setting = ["setting"] if any(row.differs for row in rows) else []
    return ["method", "dataset", "arch", *setting, "runs", *[f"{m} (%)" for m in metrics],
            *(["forward MMAC"] if _has_flops(rows) else []), "train time (s)",
            *(["with companions (s)"] if _has_companions(rows) else []), "passes/example", "time / PGD-AT"]


def _has_flops(rows: list[Row]) -> bool:
    return any(r.flops is not None for r in rows)


def _has_companions(rows: list[Row]) -> bool:
    return any(r.time_with_companions_s != r.train_time_s for r in rows)


def display_cells(row: Row, metrics: list[str], rows: list[Row]) -> list[str]:
    def pm(mean, std):
        return "" if mean is None else f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"

    setting = [row.differs] if any(r.differs for r in rows) else []
    method = f"{row.method} [{row.view}]" if row.view else row.method
    companions = [f"{row.time_with_companions_s:.1f}"] if _has_companions(rows) else []
    flops = (["" if row.flops is None else f"{row.flops / 1e6:.3g}"] if _has_flops(rows) else [])
    return [method, row.dataset, row.arch, *setting, str(row.runs), *[pm(*row.acc_pct[m]) for m in metrics],
            *flops, f"{row.train_time_s:.1f}", *companions, f"{row.passes_per_example:.2f}",
            "" if row.time_vs_pgd is None else f"{row.time_vs_pgd:.2f}"]


def evaluation_columns(metrics: list[str]) -> list[str]:
    return ["method", "dataset", "arch", "seed", "trained in", "n", *[f"{m} (%)" for m in metrics]]


def evaluation_cells(run: dict, metrics: list[str]) -> list[str]:
    trained_in = str(Path(run["checkpoint"]).parent.parent) if run.get("checkpoint") else ""
    method = f"{run['method']} [{run['view']}]" if run.get("view") else str(run["method"])
    return [method, str(run["dataset"]), str(run["arch"]), str(run["seed"]), trained_in,
            str(run["eval"].get("n", "")),
            *["" if run["eval"].get(m) is None else f"{100 * run['eval'][m]:.2f}" for m in metrics]]


def _markdown(columns: list[str], cells: list[list[str]], left: int) -> list[str]:
    return ["| " + " | ".join(columns) + " |",
            "|" + "|".join("---" if i < left else "---:" for i in range(len(columns))) + "|",
            *["| " + " | ".join(c) + " |" for c in cells]]


def write_markdown(rows: list[Row], metrics: list[str], path: Path, evaluations: list[dict] = ()) -> None:
    columns = display_columns(metrics, rows)
    lines = _markdown(columns, [display_cells(row, metrics, rows) for row in rows],
                      left=columns.index("runs"))
    if evaluations:
        lines += ["", "Evaluations of checkpoints (advtrain-eval; not counted as runs above):", "",
                  *_markdown(evaluation_columns(metrics), [evaluation_cells(r, metrics) for r in evaluations], 5)]
    path.write_text("\n".join(lines) + "\n")
