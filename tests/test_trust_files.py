"""Trust nothing that arrives in a file (issue 23, items 1, 2, 3, 11, 13, 14, 16): checkpoints that would run
code, predict's output folder, the teacher cache, and what a user's network or a TorchScript teacher hands back.

docs/reliability.md lists each case with the test here that shows it; every one fails on the code before it.
"""
from __future__ import annotations

import json
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocofast import export, predict, segment
from cocofast.checkpoint import UntrustedCodeError
from cocofast.data import SyntheticPathology
from cocofast.io import atomic_save, lock_folder
from cocofast.models import create_model
from cocofast.train import distill, loop
from cocofast.train.teacher_cache import TeacherCache, TeacherCacheError
from helpers import save_enet_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TINY_TEACHER = {"in_channels": 3, "num_classes": 2, "width": 0.25}  # configs/tiny.yaml's erfnet


def train(run_dir: Path, *extra: str) -> int:
    return distill.main(["--config", TINY, f"--run_dir={run_dir}", "--threads=1", *extra])


def image_file(path: Path, seed: int = 0, size=(40, 48)) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """write(source) -> the name of a fresh importable module holding `source` (removed from sys.modules after)."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(source: str) -> str:
        name = f"user_net_{uuid.uuid4().hex[:8]}"
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


# --- 1: a checkpoint never imports code on its own ------------------------------------------------------------
PAYLOADS = {
    "subprocess": lambda marker: ("subprocess:check_call", {"args": ["touch", str(marker)]}),
    "os.system": lambda marker: ("os:system", {"command": f"touch {marker}"}),
}


def evil_entry(marker: Path, payload: str) -> dict:
    name, kwargs = PAYLOADS[payload](marker)
    return {"model_name": name, "model_kwargs": kwargs, "state_dict": {}}


def evil_weights_file(path: Path, marker: Path, payload: str) -> Path:
    from safetensors.torch import save_file

    name, kwargs = PAYLOADS[payload](marker)
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": export.WEIGHTS_FORMAT, "model_name": name,
                                                         "model_kwargs": json.dumps(kwargs)})
    return path


def entry_point(kind: str, tmp_path: Path, marker: Path, payload: str, capsys) -> str:
    """Run one reader of checkpoints on a file whose network is `payload`; returns what it said."""
    evil = tmp_path / "evil.pt"
    atomic_save({"models": {"student": evil_entry(marker, payload), "teacher": evil_entry(marker, payload)}}, evil)
    image = image_file(tmp_path / "s.png")
    if kind == "segment":
        assert segment.main([str(image), "--checkpoint", str(evil), "--out", str(tmp_path / "m.png"),
                             "--quiet"]) == 2
    elif kind == "predict":
        assert predict.main([str(image), "--checkpoint", str(evil), "--out", str(tmp_path / "out"),
                             "--quiet"]) == 2
    elif kind == "export":
        assert export.main([str(evil), "--out", str(tmp_path / "exp")]) == 2
    elif kind == "segment.load_model":
        with pytest.raises(UntrustedCodeError):
            segment.load_model(evil)
    elif kind == "load_weights_file":
        with pytest.raises(UntrustedCodeError) as err:
            export.load_weights_file(evil_weights_file(tmp_path / "w.safetensors", marker, payload))
        return str(err.value)
    elif kind == "eval --eval_students":
        (tmp_path / "run" / "mine").mkdir(parents=True)
        evil.rename(tmp_path / "run" / "mine" / "best.pt")
        assert train(tmp_path / "run", "--stage=eval", "--eval_students=mine") == 2
    elif kind == "eval, teacher in the run folder":
        (tmp_path / "run" / "teacher").mkdir(parents=True)
        evil.rename(tmp_path / "run" / "teacher" / "best.pt")
        assert train(tmp_path / "run", "--stage=eval") == 2
    elif kind == "student --teacher_checkpoint":
        assert train(tmp_path / "run", "--stage=student", "--losses=kd", f"--teacher_checkpoint={evil}") == 2
    return capsys.readouterr().err


READERS = ["segment", "predict", "export", "segment.load_model", "load_weights_file", "eval --eval_students",
           "eval, teacher in the run folder", "student --teacher_checkpoint"]


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("kind", READERS)
def test_a_checkpoint_never_imports_or_calls_code_on_its_own(tmp_path, capsys, kind, payload):
    marker = tmp_path / "PWNED"
    said = entry_point(kind, tmp_path, marker, payload, capsys)
    assert not marker.exists(), f"{kind}: the checkpoint ran its code"
    if kind not in ("segment.load_model",):
        name = PAYLOADS[payload](marker)[0]
        assert name in said and "import path" in said and "Traceback" not in said, said
        how = {"eval, teacher in the run folder": "--teacher_model=",
               "student --teacher_checkpoint": "--teacher_model=",
               "eval --eval_students": "--trust_model_code=",
               "load_weights_file": "trusted="}.get(kind, "--trust-model-code=")
        assert how in said, said


TRUSTED_NET = """\
    from pathlib import Path

    from torch import nn

    Path({marker!r}).touch()  # importing this module is what a trusted checkpoint may do


    class Net(nn.Module):
        def __init__(self, in_channels=3, num_classes=2):
            super().__init__()
            self.in_channels, self.num_classes = in_channels, num_classes
            self.conv = nn.Conv2d(in_channels, num_classes, 1)

        def forward(self, x):
            return self.conv(x)
