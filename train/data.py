"""The training program's data: each split's data set, and the student's (possibly half-labelled) loader."""
from __future__ import annotations

from pathlib import Path

from cocofast.data import FolderDataset, SyntheticPathology
from cocofast.data.slide_dataset import SlideDataset, list_slides

from .config import ConfigError, TrainConfig
from .runtime import Runtime, train_loader
from .semi import HalfLabelledSampler, PartlyLabelled, check_fraction, labelled_indices
from .teacher_cache import KeyedSamples

# Synthetic splits are one generator at seeds far apart (primes, so no split is another's shifted copy).
SPLIT_SEED_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def build_dataset(cfg: TrainConfig, split: str):
    """split: 'train', 'val' or 'test'. Synthetic splits use disjoint seeds; folder splits are sub-folders."""
    options = cfg.data_options()
    # Augmentation (flips, stain and brightness jitter) on the training split only, drawn per sample from
    # (seed, epoch, index): the same on every rank and worker and after a resume.
    augment = options["augment"] if split == "train" else None
    if cfg.dataset == "synthetic":
        length = cfg.train_samples if split == "train" else cfg.val_samples
        return SyntheticPathology(length, size=cfg.image_size, seed=cfg.data_seed + SPLIT_SEED_OFFSETS[split],
                                  in_channels=cfg.in_channels, augment=augment, augment_seed=cfg.seed)
    if cfg.dataset == "slides":
        return build_slides(cfg, split, options, augment)
    root = Path(cfg.data_root)
    folder = root / split
    if split == "test" and not folder.is_dir():
        folder = root / "val"  # no separate test split: report on validation, as many public sets do
    if not folder.is_dir():
        raise ConfigError(f"config key 'data_root': expected a '{split}' sub-folder in {root}")
    try:
        return FolderDataset(folder, mask_values=cfg.mask_mapping(), num_classes=cfg.num_classes,
                             in_channels=cfg.in_channels, patch_size=cfg.patch_size or None,
                             # patch_stride tiles training only: scored patches must hold each pixel once
                             stride=(cfg.patch_stride or None) if split == "train" else None,
                             score_once=split != "train", resize=cfg.image_size,
                             normalise=options["normalise"], augment=augment, seed=cfg.seed)
    except ValueError as err:  # the dataset lists every bad file; say which split and key it came from
        raise ConfigError(f"config key 'data_root': the {split} split in {folder} is not usable: {err}") from None


def build_slides(cfg: TrainConfig, split: str, options: dict, augment):
    """The slides of one split; with no test slides, the val slides stand in (as for folders)."""
    slides = cfg.slide_options()
    kwargs = dict(classes=slides["classes"], num_classes=cfg.num_classes, mpp=slides["mpp"],
                  patch_size=cfg.image_size, length=cfg.train_samples, unannotated=slides["unannotated"],
                  balance=slides["balance"], tissue_method=slides["tissue_method"],
                  tissue_threshold=slides["tissue_threshold"], in_channels=cfg.in_channels,
                  normalise=options["normalise"], augment=augment, seed=cfg.seed)
    try:
        try:
            return SlideDataset(cfg.data_root, split=split, split_file=slides["split_file"], **kwargs)
        except ValueError as err:
            if split != "test" or "no slide is assigned to the test split" not in str(err):
                raise
            return SlideDataset(cfg.data_root, split="val", split_file=slides["split_file"], **kwargs)
    except ValueError as err:  # every bad slide and annotation at once; say which split and key
        raise ConfigError(f"config key 'data_root': the {split} slides of {cfg.data_root} are not usable: "
                          f"{err}") from None


def has_test_slides(cfg: TrainConfig) -> bool:
    """Whether the slide list assigns any slide to the test split (else the val slides stand in)."""
    entries, _ = list_slides(cfg.data_root, cfg.slide_options()["split_file"])
    return any(entry.split == "test" for entry in entries)


def student_loader(train_set, cfg: TrainConfig, rt: Runtime, keyed: bool = False):
    """The usual shuffled loader, or, with labelled_fraction < 1, half-labelled batches (train/semi.py).
    keyed: batches are (images, masks, keys), each sample's teacher-cache key (train/teacher_cache.py)."""
    wrap = KeyedSamples if keyed else (lambda dataset: dataset)
    if cfg.labelled_fraction >= 1:
        return train_loader(wrap(train_set), cfg, rt)
    try:
        check_fraction(len(train_set), cfg.labelled_fraction)
        labelled = labelled_indices(len(train_set), cfg.labelled_fraction, cfg.data_seed)
        sampler = HalfLabelledSampler(labelled, len(train_set), rt.world_size, rt.rank, cfg.seed,
                                      cfg.batch_size // rt.world_size, cfg.batch_size)
    except ValueError as err:
        raise ConfigError(f"config key 'labelled_fraction': {err}") from None
    if rt.is_main:
        print(f"[student] semi-supervised: {len(labelled)} of {len(train_set)} training patches labelled "
              f"({cfg.labelled_fraction:g})", flush=True)
    loader, _ = train_loader(wrap(PartlyLabelled(train_set, labelled)), cfg, rt, sampler=sampler)
    return loader, sampler
