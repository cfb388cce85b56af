"""`python -m cocofast COMMAND ...`: the `cocofast` console command (see cocofast.cli)."""
import sys

from cocofast.cli import main

sys.exit(main())
