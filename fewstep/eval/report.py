"""Tables, plots and sample grids of a ``fewstep compare`` run."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .io import atomic_write_bytes

__all__ = ["pivot_tables", "markdown_report", "plot_quality", "sample_grid"]

_METRIC_NAMES = {"mse": "MSE to reference", "fd": "digits-FD", "accuracy": "accuracy", "time_s": "time (s)"}
_FORMATS = {"mse": "{:.2e}", "fd": "{:.2f}", "accuracy": "{:.1%}", "time_s": "{:.2f}"}


def _fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return _FORMATS.get(metric, "{:.4g}").format(value)


def pivot_tables(results: dict[str, Any], metrics: Sequence[str]) -> str:
    """One Markdown table per metric: a row per method, a column per NFE."""
    entries = results["entries"]
    methods = list(dict.fromkeys(e["method"] for e in entries))
    nfes = sorted({e["nfe"] for e in entries})
    by_key = {(e["method"], e["nfe"]): e for e in entries}
    fd_name = results.get("fd_name", "FD")
    blocks = []
    for metric in metrics:
        title = fd_name if metric == "fd" else _METRIC_NAMES.get(metric, metric)
        head = f"| {title} | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
        rule = "|---|" + "---:|" * len(nfes)
        rows = [
            f"| {m} | " + " | ".join(_fmt(metric, by_key.get((m, n), {}).get(metric)) for n in nfes) + " |"
            for m in methods
        ]
        blocks.append("\n".join([head, rule, *rows]))
    return "\n\n".join(blocks)


def markdown_report(results: dict[str, Any], metrics: Sequence[str]) -> str:
    """The full Markdown report written next to results.json."""
    cfg = results["config"]
    ref = results["reference"]
    lines = [
        f"# fewstep compare: {cfg['model']}",
        "",
        f"{cfg['num_samples']} samples, seed {cfg['seed']}, guidance {cfg['guidance']}, "
        f"spacing `{cfg['spacing'] or 'model default'}` (one grid for every solver).",
        f"Reference: {ref['description']}.",
        "",
        pivot_tables(results, metrics),
        "",
    ]
    extra = [f"{k} {_fmt(k, v)}" for k, v in ref.items() if k in metrics]
    if extra:
        lines.append("Reference samples: " + ", ".join(extra) + ".")
    for k, v in results.get("floor", {}).items():
        lines.append(f"Real data against itself (two halves): {k} {_fmt(k, v)}.")
    lines.append("")
    return "\n".join(lines)


def plot_quality(results: dict[str, Any], path: str | Path, metrics: Sequence[str]) -> bool:
    """Quality-vs-NFE panels (one per metric). Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = [m for m in metrics if m != "time_s"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    methods = list(dict.fromkeys(e["method"] for e in results["entries"]))
    for ax, metric in zip(axes[0], metrics):
        for m in methods:
            pts = sorted((e["nfe"], e[metric]) for e in results["entries"] if e["method"] == m and e.get(metric) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        if metric in results["reference"]:
            ax.axhline(results["reference"][metric], color="k", ls="--", lw=1, label="reference")
        if metric in results.get("floor", {}):
            ax.axhline(results["floor"][metric], color="grey", ls=":", lw=1, label="real vs real")
        if metric == "mse":
            ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(results.get("fd_name", "FD") if metric == "fd" else _METRIC_NAMES.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fewstep compare: {results['config']['model']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def sample_grid(rows: Sequence[tuple[str, dict[int, torch.Tensor]]], path: str | Path, scale: int = 3) -> None:
    """A PNG with one row per method and one block of images per NFE.

    Args:
        rows: (label, {nfe: images [k, H, W] in [0, 1]}); nfe 0 labels the reference.
        path: Output file.
        scale: Integer upscaling of each pixel.
    """
    from PIL import Image, ImageDraw

    nfes = sorted({n for _, blocks in rows for n in blocks})
    k, h, w = next(iter(rows[0][1].values())).shape
    cell_w, cell_h, gap, label_w, head_h = k * w * scale, h * scale, 8, 150, 16
    width = label_w + len(nfes) * (cell_w + gap)
    height = head_h + len(rows) * (cell_h + gap)
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for j, n in enumerate(nfes):
        draw.text((label_w + j * (cell_w + gap), 2), "reference" if n == 0 else f"NFE {n}", fill=0)
    for i, (label, blocks) in enumerate(rows):
        y = head_h + i * (cell_h + gap)
        draw.text((4, y + cell_h // 2 - 5), label[:24], fill=0)
        for j, n in enumerate(nfes):
            if n not in blocks:
                continue
            imgs = blocks[n].clamp(0, 1).numpy()
            strip = np.concatenate(list(imgs), axis=1)  # [H, k*W]
            strip = np.kron(strip, np.ones((scale, scale)))
            tile = Image.fromarray((255 - strip * 255).astype(np.uint8))  # dark digits on white
            canvas.paste(tile, (label_w + j * (cell_w + gap), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
