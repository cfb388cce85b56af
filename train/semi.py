"""Semi-supervised training (Graph Flow's setting): a fixed labelled subset, and batches half labelled.

    labelled = labelled_indices(len(train_set), fraction=0.6, seed=data_seed)   # exactly round(0.6 * n) indices
    view = PartlyLabelled(train_set, labelled)      # unlabelled samples come with an all-UNLABELLED mask
    sampler = HalfLabelledSampler(labelled, len(train_set), rt, seed, per_rank_batch)

The unlabelled samples' masks are replaced in the dataset itself, so no code path after it can read them;
the student step finds the labelled rows of a batch with `labelled_rows(masks)` and gives only those to the
supervised loss (and to distillation losses that need labels). Every other term sees the whole batch.

An epoch has as many iterations as a fully supervised one (len(train_set) // batch_size). Each per-rank batch
is its first half drawn from the labelled subset and its second half from the rest, each pool walked in a
permutation that depends on (seed, epoch) only and reshuffled when it runs out, so a resumed run sees the
batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

UNLABELLED = -1  # mask value of every pixel of an unlabelled sample


def labelled_indices(length: int, fraction: float, seed: int) -> list[int]:
    """Exactly round(fraction * length) sample indices (at least one), the same for the same seed."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled fraction must be in (0, 1], got {fraction}")
    count = max(1, round(fraction * length))
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


def labelled_rows(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) masks -> (B,) bool: the samples that carry labels."""
    return (masks != UNLABELLED).flatten(1).any(dim=1)


class DatasetView(Dataset):
    """A data set seen through a wrapper: same length, and the wrapped set's augmentation follows the epoch,
    as the training loop asks of every training set. Subclasses change what __getitem__ returns."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class PartlyLabelled(DatasetView):
    """The training set with every mask outside `labelled` replaced by UNLABELLED."""

    def __init__(self, dataset: Dataset, labelled: list[int]):
        super().__init__(dataset)
        self.labelled = frozenset(labelled)

    def __getitem__(self, index: int):
        image, mask = self.dataset[index]
        if index not in self.labelled:
            mask = torch.full_like(mask, UNLABELLED)
        return image, mask


class HalfLabelledSampler(Sampler[int]):
    """Per-rank batches whose first half is labelled and second half unlabelled (see the module docstring).

    Offers the interface the training loop uses on ResumableSampler: num_samples, set_epoch, start_at.
    """

    def __init__(self, labelled: list[int], length: int, world_size: int, rank: int, seed: int,
                 per_rank_batch: int, global_batch: int):
        unlabelled = sorted(set(range(length)) - set(labelled))
        if per_rank_batch < 2 or per_rank_batch % 2:
            raise ValueError(f"semi-supervised training needs an even per-process batch of at least 2, got "
                             f"{per_rank_batch} (batch_size / processes)")
        if not unlabelled:
            raise ValueError("semi-supervised training needs unlabelled samples: labelled_fraction leaves none")
        self.labelled, self.unlabelled = list(labelled), unlabelled
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.half = per_rank_batch // 2
        self.iters = length // global_batch
        self.num_samples = self.iters * per_rank_batch
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, n_indices: int) -> None:
        self._skip = n_indices

    def _stream(self, pool: list[int], salt: int, start: int, count: int, laps: dict) -> list[int]:
        """Items start .. start+count of an endless walk through `pool`, reshuffled at every pass."""
        out = []
        for position in range(start, start + count):
            lap, offset = divmod(position, len(pool))
            if (salt, lap) not in laps:
                gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, salt, lap)) & 0x7FFF_FFFF_FFFF)
                laps[salt, lap] = torch.randperm(len(pool), generator=gen).tolist()
            out.append(pool[laps[salt, lap][offset]])
        return out

    def __iter__(self) -> Iterator[int]:
        indices, laps = [], {}
        for it in range(self.iters):
            first = (it * self.world_size + self.rank) * self.half
            indices += self._stream(self.labelled, 1, first, self.half, laps)
            indices += self._stream(self.unlabelled, 2, first, self.half, laps)
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])

    def __len__(self) -> int:
        return self.num_samples



def check_fraction(length: int, fraction: float) -> None:
    """Refuse a fraction below 1 that still labels every sample once rounded."""
    if fraction < 1 and round(fraction * length) >= length:
        raise ValueError(f"labelled_fraction={fraction} of {length} training samples labels all of them "
                         f"(round({fraction} * {length}) = {round(fraction * length)}); lower it or set 1")
