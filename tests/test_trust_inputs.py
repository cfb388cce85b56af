"""Nothing taken on faith from a file or a flag: configs, loss texts, data folders, pixels, segment's sizes.

Each test reproduces one case of issue 23 (docs/reliability.md lists them) that used to be silently wrong, a
traceback or a misleading message; the item number is in each section's title.
"""
from __future__ import annotations

import math
import shutil
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cocofast.data.folder import DatasetError, FolderDataset
from cocofast.experiments import main as experiments_main
from cocofast.losses import LOSSES, DistillLoss, Reads, get_loss, parse_losses
from cocofast.segment import main as segment_main
from cocofast.train import distill
from cocofast.train.config import ConfigError, load_yaml, parse_args
from helpers import save_enet_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def train(run_dir: Path, *extra: str) -> int:
    return distill.main(["--config", TINY, f"--run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher_run")
    assert train(run_dir, "--stage=teacher", "--teacher_epochs=1") == 0
    return run_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_enet_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")[0]


def segment(image: Path, checkpoint: Path, out: Path, *extra: str) -> int:
    return segment_main([str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--window", "64",
                         "--quiet", *extra])


# --- 4: NaN pixels are refused, not "clipped" -------------------------------------------------------------
def nan_tiff(path: Path, nans: int = 3) -> Path:
    image = np.random.default_rng(0).random((40, 48, 3), dtype=np.float32)
    image[0, :nans, 1] = np.nan  # one channel of `nans` pixels
    tifffile.imwrite(path, image, photometric="rgb")
    return path


def folder_with(root: Path, image_writer) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image_writer(root / "images" / "a.tif")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "a.png")
    return root


@pytest.mark.parametrize("normalise", ["range", "percentile:1:99"])
def test_training_refuses_nan_pixels_naming_the_file_and_the_count(tmp_path, normalise):
    root = folder_with(tmp_path / "data", nan_tiff)
    with pytest.raises(DatasetError) as caught:
        FolderDataset(root, normalise=normalise)
    assert len(caught.value.problems) == 1
    path, reason = caught.value.problems[0]
    assert path.endswith("a.tif") and "NaN in 3 of its 1920 pixels" in reason


def test_segment_refuses_nan_pixels_instead_of_blanking_their_windows(tmp_path, checkpoint, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = segment(nan_tiff(tmp_path / "nan.tif"), checkpoint, tmp_path / "m.png")
    assert code == 2
    err = capsys.readouterr().err
    assert "3 NaN pixel(s) in rows 0..39" in err and "class 0" in err
    assert not (tmp_path / "m.png").exists()
    assert not [w for w in caught if "clipped" in str(w.message)]  # the old 'nan..nan ... clipped' warning


# --- 5: a hyper-parameter given twice in one --losses item ------------------------------------------------
def test_a_loss_hyper_parameter_given_twice_is_refused():
    with pytest.raises(ValueError, match="'T' is given twice in 'kd:T=2:T=3'"):
        parse_losses("kd:T=2:T=3")
    with pytest.raises(ConfigError, match="config key 'losses'.*twice"):
        parse_args(["--losses=kd:T=2:T=3"])


# --- 6: a second --config ----------------------------------------------------------------------------------
def test_a_second_config_file_is_refused_not_swapped_in(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("image_size: 64\n")
    second.write_text("batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"--config given twice \(.*a\.yaml, then .*b\.yaml\)"):
        parse_args(["--config", str(first), "--config", str(second)])
    assert parse_args(["--config", str(first), "--batch_size=4"]).image_size == 64


# --- 7: --eval_students with a typo or a name twice --------------------------------------------------------
def test_eval_students_listed_twice_are_refused():
    with pytest.raises(ConfigError, match="'eval_students': 'student' listed twice"):
        parse_args(["--eval_students=student,student"])


def test_an_eval_student_without_a_checkpoint_is_an_error_naming_those_there(teacher_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(teacher_run, run_dir)
    (run_dir / "student_alone").mkdir()
    shutil.copy(run_dir / "teacher" / "best.pt", run_dir / "student_alone" / "best.pt")  # any file: only listed
    assert train(run_dir, "--stage=eval", "--eval_students=typo") == 2
    err = capsys.readouterr().err
    assert "'eval_students': no typo/best.pt" in err and "students there: student_alone" in err
    assert not (run_dir / "eval.csv").exists()


# --- 8: --seeds=0,0 counts one run twice --------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--seeds", "--teacher_seeds"])
def test_experiment_seeds_listed_twice_are_refused(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        experiments_main(["teacher", f"{flag}=0,1,0", f"--config={TINY}", f"--work={tmp_path}", "--dry_run"])
    assert stopped.value.code == 2
    assert f"{flag}: seed(s) 0 listed twice" in capsys.readouterr().err


# --- 9: symlinks that reach no file in images/ ---------------------------------------------------------------
def test_dangling_and_looping_symlinks_in_images_are_reported(tmp_path):
    root = folder_with(tmp_path / "data", lambda p: Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(p))
    (root / "images" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "images" / "loop.png").symlink_to(root / "images" / "loop.png")
    with pytest.raises(DatasetError) as caught:
        FolderDataset(root)
    problems = dict(caught.value.problems)
    assert "dangling symlink" in problems[str(root / "images" / "gone.png")]
    assert "symlink loop" in problems[str(root / "images" / "loop.png")]


# --- 12: at and fsp on finite features of 1e38 ------------------------------------------------------------------
def taps(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, generator=g) * scale, torch.randn(2, 6, 4, 4, generator=g) * scale]


@pytest.mark.parametrize("scale", [1e10, 1e20, 1e38 / 8, 1e-30])
def test_attention_transfer_is_the_same_at_any_finite_feature_scale(scale):
    expected = get_loss("at")(taps(0), taps(1)).item()
    got = get_loss("at")(taps(0, scale), taps(1, scale))
    assert math.isfinite(got.item()) and got.item() == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_matches_the_unscaled_formula_in_float64():
    s, t = [x.double() for x in taps(0)], [x.double() for x in taps(1)]

    def unscaled(f_s, f_t, p=2.0):  # the paper's formula, no rescaling
        a_s = f_s.abs().pow(p).mean(1, keepdim=True)
        a_s = torch.nn.functional.interpolate(a_s, size=f_t.shape[-2:], mode="bilinear", align_corners=False)
        a_t = f_t.abs().pow(p).mean(1, keepdim=True)
        q_s, q_t = (a / a.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) for a in (a_s, a_t))
        return (q_s - q_t).square().mean()

    expected = 1000 * sum(unscaled(a, b) for a, b in zip(s, t))
    assert get_loss("at")(s, t).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("scale", [1e10, 1e38 / 8])
def test_fsp_refuses_features_whose_fourth_power_overflows(scale):
    s = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)]
    t = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)]
    assert math.isfinite(get_loss("fsp")(s, t).item())
    with pytest.raises(ValueError, match=r"FSPLoss: `student\[0\] \(shallow\)`.*finite but too large.*"
                                         r"rescale the features"):
        get_loss("fsp")([x * scale for x in s], t)


