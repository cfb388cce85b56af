"""The networks each stage builds or loads: teacher, paraphrasers, and the checks made before training."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from cocofast.models import (NetworkError, ScriptedNetwork, TapNotFoundError, TappedModel, create_model,
                             is_import_path, probe, unwrap_model)
from cocofast.losses import LOSSES
from cocofast.models.user import is_torchscript

from .checkpoint import CheckpointError, check_model, load_checkpoint, load_weights
from .config import ConfigError, TrainConfig
from .runtime import Runtime


TRUST_OPT_IN = "--trust_model_code={0} (or trust_model_code: [{0}] in the config)"


def trusted_code(cfg: TrainConfig) -> tuple[str, ...]:
    """The import paths the user named, which a checkpoint of this run may build: the configured teacher and
    student factories and whatever `trust_model_code` lists (cocofast.checkpoint.check_model_code)."""
    named = [cfg.teacher_model, cfg.student_model, *cfg.trust_model_code]
    return tuple(dict.fromkeys(n for n in named if is_import_path(n)))


def model_name(cfg: TrainConfig, role: str) -> str:
    return cfg.teacher_model if role == "teacher" else cfg.student_model


def seg_kwargs(cfg: TrainConfig, role: str) -> dict:
    """create_model's arguments for the teacher or the student: what a checkpoint records to rebuild it."""
    teacher = role == "teacher"
    user = dict(cfg.teacher_model_kwargs if teacher else cfg.student_model_kwargs)
    if is_import_path(model_name(cfg, role)):
        kwargs = user  # a user's factory takes only what the user gives it
    else:
        width = cfg.teacher_width if teacher else cfg.student_width
        kwargs = {"in_channels": cfg.in_channels, "num_classes": cfg.num_classes, "width": width, **user}
    taps, chain = (cfg.teacher_taps, cfg.teacher_chain) if teacher else (cfg.student_taps, cfg.student_chain)
    if taps:
        kwargs["taps"] = list(taps)
    if chain:
        kwargs["chain"] = list(chain)
    divisor = cfg.teacher_input_divisor if teacher else cfg.student_input_divisor
    if divisor:
        kwargs["input_divisor"] = divisor
    return kwargs


def build_network(cfg: TrainConfig, role: str) -> nn.Module:
    """The configured teacher or student; a bad name, import path, argument or tap path is a ConfigError."""
    try:
        return create_model(model_name(cfg, role), **seg_kwargs(cfg, role))
    except TapNotFoundError as err:
        raise ConfigError(f"config key '{role}_taps' / '{role}_chain': {err}") from None
    except (NetworkError, TypeError, ValueError) as err:
        raise ConfigError(f"config key '{role}_model' ({model_name(cfg, role)}): {err}") from None


def tap_channels(cfg: TrainConfig, model: nn.Module, role: str) -> tuple[int, int]:
    """The (shallow, deep) channel counts: declared by built-in networks, found by a dry forward otherwise."""
    inner = unwrap_model(model)
    known = inner.known_tap_channels if isinstance(inner, TappedModel) else getattr(inner, "tap_channels", None)
    if known:
        return tuple(known)
    shapes = probe(inner, cfg.in_channels, cfg.image_size)
    if shapes.shallow is None:
        raise ConfigError(f"config key '{role}_taps': the {role} ({model_name(cfg, role)}) has no taps; name "
                          f"two module paths, e.g. --{role}_taps=encoder.layer2,decoder.up1")
    return shapes.shallow[1], shapes.deep[1]