"""


def trusted_checkpoint(tmp_path: Path, user_module, roles=("student",)) -> tuple[Path, str, Path]:
    """(a checkpoint of a user factory, its import path, the marker its import touches), the marker cleared."""
    marker = tmp_path / "imported"
    module = user_module(TRUSTED_NET.format(marker=str(marker)))
    path = f"{module}:Net"
    net = create_model(path, in_channels=3, num_classes=2)
    entry = {"model_name": path, "model_kwargs": net.model_kwargs, "state_dict": net.state_dict()}
    atomic_save({"models": {role: entry for role in roles}}, tmp_path / "mine.pt")
    marker.unlink()
    sys.modules.pop(module)
    return tmp_path / "mine.pt", path, marker


@pytest.mark.parametrize("tool", ["segment", "predict", "export", "segment.load_model"])
def test_naming_the_factory_yourself_opts_in(tmp_path, capsys, user_module, tool):
    ckpt, path, marker = trusted_checkpoint(tmp_path, user_module)
    if tool == "segment.load_model":  # the Python API
        with pytest.raises(UntrustedCodeError, match=path):
            segment.load_model(ckpt)
        assert not marker.exists()
        model, _ = segment.load_model(ckpt, trusted=[path])
        assert marker.exists() and model.model_name == path
        return
    image = image_file(tmp_path / "s.png")
    args = {"segment": [str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png"), "--quiet"],
            "predict": [str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--quiet"],
            "export": [str(ckpt), "--out", str(tmp_path / "exp")]}[tool]
    main = {"segment": segment.main, "predict": predict.main, "export": export.main}[tool]
    assert main(args) == 2
    assert not marker.exists() and f"--trust-model-code={path}" in capsys.readouterr().err
    assert main([*args, f"--trust-model-code={path}"]) == 0
    assert marker.exists()


def test_training_trusts_the_factories_its_config_names(tmp_path, capsys, user_module):
    ckpt, path, marker = trusted_checkpoint(tmp_path, user_module)
    (tmp_path / "run" / "mine").mkdir(parents=True)
    ckpt.rename(tmp_path / "run" / "mine" / "best.pt")
    assert train(tmp_path / "run", "--stage=eval", "--eval_students=mine") == 2
    assert not marker.exists() and f"--trust_model_code={path}" in capsys.readouterr().err
    assert train(tmp_path / "run", "--stage=eval", "--eval_students=mine", f"--trust_model_code={path}") == 0
    assert marker.exists()
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [r["model"] for r in rows] == [path]


# --- 2 and 16: predict's output folder records what made each output ------------------------------------------
@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate("abc"):
        image_file(folder / f"{name}.png", seed=i)
    return folder


def masks_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "masks").iterdir())}


def predicts(source, out, ckpt, *extra) -> int:
    return predict.main([str(source), "--out", str(out), "--checkpoint", str(ckpt), "--window", "32", "--quiet",
                         *extra])


def test_predict_refuses_outputs_made_by_another_checkpoint_role_or_window(tmp_path, images, capsys):
    first, _ = save_enet_checkpoint(tmp_path / "first.pt", roles=("student", "teacher"))
    torch.manual_seed(1)
    other = create_model("enet", **TINY_TEACHER).eval()
    entry = {"model_name": "enet", "model_kwargs": TINY_TEACHER, "state_dict": other.state_dict()}
    atomic_save({"models": {"student": entry}}, tmp_path / "other.pt")
    out = tmp_path / "out"
    assert predicts(images, out, first) == 0
    before = masks_of(out)
    capsys.readouterr()
    for ckpt, extra, differs in [(tmp_path / "other.pt", [], "network"), (first, ["--role", "teacher"], "role"),
                                 (first, ["--window", "64"], "window")]:
        assert predicts(images, out, ckpt, *extra) == 2
        err = capsys.readouterr().err
        assert f"{differs}: " in err and "--overwrite" in err, err
        assert masks_of(out) == before  # nothing mixed in
    assert predicts(images, out, first) == 0  # the same checkpoint and settings: kept
    assert "0 segmented, 3 already done" in capsys.readouterr().out
    assert predicts(images, out, tmp_path / "other.pt", "--overwrite") == 0
    assert "3 segmented" in capsys.readouterr().out and masks_of(out) != before
    assert predicts(images, out, tmp_path / "other.pt") == 0
    assert "0 segmented, 3 already done" in capsys.readouterr().out


def test_predict_names_what_differs(tmp_path, images, capsys):
    ckpt, _ = save_enet_checkpoint(tmp_path / "c.pt")
    assert predicts(images, tmp_path / "out", ckpt) == 0
    capsys.readouterr()
    assert predicts(images, tmp_path / "out", ckpt, "--window", "64", "--normalise", "range:0:200") == 2
    err = capsys.readouterr().err
    assert "another network or settings" in err and "window: 32 then, 64 now" in err and "normalise" in err
    assert "--overwrite" in err and "Traceback" not in err


def test_predict_refuses_outputs_it_has_no_record_of_and_redoes_changed_inputs(tmp_path, images, capsys):
    ckpt, _ = save_enet_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    image_file(out / "masks" / "a.png", seed=7)  # by hand, or by a cocofast without manifests
    assert predicts(images, out, ckpt) == 2
    assert "no record" in capsys.readouterr().err
    assert predicts(images, out, ckpt, "--overwrite") == 0
    capsys.readouterr()
    image_file(images / "b.png", seed=9, size=(44, 52))  # b changed since its mask was made
    assert predicts(images, out, ckpt) == 0
    assert "1 segmented (1 redone because their input changed), 2 already done" in capsys.readouterr().out
    assert Image.open(out / "masks" / "b.png").size == (52, 44)


def test_predict_holds_its_output_folder_and_clears_a_killed_runs_temporaries(tmp_path, images, capsys):
    ckpt, _ = save_enet_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "out"
    with lock_folder(out, predict.LOCK_NAME):  # another predict run is writing here
        assert predicts(images, out, ckpt) == 2
    err = capsys.readouterr().err
    assert "in use by another predict run" in err and "pid" in err
    (out / "masks").mkdir()
    stale = out / "masks" / ".a.png.k1ll3d.tmp"
    stale.write_bytes(b"half a mask")
    assert predicts(images, out, ckpt) == 0
    assert not stale.exists() and sorted(masks_of(out)) == ["a.png", "b.png", "c.png"]


def test_a_binary_list_file_is_named(tmp_path, capsys):
    ckpt, _ = save_enet_checkpoint(tmp_path / "c.pt")
    listing = tmp_path / "slides.lst"
    listing.write_bytes(b"\xff\xfe\x00\x01binary" * 4)
    assert predicts(listing, tmp_path / "out", ckpt) == 2
    err = capsys.readouterr().err
    assert str(listing) in err and "not a list file" in err


def test_ctrl_c_during_predict_is_one_line_and_exit_130(tmp_path, images, capsys, monkeypatch):
    ckpt, _ = save_enet_checkpoint(tmp_path / "c.pt")
    real, calls = predict.predict_image, []

    def interrupted_at_the_second(job, *args, **kwargs):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job, *args, **kwargs)

    monkeypatch.setattr(predict, "predict_image", interrupted_at_the_second)
    try:
        code = predicts(images, tmp_path / "out", ckpt)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped predict as a traceback")
    err = capsys.readouterr().err
    assert code == 130 and "interrupted after 1 of 3" in err and "same command" in err
    monkeypatch.setattr(predict, "predict_image", real)
    assert predicts(images, tmp_path / "out", ckpt) == 0
    assert "2 segmented, 1 already done" in capsys.readouterr().out


# --- 3: the teacher cache is verified, and rebuilt when it is not what it should be ---------------------------
def fake_teacher(images: torch.Tensor):
    from cocofast.train.features import Features

    pooled = torch.nn.functional.avg_pool2d(images, 2)
    return Features(images * 2, pooled, pooled.mean(1, keepdim=True), None, None)


IDENTITY = {"variants": 4, "sources": {"teacher": "a" * 64}}


def tamper(folder: Path, how: str) -> None:
    if how == "logits x -50":
        logits = np.load(folder / "logits.npy", mmap_mode="r+")
        logits[:5] *= -50
        logits.flush()
    elif how == "truncated":
        path = folder / "shallow.npy"
        path.write_bytes(path.read_bytes()[:200])
    elif how == "array missing":
        (folder / "deep.npy").unlink()
    elif how == "identity missing":
        (folder / "identity.json").unlink()
    elif how == "identity garbage":
        (folder / "identity.json").write_bytes(b"\x00\xffnot json")
    elif how == "another teacher's":
        identity = json.loads((folder / "identity.json").read_text())
        identity["sources"] = {"teacher": "b" * 64}
        (folder / "identity.json").write_text(json.dumps(identity))


@pytest.mark.parametrize("how", ["logits x -50", "truncated", "array missing", "identity missing",
                                 "identity garbage", "another teacher's"])
def test_a_broken_or_foreign_teacher_cache_is_refused_and_rebuilt(tmp_path, how):
    base = SyntheticPathology(3, size=32, seed=5)
    folder = tmp_path / "cache"
    TeacherCache.build(folder, IDENTITY, base, 2, fake_teacher, torch.device("cpu"))
    tamper(folder, how)
    with pytest.raises(TeacherCacheError, match=str(folder)):
        TeacherCache(folder, IDENTITY)
    said, builds = [], []

    def build():
        builds.append(1)
        return TeacherCache.build(folder, IDENTITY, base, 2, fake_teacher, torch.device("cpu"))

    cache = TeacherCache.open_or_build(folder, IDENTITY, build, said.append)
    assert builds and said and "rebuilding" in said[0]
    keys = torch.tensor([[i, int(cache.digests[4 * i])] for i in range(3)])
    want = fake_teacher(torch.stack([base[i][0] for i in range(3)]))
    got = cache.features(keys, torch.device("cpu"))
    assert torch.equal(got.logits, want.logits) and torch.equal(got.shallow, want.shallow)
    TeacherCache(folder, IDENTITY)  # verifies now
    assert TeacherCache.open_or_build(folder, IDENTITY, build, said.append) and len(builds) == 1


def test_a_tampered_cache_is_rebuilt_by_the_student_stage(tmp_path, capsys):
    """The issue's attack end to end: slots of logits.npy multiplied by -50 no longer train the student."""
    run_dir = tmp_path / "run"
    student = ["--stage=student", "--losses=kd", "--teacher_cache=true", "--student_epochs=1",
               "--adversarial=false"]
    assert train(run_dir, "--stage=teacher", "--teacher_epochs=1") == 0
    assert train(run_dir, *student, "--student_name=first") == 0
    (folder,) = (run_dir / "teacher_cache").iterdir()
    sound = (folder / "logits.npy").read_bytes()
    tamper(folder, "logits x -50")
    capsys.readouterr()
    assert train(run_dir, *student, "--student_name=second") == 0
    out = capsys.readouterr().out
    assert "logits.npy is not the file the cache was built with" in out and "rebuilding it" in out
    assert (folder / "logits.npy").read_bytes() == sound


