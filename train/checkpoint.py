"""Checkpoints: one torch.save'd dict, written atomically, loadable with `weights_only=True`.

Layout (shared with cocofast's segmentation tools, which read only "models"):

    {"format": "cocofast-checkpoint", "version": 1, "stage": "student",
     "models": {role: {"model_name": str, "model_kwargs": dict, "state_dict": dict}},
     "optimizers": {role: state_dict}, "schedulers": {role: dict}, "scaler": dict | None,
     "epoch": int, "batch_in_epoch": int, "iteration": int, "finished": bool,
     "rng": [per-rank dict of tensors / plain values], "config": dict, "history": [per-epoch dict],
     "meters": dict, "best_score": float | None}

Everything in it is a tensor or a plain Python value, because `weights_only=True` loading refuses anything else
(numpy arrays and the tuples inside RNG states are converted to tensors and lists here).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cocofast.io import atomic_save

FORMAT = "cocofast-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or made for a different network or configuration."""


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def model_entry(model_name: str, model_kwargs: dict, module: nn.Module) -> dict:
    return {"model_name": model_name, "model_kwargs": dict(model_kwargs),
            "state_dict": unwrap(module).state_dict()}


# --- RNG states as tensors and plain values --------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- save / load -----------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, **content: Any) -> None:
    atomic_save({"format": FORMAT, "version": VERSION, **content}, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean the same to the user
        raise CheckpointError(f"cannot read checkpoint {path} (weights_only=True): {err}") from None
    if not isinstance(ckpt, dict) or "models" not in ckpt:
        raise CheckpointError(f"{path} is not a cocofast checkpoint (no 'models' entry)")
    return ckpt


def model_spec(ckpt: dict, role: str, path: str | os.PathLike) -> dict:
    if role not in ckpt["models"]:
        raise CheckpointError(f"checkpoint {path} holds no '{role}' model; it has {sorted(ckpt['models'])}")
    return ckpt["models"][role]


def check_model(ckpt: dict, role: str, path, model_name: str, model_kwargs: dict) -> dict:
    """Refuse a checkpoint whose `role` network differs from the one the configuration asks for."""
    spec = model_spec(ckpt, role, path)
    found = (spec["model_name"], dict(spec["model_kwargs"]))
    wanted = (model_name, dict(model_kwargs))
    if found != wanted:
        raise CheckpointError(
            f"checkpoint {path}: its '{role}' is {found[0]}({_kw(found[1])}), but this configuration needs "
            f"{wanted[0]}({_kw(wanted[1])}); point to a matching checkpoint or change the configuration")
    return spec


def load_weights(module: nn.Module, spec: dict, role: str, path) -> None:
    try:
        unwrap(module).load_state_dict(spec["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: the '{role}' weights do not fit "
                              f"{spec['model_name']}({_kw(spec['model_kwargs'])}): {err}") from None


def check_config(saved: dict, wanted: dict, path) -> None:
    """Refuse to resume when a setting the checkpoint depends on has changed."""
    changed = [f"{k}: checkpoint has {saved.get(k, '<absent>')!r}, now {v!r}"
               for k, v in wanted.items() if saved.get(k, v) != v]
    if changed:
        raise CheckpointError(f"cannot resume from {path}: the configuration differs in "
                              + "; ".join(changed) + " (use --overwrite to start this stage afresh)")


def _kw(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