def check_networks(cfg: TrainConfig) -> None:
    """Before any stage: both networks build, take the configured input, give K-class logits at the input's
    size, and (where taps are named or built in) two taps of equal H·W; names, paths and shapes in errors."""
    taps_needed = needs_taps(cfg)
    for role in ("teacher", "student"):
        if role == "teacher" and cfg.teacher_checkpoint and is_torchscript(cfg.teacher_checkpoint):
            continue  # checked when loaded: a TorchScript teacher is whatever its file holds
        try:
            with torch.device("meta"):  # shapes only: no weights are allocated, no arithmetic is done
                net = build_network(cfg, role)
        except ConfigError:  # a factory that needs real tensors (reads weights, calls .item()): build it for real
            net = build_network(cfg, role)
        check_image_size(cfg, unwrap_model(net), role)
        try:
            shapes = probe(net, cfg.in_channels, cfg.image_size)
        except NetworkError:  # an op without a meta kernel: one real forward at the configured size
            try:
                shapes = probe(build_network(cfg, role), cfg.in_channels, cfg.image_size)
            except NetworkError as err:
                raise ConfigError(f"config key '{role}_model': {err}") from None
        check_shapes(cfg, role, shapes, net, taps_needed)


def needs_taps(cfg: TrainConfig) -> bool:
    """Whether this invocation reads the teacher's and student's taps (the paraphraser stage, tap losses)."""
    stages = set(cfg.stages())
    losses_read_taps = any(LOSSES[spec.name].reads.taps for spec in cfg.loss_specs())
    return "paraphraser" in stages or ("student" in stages and losses_read_taps)


def check_shapes(cfg: TrainConfig, role: str, shapes, net: nn.Module, taps_needed: bool) -> None:
    name, size = model_name(cfg, role), cfg.image_size
    if isinstance(net, ScriptedNetwork):
        name = f"TorchScript {net.path}"
    wanted = (1, cfg.num_classes, size, size)
    if shapes.logits != wanted:
        raise ConfigError(f"the {role} ({name}) returns logits of shape {shapes.logits} for a "
                          f"(1, {cfg.in_channels}, {size}, {size}) input; expected {wanted} (num_classes="
                          f"{cfg.num_classes}, logits at the input's size)")
    if shapes.logits_dtype is not None and not shapes.logits_dtype.is_floating_point:
        raise ConfigError(f"the {role} ({name}) returns {shapes.logits_dtype} logits; expected floating-point "
                          f"scores (integers carry no gradient, so nothing would train): return the raw "
                          f"scores, not class indices or rounded values")
    if shapes.shallow is None:
        if taps_needed and isinstance(net, ScriptedNetwork):
            raise ConfigError(f"the {role} ({name}) returns logits only, but the paraphraser stage and the "
                              f"losses {cfg.losses!r} need its taps; a TorchScript network runs in C++ where "
                              f"no module path can be tapped (--{role}_taps does not apply), so it must return "
                              f"(logits, shallow, deep) itself; logit losses alone (e.g. --losses=kd) need none")
        if taps_needed:
            raise ConfigError(f"config key '{role}_taps': the {role} ({name}) has no taps, which the "
                              f"paraphraser stage and the losses {cfg.losses!r} need; name two module paths "
                              f"(shallow, deep), e.g. --{role}_taps=down2,up1 (logit losses alone, e.g. "
                              f"--losses=kd, need none: run --stage=teacher,student,eval)")
        return
    if shapes.shallow[2] * shapes.shallow[3] != shapes.deep[2] * shapes.deep[3]:
        paths = getattr(unwrap_model(net), "tap_paths", ("shallow", "deep"))
        raise ConfigError(f"config key '{role}_taps': the {role}'s taps must share H·W (their cross-layer "
                          f"correlation pairs pixel i with pixel i), got {paths[0]} {shapes.shallow} and "
                          f"{paths[1]} {shapes.deep}")


