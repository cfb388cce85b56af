"""Reading cocofast checkpoints: the one reader training and the segmentation tools share.

A checkpoint is one torch.save'd dict that `torch.load(..., weights_only=True)` accepts (tensors and plain
Python values only). The part every tool reads is

    {"models": {role: {"model_name": str, "model_kwargs": dict, "state_dict": dict}}, ...}

and `create_model(model_name, **model_kwargs).load_state_dict(state_dict)` rebuilds a network from one entry.

Training also stores "checksum": a SHA-256 over every tensor's bytes and every plain value in the dict. torch's
zip reader does not check the archive's CRCs, so without it a flipped bit inside a tensor loads silently;
`read_checkpoint` recomputes the digest and refuses a mismatch. Dicts without a checksum (written by hand or by
older versions) still load; a version-1 training checkpoint says once that it cannot be verified.

A checkpoint is data, never code: `model_spec` refuses an entry whose `model_name` is an import path
("package.module:factory") unless the caller says the user named that very path (`trusted`), so reading a file
never imports or calls anything on the file's say-so. Registered names build only cocofast's own networks.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Collection

import torch

from cocofast.models import is_import_path

FORMAT = "cocofast-checkpoint"
VERSION = 2  # 2: adds "checksum"
MODEL_FIELDS = ("model_name", "model_kwargs", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupt, or made for a different network or configuration."""


class UntrustedCodeError(CheckpointError):
    """A file that names code (an import path) the user has not named: building it would import and run it."""


TRUST_FLAG = "--trust-model-code={}"  # how a command-line user opts in; {} is the import path


# --- content digest --------------------------------------------------------------------------------------
def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of a checkpoint's content: tensors by dtype, shape and bytes, plain values by type and repr.

    It depends only on what torch.load gives back, so it is the same before saving and after loading, on any
    device (tensors are hashed from a CPU copy) and whatever the dict order.
    """
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):  # pickling keeps the kind, but a tuple and a list mean the same here
        digest.update(f"L{len(obj)}:".encode())
        for item in obj:
            _feed(digest, item)
    else:
        text = repr(obj)
        digest.update(f"V{type(obj).__name__}{len(text)}:{text}".encode())


def with_checksum(content: dict) -> dict:
    """`content` plus its "checksum" entry, ready for torch.save."""
    body = {k: v for k, v in content.items() if k != "checksum"}
    return {**body, "checksum": {"algorithm": "sha256", "digest": content_digest(body)}}


def verify_checksum(ckpt: dict, path: str | os.PathLike) -> bool:
    """True when `ckpt` carries a checksum and it matches; False when it has none; CheckpointError otherwise."""
    stored = ckpt.get("checksum")
    if stored is None:
        if ckpt.get("format") == FORMAT and ckpt.get("version", 1) < 2:
            warnings.warn(f"{path}: a version-1 checkpoint without a checksum; its contents cannot be verified",
                          stacklevel=3)
        return False
    if not isinstance(stored, dict) or stored.get("algorithm") != "sha256" or "digest" not in stored:
        raise CheckpointError(f"checkpoint {path}: malformed 'checksum' entry {stored!r}")
    found = content_digest({k: v for k, v in ckpt.items() if k != "checksum"})
    if found != stored["digest"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its content's sha256 is {found[:16]}…, the one "
                              f"stored when it was written is {stored['digest'][:16]}…; restore it from a copy or "
                              f"start the stage afresh with --overwrite")
    return True


# --- reading ---------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict at `path`, loaded on the CPU with weights_only=True and its checksum verified."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean the same to the user
        raise CheckpointError(f"cannot read checkpoint {path} (weights_only=True): "
                              f"{type(err).__name__}: {err}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("models"), dict):
        raise CheckpointError(f"{path} is not a cocofast checkpoint (no 'models' mapping of role -> network)")
    verify_checksum(ckpt, path)
    return ckpt


def check_model_code(model_name: str, trusted: Collection[str], source: str, opt_in: str = TRUST_FLAG) -> None:
    """The one gate between a file and an import: an import path named by `source` (a checkpoint, a weights
    file) is refused unless it is in `trusted`, the import paths the user named themselves; `opt_in` says how
    to name one ({} is the path).

    Called before anything is imported; registered names pass (they build cocofast's own networks only).
    """
    if not is_import_path(model_name) or model_name in set(trusted):
        return
    raise UntrustedCodeError(
        f"{source} names the network {model_name!r}, an import path: building it would import and call that "
        f"code, and a file never runs code on its own. If you wrote or trust this factory, name it yourself: "
        f"{opt_in.format(model_name)}")


def trusted_paths(values) -> tuple[str, ...]:
    """The import paths a repeatable, comma-separated --trust-model-code flag names (None: none)."""
    return tuple(p.strip() for value in values or () for p in str(value).split(",") if p.strip())


TRUST_HELP = ("an import path 'package.module:factory' you trust: a checkpoint whose network is built by it may "
              "import and call it (repeatable or comma-separated; without it such a checkpoint is refused, because "
              "a file never runs code on its own)")


def model_spec(ckpt: dict, role: str, path: str | os.PathLike, trusted: Collection[str] = (),
               opt_in: str = TRUST_FLAG) -> dict:
    """The {"model_name", "model_kwargs", "state_dict"} entry of network `role`, checked for its three fields
    and passed through `check_model_code`: an import path must be one of `trusted` (see the module doc)."""
    models = ckpt["models"]
    if role not in models:
        raise CheckpointError(f"checkpoint {path} holds no network for role {role!r}; roles in it: "
                              f"{', '.join(sorted(map(str, models))) or 'none'}")
    spec = models[role]
    missing = [k for k in MODEL_FIELDS if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise CheckpointError(f"checkpoint {path}: the {role!r} entry lacks {', '.join(missing)}")
    name, kwargs = spec["model_name"], spec["model_kwargs"]
    if not isinstance(name, str) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"checkpoint {path}: the {role!r} entry's model_name must be a string and its "
                              f"model_kwargs a mapping of names, got {type(name).__name__} and "
                              f"{type(kwargs).__name__}")
    if not isinstance(spec["state_dict"], dict):
        raise CheckpointError(f"checkpoint {path}: the {role!r} entry's state_dict is a "
                              f"{type(spec['state_dict']).__name__}, not a mapping of tensors")
    check_model_code(name, trusted, f"checkpoint {path} (role {role!r})", opt_in)
    return spec


def network_digest(model_name: str, model_kwargs: dict, state_dict: dict) -> str:
    """The identity of one trained network (what it is and its weights), independent of the file holding it."""
    return content_digest({"model_name": model_name, "model_kwargs": dict(model_kwargs),
                           "state_dict": state_dict})
