"""One training process per run folder: an advisory lock on RUN_DIR/.distill.lock, held for the invocation.

Two runs writing one folder would interleave checkpoints, summaries and plots and both exit 0. The lock is
cocofast.io.lock_folder (flock, released by the kernel when the process exits or crashes; the file names the
holder), which `predict` takes on its output folder too.
"""
from __future__ import annotations

import os
from pathlib import Path

from cocofast.io import FolderInUse, FolderLock, WriteError, lock_folder, remove_stale_temporaries

from .config import ConfigError

LOCK_NAME = ".distill.lock"


def lock_run_dir(run_dir: str | os.PathLike) -> FolderLock:
    """Take the folder's lock without waiting, then clear temporaries a killed run left; ConfigError if held."""
    run_dir = Path(run_dir)
    try:
        lock = lock_folder(run_dir, LOCK_NAME)
    except WriteError as err:
        raise ConfigError(f"config key 'run_dir': {err}") from None
    except FolderInUse as err:
        raise ConfigError(f"config key 'run_dir': {run_dir} is in use by another training run ({err.holder}); "
                          f"wait for it to finish, stop it, or choose another --run_dir") from None
    for folder in [run_dir, *(p for p in run_dir.iterdir() if p.is_dir())]:
        remove_stale_temporaries(folder)  # safe now: nobody else writes here while we hold the lock
    return lock


def hold_run_dir(run_dir: str | os.PathLike, rt) -> FolderLock | None:
    """Rank 0 takes the lock (it alone writes files); every rank learns the outcome, so all stop together."""
    lock, refusal = None, None
    if rt.is_main:
        try:
            lock = lock_run_dir(run_dir)
        except ConfigError as err:
            refusal = str(err)
    refusal = rt.gather_objects(refusal)[0]
    if refusal:
        raise ConfigError(refusal)
    return lock
