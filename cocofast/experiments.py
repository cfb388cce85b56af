"""`python -m cocofast.experiments ...` is `cocofast experiments ...`: the experiment runner lives in the
training layer (cocofast.train.experiments, since it drives the training program and reads its
configuration), reached through the cocofast command, the one module of this package that may."""
from __future__ import annotations

import sys

from cocofast.cli import main as cocofast_main


def main(argv: list[str] | None = None) -> int:
    return cocofast_main(["experiments", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
