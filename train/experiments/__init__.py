"""Distillation methods side by side, on the paper's set-up or on anyone's own data and networks: train each
table's rows over K seeds, tuned or not, and report mean ± std with paired tests against the student alone.

    cocofast experiments I II III                              # the paper's tables (configs/experiments/*.yaml)
    cocofast experiments --config MY.yaml --methods kd,coco,graph_flow --seeds 0-4 --tune

tables.py reads the tables (YAML), runner.py trains their runs (the training program, one process a run),
tuning.py is the fair protocol (--tune) and the plan, report.py writes the tables, cli.py is the command
(its docstring says what is shared between runs and what varies).
"""
