"""The frozen teacher's features, computed once per training patch and flip variant and replayed exactly.

The student stage runs the teacher (and the paraphrasers' encoders) on every batch although none of them learns.
With `teacher_cache: true` the features FeatureAdapter.teacher produces (logits, taps, paraphrased taps, chain)
are computed once for every (patch, flip variant) of the training set and kept in memory-mapped .npy files:

    TEACHER_CACHE_DIR/<identity digest>/identity.json    what the features were computed from
                                       /digests.npy      (slots,) int64 content digest of each slot's image
                                       /<feature>.npy    (slots, ...) float32, slot = index * variants + variant

Exactness. Every tensor is stored in the dtype FeatureAdapter.teacher returns (fp32), computed by that very
function (eval, no_grad, autocast), in batches of the training step's per-process batch size, so replay hands
the student step the bits the teacher would have given it. This relies on the teacher's forward being
row-wise independent of the other rows of a batch of that size (an eval-mode network: no batch statistics);
tests/test_teacher_cache.py checks the end result, bit-identical student weights with and without the cache.

Keys. The training set is wrapped in KeyedSamples, which adds to each sample its index and a digest of the image
bytes the student will see. The variant is found by matching that digest against the slot digests of the
patch's variants, so the key is exact by construction: an image that is none of the cached variants (another
augmentation, changed files) is an error, never a wrong replay. Non-flip augmentation has infinitely many
variants and is refused by the configuration before training.

Identity. The folder name is a digest of the teacher's and paraphrasers' network digests (weights included,
train/checkpoint.py source_digests), the data settings, image size, batch size, device type and autocast dtype,
and which features are stored: a cache of other networks or data is never opened, and every row and seed of an
experiment table with the same ones can share one folder (`teacher_cache_dir`). A cache is written into a
temporary folder and renamed into place when complete, so a killed build leaves nothing that is read.

Trust. Nothing in the folder is taken on faith: identity.json must equal the identity this run computes (a
cache copied under another teacher's key is caught), and it records the SHA-256 of every .npy file, which
rank 0 recomputes when it opens the cache (about 1 s per GB read on one core; shapes are checked too). A cache
that is missing a file, truncated, altered or foreign is set aside and rebuilt, with a line saying why: it is
derived data, so rebuilding is always safe, and nobody has to delete a folder by hand.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cocofast.data import joint_flip
from cocofast.io import file_sha256

from .checkpoint import CheckpointError, source_digests
from .config import ConfigError, TrainConfig
from .config_checks import check_cacheable
from .features import Features
from .semi import DatasetView

FORMAT_VERSION = 2  # 2: identity.json records each array's SHA-256
IDENTITY = "identity.json"
RECORDED = ("features", "checksums")  # what identity.json adds to the identity the folder is named after


class TeacherCacheError(CheckpointError):
    """A cache folder that is incomplete, corrupt or another run's, or a batch whose images it does not hold."""


