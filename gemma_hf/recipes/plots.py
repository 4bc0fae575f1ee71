"""The PNG plots of a run directory (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], path: Path, title: str) -> None:
    """Training loss (and held-out loss) against step."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.6)
    if evals:
        ax.plot(*zip(*evals), label="held-out loss", color="tab:orange", marker="o", linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(panels: list[tuple[str, dict[str, list[float]]]], path: Path, title: str, xlabel: str) -> None:
    """One panel per (subtitle, {label: values}) with overlaid histograms on shared bins."""
    plt = _pyplot()
    values = [v for _, series in panels for vs in series.values() for v in vs]
    if not values:
        return
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    bins = [low + (high - low) * i / 30 for i in range(31)]
    colors = ["tab:green", "tab:red", "tab:blue", "tab:orange"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=110, sharex=True, squeeze=False)
    for ax, (subtitle, series) in zip(axes[0], panels):
        for color, (label, vs) in zip(colors, series.items()):
            ax.hist(vs, bins=bins, alpha=0.55, color=color, label=f"{label} (n={len(vs)})")
        ax.set_title(subtitle)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("count")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_series(series: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    """One panel per named series of (step, value) points, stacked, sharing the step axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), dpi=110, sharex=True, squeeze=False)
    for ax, (name, points) in zip(axes[:, 0], series.items()):
        ax.plot(*zip(*points), marker=".", linewidth=1.4)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class Point:
    """A labelled point of plot_points, with optional intervals (error bars) on either axis."""

    x: float
    y: float
    label: str = ""
    x_interval: tuple[float, float] | None = None
    y_interval: tuple[float, float] | None = None


def merge_coincident(points: list[Point], x_span: float, y_span: float,
                     tolerance: float = 0.015) -> list[tuple[float, float, str]]:
    """One label per group of points at the same or nearly the same position: (x, y, text).

    Two points are near when they are apart by at most ``tolerance`` of the axes' spans on both axes
    (chained: a near b near c is one group). Labels at exactly the same position join with " = "
    ("slerp = η=1": LITI at η = 1 is the SLERP merge), distinct positions of a group with " ≈ "; the
    group's label sits at its mean position. Groups come in the order of their first point."""
    labelled = [p for p in points if p.label]
    parent = list(range(len(labelled)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(labelled):
        for j in range(i):
            b = labelled[j]
            if abs(a.x - b.x) <= tolerance * x_span and abs(a.y - b.y) <= tolerance * y_span:
                parent[root(i)] = root(j)
    groups: dict[int, list[Point]] = {}
    for i, point in enumerate(labelled):
        groups.setdefault(root(i), []).append(point)
    out = []
    for members in groups.values():
        positions: dict[tuple[float, float], list[str]] = {}
        for point in members:
            names = positions.setdefault((point.x, point.y), [])
            if point.label not in names:
                names.append(point.label)
        text = " ≈ ".join(" = ".join(names) for names in positions.values())
        out.append((sum(p.x for p in members) / len(members), sum(p.y for p in members) / len(members), text))
    return out


# Where a label may go, in points from its anchor (x, y, horizontal alignment), nearest first: the
# first that overlaps nothing drawn and stays inside the axes is taken (else the least covering one).
# The first four touch their point; a label moved farther gets a leader line to it.
_LABEL_OFFSETS = [(5, 5, "left"), (5, -13, "left"), (-5, 5, "right"), (-5, -13, "right")] + [
    (dx, dy * step, ha) for step in (1, 2, 3, 4, 5) for dx, dy, ha in
    ((14, 14, "left"), (14, -18, "left"), (-14, 14, "right"), (-14, -18, "right"))]
_TOUCHING = 4  # the first offsets of _LABEL_OFFSETS: no leader line


def _place_labels(fig, ax, anchors: list[tuple[float, float, str]], points: list[Point]) -> list:
    """Annotate each (x, y, text) where it overlaps nothing already drawn (see _LABEL_OFFSETS): other
    labels, markers, error bars (thin boxes) and the legend."""
    renderer = fig.canvas.get_renderer()
    to_pixels = ax.transData.transform
    bounds = ax.get_window_extent(renderer)
    taken = []
    for point in points:
        px, py = to_pixels((point.x, point.y))
        taken.append((px - 5, py - 5, px + 5, py + 5))
        if point.x_interval:
            (x0, _), (x1, _) = to_pixels((point.x_interval[0], point.y)), to_pixels((point.x_interval[1], point.y))
            taken.append((x0 - 1, py - 1.5, x1 + 1, py + 1.5))
        if point.y_interval:
            (_, y0), (_, y1) = to_pixels((point.x, point.y_interval[0])), to_pixels((point.x, point.y_interval[1]))
            taken.append((px - 1.5, y0 - 1, px + 1.5, y1 + 1))
    legend = ax.get_legend()
    if legend is not None:
        extent = legend.get_window_extent(renderer)
        taken.append((extent.x0, extent.y0, extent.x1, extent.y1))

    def overlaps(box) -> float:
        area = 0.0
        for x0, y0, x1, y1 in taken:
            w, h = min(box[2], x1) - max(box[0], x0), min(box[3], y1) - max(box[1], y0)
            area += max(0.0, w) * max(0.0, h)
        outside = (max(0.0, bounds.x0 - box[0]) + max(0.0, box[2] - bounds.x1) + max(0.0, bounds.y0 - box[1])
                   + max(0.0, box[3] - bounds.y1))
        return area + 100.0 * outside

    placed = []
    for x, y, text in anchors:
        best = None
        for rank, (dx, dy, ha) in enumerate(_LABEL_OFFSETS):
            trial = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8)
            extent = trial.get_window_extent(renderer)
            trial.remove()
            box = (extent.x0 - 1, extent.y0 - 1, extent.x1 + 1, extent.y1 + 1)
            cost = overlaps(box)
            if best is None or cost < best[0]:
                best = (cost, rank, box)
            if cost <= 0:
                break
        _, rank, box = best
        dx, dy, ha = _LABEL_OFFSETS[rank]
        leader = dict(arrowstyle="-", color="0.45", linewidth=0.6, shrinkA=1, shrinkB=3) if rank >= _TOUCHING else None
        placed.append((text, ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8,
                                         arrowprops=leader), box))
        taken.append(box)
    return placed


def plot_points(groups: dict[str, list[Point]], path: Path, title: str, xlabel: str, ylabel: str) -> list[tuple]:
    """A scatter of labelled points per group, with error bars where a point has intervals (the Pareto
    view of WARP: KL to init vs reward, 95% intervals). Points at (nearly) the same position share one
    label (merge_coincident); labels are placed so that none covers another or a marker, with a leader
    line when moved off their point. Returns the labels drawn: (text, (x0, y0, x1, y1) in pixels)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    markers = ["o", "s", "^", "D", "v", "P"]
    everything = []
    for marker, (group, points) in zip(markers, groups.items()):
        points = [p if isinstance(p, Point) else Point(*p) for p in points]
        if not points:
            continue
        everything += points

        def bars(values, intervals):
            if all(i is None for i in intervals):
                return None
            return [[max(0.0, v - i[0]) if i else 0.0 for v, i in zip(values, intervals)],
                    [max(0.0, i[1] - v) if i else 0.0 for v, i in zip(values, intervals)]]

        xs, ys = [p.x for p in points], [p.y for p in points]
        ax.errorbar(xs, ys, xerr=bars(xs, [p.x_interval for p in points]),
                    yerr=bars(ys, [p.y_interval for p in points]),
                    fmt=marker, linestyle="-" if group.startswith("LITI") else "none", label=group, capsize=3,
                    elinewidth=0.8, markersize=6, alpha=0.9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    placed = []
    if everything:
        ax.legend(fontsize=8, loc="best")
        ax.margins(0.12)
        fig.tight_layout()
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)  # labels are placed in pixels: the limits stay as they are now
        anchors = merge_coincident(everything, x1 - x0, y1 - y0)
        placed = [(text, box) for text, _, box in
                  _place_labels(fig, ax, anchors, everything)]
    else:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return placed


__all__ = ["plot_losses", "plot_histograms", "plot_series", "Point", "merge_coincident", "plot_points"]
