"""report.png: robust accuracy against training wall-clock, one marker per run, one colour per method;
report_views.png: clean against robust accuracy of the methods evaluated in several views (OAT, OATS).

Runs that land on the same point (the same method and setting, seeds that agree) are one marker labelled with
their count, never hidden behind each other; the accuracy axis stays in [0, 100] with at least 10 points shown, so
equal runs do not zoom it onto a sliver. A plot's title names what its accuracies were measured on (dataset, the
attack's norm and ε, the number of test examples): a figure pasted into a slide or a chat still says it."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.path import Path as Polyline  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from advtrain.report.table import experiment  # noqa: E402

MARKERS = "osD^vPX*"  # one per (dataset, arch), when the folder holds more than one


def write_png(runs: list[dict], metric: str, path: Path) -> None:
    _save(runs_figure(runs, metric), path)


def runs_figure(runs: list[dict], metric: str) -> Figure:
    n_runs = len({r["path"] for r in runs})  # a run evaluated in views is several entries, one folder
    runs = [r for r in runs if r["eval"].get(metric) is not None]
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
    folders = len({r["path"] for r in runs})
    shown = f"{folders} run{'s' * (folders != 1)}" if folders == n_runs else f"the {folders} of {n_runs} runs that have it"
    views = ", a marker per view" if len(runs) > folders else ""
    cases = [(r["dataset"], experiment(r)[0], r["eval"].get("n")) for r in runs]
    ax.set_title(f"{metric} accuracy vs training time ({shown}{views})\n{scope(cases, metric)}", fontsize="medium")
    ax.grid(alpha=0.3)
    legend = ax.legend(handles=[Line2D([], [], ls="", marker="o", color=colour[m], label=m) for m in methods],
                       title="method", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    if len(settings) > 1:
        ax.add_artist(legend)
        ax.legend(handles=[Line2D([], [], ls="", marker=marker[s], color="grey", label=f"{s[0]} / {s[1]}")
                           for s in settings], title="dataset / arch", loc="lower left", bbox_to_anchor=(1.01, 0),
                  fontsize="small")
    return fig


def _save(fig: Figure, path: Path) -> None:
    try:
        fig.savefig(path, bbox_inches="tight")  # "tight" keeps the legends beside the axes in the image
    finally:
        plt.close(fig)


NORMS = {"linf": "L∞", "l2": "L2", "l1": "L1"}


def scope(cases: list[tuple[str, dict, int | None]], metric: str) -> str:
    """What a plot's accuracies were measured on, from the (dataset, flat setting, n evaluated) of what it shows:
    "fashion_mnist, L∞ ε = 0.1, n = 1000"; a quantity the cases disagree on lists its values."""
    def value(setting, key):
        return json.loads(setting[key]) if setting.get(key) is not None else None

    attack = f"attack.{metric}."  # clean accuracy has no attack: the ε trained at stands
    eps = _distinct(_eps_text(value(s, attack + "eps" if attack + "eps" in s else "dataset.eps")) for _, s, _ in cases)
    norm = _distinct(NORMS.get(value(s, attack + "norm"), value(s, attack + "norm")) for _, s, _ in cases)
    return (f"{_distinct(d for d, _, _ in cases)}, {norm + ' ' if norm != '?' else ''}ε = {eps}, "
            f"n = {_distinct(n for _, _, n in cases)}")


def _distinct(values) -> str:
    return ", ".join(sorted({str(v) for v in values if v is not None}, key=_number_or_text)) or "?"


def _eps_text(eps) -> str | None:
    """8/255 as the field writes it, rather than 0.03137."""
    if not isinstance(eps, (int, float)):
        return None if eps is None else str(eps)
    text, steps = f"{eps:g}", eps * 255
    return f"{round(steps)}/255" if len(text) > 6 and abs(steps - round(steps)) < 1e-6 else text  # 0.2 stays


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
    rows: tuple = field(default=(), repr=False)


def tradeoff_series(rows, metric: str) -> list[Series]:
    """Every method evaluated in several views (OAT's lambdas), a line per width where the views have one (OATS:
    lambda along each), in lambda's order; then, beside them, every method of the same dataset and arch trained once
    per setting (the dedicated PGD-AT run at each lambda), joined in the setting's order, so the one model's curve
    sits against the models it stands in for."""
    def scored(row):
        return row.acc_pct.get(metric, (None,))[0] is not None and row.acc_pct.get("clean", (None,))[0] is not None

    families: dict = defaultdict(list)
    for row in rows:
        if scored(row):
            width = _width_and_rest(row.view)[0]
            families[(bool(row.view), row.method, row.dataset, row.arch, row.differs if row.view else "", width)
                     ].append(row)
    places = {(dataset, arch) for has_views, _, dataset, arch, _, _ in families if has_views}
    series = []
    for (has_views, method, dataset, arch, differs, width), family in sorted(families.items(), key=_family_order):
        if has_views:
            label = f"{method}{', ' + width if width else ''} ({dataset} / {arch}{', ' + differs if differs else ''})"
            notes = [_width_and_rest(r.view)[1] for r in family]
            family, notes = zip(*sorted(zip(family, notes), key=lambda rn: _number_or_text(rn[1].rpartition("=")[2])))
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
                                     for r, note in zip(family, notes)], one_model=has_views, rows=tuple(family)))
    return series


def _width_and_rest(view: str) -> tuple[str, str]:
    """("width=0.5", "lambda=0.3") of OATS' "width=0.5,lambda=0.3"; ("", view) for a view without a width or with
    nothing else, which is then a point of its model's one line."""
    parts = view.split(",")
    width = [p for p in parts if p.startswith("width=")]
    rest = [p for p in parts if not p.startswith("width=")]
    return (",".join(width), ",".join(rest)) if width and rest else ("", view)


