"""`advtrain-report PATH`: compare every run under a folder (a run, a sweep, or any folder of them).

    advtrain-report multirun/<date>/<time>
    advtrain-report outputs/ --out reports/cifar10 --metric pgd20
    advtrain-report multirun/ --wandb-project advtrain --wandb-group sweep-1

Reads every results.json below PATH and writes into --out (default PATH): report.csv (one column per mean and per
std), report.md (the tables as printed) and report.png (robust accuracy against training time, one marker per
run). A row is one experiment (method, dataset, arch and every setting but the seed; see report/table.py):
accuracy in % as mean ± std over its runs (seeds), mean training time, passes per example, and training time
relative to the PGD-AT run (method "pgd") of the same setting (--baseline picks one where a sweep has several).
Rows of one method that differ in a setting name
it in the "setting" column. advtrain-eval's evaluations of checkpoints are listed in a table of their own.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from advtrain.report.table import (aggregate, ambiguous_baselines, collect, csv_columns, csv_values, default_metric, display_cells,
                                   display_columns, evaluation_cells, evaluation_columns, expand_views,
                                   is_evaluation, metric_names, write_csv, write_markdown)

PROG = "advtrain-report"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage too; every advtrain error is one line
        fail(message)


def fail(message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def print_table(columns: list[str], cells: list[list[str]], title: str, left: int) -> None:
    console = Console(highlight=False)
    table = Table(title=title)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < left else "right")
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))  # cells are data: "pgd [lambda=0.1]" is no markup
    if not console.is_terminal:  # logs and pipes: never wrap or squeeze cells, whatever the table's width
        unwrapped = console.measure(table, options=console.options.update_width(10**4)).maximum
        console.width = max(console.width, unwrapped)
    console.print(table, markup=False)


def log_to_wandb(args, rows, metrics, metric: str, png: Path) -> None:
    import wandb

    from advtrain.logging.wandb_logger import resolve_mode

    try:
        run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, group=args.wandb_group,
                         job_type="report", config={"path": str(args.path), "metric": metric},
                         mode=resolve_mode("auto"),  # offline without credentials; never prompts
                         dir=os.environ.get("WANDB_DIR", str(args.out)),
                         settings=wandb.Settings(console="off", silent=True))
    except wandb.errors.Error as e:  # e.g. a bad API key or an unknown entity; the files are written already
        fail(f"W&B: {str(e).splitlines()[0]}")
    try:
        table = wandb.Table(columns=csv_columns(metrics), data=[csv_values(row, metrics) for row in rows])
        run.log({"report": table, f"{metric}_vs_train_time": wandb.Image(str(png))})
    finally:
        run.finish()


def parse_baseline(items: list[str]) -> dict[str, str]:
    baseline = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("method.") or not value:
            fail(f"--baseline {item}: expected a method setting as KEY=VALUE, e.g. method.steps=10")
        baseline[key] = value
    return baseline


def main(argv: list[str]) -> None:
    parser = _OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, metavar="PATH",
                        help="folder searched recursively for results.json files (or one results.json)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder for report.{csv,md,png} (default: PATH)")
    parser.add_argument("--metric", type=str, default=None, metavar="NAME",
                        help="accuracy on the plot's y axis (default: autoattack if any run has it, else the first "
                             "attack in sorted order)")
    parser.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                        help="the PGD-AT run times are relative to, where several share a setting: a method setting "
                             "as the table's setting column shows it, e.g. method.steps=10 (repeatable)")
    parser.add_argument("--per-seed", action="store_true",
                        help="a row per seed instead of mean ± std over seeds (the seed in the setting column), "
                             "for paired comparisons: runs of one seed share initial weights and batch order")
    parser.add_argument("--wandb-project", type=str, default=None, metavar="NAME",
                        help="also log the table and plot to a W&B run (job_type report) in this project")
    parser.add_argument("--wandb-entity", type=str, default=None, metavar="E")
    parser.add_argument("--wandb-group", type=str, default=None, metavar="G")
    args = parser.parse_args(argv)

    if not args.path.exists():
        fail(f"{args.path} does not exist")
    runs = collect(args.path)
    if not runs:
        fail(f"no results.json under {args.path}")
    metrics = metric_names(runs)
    metric = args.metric or default_metric(metrics) or "clean"
    if metric not in metrics:
        fail(f"--metric {metric} is not in these runs; choose one of: {', '.join(metrics)}")
    args.out = args.out or (args.path.parent if args.path.is_file() else args.path)

    from advtrain.report.plot import write_png, write_tradeoff_png  # matplotlib only when there is a plot

    evaluations = expand_views([run for run in runs if is_evaluation(run)])
    trained = [run for run in runs if not is_evaluation(run)]
    runs = expand_views(trained)
    baseline = parse_baseline(args.baseline)
    rows = aggregate(runs, metrics, baseline, per_seed=args.per_seed)
    if baseline and not any(row.time_vs_pgd is not None for row in rows if row.method == "pgd"):
        candidates = sorted({row.differs or "(no differing setting)" for row in rows if row.method == "pgd"})
        fail(f"--baseline {' '.join(args.baseline)} matches no PGD-AT run here; the PGD-AT runs are: "
             + ("; ".join(candidates) if candidates else "none"))
    for same in [] if baseline else ambiguous_baselines(rows):
        example = same[0].differs.split(", ")[0]
        print(f"{PROG}: time / PGD-AT left empty: {len(same)} PGD-AT runs share a setting "
              f"({' | '.join(row.differs for row in same)}); pick the yardstick with --baseline {example}",
              file=sys.stderr)
    if runs:
        columns = display_columns(metrics, rows)
        print_table(columns, [display_cells(row, metrics, rows) for row in rows],
                    f"{len(trained)} run{'s' * (len(trained) != 1)} under {args.path}", left=columns.index("runs"))
    if evaluations:
        print_table(evaluation_columns(metrics), [evaluation_cells(run, metrics) for run in evaluations],
                    f"{len(evaluations)} evaluation{'s' * (len(evaluations) != 1)} of checkpoints (advtrain-eval)",
                    left=5)
    written = ["report.csv", "report.md"] + (["report.png"] if runs else [])
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, metrics, args.out / "report.csv")
        write_markdown(rows, metrics, args.out / "report.md", evaluations)
        if runs:
            write_png(runs, metric, args.out / "report.png")
        if any(row.view for row in rows):
            write_tradeoff_png(rows, metric, args.out / "report_views.png")
            written.append("report_views.png")
    except OSError as e:
        fail(f"cannot write the report into {args.out}: {e}")
    print(f"wrote {', '.join(written)}{f' ({metric} vs training time)' if runs else ''} to {args.out}")
    if args.wandb_project:
        log_to_wandb(args, rows, metrics, metric, args.out / "report.png")
