"""`advtrain-report PATH`: one table of every results.json under PATH (a run, a sweep, or any folder)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from advtrain.logging.console import console


def collect(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.rglob("results.json")):
        try:
            runs.append({**json.loads(path.read_text()), "path": str(path.parent)})
        except (json.JSONDecodeError, OSError) as e:
            console.print(f"skipping {path}: {e}", markup=False)
    return runs


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="advtrain-report", description=__doc__)
    parser.add_argument("path", type=Path, help="folder searched recursively for results.json files")
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"{args.path} does not exist")
    runs = collect(args.path)
    if not runs:
        parser.error(f"no results.json under {args.path}")
    metrics = sorted({k for r in runs for k in r["eval"] if k != "n"}, key=lambda k: (k != "clean", k))
    table = Table(title=f"{len(runs)} runs under {args.path}")
    for col in ("method", "dataset", "arch", "seed", "n", *metrics, "train time (s)", "passes/example"):
        table.add_column(col)
    for r in runs:
        accs = [f"{r['eval'][m]:.4f}" if m in r["eval"] else "-" for m in metrics]
        table.add_row(r["method"], r["dataset"], r["arch"], str(r["seed"]), str(r["eval"]["n"]), *accs,
                      f"{r['train_time_s']:.1f}", f"{r['passes_per_example']:.2f}")
    console.print(table)