# --- 11, 13, 14: what a user's network or a teacher hands back -------------------------------------------------
def test_a_network_returning_integer_logits_is_refused_at_start_up(tmp_path, capsys, user_module):
    module = user_module("""\
        from torch import nn

        class Rounded(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 2, 1)

            def forward(self, x):
                return self.conv(x).round().long()
    """)
    assert train(tmp_path / "run", "--stage=teacher", f"--student_model={module}:Rounded") == 2
    err = capsys.readouterr().err
    assert f"{module}:Rounded" in err and "torch.int64 logits" in err and "floating-point" in err
    assert not (tmp_path / "run" / "teacher").exists()


@pytest.mark.parametrize("error", ["RuntimeError('no CUDA driver')", "ImportError('needs timm')",
                                   "AssertionError('base must be even')"])
def test_a_factory_that_raises_is_named_with_its_error(tmp_path, capsys, user_module, error):
    module = user_module(f"""\
        def Broken(**kwargs):
            raise {error}
    """)
    kind = error.split("(")[0]
    assert train(tmp_path / "run", "--stage=teacher", f"--student_model={module}:Broken") == 2
    err = capsys.readouterr().err
    assert f"'{module}:Broken'" in err and f"raised {kind}" in err and "'student_model'" in err
    # the same factory met in a checkpoint the user trusts
    atomic_save({"models": {"student": {"model_name": f"{module}:Broken", "model_kwargs": {}, "state_dict": {}}}},
                tmp_path / "c.pt")
    assert segment.main([str(image_file(tmp_path / "s.png")), "--checkpoint", str(tmp_path / "c.pt"), "--out",
                         str(tmp_path / "m.png"), f"--trust-model-code={module}:Broken"]) == 2
    assert f"raised {kind}" in capsys.readouterr().err