def image_digest(image: torch.Tensor) -> int:
    """64-bit digest of an image's bytes (dtype and shape included), as a signed int64."""
    image = image.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{image.dtype}{tuple(image.shape)}".encode())
    h.update(image.numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


class KeyedSamples(DatasetView):
    """The training set with each sample's cache key: (image, mask, tensor([index, image digest]))."""

    def __getitem__(self, index: int):
        image, mask = self.dataset[index]
        return image, mask, torch.tensor([index, image_digest(image)], dtype=torch.int64)


def flip_variant(image: torch.Tensor, mask: torch.Tensor, variant: int):
    """Variant v of an unaugmented sample: bit 0 a horizontal flip, bit 1 a vertical one (augment_pair's flips)."""
    image, mask = joint_flip(image, mask, bool(variant & 1), bool(variant & 2))
    return image.contiguous(), mask.contiguous()


def feature_arrays(feats: Features) -> dict[str, torch.Tensor]:
    named = {"logits": feats.logits, "shallow": feats.shallow, "deep": feats.deep}
    for i, t in enumerate(feats.paraphrased or ()):
        named[f"paraphrased{i}"] = t
    for i, t in enumerate(feats.chain or ()):
        named[f"chain{i}"] = t
    return named


def as_json(value):
    """`value` as it reads back from JSON (tuples become lists), for comparing with a stored identity."""
    return json.loads(json.dumps(value, sort_keys=True))


class TeacherCache:
    """A built cache folder, memory-mapped; `features(keys, device)` is one batch's teacher Features.

    `identity`, when given, must be the one identity.json holds (minus what the build adds); `verify`
    recomputes every array's SHA-256. Any problem is a TeacherCacheError that says what is wrong.
    """

    def __init__(self, folder: str | Path, identity: dict | None = None, verify: bool = True):
        self.folder = Path(folder)
        self.identity = read_identity(self.folder)
        if identity is not None:
            stored = {k: v for k, v in self.identity.items() if k not in RECORDED}
            wanted = as_json(identity)
            if stored != wanted:
                differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
                raise TeacherCacheError(f"teacher cache {self.folder}: {IDENTITY} describes another teacher, "
                                        f"paraphrasers or data (it differs in {', '.join(differ)})")
        checksums = self.identity["checksums"]
        names = ["digests", *self.identity["features"]]
        for name in names:
            path = self.folder / f"{name}.npy"
            if not path.is_file():
                raise TeacherCacheError(f"teacher cache {self.folder}: {path.name} is missing")
            if verify and file_sha256(path) != checksums.get(name):
                raise TeacherCacheError(f"teacher cache {self.folder}: {path.name} is not the file the cache was "
                                        f"built with (its SHA-256 differs: altered or truncated)")
        try:
            self.variants = int(self.identity["variants"])
            self.digests = np.load(self.folder / "digests.npy")
            self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r")
                           for name in self.identity["features"]}
        except (OSError, ValueError, TypeError, KeyError) as err:  # truncated or not an .npy file at all
            raise TeacherCacheError(f"teacher cache {self.folder}: cannot read its arrays: "
                                    f"{type(err).__name__}: {err}") from None
        slots = self.digests.shape[0] if self.digests.ndim == 1 else -1
        bad = [f"{n} {a.shape}" for n, a in self.arrays.items() if a.ndim == 0 or a.shape[0] != slots]
        if slots < 0 or bad or self.digests.dtype != np.int64:
            raise TeacherCacheError(f"teacher cache {self.folder}: arrays of inconsistent shapes (digests "
                                    f"{self.digests.shape} {self.digests.dtype}; {', '.join(bad) or 'features fine'})")

    @classmethod
    def build(cls, folder: str | Path, identity: dict, base_set: Dataset, batch: int, teacher_features,
              device: torch.device) -> "TeacherCache":
        """Compute every slot of `base_set` (unaugmented) into `folder`, atomically; an existing complete
        folder (another process built it meanwhile) is kept and opened instead."""
        folder = Path(folder)
        variants = int(identity["variants"])
        slots = len(base_set) * variants
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            digests = np.zeros(slots, dtype=np.int64)
            arrays: dict[str, np.ndarray] = {}
            order = [(i, v) for i in range(len(base_set)) for v in range(variants)]
            sample, sample_index = None, -1
            for start in range(0, slots, batch):
                chunk = order[start:start + batch]
                images = []
                for i, v in chunk:
                    if i != sample_index:
                        sample, sample_index = base_set[i], i
                    image, _ = flip_variant(*sample, v)
                    images.append(image)
                    digests[i * variants + v] = image_digest(image)
                # The last chunk is padded to the training batch size: the teacher sees the batch shape it
                # sees in training, which is what makes its rows match the uncached run's bit for bit.
                images += [images[0]] * (batch - len(images))
                named = feature_arrays(teacher_features(torch.stack(images).to(device)))
                for name, t in named.items():
                    if name not in arrays:
                        arrays[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float32,
                                                                 shape=(slots, *t.shape[1:]))
                    arrays[name][start:start + len(chunk)] = t[:len(chunk)].detach().cpu().numpy()
            for arr in arrays.values():
                arr.flush()
            del arrays
            np.save(tmp / "digests.npy", digests)
            names = sorted(p.stem for p in tmp.glob("*.npy") if p.stem != "digests")
            checksums = {p.stem: file_sha256(p) for p in tmp.glob("*.npy")}
            (tmp / IDENTITY).write_text(json.dumps({**identity, "features": names, "checksums": checksums},
                                                   indent=1, sort_keys=True))
            try:
                tmp.rename(folder)
            except OSError:
                if not (folder / IDENTITY).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else finished the same cache first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(folder, identity, verify=False)  # just written and hashed: no second read

    @classmethod
    def open_or_build(cls, folder: Path, identity: dict, build, log) -> "TeacherCache":
        """The verified cache at `folder`; built by `build()` when absent, set aside and rebuilt (saying why via
        `log`) when it fails verification."""
        if folder.exists():
            try:
                return cls(folder, identity)
            except TeacherCacheError as err:
                log(f"{err}; rebuilding it")
                discard(folder)
        return build()

    def slots(self, keys: torch.Tensor) -> np.ndarray:
        keys = keys.cpu().numpy()
        index, digest = keys[:, 0], keys[:, 1]
        if (index < 0).any() or (index * self.variants >= len(self.digests)).any():
            raise TeacherCacheError(f"teacher cache {self.folder}: sample index out of range")
        candidates = self.digests[index[:, None] * self.variants + np.arange(self.variants)[None]]
        match = candidates == digest[:, None]
        if not match.any(axis=1).all():
            bad = index[~match.any(axis=1)].tolist()
            discard(self.folder)  # its images are not the data's any more: the next run rebuilds it
            raise TeacherCacheError(f"teacher cache {self.folder}: training patches {bad[:8]} are none of the "
                                    f"cached flip variants (the data changed, or augmentation other than flips is "
                                    f"on); the cache is set aside, so rerunning (--resume continues this run) "
                                    f"rebuilds it from the data as it is now")
        return index * self.variants + match.argmax(axis=1)

    def features(self, keys: torch.Tensor, device: torch.device) -> Features:
        slots = self.slots(keys)
        take = {name: torch.from_numpy(np.ascontiguousarray(arr[slots])).to(device)
                for name, arr in self.arrays.items()}
        listed = lambda prefix: [take[n] for n in sorted((n for n in take if n.startswith(prefix)),  # noqa: E731
                                                         key=lambda n: int(n[len(prefix):]))] or None
        paraphrased = listed("paraphrased")
        return Features(take["logits"], take["shallow"], take["deep"],
                        tuple(paraphrased) if paraphrased else None, listed("chain"))


