"""What a person watches: summary.csv, curve plots, prediction overlays, and a model's size and cost.

All files are written atomically, so a plot or CSV opened while training runs is never half-written.
Plots need matplotlib (the `plot` extra); without it they are skipped with one warning.
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from cocofast.io import atomic_path, atomic_write_text
from cocofast.overlay import DEFAULT_THICKNESS, draw_outlines


# --- summary.csv -----------------------------------------------------------------------------------------
def write_summary(rows: Sequence[dict], path: str | Path) -> None:
    """One row per epoch; columns are the union of all rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(buffer.getvalue(), path)


# --- curves ----------------------------------------------------------------------------------------------
_warned = False


def _pyplot():
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            warnings.warn("matplotlib is not installed: skipping curve plots (pip install 'cocofast[plot]')")
            _warned = True
        return None
    return plt


def plot_curves(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Panels over epochs: training losses, critic terms (if any), validation metrics, learning rates."""
    plt = _pyplot()
    if plt is None or not rows:
        return
    epochs = [r["epoch"] for r in rows]
    panels = {
        "training losses": [k for k in rows[-1] if k.startswith("loss")],
        "critic (WGAN-GP)": [k for k in rows[-1] if k.startswith("d_")],
        "validation": [k for k in rows[-1] if k.startswith("val_")],
        "learning rate": [k for k in rows[-1] if k.startswith("lr")],
    }
    panels = {name: keys for name, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels.items()):
        for key in keys:
            ys = [r.get(key, math.nan) for r in rows]
            ax.plot(epochs, [float(y) if y != "" else math.nan for y in ys], marker="o", ms=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if name == "learning rate" and all(float(r.get(k) or 0) > 0 for r in rows for k in keys):
            ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --- overlays --------------------------------------------------------------------------------------------
def _to_rgb(image: torch.Tensor) -> np.ndarray:
    img = image.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img[:3].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def save_overlays(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor, path: str | Path) -> None:
    """A grid with one row per patch: the image, then the ground truth's and the prediction's class outlines
    drawn over it (`cocofast.overlay`, the colours segment and predict use: class 1 lime, class 2 yellow, ...).

    Outlines instead of tints leave the tissue under a region visible, so both panels show what was there.
    """
    rows = []
    for image, mask, pred in zip(images, masks, preds):
        rgb = _to_rgb(image)
        # Thinner outlines on small patches, which are enlarged below: 3 px at 512, 1 px from 128 down.
        thickness = max(1, min(DEFAULT_THICKNESS, rgb.shape[0] // 128))
        gt = draw_outlines(rgb, mask.cpu().numpy(), thickness)
        pr = draw_outlines(rgb, pred.cpu().numpy(), thickness)
        row = np.concatenate([rgb, gt, pr], axis=1)
        zoom = max(1, 160 // rgb.shape[0])  # small demo patches are enlarged (nearest) to stay readable
        rows.append(row.repeat(zoom, axis=0).repeat(zoom, axis=1))
    if not rows:
        return
    sep = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([piece for row in rows for piece in (row, sep)][:-1], axis=0)
    header = 18
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    w = rows[0].shape[1] // 3
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(("image", "ground truth (outlines)", "prediction (outlines)")):
        draw.text((i * w + 4, 3), label, fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def format_eval_table(rows: list[dict], image_size: int) -> str:
    """The eval table as markdown: one row per network scored."""
    head = f"| model | network | params | GMACs @{image_size}² | ACC | mIoU | mDice | split | warning |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        network = r["model"] + (f" x{r['width']:g}" if r["width"] is not None else "")
        lines.append(f"| {r['name']} | {network} | {r['params']:,} | {r[f'gmacs@{image_size}']:.3f} | "
                     f"{r['acc']:.4f} | {r['miou']:.4f} | {r['mdice']:.4f} | {r['split']} | {r['warning']} |")
    return "\n".join(lines)
