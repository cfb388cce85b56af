"""Checks of a training configuration's values that would otherwise surface as a traceback mid-run.

Each failure is a ConfigError naming the key, the value and what is expected, raised before any stage runs:
a NaN learning rate, an unknown network or a student folder named like another stage's must not get as far as
torch's optimiser, the model registry or the teacher's checkpoints.
It also holds ConfigError itself, so nothing here imports train/config.py (which imports these checks).
"""
from __future__ import annotations

import dataclasses
import math

import yaml

class ConfigError(ValueError):
    """A configuration problem; the message names the key or file and what was expected."""


STAGE_FOLDERS = ("teacher", "paraphraser")  # run_dir sub-folders the other stages own
MERGE_TAG = "tag:yaml.org,2002:merge"
# Bytes in one file name on ext4, XFS, btrfs, APFS and NTFS: a longer folder name fails at mkdir mid-run.
NAME_MAX = 255


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                # `<<: *base` merges another mapping, whose keys the explicit ones here override (YAML's merge
                # key, which SafeLoader applies below); only a second `<<` in one mapping is a duplicate.
                key = "<<"
            else:
                key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: SafeLoader's own error message says so
                break
            if seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found key {key!r} twice (lines {first_line[key]} and {line}); keep one of them",
                    key_node.start_mark)
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def check_values(cfg) -> None:
    """Raise ConfigError on the first value of `cfg` that cannot work."""
    from cocofast.data.synthetic import MIN_SIZE as SYNTHETIC_MIN_SIZE
    from cocofast.models import SEGMENTATION_MODELS, NetworkError, is_import_path
    from cocofast.models.user import import_factory

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{f.name}': must be a finite number, got {value}")
    for key in ("teacher_model", "student_model"):
        name = getattr(cfg, key)
        if is_import_path(name):
            try:
                import_factory(name)
            except NetworkError as err:
                raise ConfigError(f"config key '{key}': {err}") from None
        elif name not in SEGMENTATION_MODELS:
            raise ConfigError(f"config key '{key}': unknown segmentation network {name!r}; choose one of "
                              f"{', '.join(SEGMENTATION_MODELS)} or give an import path 'package.module:factory'")
    for key in ("teacher_taps", "student_taps"):
        if getattr(cfg, key) and len(getattr(cfg, key)) != 2:
            raise ConfigError(f"config key '{key}': expected two module paths (shallow, deep), got "
                              f"{getattr(cfg, key)}")
    ranges = {
        "teacher_width": (0, None), "student_width": (0, None), "disc_width": (0, None),
        # A learning rate of 0 freezes a network (tests use it to compare initial weights); negative ones diverge.
        "teacher_lr": (0, None, "closed"), "paraphraser_lr": (0, None, "closed"), "student_lr": (0, None, "closed"),
        "disc_lr": (0, None, "closed"),
        "lr_power": (0, None, "closed"), "paraphraser_clip": (0, None, "closed"), "lr_step_gamma": (0, None), "weight_decay": (0, None, "closed"),
        "paraphraser_momentum": (0, 1, "closed"), "disc_beta1": (0, 1, "closed"), "disc_beta2": (0, 1, "closed"),
        "adv_weight": (0, None, "closed"), "gp_weight": (0, None, "closed"),
    }
    for key, (low, high, *closed) in ranges.items():
        value = getattr(cfg, key)
        too_low = value < low if closed else value <= low
        if too_low or (high is not None and value >= high):
            wanted = (f">= {low}" if closed else f"> {low}") + (f" and < {high}" if high is not None else "")
            raise ConfigError(f"config key '{key}': must be {wanted}, got {value}")
    if cfg.in_channels not in (1, 3):
        # The networks take any channel count, but the data sets and overlays know only grayscale and RGB.
        raise ConfigError(f"config key 'in_channels': must be 1 (grayscale) or 3 (RGB), got {cfg.in_channels}")
    check_folder_name("student_name", cfg.student_name)
    listed = [s.strip() for s in cfg.eval_students.split(",") if s.strip()]
    for name in listed:
        check_folder_name("eval_students", name)
    twice = sorted({name for name in listed if listed.count(name) > 1})
    if twice:
        raise ConfigError(f"config key 'eval_students': {', '.join(map(repr, twice))} listed twice in "
                          f"{cfg.eval_students!r}; eval.csv would hold the same row twice")
    if cfg.dataset == "synthetic" and cfg.image_size < SYNTHETIC_MIN_SIZE:
        raise ConfigError(f"config key 'image_size': the synthetic data set draws patches of at least "
                          f"{SYNTHETIC_MIN_SIZE} pixels, got {cfg.image_size}")


def check_folder_name(key: str, name: str) -> None:
    """A student's folder is one plain name inside run_dir, and not the folder of another stage."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"config key '{key}': {name!r} is not a plain folder name (no '/', no leading '.')")
    if len(name.encode()) > NAME_MAX:
        raise ConfigError(f"config key '{key}': a folder name of {len(name.encode())} bytes ({name[:24]}...) is "
                          f"longer than the {NAME_MAX} a file system allows for one name")
    if name in STAGE_FOLDERS:
        raise ConfigError(f"config key '{key}': {name!r} is the {name} stage's folder in run_dir; a student "
                          f"there would replace its checkpoints. Choose another name")


def check_eval_students(cfg) -> None:
    """At the eval stage: every student named in `eval_students` has its best.pt (a typo would otherwise drop
    its row from eval.csv under exit 0); the message names the student folders that do."""
    from pathlib import Path

    run_dir = Path(cfg.run_dir)
    listed = [s.strip() for s in cfg.eval_students.split(",") if s.strip()]
    missing = [name for name in listed if not (run_dir / name / "best.pt").is_file()]
    if missing:
        found = sorted(p.parent.name for p in run_dir.glob("*/best.pt") if p.parent.name not in STAGE_FOLDERS)
        raise ConfigError(f"config key 'eval_students': no {', '.join(f'{n}/best.pt' for n in missing)} in "
                          f"{run_dir}; students there: {', '.join(found) or 'none'}")


def check_cacheable(cfg) -> None:
    """Flips give four variants of a patch; any colour jitter gives infinitely many, so nothing to cache."""
    if not cfg.teacher_cache:
        return
    jitter = [name for name in ("hed_jitter", "brightness", "contrast") if getattr(cfg, name) > 0]
    if jitter:
        raise ConfigError(f"config key 'teacher_cache': the teacher's features can be cached only for a finite "
                          f"set of inputs (flips), but {', '.join(jitter)} > 0 draws a new image every epoch; "
                          f"turn those off or teacher_cache off")
