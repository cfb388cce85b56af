"""Reading cocofast checkpoints: the one reader training and the segmentation tools share.

A checkpoint is one torch.save'd dict that `torch.load(..., weights_only=True)` accepts (tensors and plain
Python values only). The part every tool reads is

    {"models": {role: {"model_name": str, "model_kwargs": dict, "state_dict": dict}}, ...}

and `create_model(model_name, **model_kwargs).load_state_dict(state_dict)` rebuilds a network from one entry.

Training also stores "checksum": a SHA-256 over every tensor's bytes and every plain value in the dict. torch's
zip reader does not check the archive's CRCs, so without it a flipped bit inside a tensor loads silently;
`read_checkpoint` recomputes the digest and refuses a mismatch. Dicts without a checksum (written by hand or by
older versions) still load; a version-1 training checkpoint says once that it cannot be verified.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT = "cocofast-checkpoint"
VERSION = 2  # 2: adds "checksum"
MODEL_FIELDS = ("model_name", "model_kwargs", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupt, or made for a different network or configuration."""


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


def model_spec(ckpt: dict, role: str, path: str | os.PathLike) -> dict:
    """The {"model_name", "model_kwargs", "state_dict"} entry of network `role`, checked for its three fields."""
    models = ckpt["models"]
    if role not in models:
        raise CheckpointError(f"checkpoint {path} holds no network for role {role!r}; roles in it: "
                              f"{', '.join(sorted(models)) or 'none'}")
    spec = models[role]
    missing = [k for k in MODEL_FIELDS if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise CheckpointError(f"checkpoint {path}: the {role!r} entry lacks {', '.join(missing)}")
    return spec


def network_digest(model_name: str, model_kwargs: dict, state_dict: dict) -> str:
    """The identity of one trained network (what it is and its weights), independent of the file holding it."""
    return content_digest({"model_name": model_name, "model_kwargs": dict(model_kwargs),
                           "state_dict": state_dict})