def _family_order(item) -> tuple:
    has_views, method, dataset, arch, differs, width = item[0]
    return not has_views, method, dataset, arch, differs, _number_or_text(width.partition("=")[2])


def _number_or_text(text: str) -> tuple:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def write_tradeoff_png(rows, metric: str, path: Path) -> None:
    _save(tradeoff_figure(rows, metric), path)


def tradeoff_figure(rows, metric: str) -> Figure:
    """report_views.png: clean against `metric` accuracy, a solid line per model evaluated in several views (the
    trade-off it offers at test time; a line per width for OATS), a dashed one per method trained once per setting
    beside it. Points are labelled with their view (lambda=0.3) only where the label has room (see _label_points):
    18 OATS views in a few points of accuracy leave room for the lines' ends; the legend says which line is which."""
    series = tradeoff_series(rows, metric)
    colours = [plt.cm.tab10(i % 10) for i in range(len(series))]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    for line, colour in zip(series, colours):
        xs, ys, _ = zip(*line.points)
        ax.plot(xs, ys, marker="o" if line.one_model else "s", linestyle="-" if line.one_model else "--",
                color=colour, label=line.label, markersize=5)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_ylim(*y_limits([y for line in series for _, y, _ in line.points]))
    ax.margins(x=0.12)  # room inside the axes for the labels of the outermost points
    cases = [(row.dataset, dict(row.setting), row.n) for line in series for row in line.rows]
    ax.set_title(f"{metric} vs clean accuracy of each view\n{scope(cases, metric)}", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    _label_points(ax, series, colours)
    return fig


# Where a label may go, in points from its marker: beside it first, then above or below, then further out.
OFFSETS = ((5, 3), (5, -3), (-5, 3), (-5, -3), (0, 6), (0, -6), (10, 8), (10, -8), (-10, 8), (-10, -8))


def _label_points(ax, series: list[Series], colours) -> None:
    """Label each line's ends, then the points between them where all of that line's fit. No label overlaps another
    label or a marker or leaves the axes; none crosses a line where it has a place that does not. An end label with
    no place is left out (the legend still names the line); a line whose middle labels do not all fit keeps only its
    ends, rather than a random few."""
    renderer = ax.figure.canvas.get_renderer()
    ax.get_xlim()  # settles autoscaling, so data positions map to their final pixels
    radius = 2.5 * ax.figure.dpi / 72  # half a 5-point marker, in pixels
    pixels = [ax.transData.transform([p[:2] for p in line.points]) for line in series]
    boxes = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius) for xy in pixels for x, y in xy]
    place = partial(_place, ax, renderer, markers=[tuple(xy) for line in pixels for xy in line])
    paths = [Polyline(xy) for xy in pixels]
    for line, colour in zip(series, colours):
        for point in dict.fromkeys([line.points[0], line.points[-1]]):
            text = place(point, colour, boxes, paths) or place(point, colour, boxes)
            boxes += [text.get_window_extent(renderer)] if text else []
    for line, colour in zip(series, colours):
        texts, mine = [], list(boxes)
        for point in line.points[1:-1]:
            texts.append(place(point, colour, mine, paths))
            mine += [texts[-1].get_window_extent(renderer)] if texts[-1] else []
        if all(texts):
            boxes = mine
        else:
            for text in filter(None, texts):
                text.remove()


def _place(ax, renderer, point: tuple[float, float, str], colour, boxes: list[Bbox], paths: list[Polyline] = (),
           markers: list[tuple[float, float]] = ()):
    """The point's label at the first of OFFSETS inside the axes that overlaps none of `boxes`, crosses none of
    `paths` and is nearer its own marker than any other of `markers` (pixels); None where there is none."""
    frame = ax.get_window_extent(renderer)
    x, y, note = point
    own = ax.transData.transform((x, y))
    for dx, dy in OFFSETS:
        text = ax.annotate(note, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize="x-small",
                           color=colour, ha="left" if dx > 0 else "right" if dx < 0 else "center",
                           va="bottom" if dy > 0 else "top")
        box = text.get_window_extent(renderer)
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        if (inside and not any(box.overlaps(other) for other in boxes)
                and not any(path.intersects_bbox(box, filled=False) for path in paths)
                and _gap(box, own) <= min((_gap(box, m) for m in markers if not np.allclose(m, own)), default=np.inf)):
            return text
        text.remove()
    return None


def _gap(box: Bbox, xy) -> float:
    """Pixels from a point to the nearest edge of a box (0 inside it)."""
    return float(np.hypot(max(box.x0 - xy[0], 0, xy[0] - box.x1), max(box.y0 - xy[1], 0, xy[1] - box.y1)))
