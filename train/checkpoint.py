"""Training checkpoints: one torch.save'd dict, written atomically, loadable with `weights_only=True`.

Layout (shared with cocofast's segmentation tools, which read only "models"; cocofast/checkpoint.py reads it):

    {"format": "cocofast-checkpoint", "version": 2, "stage": "student", "run_id": str,
     "models": {role: {"model_name": str, "model_kwargs": dict, "state_dict": dict}},
     "optimizers": {role: state_dict}, "schedulers": {role: dict}, "scaler": dict | None,
     "epoch": int, "batch_in_epoch": int, "iteration": int, "finished": bool, "best_epoch": int | None,
     "per_rank": [{"rng": dict, "meters": dict}], "config": dict, "history": [per-epoch dict],
     "best_score": float | None, "sources": {role: network digest}, "checksum": {"algorithm", "digest"}}

Everything in it is a tensor or a plain Python value, because `weights_only=True` loading refuses anything else
(numpy arrays and the tuples inside RNG states are converted to tensors and lists here). "sources" records the
networks a stage was trained from (the teacher, the paraphrasers), so a resume against different ones is refused.
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cocofast.checkpoint import (FORMAT, VERSION, CheckpointError, model_spec, network_digest, read_checkpoint,
                                 with_checksum)
from cocofast.io import atomic_save
from cocofast.models import unwrap_model

__all__ = ["FORMAT", "VERSION", "CheckpointError", "capture_rng", "check_config", "check_model", "check_sources",
           "load_checkpoint", "load_weights", "model_entry", "model_spec", "restore_rng", "save_checkpoint",
           "source_digests"]


def model_entry(model_name: str, model_kwargs: dict, module: nn.Module) -> dict:
    return {"model_name": model_name, "model_kwargs": dict(model_kwargs),
            "state_dict": unwrap_model(module).state_dict()}


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
    atomic_save(with_checksum({"format": FORMAT, "version": VERSION, **content}), path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """On the CPU (RNG states must stay CPU tensors; weights are copied onto the device by load_state_dict)."""
    return read_checkpoint(path)


def check_model(ckpt: dict, role: str, path, model_name: str, model_kwargs: dict) -> dict:
    """Refuse a checkpoint whose `role` network differs from the one the configuration asks for.

    Only the configured network may be built from it, so the configured import path is the one trusted.
    """
    opt_in = f"--{role}_model={{}}" if role in ("teacher", "student") else "--trust_model_code={}"
    spec = model_spec(ckpt, role, path, trusted=(model_name,), opt_in=opt_in)
    found = (spec["model_name"], dict(spec["model_kwargs"]))
    wanted = (model_name, dict(model_kwargs))
    if found != wanted:
        raise CheckpointError(
            f"checkpoint {path}: its '{role}' is {found[0]}({_kw(found[1])}), but this configuration needs "
            f"{wanted[0]}({_kw(wanted[1])}); point to a matching checkpoint or change the configuration")
    return spec


def load_weights(module: nn.Module, spec: dict, role: str, path) -> None:
    try:
        unwrap_model(module).load_state_dict(spec["state_dict"])
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


# --- what a stage was trained from ------------------------------------------------------------------------
def source_digests(**networks: nn.Module | nn.ModuleList | None) -> dict[str, str]:
    """{role: digest} of the frozen networks a stage learns from, e.g. source_digests(teacher=t, paraphraser=p).

    A ModuleList contributes one entry per member (paraphraser0, paraphraser1, ...); None is left out. Each
    module must come from create_model, which records the model_name and model_kwargs the digest covers.
    """
    found: dict[str, str] = {}
    for role, net in networks.items():
        if net is None:
            continue
        members = {f"{role}{i}": m for i, m in enumerate(net)} if isinstance(net, nn.ModuleList) else {role: net}
        for name, module in members.items():
            module = unwrap_model(module)
            found[name] = network_digest(module.model_name, module.model_kwargs, module.state_dict())
    return found


def check_sources(saved: dict[str, str] | None, current: dict[str, str], path, finished: bool = False) -> None:
    """Refuse to resume a stage against different teacher/paraphraser weights than it was trained from.

    A checkpoint from before sources were recorded cannot be checked: an unfinished one is refused (training
    would go on against networks nobody can compare), a finished one, which is only skipped, gets a warning.
    """
    if saved is None:
        if current and finished:
            warnings.warn(f"{path} does not record which {', '.join(current)} it was trained from (an older "
                          f"checkpoint); it is kept as finished without that check", stacklevel=2)
        elif current:
            raise CheckpointError(f"cannot resume from {path}: it does not record which {', '.join(current)} "
                                  f"it was trained from, so a change of them could not be noticed (written by an "
                                  f"older version; use --overwrite to start this stage afresh)")
        return
    roles = sorted(set(saved) | set(current))
    changed = [f"{role}: checkpoint was trained from {saved.get(role, '<none>')[:12]}, "
               f"now {current.get(role, '<none>')[:12]}" for role in roles if saved.get(role) != current.get(role)]
    if changed:
        raise CheckpointError(f"cannot resume from {path}: it was trained from other networks than the ones "
                              "given now (" + "; ".join(changed) + "); point --teacher_checkpoint / "
                              "--paraphraser_checkpoint to the ones it used, or use --overwrite")


def _kw(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
