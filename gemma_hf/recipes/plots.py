"""The PNG plots of a run directory (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

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


def plot_points(groups: dict[str, list[tuple[float, float, str]]], path: Path, title: str, xlabel: str,
                ylabel: str) -> None:
    """A scatter of labelled (x, y) points per group (the Pareto view of WARP: KL vs reward)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=110)
    markers = ["o", "s", "^", "D", "v", "P"]
    for marker, (group, points) in zip(markers, groups.items()):
        if not points:
            continue
        xs, ys, labels = zip(*points)
        ax.plot(xs, ys, marker=marker, linestyle="-" if group.startswith("LITI") else "none", label=group)
        for x, y, label in points:
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


__all__ = ["plot_losses", "plot_histograms", "plot_series", "plot_points"]
