"""The `cocofast` command: one entry point for training, inference, export and the reports.

    cocofast train --config configs/tiny.yaml [--key=value ...]     (= python train/distill.py ...)
    cocofast segment SLIDE.svs --checkpoint run/student/best.pt --out mask.png
    cocofast predict SLIDES/ --checkpoint run/student/best.pt --out predictions/
    cocofast export run/student/best.pt --out deploy/
    cocofast models                                                  (parameters and MACs of every network)
    cocofast experiments --config MY.yaml --methods kd,coco --seeds 0-4 --tune   (methods side by side)

`python -m cocofast ...` is the same command. Everything after the subcommand goes to that tool unchanged,
so `cocofast SUBCOMMAND --help` shows the tool's own options. Each tool's module is imported only when its
subcommand runs; this is the one place that reaches up into cocofast.train, and nothing imports it.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # has main(argv: list[str]) -> int
    summary: str


COMMANDS = {
    "train": Command("cocofast.train.distill", "train teacher -> paraphrasers -> student (train/distill.py)"),
    "segment": Command("cocofast.segment", "segment one image or slide of any size into a mask"),
    "predict": Command("cocofast.predict", "segment a folder or list of images into masks and outline overlays"),
    "export": Command("cocofast.export", "write a checkpoint's network as ONNX, TorchScript and safetensors"),
    "models": Command("cocofast.models.__main__", "list the registered networks with parameters and MACs"),
    "experiments": Command("cocofast.train.experiments.cli",
                           "distillation methods side by side on any configuration, paired over seeds"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cocofast COMMAND [ARGS ...]    (cocofast COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(usage())
        return 0
    if name == "--version":
        from cocofast import __version__

        print(f"cocofast {__version__}")
        return 0
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        print(f"cocofast: error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    tool = importlib.import_module(COMMANDS[name].module)
    return int(tool.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
