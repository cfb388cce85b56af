"""One training process per run folder: an advisory lock on RUN_DIR/.distill.lock, held for the invocation.

Two runs writing one folder would interleave checkpoints, summaries and plots and both exit 0. flock is tied
to the open file, so the kernel releases it when the process exits or crashes: no stale lock survives a kill.
The file keeps the holder's pid, host and command so the refused run can say who holds the folder.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from cocofast.io import remove_stale_temporaries

from .config import ConfigError

LOCK_NAME = ".distill.lock"


class RunDirLock:
    """The held lock; `release()` (or leaving the `with` block) lets the next run in."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock; the file stays for the next holder
            self.fd = -1

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str | os.PathLike) -> RunDirLock:
    """Take the folder's lock without waiting, then clear temporaries a killed run left; ConfigError if held."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise ConfigError(f"config key 'run_dir': cannot create {path}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError when held; other errors (e.g. no lock support) are refusals too
        holder = describe_holder(os.pread(fd, 65536, 0))
        os.close(fd)
        raise ConfigError(f"config key 'run_dir': {run_dir} is in use by another training run ({holder}); wait "
                          f"for it to finish, stop it, or choose another --run_dir") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([sys.executable, *sys.argv])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    for folder in [run_dir, *(p for p in run_dir.iterdir() if p.is_dir())]:
        remove_stale_temporaries(folder)  # safe now: nobody else writes here while we hold the lock
    return RunDirLock(fd, path)


def describe_holder(raw: bytes) -> str:
    try:
        record = json.loads(raw.decode())
        return (f"pid {record['pid']} on host {record['host']}, started {record['started']}: "
                f"{record['command']}")
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def hold_run_dir(run_dir: str | os.PathLike, rt) -> RunDirLock | None:
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
