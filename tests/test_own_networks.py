"""A user's own U-Net, named in a YAML config as teacher and student, end to end through the command line:
teacher -> paraphraser -> student (CoCo + adversarial) -> eval -> segment -> export -> ONNX Runtime parity.
And the same student distilled from a teacher the user trained elsewhere (TorchScript, plain state-dict)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
UNET = Path(__file__).resolve().parent / "data" / "user_unet.py"

CONFIG = """\
dataset: synthetic
train_samples: 8
val_samples: 4
image_size: 64
batch_size: 4
eval_batch_size: 4
num_workers: 0
progress: false
save_every_iters: 0
num_overlays: 1
threads: 1
teacher_model: "user_unet:UNet"
teacher_model_kwargs: {base: 8}
teacher_taps: [down2, up1]
teacher_input_divisor: 8
student_model: "user_unet:UNet"
student_model_kwargs: {base: 4}
student_taps: [down2, up1]
student_input_divisor: 8
lr_schedule: poly
teacher_epochs: 1
teacher_lr: 1.0e-3
paraphraser_epochs: 1
paraphraser_lr: 1.0e-2
student_epochs: 1
student_lr: 1.0e-3
losses: coco
adversarial: true
disc_width: 0.125
"""


@pytest.fixture
def user(tmp_path):
    """A temporary package folder holding the user's network, on PYTHONPATH, and a config naming it."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shutil.copy(UNET, pkg / "user_unet.py")
    (tmp_path / "config.yaml").write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": str(pkg), "OMP_NUM_THREADS": "1"}
    sys.path.insert(0, str(pkg))
    yield tmp_path, env
    sys.path.remove(str(pkg))
    sys.modules.pop("user_unet", None)


def cli(env, *args, timeout=300):
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def distill(tmp_path, env, *extra):
    return cli(env, str(ROOT / "train" / "distill.py"), "--config", str(tmp_path / "config.yaml"), *extra)


def test_a_users_unet_from_yaml_through_every_command(user):
    tmp_path, env = user
    rc, out = distill(tmp_path, env, f"--run_dir={tmp_path / 'run'}")
    assert rc == 0, out[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "eval.json").read_text())}
    assert rows["teacher"]["model"] == rows["student"]["model"] == "user_unet:UNet"
    assert rows["student"]["params"] < rows["teacher"]["params"]
    summary = (tmp_path / "run" / "student" / "summary.csv").read_text().splitlines()[0]
    assert "loss_coco" in summary and "loss_adv_g" in summary and "d_loss" in summary

    Image.fromarray((np.random.default_rng(0).random((72, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / "s.png")
    best = str(tmp_path / "run" / "student" / "best.pt")
    rc, out = cli(env, "-m", "cocofast", "segment", str(tmp_path / "s.png"), "--checkpoint", best,
                  "--out", str(tmp_path / "mask.png"), "--quiet", "--trust-model-code=user_unet:UNet")
    assert rc == 0, out[-3000:]
    assert Image.open(tmp_path / "mask.png").size == (80, 72)

    rc, out = cli(env, "-m", "cocofast", "export", best, "--out", str(tmp_path / "exp"),
                  "--trust-model-code=user_unet:UNet")
    assert rc == 0, out[-3000:]
    import onnxruntime

    from cocofast.models import create_model
    from cocofast.checkpoint import model_spec, read_checkpoint

    spec = model_spec(read_checkpoint(best), "student", best, trusted=["user_unet:UNet"])
    net = create_model(spec["model_name"], **spec["model_kwargs"])
    net.load_state_dict(spec["state_dict"])
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected = net.eval()(x).logits.numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "exp" / "student.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_a_teacher_trained_elsewhere(user, kind):
    tmp_path, env = user
    import user_unet

    torch.manual_seed(0)
    if kind == "torchscript":
        teacher = user_unet.UNetWithTaps(base=8).eval()
        path = tmp_path / "teacher.ts"
        torch.jit.trace(teacher, torch.rand(1, 3, 64, 64)).save(str(path))
    else:
        path = tmp_path / "teacher_weights.pt"
        torch.save(user_unet.UNet(base=8).state_dict(), path)
    rc, out = distill(tmp_path, env, f"--run_dir={tmp_path / 'run'}", f"--teacher_checkpoint={path}",
                      "--stage=paraphraser,student,eval")
    assert rc == 0, out[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "eval.json").read_text())}
    assert set(rows) == {"teacher", "student"}
    assert not (tmp_path / "run" / "teacher").exists()  # nothing trained it here


@pytest.mark.parametrize("override, words", [
    ("--student_model=user_unet:Nope", ["'student_model'", "has no 'Nope'", "UNet"]),
    ("--student_model=no_such_pkg.unet:UNet", ["'student_model'", "cannot import 'no_such_pkg.unet'"]),
    ("--student_taps=down2,upp1", ["'student_taps'", "no submodule 'upp1'", "up1"]),
    ("--student_taps=down1,up1", ["'student_taps'", "must share H·W", "down1 (1, 8, 32, 32)", "up1 (1, 16, 16, 16)"]),
    ("--student_model_kwargs={bass: 4}", ["'student_model'", "bass"]),
])
def test_bad_names_paths_and_shapes_exit_2_before_training(user, override, words):
    tmp_path, env = user
    rc, out = distill(tmp_path, env, f"--run_dir={tmp_path / 'run'}", override)
    assert rc == 2, out[-3000:]
    for word in words:
        assert word in out, (word, out[-2000:])
    assert not (tmp_path / "run" / "teacher").exists()


def test_logit_distillation_needs_no_taps(user):
    """A user network named without taps still distils through logit losses and the critic."""
    tmp_path, env = user
    text = (tmp_path / "config.yaml").read_text()
    text = "\n".join(line for line in text.splitlines() if "_taps" not in line) + "\nlosses: kd\n"
    (tmp_path / "config.yaml").write_text(text.replace("losses: coco\n", ""))
    rc, out = distill(tmp_path, env, f"--run_dir={tmp_path / 'run'}")
    assert rc == 2 and "'teacher_taps'" in out and "--stage=teacher,student,eval" in out, out[-2000:]
    rc, out = distill(tmp_path, env, f"--run_dir={tmp_path / 'run'}", "--stage=teacher,student")
    assert rc == 0, out[-3000:]
    assert "loss_kd" in (tmp_path / "run" / "student" / "summary.csv").read_text().splitlines()[0]