def test_a_teacher_whose_outputs_are_nan_is_refused_when_loaded(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = create_model("erfnet", **TINY_TEACHER)
    state = teacher.state_dict()
    next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4).fill_(float("nan"))
    path = tmp_path / "nan_teacher.pt"
    atomic_save({"models": {"teacher": {"model_name": "erfnet", "model_kwargs": TINY_TEACHER, "state_dict": state}}},
                path)
    assert train(tmp_path / "run", "--stage=student", "--losses=kd", f"--teacher_checkpoint={path}") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "NaN or infinite" in err and "weights hold NaN" in err
    assert not (tmp_path / "run" / "student").exists()


def test_ctrl_c_during_training_prints_the_resume_command_and_exits_130(tmp_path, capsys, monkeypatch):
    saved = loop.save_checkpoint

    def then_ctrl_c(path, **content):
        saved(path, **content)
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", then_ctrl_c)
    args = ["--config", TINY, f"--run_dir={tmp_path / 'run'}", "--threads=1", "--stage=teacher",
            "--teacher_epochs=1", "--overwrite"]
    try:
        code = distill.main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped training as a traceback")
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and "interrupted; resume with: " in err
    command = err.split("resume with: ")[1].split()
    assert command[-1] == "--resume" and "--overwrite" not in command and "--stage=teacher" in command
    monkeypatch.setattr(loop, "save_checkpoint", saved)
    assert distill.main(command[command.index("--config"):]) == 0  # the printed command resumes the run


