"""The YAML configurations cocofast ships: training set-ups (tiny, demo, paper, experiments) and the experiment
tables (experiments/*.yaml). A package only so that an installed cocofast carries them (cocofast.configs)."""
