"""report.png: robust accuracy against training wall-clock, one marker per run, one colour per method.

Runs that land on the same point (the same method and setting, seeds that agree) are one marker labelled with
their count, never hidden behind each other; the accuracy axis stays in [0, 100] with at least 10 points shown, so
equal runs do not zoom it onto a sliver."""
from __future__ import annotations

from collections import Counter
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
    points = Counter((r["train_time_s"], 100 * r["eval"][metric], r["method"], (r["dataset"], r["arch"]))
                     for r in runs)
    for (x, y, method, setting), count in points.items():
        ax.scatter(x, y, color=colour[method], marker=marker[setting], s=40, alpha=0.85, edgecolors="none")
        if count > 1:
            ax.annotate(f"×{count}", (x, y), xytext=(5, 3), textcoords="offset points", fontsize="x-small")
    ax.set_ylim(*y_limits([y for _, y, _, _ in points]))
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


def y_limits(values_pct: list[float], min_span: float = 10.0) -> tuple[float, float]:
    """An accuracy axis inside [0, 100] that shows at least `min_span` points around the data, with a margin."""
    lo, hi = min(values_pct, default=0.0), max(values_pct, default=100.0)
    pad = max((min_span - (hi - lo)) / 2, 0.05 * (hi - lo), 1.0)
    lo, hi = lo - pad, hi + pad
    if lo < 0:
        lo, hi = 0.0, min(100.0, hi - lo)
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def write_tradeoff_png(rows, metric: str, path: Path) -> None:
    """report_views.png: for each method evaluated in several views (OAT's lambdas), clean against `metric` accuracy
    per view, joined in view order: the trade-off one model offers at test time."""
    families: dict = {}
    for row in rows:
        if row.view and row.acc_pct.get(metric, (None,))[0] is not None:
            families.setdefault((row.method, row.dataset, row.arch, row.differs), []).append(row)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    for i, ((method, dataset, arch, differs), family) in enumerate(sorted(families.items())):
        xs = [r.acc_pct["clean"][0] for r in family]
        ys = [r.acc_pct[metric][0] for r in family]
        label = f"{method} ({dataset} / {arch}{', ' + differs if differs else ''})"
        ax.plot(xs, ys, marker="o", color=plt.cm.tab10(i % 10), label=label)
        for r, x, y in zip(family, xs, ys):
            ax.annotate(r.view, (x, y), xytext=(4, 3), textcoords="offset points", fontsize="x-small")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_ylim(*y_limits([r.acc_pct[metric][0] for f in families.values() for r in f]))
    ax.set_title(f"{metric} against clean accuracy, one point per evaluation view")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
