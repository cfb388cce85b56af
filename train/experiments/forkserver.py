"""Training processes forked from one that has already imported the training program.

A run of the experiment tables is a fresh `python -m cocofast.train.distill` process, and a fresh process
pays, before its first epoch, for the interpreter, torch and cocofast imports and the lazy imports torch makes
on first use (the meta-device shape check pulls in its decompositions and sympy): 10-20 s of a 1-2 minute run
on the development machine. The server here pays that once: it imports the training program, touches those
lazy paths, and then forks one child per run; the child redirects its output, calls the training program's
own `main(argv)` and exits with its status. Each child is still its own process, with its own seeding from
the run's configuration (tests/test_experiments_forkserver.py: the same weights as a fresh process).

The server is single-threaded (forking a threaded process can copy a held lock); the runner's threads talk
to it over two pipes, one line of JSON per request and per exit status. Its own output and that of a child
without a log go where the runner's go.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path


class ForkServer:
    """The runner's side: start the server, ask for runs from any thread, wait for their exit status."""

    def __init__(self):
        replies_read, replies_write = os.pipe()
        self._process = subprocess.Popen([sys.executable, "-m", "cocofast.train.experiments.forkserver",
                                          str(replies_write)], stdin=subprocess.PIPE, pass_fds=[replies_write])
        os.close(replies_write)
        self._replies = os.fdopen(replies_read, "r")
        ready = self._replies.readline()
        if ready.strip() != "ready":
            raise RuntimeError("the fork server did not start; see its output above")
        self._lock, self._next, self._waiting = threading.Lock(), 0, {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def run(self, argv: list[str], log: Path | None) -> int:
        """Run the training program with `argv` in a forked child (its output to `log`, else to this
        process's stdout and stderr); returns its exit status."""
        future: Future = Future()
        request = {"argv": argv, "cwd": os.getcwd(), "log": None if log is None else str(log)}
        with self._lock:
            self._next += 1
            request["id"] = self._next
            self._waiting[self._next] = future
            self._process.stdin.write((json.dumps(request) + "\n").encode())
            self._process.stdin.flush()
        return future.result()

    def _read(self) -> None:
        for line in self._replies:
            reply = json.loads(line)
            with self._lock:
                future = self._waiting.pop(reply["id"])
            future.set_result(reply["status"])
        with self._lock:  # the server died: every run still waiting failed
            for future in self._waiting.values():
                future.set_result(-1)
            self._waiting.clear()

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait()


def _child(request: dict) -> None:
    """In the forked child: the run's output to its log, then the training program; never returns."""
    status = 1
    try:
        os.chdir(request["cwd"])
        if request["log"] is not None:
            Path(request["log"]).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        from cocofast.train.distill import main
        sys.argv = ["distill.py", *request["argv"]]
        status = main(request["argv"])
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def warm_up() -> None:
    """What every training process would otherwise import on its own, the lazy parts included."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (curves.png)
    import torch

    import cocofast.train.distill  # noqa: F401
    with torch.device("meta"):  # the shape check's path: meta kernels load torch's decompositions
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
        net(torch.empty(1, 3, 8, 8))


def serve(replies_fd: int) -> None:
    warm_up()
    replies = os.fdopen(replies_fd, "w", buffering=1)
    replies.write("ready\n")
    children: dict[int, int] = {}  # pid -> request id
    pending, open_input = b"", True
    while open_input or children:
        readable, _, _ = select.select([0] if open_input else [], [], [], 0.05)
        if readable:
            data = os.read(0, 65536)
            open_input = bool(data)
            pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                replies.close()
                _child(request)
            children[pid] = request["id"]
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            replies.write(json.dumps({"id": children.pop(pid), "status": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]))
