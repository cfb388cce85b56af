"""The frozen-teacher cache (train/teacher_cache.py): exact keys, exact replay, and refusals."""
from pathlib import Path

import pytest
import torch

from cocofast.data import Augmentation, SyntheticPathology
from cocofast.train import distill
from cocofast.train.checkpoint import load_checkpoint
from cocofast.train.config import ConfigError, parse_args
from cocofast.train.features import Features
from cocofast.train.teacher_cache import KeyedSamples, TeacherCache, TeacherCacheError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def fake_teacher(images: torch.Tensor) -> Features:
    """A deterministic stand-in for FeatureAdapter.teacher: every feature a different function of the image."""
    pooled = torch.nn.functional.avg_pool2d(images, 2)
    return Features(images * 2, pooled, pooled.mean(1, keepdim=True), paraphrased=(pooled + 1, pooled - 1),
                    chain=[images.amax(1, keepdim=True)])


def test_keys_find_each_flip_variant_and_refuse_other_images(tmp_path):
    base = SyntheticPathology(3, size=32, seed=5)
    cache = TeacherCache.build(tmp_path / "c", {"variants": 4}, base, 2, fake_teacher, torch.device("cpu"))
    assert sorted(cache.arrays) == ["chain0", "deep", "logits", "paraphrased0", "paraphrased1", "shallow"]
    flipped = KeyedSamples(SyntheticPathology(3, size=32, seed=5, flips=True))
    variants_seen = set()
    for epoch in range(6):
        flipped.set_epoch(epoch)
        samples = [flipped[i] for i in range(3)]
        images, keys = torch.stack([s[0] for s in samples]), torch.stack([s[2] for s in samples])
        variants_seen |= set((cache.slots(keys) % 4).tolist())
        got, want = cache.features(keys, torch.device("cpu")), fake_teacher(images)
        for a, b in zip([got.logits, got.shallow, got.deep, *got.paraphrased, *got.chain],
                        [want.logits, want.shallow, want.deep, *want.paraphrased, *want.chain]):
            assert a.dtype == torch.float32 and torch.equal(a, b)
    assert len(variants_seen) > 1  # the epochs drew different flips, each found in its own slot
    jittered = KeyedSamples(SyntheticPathology(3, size=32, seed=5, augment=Augmentation(brightness=0.2)))
    with pytest.raises(TeacherCacheError, match="none of the cached flip variants"):
        cache.features(jittered[1][2][None], torch.device("cpu"))


def test_colour_augmentation_is_refused_before_training():
    for key in ("hed_jitter", "brightness", "contrast"):
        with pytest.raises(ConfigError, match=f"'teacher_cache'.*{key}"):
            parse_args(["--config", TINY, "--teacher_cache=true", f"--{key}=0.05"])
    parse_args(["--config", TINY, "--teacher_cache=true"])  # flips alone are cacheable


def student_weights(path: Path) -> dict:
    return {role: spec["state_dict"] for role, spec in load_checkpoint(path)["models"].items()}


def test_cached_and_uncached_students_are_bit_identical(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--config", TINY, f"--run_dir={run_dir}", "--threads=1", "--teacher_epochs=1"]
    assert distill.main([*common, "--stage=teacher,paraphraser"]) == 0
    # coco reads the paraphrased taps, graph_flow the chain, kd the logits; the critic reads the logits too.
    student = [*common, "--stage=student", "--losses=coco,graph_flow,kd"]
    capsys.readouterr()
    assert distill.main([*student, "--student_name=cached", "--teacher_cache=true"]) == 0
    assert "teacher cache: computing 64 patch variants" in capsys.readouterr().out  # 16 patches x 4 flips
    assert distill.main([*student, "--student_name=uncached"]) == 0
    cached = student_weights(run_dir / "cached" / "last.pt")
    uncached = student_weights(run_dir / "uncached" / "last.pt")
    assert cached.keys() == uncached.keys() == {"student", "discriminator"}
    for role in cached:
        for name, tensor in cached[role].items():
            assert torch.equal(tensor, uncached[role][name]), f"{role}.{name} differs"
    (folder,) = (run_dir / "teacher_cache").iterdir()
    assert {"paraphrased0.npy", "chain3.npy", "digests.npy"} <= {p.name for p in folder.iterdir()}

    # Another seed with the same teacher, paraphrasers and data replays the same cache, without the teacher.
    assert distill.main([*student, "--student_name=seed1", "--seed=1", "--teacher_cache=true"]) == 0
    out = capsys.readouterr().out
    assert f"teacher cache: replaying {folder}" in out and "computing" not in out
    seed1 = student_weights(run_dir / "seed1" / "last.pt")
    assert any(not torch.equal(seed1["student"][n], cached["student"][n]) for n in cached["student"])
