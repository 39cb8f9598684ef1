"""Certified-accuracy curves (matplotlib, Agg canvas: no display and no change to the global backend)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from smoothtransfer.evaluation.metrics import certified_accuracy
from smoothtransfer.smoothing.results import Run
from smoothtransfer.utils import write_if_changed

_LINESTYLES = ("-", "--", ":", "-.")


def certified_curve(radii: np.ndarray, correct: np.ndarray, max_radius: float, points: int = 400
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a certified-accuracy curve: ``x`` ``(points,)`` radii in ``[0, max_radius]``, ``y`` in %."""
    x = np.linspace(0.0, max(max_radius, 1e-6), points)
    return x, 100.0 * certified_accuracy(radii, correct, x)


def plot_certified_accuracy(runs: Sequence[Run], path: str | os.PathLike, *, max_radius: float | None = None,
                            title: str | None = None, dpi: int = 150) -> Path:
    """Save a PNG (or any matplotlib format by suffix) of certified accuracy vs L2 radius.

    One curve per sigma of each run: colour = sigma, line style = run (labels ``run σ=...`` when several runs).
    ``max_radius`` defaults to 5% beyond the largest certified radius. Returns the written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if max_radius is None:
        largest = max((float(np.max(r.radii)) for run in runs for r in run.results if r.num_done), default=0.0)
        max_radius = max(largest * 1.05, 0.5)
    sigmas = sorted({r.sigma for run in runs for r in run.results}, key=lambda s: (s is None, s or 0.0))
    colours = {s: f"C{i % 10}" for i, s in enumerate(sigmas)}

    fig = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, run in enumerate(runs):
        for res in run.results:
            if not res.num_done:
                continue
            x, y = certified_curve(res.radii, res.correct, max_radius)
            sig = "σ=?" if res.sigma is None else f"σ={res.sigma:g}"
            label = f"{run.name} {sig}" if len(runs) > 1 else sig
            ax.plot(x, y, color=colours[res.sigma], linestyle=_LINESTYLES[k % len(_LINESTYLES)], label=label)
    ax.set_xlabel("L2 radius (pixel units in [0,1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_xlim(0.0, max_radius)
    ax.set_ylim(0.0, 100.0)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    # Without a date in the metadata the bytes depend on the data only, so an unchanged plot is not rewritten.
    fmt = path.suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, dpi=dpi, format=fmt, metadata={"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt))
    write_if_changed(path, buf.getvalue())
    return path