def read_identity(folder: Path) -> dict:
    path = folder / IDENTITY
    try:
        identity = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TeacherCacheError(f"teacher cache {folder}: {IDENTITY} is missing (an incomplete folder)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TeacherCacheError(f"teacher cache {folder}: {IDENTITY} is unreadable ({type(err).__name__})") from None
    fields_ok = (isinstance(identity, dict) and isinstance(identity.get("features"), list)
                 and all(isinstance(n, str) and n.isidentifier() for n in identity["features"])
                 and isinstance(identity.get("checksums"), dict) and "variants" in identity)
    if not fields_ok:
        raise TeacherCacheError(f"teacher cache {folder}: {IDENTITY} lacks the features, checksums or variants a "
                                f"built cache records (another format or version)")
    return identity


def discard(folder: Path) -> None:
    """Move a bad cache folder aside in one rename (a reader that has it open keeps its files), then delete it."""
    aside = folder.parent / f".{folder.name}.discarded-{uuid.uuid4().hex[:8]}"
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return  # another process set it aside first
    except OSError as err:
        raise TeacherCacheError(f"teacher cache {folder} is unusable and cannot be moved aside to rebuild it: "
                                f"{err.strerror or err}") from None
    shutil.rmtree(aside, ignore_errors=True)


def cache_identity(cfg: TrainConfig, step, teacher, paraphrasers, device: torch.device) -> dict:
    adapter = step.adapter
    chain = list(adapter.teacher_chain.paths) if adapter.teacher_chain is not None else None
    data = {k: getattr(cfg, k) for k in ("dataset", "data_seed", "train_samples", "mask_values", "patch_size",
                                          "patch_stride", "normalise", "image_size", "in_channels", "num_classes")}
    if cfg.dataset == "folder":
        data["data_root"] = str(Path(cfg.data_root).resolve())
        data.pop("train_samples")
    return {"version": FORMAT_VERSION, "sources": source_digests(teacher=teacher, paraphraser=paraphrasers),
            "data": data, "variants": 4 if cfg.flips else 1, "batch": step.cfg.batch_size // step.rt.world_size,
            "device": device.type, "amp": str(step.rt.amp_dtype), "paraphrased": adapter.paraphrasers is not None,
            "chain": chain, "torch": torch.__version__}


def open_teacher_cache(cfg: TrainConfig, rt, step, teacher, paraphrasers, unaugmented_train_set) -> TeacherCache:
    """The cache for this run's teacher, paraphrasers and data: opened if built, else built (by rank 0) from
    `unaugmented_train_set()` (the training set without flips: the variants are made here)."""
    check_cacheable(cfg)
    identity = cache_identity(cfg, step, teacher, paraphrasers, rt.device)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.teacher_cache_dir or Path(cfg.run_dir) / "teacher_cache")
    folder = root / key

    def build() -> TeacherCache:
        base_set = unaugmented_train_set()
        print(f"[student] teacher cache: computing {len(base_set) * identity['variants']} patch variants "
              f"into {folder}", flush=True)
        try:
            return TeacherCache.build(folder, identity, base_set, identity["batch"], step.teacher_features,
                                      rt.device)
        except OSError as err:  # a full disk, a folder that cannot be written: name it (the build left nothing)
            raise TeacherCacheError(f"cannot write the teacher cache {folder}: {err.strerror or err} (free space "
                                    f"there, set teacher_cache_dir, or turn teacher_cache off)") from None

    cache, problem = None, None
    if rt.is_main:  # rank 0 alone verifies (reads every byte) and builds; the others open what it left
        try:
            cache = TeacherCache.open_or_build(folder, identity, build,
                                               lambda message: print(f"[student] {message}", flush=True))
        except TeacherCacheError as err:
            problem = str(err)
    problem = rt.gather_objects(problem)[0]
    if problem:
        raise TeacherCacheError(problem)
    rt.barrier()
    if cache is None:
        cache = TeacherCache(folder, identity, verify=False)
    if rt.is_main:
        print(f"[student] teacher cache: replaying {folder}", flush=True)
    return cache