class ThreeChannels(torch.nn.Module):
    def __init__(self, taps: bool):
        super().__init__()
        self.taps = taps
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        logits = self.conv(x)
        return (logits, x, x) if self.taps else logits


def torchscript_teacher(path: Path, taps: bool = False) -> Path:
    torch.jit.trace(ThreeChannels(taps).eval(), torch.rand(1, 3, 64, 64)).save(str(path))
    return path


def test_a_3_channel_torchscript_teacher_on_1_channel_data_names_the_channels(tmp_path, capsys):
    ts = torchscript_teacher(tmp_path / "teacher.ts")
    assert train(tmp_path / "run", "--stage=student", "--losses=kd", "--in_channels=1",
                 f"--teacher_checkpoint={ts}") == 2
    err = capsys.readouterr().err
    assert str(ts) in err and "in_channels=1" in err and "takes 3-channel input" in err


def test_a_torchscript_teacher_without_taps_is_told_to_return_them(tmp_path, capsys):
    ts = torchscript_teacher(tmp_path / "teacher.ts")
    assert train(tmp_path / "run", "--stage=paraphraser", "--teacher_taps=encoder.a,decoder.b",
                 f"--teacher_checkpoint={ts}") == 2
    err = capsys.readouterr().err
    assert "TorchScript" in err and "(logits, shallow, deep) itself" in err and "--teacher_taps=" not in err


def test_a_torchscript_file_is_run_only_when_named(tmp_path, capsys):
    """TorchScript is a program: one found at RUN/teacher/best.pt (where training writes checkpoints) is refused."""
    (tmp_path / "run" / "teacher").mkdir(parents=True)
    ts = torchscript_teacher(tmp_path / "run" / "teacher" / "best.pt")
    assert train(tmp_path / "run", "--stage=eval") == 2
    assert "TorchScript" in (err := capsys.readouterr().err) and f"--teacher_checkpoint={ts}" in err
    assert train(tmp_path / "run", "--stage=eval", f"--teacher_checkpoint={ts}") == 0
