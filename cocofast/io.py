"""Crash-safe file writes: a reader never sees a half-written checkpoint, CSV or image.

Each file is written to a hidden temporary beside it (".NAME.XXXX.tmp"), flushed to disk, given the mode a
plain open() would have given it (mkstemp makes 0600 files), and renamed over the target; the folder is then
synced so the rename itself survives a power cut. A kill can still leave a hidden temporary behind;
`remove_stale_temporaries` clears them once the writer owns the folder (`lock_folder`: training holds one on
its run folder, `predict` on its output folder).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

TEMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written (disk full, quota, permissions); the message names the file."""


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    An OSError while writing (ENOSPC, EFBIG, EDQUOT, ...) comes out as a WriteError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
    except OSError as err:
        raise WriteError(f"could not write {path}: {err.strerror or err}") from None
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(f"could not write {path} (disk full?): {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save that leaves either the old file or the complete new one, never a torn one."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            # torch's zip writer reports a failed write as RuntimeError ("unexpected pos ...",
            # "PytorchStreamWriter failed writing file ..."), not as OSError.
            raise WriteError(f"could not write {path} (disk full?): {err}") from None


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporaries a killed writer left in `folder`; only safe while no one else writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --- one writer per folder -------------------------------------------------------------------------------
class FolderInUse(OSError):
    """Another process holds the folder's lock; `holder` says who (pid, host, start time, command)."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use by another process ({holder})")
        self.folder, self.holder = folder, holder


class FolderLock:
    """A held `lock_folder` lock; `release()` (or leaving the `with` block) lets the next writer in."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock; the file stays for the next holder
            self.fd = -1

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike, name: str) -> FolderLock:
    """Take an advisory flock on FOLDER/NAME without waiting; FolderInUse when another process holds it,
    WriteError when the lock file cannot be created.

    Two writers in one folder would interleave their files and both succeed. flock is tied to the open file,
    so the kernel releases it when the holder exits or is killed: no stale lock survives a crash. The file
    keeps the holder's pid, host and command, so a refused writer can say who holds the folder.
    """
    folder = Path(folder)
    path = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise WriteError(f"cannot create {path}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError when held; other errors (e.g. no lock support) are refusals too
        holder = describe_holder(os.pread(fd, 65536, 0))
        os.close(fd)
        raise FolderInUse(folder, holder) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([sys.executable, *sys.argv])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return FolderLock(fd, path)


def describe_holder(raw: bytes) -> str:
    try:
        record = json.loads(raw.decode())
        return (f"pid {record['pid']} on host {record['host']}, started {record['started']}: "
                f"{record['command']}")
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MiB blocks so a large file never sits in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