# --- 13: tracebacks become one line naming the culprit ---------------------------------------------------------
@pytest.mark.parametrize("text, named", [("emkd:temperature=[1]", "temperature must be a finite number > 0"),
                                         ("emkd:T=abc", "temperature must be a finite number > 0, got 'abc'"),
                                         ("skd_pairwise:pool_kernel=[2]", "pool_kernel must be an integer >= 1")])
def test_loss_values_of_the_wrong_type_are_config_errors(text, named):
    with pytest.raises(ConfigError, match=f"config key 'losses'.*{named}"):
        parse_args([f"--losses={text}"])


class PerImageLoss(DistillLoss):
    reads = Reads("logits")

    def distill(self, student, teacher, labels):
        return (student[0] - teacher[0]).square().mean(dim=(1, 2, 3))  # (B,): forgot the batch mean


def test_a_loss_that_returns_a_vector_is_named():
    with pytest.raises(ValueError, match=r"PerImageLoss.distill returned shape \(2\); a loss returns one "
                                              r"scalar"):
        PerImageLoss()([torch.randn(2, 2, 4, 4)], [torch.randn(2, 2, 4, 4)])


def test_training_with_a_vector_loss_exits_2_naming_it(teacher_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "vector_loss.py").write_text(textwrap.dedent('''
        from cocofast.losses import register_loss
        from test_trust_inputs import PerImageLoss
        register_loss("per_image", PerImageLoss)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    run_dir = tmp_path / "run"
    shutil.copytree(teacher_run, run_dir)
    try:
        code = train(run_dir, "--stage=student", "--student_epochs=1", "--loss_modules=vector_loss",
                     "--losses=per_image", "--adversarial=false")
    finally:  # the registry is global: other tests list every loss
        LOSSES.pop("per_image", None)
        sys.modules.pop("vector_loss", None)
    assert code == 2
    assert "config key 'losses': 'per_image': PerImageLoss.distill returned shape" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--mpp", "inf"], "--mpp inf: must be a finite positive number"),
    (["--mpp", "1e6"], "1000000.0 µm per pixel needs level 0 (0.25 µm per pixel) downscaled by 4000000 on a 48x40 "
                       "image"),
    (["--mpp", "1e300"], "1e+300 µm per pixel"),
    (["--downscale", "1000000"], "downscale factor 1000000 on a 48x40 image would give 4.8e-05x4e-05 pixels, less "
                                 "than one; the largest usable factor is 40"),
    (["--window", "400000"], "a 400000x400000 window over a 48-pixel-wide image needs 2.38e+03 GiB for one band of "
                             "blended scores")])
def test_segment_sizes_that_cannot_fit_are_refused_naming_them(tmp_path, checkpoint, capsys, extra, message):
    image = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", image, photometric="rgb", description="Aperio |MPP = 0.25", metadata=None)
    assert segment(tmp_path / "s.tif", checkpoint, tmp_path / "m.png", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_the_largest_usable_downscale_still_segments(tmp_path, checkpoint):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((40, 48, 3), np.uint8), photometric="rgb")
    assert segment(tmp_path / "s.tif", checkpoint, tmp_path / "m.png", "--downscale", "40") == 0
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (40, 48)


def test_a_level_openslide_lacks_is_named_not_a_closed_slide_traceback(tmp_path, checkpoint, capsys):
    pytest.importorskip("openslide")
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((64, 64, 3), np.uint8), tile=(16, 16), photometric="rgb")
    assert segment(tmp_path / "s.tif", checkpoint, tmp_path / "m.png", "--level", "5", "--reader", "openslide") == 2
    assert "level 5 requested, the slide has levels 0..0" in capsys.readouterr().err


def test_utf16_config_files_are_read_and_binary_ones_refused(tmp_path):
    (tmp_path / "utf16.yaml").write_bytes("image_size: 64\n".encode("utf-16"))  # with its byte-order mark
    assert load_yaml(tmp_path / "utf16.yaml") == {"image_size": 64}
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="binary.yaml is not valid YAML"):
        load_yaml(tmp_path / "binary.yaml")
    (tmp_path / "latin1.yaml").write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml is not valid YAML"):
        load_yaml(tmp_path / "latin1.yaml")


def test_a_student_name_longer_than_a_file_name_can_be_is_refused():
    with pytest.raises(ConfigError, match="'student_name': a folder name of 300 bytes .* longer than the 255"):
        parse_args(["--student_name=" + "s" * 300])


def test_an_image_size_below_the_synthetic_minimum_names_it():
    with pytest.raises(ConfigError, match="'image_size': the synthetic data set draws patches of at least 32 "
                                          "pixels, got 8"):
        parse_args(["--config", TINY, "--image_size=8"])


# --- 15: 1e1 is a number ------------------------------------------------------------------------------------
def test_loss_values_python_reads_as_floats_are_numbers():
    (spec,) = parse_losses("kd:T=1e1")
    assert spec.params == {"T": 10.0} and spec.build().temperature == 10.0
    assert parse_losses("cpkd:tau=5e-1")[0].build().tau == 0.5
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        parse_losses("kd:T=nan")


# --- 16: YAML merge keys ----------------------------------------------------------------------------------------
def test_yaml_merge_keys_are_accepted_and_real_duplicates_still_refused(tmp_path):
    merged = tmp_path / "merged.yaml"
    merged.write_text(textwrap.dedent("""\
        teacher_model_kwargs: &shared {base: 16, depth: 3}
        student_model_kwargs:
          <<: *shared
          depth: 2
    """))
    assert load_yaml(merged)["student_model_kwargs"] == {"base": 16, "depth": 2}
    twice = tmp_path / "twice.yaml"
    twice.write_text("student_model_kwargs:\n  base: 16\n  base: 8\n")
    with pytest.raises(ConfigError, match="found key 'base' twice"):
        load_yaml(twice)
    two_merges = tmp_path / "two_merges.yaml"
    two_merges.write_text("a: &a {x: 1}\nb: &b {y: 1}\nc:\n  <<: *a\n  <<: *b\n")
    with pytest.raises(ConfigError, match="found key '<<' twice"):
        load_yaml(two_merges)


def test_an_image_size_below_the_networks_divisor_says_the_smallest():
    from cocofast.train.networks import check_networks

    data = ["--dataset=folder", "--data_root=unused"]  # no synthetic minimum: the networks' own
    with pytest.raises(ConfigError, match="needs sides divisible by 32, got 8; the smallest is 32"):
        check_networks(parse_args([*data, "--image_size=8"]))
    with pytest.raises(ConfigError, match="divisible by 32, got 40$"):  # above the smallest: no such note
        check_networks(parse_args([*data, "--image_size=40"]))


def test_a_binary_list_file_is_a_dataset_problem_naming_it(tmp_path):
    (tmp_path / "pairs.txt").write_bytes(bytes(range(256)))
    with pytest.raises(DatasetError) as caught:
        FolderDataset(list_file=tmp_path / "pairs.txt")
    (path, reason), = caught.value.problems
    assert path == str(tmp_path / "pairs.txt") and "not a text list file" in reason
