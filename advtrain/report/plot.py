"""report.png: robust accuracy against training wall-clock, one marker per run, one colour per method.

Runs that land on the same point (the same method and setting, seeds that agree) are one marker labelled with
their count, never hidden behind each other; the accuracy axis stays in [0, 100] with at least 10 points shown, so
equal runs do not zoom it onto a sliver."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
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


@dataclass
class Series:
    """One line of report_views.png: (clean %, metric %, label) points in drawing order."""
    label: str
    points: list[tuple[float, float, str]]
    one_model: bool  # True: one model's views (solid line); False: separate runs, one per setting (dashed)


def tradeoff_series(rows, metric: str) -> list[Series]:
    """Every method evaluated in several views (OAT's lambdas), joined in view order; then, beside them, every method
    of the same dataset and arch trained once per setting (the dedicated PGD-AT run at each lambda), joined in the
    setting's order, so the one model's curve sits against the models it stands in for."""
    def scored(row):
        return row.acc_pct.get(metric, (None,))[0] is not None and row.acc_pct.get("clean", (None,))[0] is not None

    families: dict = defaultdict(list)
    for row in rows:
        if scored(row):
            families[(bool(row.view), row.method, row.dataset, row.arch, row.differs if row.view else "")].append(row)
    places = {(dataset, arch) for has_views, _, dataset, arch, _ in families if has_views}
    series = []
    for (has_views, method, dataset, arch, differs), family in sorted(families.items(), key=lambda kv: not kv[0][0]):
        if has_views:
            label = f"{method} ({dataset} / {arch}{', ' + differs if differs else ''})"
            notes = [r.view for r in family]
        elif (dataset, arch) in places and len(family) > 1 and all(r.differs for r in family):
            keys = sorted({part.split("=")[0] for r in family for part in r.differs.split(", ")})
            single = len(keys) == 1
            label = f"{method}, a run per {', '.join(keys)} ({dataset} / {arch})"
            notes = [r.differs.split("=", 1)[1] if single else r.differs for r in family]
            if single:
                family, notes = zip(*sorted(zip(family, notes), key=lambda rn: _number_or_text(rn[1])))
        else:
            continue
        series.append(Series(label, [(r.acc_pct["clean"][0], r.acc_pct[metric][0], note)
                                     for r, note in zip(family, notes)], one_model=has_views))
    return series


def _number_or_text(text: str) -> tuple:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def write_tradeoff_png(rows, metric: str, path: Path) -> None:
    """report_views.png: clean against `metric` accuracy, a solid line per model evaluated in several views (the
    trade-off it offers at test time), a dashed one per method trained once per setting beside it."""
    series = tradeoff_series(rows, metric)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    for i, line in enumerate(series):
        xs, ys, notes = zip(*line.points)
        ax.plot(xs, ys, marker="o" if line.one_model else "s", linestyle="-" if line.one_model else "--",
                color=plt.cm.tab10(i % 10), label=line.label)
        for x, y, note in line.points:
            ax.annotate(note, (x, y), xytext=(4, 3), textcoords="offset points", fontsize="x-small")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_ylim(*y_limits([y for line in series for _, y, _ in line.points]))
    ax.set_title(f"{metric} against clean accuracy: one model's views, and a run per setting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
