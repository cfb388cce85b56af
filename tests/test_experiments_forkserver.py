"""A run forked from the experiment runner's fork server is the run a fresh process makes: same weights, same
scores, same exit status on a refused configuration."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cocofast.train.experiments.forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# Teacher, critic and KD: the teacher's weights, the student's and the critic's random draws all go in.
ARGS = ["--config", TINY, "--stage=teacher,student,eval", "--losses=kd", "--adversarial=true", "--seed=3",
        "--teacher_epochs=1", "--student_epochs=2", "--train_samples=8", "--val_samples=4", "--num_overlays=0"]


def weights(path: Path) -> dict:
    models = torch.load(path, map_location="cpu", weights_only=False)["models"]
    return {role: entry["state_dict"] for role, entry in models.items()}


@pytest.mark.slow  # two tiny trainings, about a minute on 2 busy cores
def test_a_forked_run_is_the_run_a_fresh_process_makes(tmp_path):
    fresh, forked = tmp_path / "fresh", tmp_path / "forked"
    done = subprocess.run([sys.executable, "-m", "cocofast.train.distill", *ARGS, f"--run_dir={fresh}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    server = ForkServer()
    try:
        assert server.run([*ARGS, f"--run_dir={forked}"], tmp_path / "forked.log") == 0
        assert server.run([*ARGS, "--student_lr=fast"], tmp_path / "refused.log") == 2  # its exit status
    finally:
        server.close()
    assert "expected float" in (tmp_path / "refused.log").read_text()
    assert "[student] epoch 2/2" in (tmp_path / "forked.log").read_text()
    for stage in ("teacher", "student"):
        a, b = weights(fresh / stage / "best.pt"), weights(forked / stage / "best.pt")
        assert a.keys() == b.keys()
        for role in a:
            assert all(torch.equal(a[role][k], b[role][k]) for k in a[role]), (stage, role)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "checkpoint"} for r in rows]
    assert strip(json.loads((fresh / "eval.json").read_text())) == strip(json.loads((forked / "eval.json").read_text()))
