"""Figures: training curves of runs side by side, and the bytes-versus-KL frontier of a sweep.

matplotlib is an optional dependency (`pip install 'softcache[plot]'`): it is imported only when
a figure is drawn, with the headless Agg backend (no display needed, nothing opens a window), and
its absence is a one-line error that says what to install. Figures are PNG files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from softcache.errors import SoftcacheError

# The per-epoch lists of a run's metrics.json drawn by `plot_runs`, with their axis titles.
CURVES = (
    ("train_loss", "train loss"),
    ("eval_accuracy", "eval accuracy"),
    ("teacher_agreement", "agreement with the teacher"),
)


class PlotError(SoftcacheError):
    """A figure cannot be drawn: matplotlib is missing, or a run has no metrics."""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or a `PlotError` saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotError(
            "drawing figures needs matplotlib, which is not installed; install it with "
            "`pip install 'softcache[plot]'` (or `pip install matplotlib`)"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_runs(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Each run's metrics.json by a label (the folder's name; its path when names repeat)."""
    runs: dict[str, dict[str, Any]] = {}
    names = [Path(d).name for d in run_dirs]
    for d, name in zip(run_dirs, names, strict=True):
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise PlotError(
                f"{d} holds no metrics.json; pass the --output folders of `softcache train` runs"
            )
        label = name if names.count(name) == 1 else str(d)
        runs[label] = json.loads(path.read_text())
    return runs


def plot_runs(
    runs: Mapping[str, Mapping[str, Any]], output: str | Path, *, title: str = ""
) -> Path:
    """Draw the training curves of runs on one figure: one panel per metric of `CURVES`.

    Args:
        runs: label -> metrics (a `metrics.json`: per-epoch lists under `epoch` and `CURVES`'
            keys; None entries, such as agreement without a teacher, are left out).
        output: the PNG file to write (its folder is created).
        title: the figure's title.

    Returns:
        The path written.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for ax, (key, name) in zip(axes, CURVES, strict=True):
        for label, m in runs.items():
            points = [
                (e, v)
                for e, v in zip(m.get("epoch", []), m.get(key) or [], strict=False)
                if v is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=2.5, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, plt, output)


def plot_frontier(
    sweep: Mapping[str, Any],
    output: str | Path,
    *,
    measured: tuple[str, float, float | None] | None = None,
    unit: str = "sample",
) -> Path:
    """Draw a sweep's candidates as bytes against mean KL, the frontier joined by a line.

    Args:
        sweep: `softcache.tools.sweep.sweep`'s result.
        output: the PNG file to write.
        measured: ``(label, bytes, kl)`` of the store that was measured, drawn as a star.
        unit: "sample" or "token", for the axis.

    Returns:
        The path written.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cands = [c for c in sweep["candidates"] if c["kl_mean"] is not None]
    # A KL of exactly 0 (a lossless candidate) cannot sit on a log axis: draw it at the floor.
    floor = min([c["kl_mean"] for c in cands if c["kl_mean"] > 0] or [1e-6]) / 10
    ax.scatter(
        [c["bytes_per_unit"] for c in cands],
        [max(c["kl_mean"], floor) for c in cands],
        s=14,
        color="0.6",
        label="candidates",
    )
    front = [c for c in cands if c["label"] in set(sweep["frontier"])]
    front.sort(key=lambda c: c["bytes_per_unit"])
    ax.plot(
        [c["bytes_per_unit"] for c in front],
        [max(c["kl_mean"], floor) for c in front],
        marker="o",
        color="C0",
        label="frontier",
    )
    for c in front:
        ax.annotate(
            c["label"],
            (c["bytes_per_unit"], max(c["kl_mean"], floor)),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.axhline(sweep["max_kl"], color="C3", linestyle="--", linewidth=1, label="--max-kl")
    if measured is not None and measured[2] is not None:
        ax.scatter(
            [measured[1]],
            [max(measured[2], floor)],
            marker="*",
            s=120,
            color="C1",
            label=measured[0],
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"bytes per {unit}")
    ax.set_ylabel("mean KL(p || p~), nats")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, plt, output)


def _save(fig: Any, plt: Any, output: str | Path) -> Path:
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
