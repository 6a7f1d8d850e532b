"""Tables, plots and sample grids of a ``fewstep compare`` run."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from fewstep.infra.io import atomic_write_bytes

__all__ = ["pivot_tables", "markdown_report", "plot_quality", "sample_grid", "time_label", "validation_grid",
           "fit_legend"]

_METRIC_NAMES = {"mse": "MSE to reference", "fd": "FD", "accuracy": "accuracy",
                 "mse_ci95": "MSE 95% CI half-width", "gen_s": "sampling time (s, summed over processes)",
                 "feat_s": "feature time (s)", "samples_per_s": "samples/s", "features_per_s": "features/s"}
_FORMATS = {"mse": "{:.2e}", "fd": "{:.2f}", "accuracy": "{:.1%}", "time_s": "{:.2f}", "mse_ci95": "{:.1e}",
            "gen_s": "{:.2f}", "feat_s": "{:.2f}", "samples_per_s": "{:.0f}", "features_per_s": "{:.0f}"}
_MARKERS = "osD^vP*Xh<>p"
_LINESTYLES = ("-", "--", "-.", ":")


def _fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return _FORMATS.get(metric, "{:.4g}").format(value)


def time_label(entries: Sequence[dict[str, Any]]) -> str:
    """Title of the wall-time column: says whether it is one run or the median of several."""
    runs = sorted({e.get("time_runs", 1) for e in entries if e.get("time_runs")})
    if not runs or runs == [1]:
        return "time (s), single run"
    span = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
    return f"time (s), median of {span} runs"


def _title(results: dict[str, Any], metric: str) -> str:
    if metric == "fd":
        return results.get("fd_name", "FD")
    if metric == "time_s":
        return time_label(results["entries"])
    return _METRIC_NAMES.get(metric, metric)


def pivot_tables(results: dict[str, Any], metrics: Sequence[str]) -> str:
    """One Markdown table per metric: a row per method, a column per NFE ("-": diverged or not run)."""
    entries = results["entries"]
    methods = list(dict.fromkeys(e["method"] for e in entries))
    nfes = sorted({e["nfe"] for e in entries})
    by_key = {(e["method"], e["nfe"]): e for e in entries}
    blocks = []
    for metric in metrics:
        head = f"| {_title(results, metric)} | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
        rule = "|---|" + "---:|" * len(nfes)
        rows = [
            f"| {m} | " + " | ".join(_fmt(metric, by_key.get((m, n), {}).get(metric)) for n in nfes) + " |"
            for m in methods
        ]
        blocks.append("\n".join([head, rule, *rows]))
    return "\n\n".join(blocks)


def tuned_notes(methods: Sequence[Any]) -> list[str]:
    """One line per compared method that runs a tuned artifact: the held-out figures recorded when it
    was tuned (validation seeds, never these evaluation seeds), to read beside this run's own."""
    from fewstep.eval.holdout import recorded_validations

    lines = []
    for m in methods:
        for rec in recorded_validations(m.solver, m.option_dict):
            ci = rec.get("interval95")
            seeds = rec.get("seeds") or []
            where = f"seeds {seeds[0]}..{seeds[1] - 1}" if seeds else f"{rec.get('samples')} held-out samples"
            lines.append(
                f"- {m.label}: at tuning time, on {rec.get('samples')} validation samples ({where}): {rec['metric']} "
                f"{_fmt('mse', rec.get('tuned_value'))} ({rec.get('tuned')}) vs {_fmt('mse', rec.get('baseline_value'))} "
                f"({rec.get('baseline')})"
                + ("" if rec.get("ratio") is None else f", ratio {rec['ratio']:.2f}x")
                + ("" if not ci else f" [95% CI {ci[0]:.2f}-{ci[1]:.2f}]") + f"; written: {rec.get('written')}")
    return (["", "Tuned artifacts, as validated when they were made:", *lines]) if lines else []


def markdown_report(results: dict[str, Any], metrics: Sequence[str]) -> str:
    """The full Markdown report written next to results.json."""
    cfg = results["config"]
    ref = results["reference"]
    lines = [
        f"# fewstep compare: {cfg['model']}",
        "",
        f"{cfg['num_samples']} samples, seed {cfg['seed']}, guidance {cfg['guidance']}, "
        f"spacing `{cfg['spacing'] or 'model default'}` (one grid for every solver), device {cfg.get('device', 'cpu')}.",
        f"Reference: {ref['description']}.",
        "",
        pivot_tables(results, metrics),
        "",
    ]
    if results.get("tuned_notes"):
        lines += [*results["tuned_notes"], ""]
    diverged = sorted({f"{e['method']} at NFE {e['nfe']}" for e in results["entries"] if e.get("diverged")})
    if diverged:
        lines.append("Diverged (no finite samples): " + ", ".join(diverged) + ".")
    extra = [f"{_title(results, k)} {_fmt(k, v)}" for k, v in ref.items() if k in metrics and k != "time_s"]
    if extra:
        lines.append("Reference samples: " + ", ".join(extra) + ".")
    for k, v in results.get("floor", {}).items():
        lines.append(f"Real data against itself (two halves): {_title(results, k)} {_fmt(k, v)}.")
    lines.append("")
    return "\n".join(lines)