def check_image_size(cfg: TrainConfig, model: nn.Module, role: str) -> None:
    """Fail before training, naming the key, rather than at the first forward pass."""
    divisor = getattr(model, "input_divisor", 1)
    minimum = getattr(model, "min_size", 1)
    if cfg.image_size % divisor or cfg.image_size < minimum:
        smallest = -(-max(minimum, divisor) // divisor) * divisor
        raise ConfigError(f"config key 'image_size': the {role} ({type(model).__name__}) needs sides divisible by "
                          f"{divisor}" + (f" and at least {minimum}" if minimum > 1 else "")
                          + f", got {cfg.image_size}" + (f"; the smallest is {smallest}" if cfg.image_size < smallest
                                                         else ""))


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def teacher_path(cfg: TrainConfig) -> Path:
    return Path(cfg.teacher_checkpoint or Path(cfg.run_dir) / "teacher" / "best.pt")


def paraphraser_path(cfg: TrainConfig) -> Path:
    return Path(cfg.paraphraser_checkpoint or Path(cfg.run_dir) / "paraphraser" / "best.pt")


def load_teacher(cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """From a cocofast checkpoint, a TorchScript file, or a plain state-dict of the configured teacher."""
    path = teacher_path(cfg)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint not found: {path}; run --stage teacher first "
                              f"or set --teacher_checkpoint")
    if is_torchscript(path):
        return checked_teacher(cfg, rt, scripted_teacher(cfg, path), path)
    state = plain_state_dict(path)
    if state is not None:  # the user's own training: weights of the configured teacher network
        teacher = build_network(cfg, "teacher")
        target = teacher.model if isinstance(teacher, TappedModel) else teacher  # the user's own module
        try:
            target.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: a plain state-dict that does not fit the configured teacher "
                                  f"{cfg.teacher_model}: {err}") from None
        return checked_teacher(cfg, rt, teacher, path)
    ckpt = load_checkpoint(path)
    spec = check_model(ckpt, "teacher", path, cfg.teacher_model, seg_kwargs(cfg, "teacher"))
    teacher = rebuilt(spec, "teacher", path)
    load_weights(teacher, spec, "teacher", path)
    return checked_teacher(cfg, rt, teacher, path)


def rebuilt(spec: dict, role: str, path) -> nn.Module:
    """The network of a checkpoint entry that passed model_spec's trust gate; failures name the file."""
    try:
        return create_model(spec["model_name"], **spec["model_kwargs"])
    except (NetworkError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: its {role!r} network ({spec['model_name']}) cannot be "
                              f"rebuilt: {err}") from None


def scripted_teacher(cfg: TrainConfig, path: Path) -> ScriptedNetwork:
    """A TorchScript teacher, which is a program (TorchScript runs its own code): loaded only from a path the
    user named with teacher_checkpoint, and checked to take the configured input and give what training reads."""
    if not cfg.teacher_checkpoint:
        raise CheckpointError(f"{path} is a TorchScript file: a program, which cocofast runs only when you name "
                              f"it yourself (training writes checkpoints there, never TorchScript); if you trust "
                              f"it, pass --teacher_checkpoint={path}")
    try:
        teacher = ScriptedNetwork(str(path))
    except NetworkError as err:
        raise CheckpointError(str(err)) from None
    try:
        shapes = probe(teacher, cfg.in_channels, cfg.image_size)
    except NetworkError as err:
        takes = [c for c in (1, 3, 4) if c != cfg.in_channels and takes_channels(teacher, c, cfg.image_size)]
        hint = (f"; it takes {' or '.join(map(str, takes))}-channel input, so set in_channels to match or give "
                f"a teacher made for {cfg.in_channels} channel(s)" if takes else "")
        raise CheckpointError(f"the TorchScript teacher {path} cannot take the configured input "
                              f"(in_channels={cfg.in_channels}, image_size={cfg.image_size}){hint}: {err}") from None
    check_shapes(cfg, "teacher", shapes, teacher, needs_taps(cfg))
    return teacher


def takes_channels(net: nn.Module, channels: int, size: int) -> bool:
    try:
        probe(net, channels, size)
        return True
    except NetworkError:
        return False


