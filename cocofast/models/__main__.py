"""`python -m cocofast.models`: parameters and multiply-adds of every network, beside the paper's figures.

Multiply-adds come from torch.utils.flop_counter.FlopCounterMode, which counts 2 FLOPs per multiply-add of
convolutions and matrix products only (BatchNorm, activations, pooling and interpolation are not counted);
the table reports GMACs = FLOPs / 2 / 1e9 for one image. The networks run on the meta device, so shapes
flow and FLOPs are counted without allocating memory or computing anything: a 1024² FANet costs nothing.
The paper's figures (256², from hook-based counters such as ptflops/thop) differ in convention: they add
BatchNorm and activation modules and count a transposed convolution over its *output* positions (4x its real
multiply-adds at stride 2). The "counter-style" column recounts our networks that way, for comparison only.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from . import create_model
from .base import count_macs, count_parameters, scale_channels

# Counts from the authors' public model files (Graph-FLow networks/, GKD-Framework Unet_SKA2.py) (1 input channel, 2 classes), and the paper's Table III.
AUTHORS_PARAMS = {"fanet": 38_292_295, "mobile_unet": 4_682_323, "erfnet": 2_063_130, "enet": 348_996}
PAPER_PARAMS_M = {"fanet": 38.250, "mobile_unet": 4.640, "erfnet": 2.063, "enet": 0.349}
PAPER_GMACS_256 = {"fanet": 171.556, "mobile_unet": 1.492, "erfnet": 3.681, "enet": 0.516}


def report_entries(in_channels: int = 1, num_classes: int = 2, width: float = 1.0) -> list[tuple]:
    """(label, registry name, kwargs, input kind) for every network in the report. Input kind "image" feeds
    (1, in_channels, S, S); "tap:C" feeds a teacher tap (1, C, S/4, S/4); "critic" feeds [probs, image]."""
    seg = dict(in_channels=in_channels, num_classes=num_classes, width=width)
    teacher_c = scale_channels(256, width)  # FANet's tap channels
    entries = [(name, name, seg, "image") for name in ("fanet", "mobile_unet", "erfnet", "enet")]
    for students, k in (("mobile_unet", scale_channels(24, width)), ("erfnet, enet", scale_channels(64, width))):
        label = f"paraphraser {teacher_c}->{k} ({students})"
        entries.append((label, "paraphraser", dict(in_channels=teacher_c, k=k), f"tap:{teacher_c}"))
    critic = dict(in_channels=num_classes + in_channels, width=width)
    entries.append(("discriminator", "discriminator", critic, "critic"))
    return entries


def _input_for(kind: str, kwargs: dict, size: int, in_channels: int) -> torch.Tensor:
    if kind == "image":
        return torch.empty(1, in_channels, size, size)
    if kind.startswith("tap:"):
        return torch.empty(1, int(kind[4:]), size // 4, size // 4)
    return torch.empty(1, kwargs["in_channels"], size, size)


def count_counter_style_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds the way hook-based counters tally them, to set beside the paper's figures: convolutions
    and transposed convolutions per *output* position plus bias, 2 per element for BatchNorm, 1 per element
    for activation modules and per input element for pooling. Functional ops (F.relu) go uncounted."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            kh, kw = module.kernel_size
            positions = out.shape[0] * out.shape[2] * out.shape[3]
            total += kh * kw * module.in_channels * module.out_channels // module.groups * positions
            total += module.out_channels * positions if module.bias is not None else 0
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            total += 2 * out.numel()
        elif isinstance(module, (nn.ReLU, nn.ReLU6, nn.PReLU, nn.LeakyReLU)):
            total += out.numel()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxUnpool2d)):
            total += inputs[0].numel()

    counted = (nn.Conv2d, nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.PReLU,
               nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxUnpool2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def measure(in_channels: int = 1, num_classes: int = 2, width: float = 1.0, sizes=(256, 512, 1024)) -> list[dict]:
    """One row per network: params, params without BatchNorm, and MACs at each size, all measured."""
    rows = []
    for label, name, kwargs, kind in report_entries(in_channels, num_classes, width):
        with torch.device("meta"):
            model = create_model(name, **kwargs).eval()
            macs = {s: count_macs(model, _input_for(kind, kwargs, s, in_channels)) for s in sizes}
            counter_style = None  # only the segmentation networks have paper figures to compare with
            if kind == "image":
                counter_style = count_counter_style_macs(model, _input_for(kind, kwargs, 256, in_channels))
        rows.append(
            dict(
                label=label,
                name=name,
                params=count_parameters(model),
                params_no_bn=count_parameters(model, include_batchnorm=False),
                macs=macs,
                counter_style_macs_256=counter_style,
            )
        )
    return rows


def format_table(rows: list[dict], sizes, *, paper_columns: bool) -> str:
    head = ["network", "params", "params w/o BN"]
    if paper_columns:
        head += ["authors' files", "ours - authors'", "paper params"]
    head += [f"GMACs @{s}²" for s in sizes]
    if paper_columns:
        head += ["counter-style @256²", "paper GMACs @256²"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['params']:,}", f"{r['params_no_bn']:,}"]
        if paper_columns:
            ref = AUTHORS_PARAMS.get(r["label"])
            cells += [
                f"{ref:,}" if ref else "",
                f"{r['params'] - ref:+,}" if ref else "",
                f"{PAPER_PARAMS_M[r['label']]:.3f}M" if ref else "",
            ]
        cells += [f"{r['macs'][s] / 1e9:.3f}" for s in sizes]
        if paper_columns:
            cs = r["counter_style_macs_256"]
            cells.append(f"{cs / 1e9:.3f}" if cs is not None else "")
            cells.append(f"{PAPER_GMACS_256[r['label']]:.3f}" if r["label"] in PAPER_GMACS_256 else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cocofast.models", description=__doc__.splitlines()[0])
    parser.add_argument("--in-channels", type=int, default=1, help="image channels (paper: 1, grayscale)")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0, help="channel width multiplier (1.0 = paper)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="square input sides")
    args = parser.parse_args(argv)
    bad = [s for s in args.sizes if s < 64 or s % 16]
    if bad:  # the discriminator's four stride-2 convolutions need it; every segmentation network accepts these
        parser.error(f"--sizes {' '.join(map(str, bad))}: each side must be >= 64 and divisible by 16")
    rows = measure(args.in_channels, args.num_classes, args.width, tuple(args.sizes))
    paper = args.in_channels == 1 and args.num_classes == 2 and args.width == 1.0
    print(
        f"cocofast networks: in_channels={args.in_channels}, num_classes={args.num_classes}, "
        f"width={args.width}, torch {torch.__version__}"
    )
    print("GMACs = torch FlopCounterMode FLOPs / 2 / 1e9 per image (convolutions and matmuls only), meta device.")
    print("Paraphrasers run on H/4 teacher taps; the discriminator on [probabilities, image].\n")
    print(format_table(rows, tuple(args.sizes), paper_columns=paper))
    if paper:
        print(
            "\nauthors' files: counts of the public code; ours omit parameters no output uses "
            "(FANet's second head and strip-pooling gammas, ERFNet's encoder-only head).\n"
            "paper params count no BatchNorm for FANet and Mobile U-Net (compare 'params w/o BN').\n"
            "counter-style: ours recounted like the paper's tools (BatchNorm and activation modules added, "
            "transposed convs over output positions); it is the column to set beside the paper's GMACs."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