def plot_quality(results: dict[str, Any], path: str | Path, metrics: Sequence[str],
                 command: str = "fewstep compare") -> bool:
    """Quality-vs-NFE panels (one per metric). Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator, PercentFormatter
    except ImportError:
        return False
    metrics = [m for m in metrics if m != "time_s"]
    entries = results["entries"]
    methods = list(dict.fromkeys(e["method"] for e in entries))
    nfes = sorted({e["nfe"] for e in entries})
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6.0, 4.4 * len(metrics)), 3.9), squeeze=False,
                             layout="constrained")
    for ax, metric in zip(axes[0], metrics):
        scale = 100.0 if metric == "accuracy" else 1.0
        values = []
        for i, m in enumerate(methods):
            pts = sorted((e["nfe"], e[metric] * scale) for e in entries if e["method"] == m and e.get(metric) is not None)
            if pts:
                values += [v for _, v in pts]
                ax.plot(*zip(*pts), marker=_MARKERS[i % len(_MARKERS)], ms=5,
                        ls=_LINESTYLES[(i // 10) % len(_LINESTYLES)], color=f"C{i % 10}", label=m)
        if results["reference"].get(metric) is not None:
            ax.axhline(results["reference"][metric] * scale, color="k", ls="--", lw=1, label="reference samples")
        if results.get("floor", {}).get(metric) is not None:
            ax.axhline(results["floor"][metric] * scale, color="grey", ls=":", lw=1.2, label="real vs real data")
        title = _title(results, metric)
        if metric == "mse":
            ax.set_yscale("log")
            ax.set_ylabel(f"{title} (log scale)")
            ax.set_title("MSE to the reference (lower is better)", fontsize=9)
        elif metric == "accuracy":
            low = min(values + [100.0])
            ax.set_ylim(max(0.0, min(90.0, math.floor((low - 2.0) / 5.0) * 5.0)), 100.8)
            ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0 if low < 95 else 1))
            ax.set_ylabel("classifier accuracy (%)")
            ax.set_title("accuracy w.r.t. the requested class (higher is better)", fontsize=9)
        else:
            ax.set_ylabel(title)
            ax.set_title(f"{title} (lower is better)", fontsize=9)
        ax.set_xlabel("NFE (model evaluations)")
        if len(nfes) <= 12:
            ax.set_xticks(nfes)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = {}, []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fit_legend(fig, [handles[lab] for lab in labels], labels, 4 if len(metrics) > 1 else 3)
    cfg = results["config"]
    fig.suptitle(f"{command}: {Path(str(cfg['model'])).name}, {cfg['num_samples']} samples, "
                 f"guidance {cfg['guidance']:g}, {cfg['spacing'] or 'model-default'} grid", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # nothing drawn outside the image is lost
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def fit_legend(fig, handles: list, labels: list[str], max_columns: int):
    """A legend below the panels with as many columns as fit the figure's width (long solver specs
    get fewer columns instead of running off the image)."""
    fig.canvas.draw()  # lays out the panels, so the legend's width can be measured
    width = fig.get_window_extent().width
    for ncol in range(min(len(labels), max_columns), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
        if ncol == 1 or legend.get_window_extent(fig.canvas.get_renderer()).width <= width:
            return legend
        legend.remove()
    return None  # no labels


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Lines of ``text`` no wider than ``width``: broken after ``( , : = /`` so solver options stay
    whole where they can, and inside a token that is wider than a line by itself (a long path)."""
    tokens, cur = [], ""
    for ch in text:
        cur += ch
        if ch in "(,:=/":
            tokens.append(cur)
            cur = ""
    tokens.append(cur)
    lines = [""]
    for tok in filter(None, tokens):
        if lines[-1] and draw.textlength(lines[-1] + tok, font=font) > width:
            lines.append("")
        for ch in tok:  # character by character only when one token overflows
            if lines[-1] and draw.textlength(lines[-1] + ch, font=font) > width:
                lines.append("")
            lines[-1] += ch
    return lines


