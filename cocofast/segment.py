"""Segment images of any size with a trained network: overlapping windows, Gaussian blending, bounded memory.

    python -m cocofast.segment SLIDE.tif --checkpoint runs/demo/student/best.pt --out mask.png \
        [--overlay overlay.png] [--window 512] [--overlap 0.25] [--role student]

Windows are processed one horizontal band at a time: the class-score accumulator holds only one band
(window rows × image width), and each band's finished rows are turned into labels at once, so memory is
the label image plus a few windows, not num_classes × H × W scores. Overlapping windows are blended with a
Gaussian weight (σ = window/8), which suppresses the seams at window borders. Uncompressed TIFFs are
memory-mapped and read by region; PNG and JPEG are decoded once (as uint8).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from cocofast.data.folder import tile_origins


def gaussian_weight(window: int, sigma_scale: float = 1 / 8) -> np.ndarray:
    """(window, window) weights, largest in the middle; never 0, so every pixel has a defined blend."""
    c = (window - 1) / 2
    g = np.exp(-((np.arange(window) - c) ** 2) / (2 * (window * sigma_scale) ** 2))
    w = np.outer(g, g).astype(np.float32)
    return np.maximum(w / w.max(), 1e-6)


def read_image(path: str | Path, in_channels: int) -> np.ndarray:
    """(H, W, C) uint8 (or a read-only memory map for uncompressed TIFF) with C = in_channels."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image")
    if path.suffix.lower() in (".tif", ".tiff", ".svs"):
        import tifffile

        try:
            arr = tifffile.memmap(path, mode="r")
        except (ValueError, tifffile.TiffFileError):
            arr = tifffile.imread(path)  # compressed: decode once
        arr = arr if arr.ndim == 3 else arr[..., None]
        if in_channels == 1 and arr.shape[2] >= 3:
            return np.asarray(arr[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
        return arr[..., :in_channels] if arr.shape[2] >= in_channels else np.repeat(arr[..., :1], in_channels, 2)
    with Image.open(path) as im:
        im = im.convert("L" if in_channels == 1 else "RGB")
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def sliding_window_segment(predict: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, *,
                           window: int, overlap: float = 0.25, batch_size: int = 4, num_classes: int = 2,
                           device="cpu", progress: bool = False, scale: float = 1 / 255) -> np.ndarray:
    """Labels (H, W) uint8 for an (H, W, C) image; `predict` maps (B, C, w, w) floats to (B, K, w, w) scores."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    H, W, C = image.shape
    pad_h, pad_w = max(window - H, 0), max(window - W, 0)
    Hp, Wp = H + pad_h, W + pad_w
    stride = max(1, int(round(window * (1 - overlap))))
    ys, xs = tile_origins(Hp, window, stride), tile_origins(Wp, window, stride)
    weight = gaussian_weight(window)
    labels = np.zeros((H, W), dtype=np.uint8)
    acc = np.zeros((num_classes, window + stride, Wp), dtype=np.float32)
    norm = np.zeros((window + stride, Wp), dtype=np.float32)
    band_top = 0  # image row of acc[:, 0]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ys) * len(xs), desc="windows", unit="win")

    def window_pixels(y, x):
        tile = np.zeros((window, window, C), dtype=np.float32)
        h, w = min(window, H - y), min(window, W - x)
        if h > 0 and w > 0:
            tile[:h, :w] = image[y:y + h, x:x + w]
        return tile.transpose(2, 0, 1) * scale

    def flush(until: int):
        """Rows [band_top, until) are final: write their labels and drop them from the accumulator."""
        nonlocal band_top
        n = until - band_top
        if n <= 0:
            return
        rows = min(n, H - band_top)
        if rows > 0:
            scores = acc[:, :rows, :W] / norm[None, :rows, :W]
            labels[band_top:band_top + rows] = scores.argmax(0)
        acc[:, :-n], norm[:-n] = acc[:, n:].copy(), norm[n:].copy()
        acc[:, -n:], norm[-n:] = 0, 0
        band_top = until

    for i, y in enumerate(ys):
        flush(y)
        for x0 in range(0, len(xs), batch_size):
            batch_x = xs[x0:x0 + batch_size]
            batch = torch.from_numpy(np.stack([window_pixels(y, x) for x in batch_x])).to(device)
            with torch.no_grad():
                scores = torch.softmax(predict(batch).float(), dim=1).cpu().numpy()
            off = y - band_top
            for s, x in zip(scores, batch_x):
                acc[:, off:off + window, x:x + window] += s * weight
                norm[off:off + window, x:x + window] += weight
            if bar:
                bar.update(len(batch_x))
    flush(min(band_top + window + stride, Hp))
    if bar:
        bar.close()
    return labels


def load_model(checkpoint: str | Path, role: str = "student"):
    """A network from a cocofast checkpoint (`{"models": {role: {model_name, model_kwargs, state_dict}}}`)."""
    from cocofast.models import create_model

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    entries = ckpt.get("models", {}) if isinstance(ckpt, dict) else {}
    if "model_name" in ckpt:
        entry = ckpt
    elif role in entries:
        entry = entries[role]
    else:
        raise ValueError(f"{checkpoint}: no model for role {role!r}; roles present: {sorted(entries) or 'none'}")
    model = create_model(entry["model_name"], **entry["model_kwargs"])
    model.load_state_dict(entry["state_dict"])
    return model.eval(), entry["model_kwargs"]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    rgb = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, 2)
    out = np.array(rgb, dtype=np.float32)
    colour = np.array([0, 255, 0], np.float32)
    hit = labels > 0
    out[hit] = (1 - alpha) * out[hit] + alpha * colour
    return out.astype(np.uint8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Segment an image of any size with a trained cocofast network.")
    ap.add_argument("image")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="label image (PNG; 0/255 for two classes)")
    ap.add_argument("--overlay", help="optional PNG with the cancer class tinted green")
    ap.add_argument("--role", default="student", help="which network of the checkpoint (default: student)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, kwargs = load_model(args.checkpoint, args.role)
    model.to(device)
    divisor = getattr(model, "input_divisor", 1)
    window = math.ceil(args.window / divisor) * divisor
    image = read_image(args.image, kwargs.get("in_channels", 3))
    num_classes = kwargs.get("num_classes", 2)

    def predict(x):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return model(x).logits

    labels = sliding_window_segment(predict, image, window=window, overlap=args.overlap,
                                    batch_size=args.batch_size, num_classes=num_classes, device=device,
                                    progress=True)
    from cocofast.io import atomic_path

    out = labels * (255 if num_classes == 2 else 1)
    with atomic_path(args.out) as tmp:
        Image.fromarray(out.astype(np.uint8)).save(tmp, format="PNG")
    if args.overlay:
        with atomic_path(args.overlay) as tmp:
            Image.fromarray(overlay(np.asarray(image), labels)).save(tmp, format="PNG")
    print(f"{args.image}: {image.shape[1]}×{image.shape[0]} -> {args.out} "
          f"({(labels > 0).mean():.1%} labelled as class > 0)")


if __name__ == "__main__":
    main()
