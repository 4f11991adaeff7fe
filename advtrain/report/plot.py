"""report.png: robust accuracy against training wall-clock, one marker per run, one colour per method."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

MARKERS = "osD^vPX*"  # one per (dataset, arch), when the folder holds more than one


def write_png(runs: list[dict], metric: str, path: Path) -> None:
    n_runs, runs = len(runs), [r for r in runs if r["eval"].get(metric) is not None]
    methods = sorted({r["method"] for r in runs})
    settings = sorted({(r["dataset"], r["arch"]) for r in runs})
    colour = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    marker = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(settings)}

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    for r in runs:
        ax.scatter(r["train_time_s"], 100 * r["eval"][metric], color=colour[r["method"]],
                   marker=marker[(r["dataset"], r["arch"])], s=40, alpha=0.85, edgecolors="none")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(f"{metric} accuracy (%)")
    shown = f"{len(runs)} runs" if len(runs) == n_runs else f"the {len(runs)} of {n_runs} runs that have it"
    ax.set_title(f"{metric} accuracy vs training time ({shown})")
    ax.grid(alpha=0.3)
    legend = ax.legend(handles=[Line2D([], [], ls="", marker="o", color=colour[m], label=m) for m in methods],
                       title="method", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    if len(settings) > 1:
        ax.add_artist(legend)
        ax.legend(handles=[Line2D([], [], ls="", marker=marker[s], color="grey", label=f"{s[0]} / {s[1]}")
                           for s in settings], title="dataset / arch", loc="lower left", bbox_to_anchor=(1.01, 0),
                  fontsize="small")
    fig.savefig(path, bbox_inches="tight")  # "tight" keeps the legends beside the axes in the image
    plt.close(fig)