def checked_teacher(cfg: TrainConfig, rt: Runtime, teacher: nn.Module, path: Path) -> nn.Module:
    """The teacher frozen on the device, refused when its outputs are NaN or infinite: every distillation loss
    would refuse them at its first step, long after start-up, and nothing can be learnt from them.

    One forward under the training's autocast of an image drawn from its own generator (the training's random
    streams are left as they were), at the smallest side from 64 up that the network takes (a full-size
    teacher at 512 costs seconds on a CPU, at 64 a sixty-fourth of that), or at image_size if that fails.
    """
    teacher = frozen(teacher.to(rt.device))
    inner = unwrap_model(teacher)
    divisor, minimum = int(getattr(inner, "input_divisor", 1)), int(getattr(inner, "min_size", 1))
    side = min(cfg.image_size, -(-max(64, minimum) // divisor) * divisor)
    for size in dict.fromkeys((side, cfg.image_size)):
        image = torch.rand(1, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad(), rt.autocast():
                out = teacher(image.to(rt.device))
            break
        except Exception as err:  # the user's network (or weights) fail on a real input: name the file
            if size == cfg.image_size:
                raise CheckpointError(f"teacher {path}: a forward of a (1, {cfg.in_channels}, {size}, {size}) "
                                      f"image failed: {type(err).__name__}: {err}") from None
    named = [("logits", out.logits), ("shallow tap", out.shallow), ("deep tap", out.deep)]
    bad = [name for name, t in named if t is not None and t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        weights = [n for n, t in teacher.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
        where = (f"; its weights hold NaN or Inf in {', '.join(weights[:4])}" + (" ..." if len(weights) > 4 else "")
                 if weights else "")
        raise CheckpointError(f"teacher {path}: its {' and '.join(bad)} are NaN or infinite for a (1, "
                              f"{cfg.in_channels}, {size}, {size}) image{where}; it cannot teach anything "
                              f"(retrain it, or point --teacher_checkpoint at a sound one)")
    return teacher


def plain_state_dict(path: Path) -> dict | None:
    """The file's tensors when it is a bare {name: tensor} state-dict (not a cocofast checkpoint), else None."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # not a weights-only torch file: the checkpoint reader reports what it is
    if isinstance(obj, dict) and obj and "models" not in obj and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    return None


def paraphraser_kwargs(cfg: TrainConfig, teacher: nn.Module) -> list[dict]:
    """One paraphraser per teacher tap, k = the student's channels at the matching tap."""
    with torch.device("meta"):
        student = build_network(cfg, "student")
    pairs = zip(tap_channels(cfg, teacher, "teacher"), tap_channels(cfg, student, "student"))
    return [{"in_channels": c_t, "k": c_s} for c_t, c_s in pairs]


def load_paraphrasers(cfg: TrainConfig, rt: Runtime, teacher: nn.Module) -> nn.ModuleList:
    path = paraphraser_path(cfg)
    if not path.is_file():
        raise CheckpointError(f"paraphraser checkpoint not found: {path}; run --stage paraphraser first, "
                              f"set --paraphraser_checkpoint, or pass --use_paraphraser=false")
    ckpt = load_checkpoint(path)
    paras = nn.ModuleList()
    for i, kwargs in enumerate(paraphraser_kwargs(cfg, teacher)):
        spec = check_model(ckpt, f"paraphraser{i}", path, "paraphraser", kwargs)
        para = create_model("paraphraser", **kwargs)
        load_weights(para, spec, f"paraphraser{i}", path)
        paras.append(para)
    return frozen(paras.to(rt.device))


class ParaphraserPair(nn.Module):
    """Both taps' paraphrasers as one module, so one DDP wrapper and one optimiser cover them."""

    def __init__(self, paraphrasers: list[nn.Module]):
        super().__init__()
        self.paraphrasers = nn.ModuleList(paraphrasers)

    def forward(self, taps: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [p(t) for p, t in zip(self.paraphrasers, taps)]