def _tile(images: torch.Tensor, scale: int, gap: int) -> np.ndarray:
    """[k, H, W] in [0, 1] -> one uint8 block, dark strokes on white, two rows when k > 6."""
    imgs = np.nan_to_num(images.float().clamp(0, 1).numpy())
    k, h, w = imgs.shape
    cols = math.ceil(k / 2) if k > 6 else k
    rows = math.ceil(k / cols)
    block = np.zeros((rows * h * scale + (rows - 1) * gap, cols * w * scale + (cols - 1) * gap))
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = r * (h * scale + gap), c * (w * scale + gap)
        block[y:y + h * scale, x:x + w * scale] = np.kron(img, np.ones((scale, scale)))
    return (255 - block * 255).round().astype(np.uint8)


def sample_grid(reference: torch.Tensor, rows: Sequence[tuple[str, dict[int, Union[torch.Tensor, str]]]],
                path: str | Path, scale: int = 4, reference_label: str = "reference") -> None:
    """A PNG with one row per method and one column per NFE, under a row of reference samples.

    Args:
        reference: Reference images [k, H, W] in [0, 1], shown above every NFE column.
        rows: (label, {nfe: images [k, H, W] in [0, 1], or a note such as "diverged"}).
        path: Output file.
        scale: Integer upscaling of each pixel.
        reference_label: Label of the top row.
    """
    from PIL import Image, ImageDraw

    nfes = sorted({n for _, blocks in rows for n in blocks})
    ref_tile = _tile(reference, scale, scale)
    cell_h, cell_w = ref_tile.shape
    font, head_font = _font(13), _font(14)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_w, pad, head_h, line_h = 190, 10, 26, 16
    all_rows = [(reference_label, {n: ref_tile for n in nfes})] + [
        (label, {n: _tile(v, scale, scale) if isinstance(v, torch.Tensor) else str(v) for n, v in blocks.items()})
        for label, blocks in rows
    ]
    wrapped = [_wrap(probe, label, font, label_w - 12) for label, _ in all_rows]
    heights = [max(cell_h, len(lines) * line_h) + 2 * pad for lines in wrapped]
    width = label_w + len(nfes) * (cell_w + 2 * pad)
    canvas = Image.new("L", (width, head_h + sum(heights)), 255)
    draw = ImageDraw.Draw(canvas)
    for j, n in enumerate(nfes):
        x = label_w + j * (cell_w + 2 * pad) + pad
        draw.text((x + cell_w // 2, head_h // 2), f"NFE {n}", fill=0, font=head_font, anchor="mm")
    y = head_h
    for (label, blocks), lines, h in zip(all_rows, wrapped, heights):
        draw.line([(0, y), (width, y)], fill=200)
        for i, line in enumerate(lines):
            draw.text((6, y + (h - len(lines) * line_h) // 2 + i * line_h), line, fill=0, font=font)
        for j, n in enumerate(nfes):
            x = label_w + j * (cell_w + 2 * pad) + pad
            block = blocks.get(n, "not run")
            if isinstance(block, str):
                draw.text((x + cell_w // 2, y + h // 2), block, fill=110, font=font, anchor="mm")
            else:
                canvas.paste(Image.fromarray(block), (x, y + (h - cell_h) // 2))
        y += h
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def validation_grid(samples: dict[str, torch.Tensor], path: str | Path, scale: int = 4,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> bool:
    """A PNG of validation samples: one labelled row per entry of ``samples`` ([n, C, H, W], C 1 or 3).

    Returns:
        False (nothing written) when the samples are not images (other channel counts).
    """
    from PIL import Image, ImageDraw

    rows = {k: v.detach().float().cpu() for k, v in samples.items()}
    if not rows or any(v.dim() != 4 or v.shape[1] not in (1, 3) for v in rows.values()):
        return False
    low, high = value_range
    font, pad, label_w = _font(13), 6, 70
    n, c, h, w = next(iter(rows.values())).shape
    cell_h, cell_w = h * scale, w * scale
    width = label_w + max(v.shape[0] for v in rows.values()) * (cell_w + pad) + pad
    canvas = Image.new("RGB", (width, len(rows) * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows.items()):
        y = pad + r * (cell_h + pad)
        draw.text((6, y + cell_h // 2), label, fill="black", font=font, anchor="lm")
        pixels = ((images - low) / (high - low)).clamp(0, 1).nan_to_num(0.0).mul(255).round().to(torch.uint8)
        for i, img in enumerate(pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()):
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + i * (cell_w + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return True
