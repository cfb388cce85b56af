import sys

from cocofast.train.experiments.cli import main

sys.exit(main())
