"""Single-process `python train.py` launches forked from an interpreter that has already imported what they import.

Every such launch spends about 3.5 s of this 2-core machine importing torch (and, through the optimizer,
torch._dynamo), accelerate and lmdist before its first step, and the suite makes over a hundred of them. Here one
server process imports those once; each launch is a process forked from it that takes the launch's argv, folder,
environment, stdin, stdout and stderr, then runs train.py as `__main__` and exits through the interpreter's own
shutdown (threads joined, atexit handlers run). It is still a real process of its own: signals, exit codes and
files are as a spawned one's, and `returncode` is negative for a signal, as subprocess reports it.

What a forked launch cannot have is a different import: state read from the environment when torch, OpenMP or
accelerate load, or a fault injected before lmdist is imported. `conftest.launch` therefore spawns, as before,
every launch of another script (tests/faults.py) and every one whose environment differs from the server's in a
variable read at import (IMPORT_TIME_VARIABLES). The server holds no Python thread but its main one when it forks
(it checks; numpy's OpenBLAS pool is a native one, stopped and restarted around a fork by OpenBLAS itself, as for
every DataLoader worker), and it never computes, so no OpenMP pool is copied half-alive.

Protocol, one connection per launch on a Unix socket: the client sends its request as one JSON line and the
standard streams' file descriptors; the server forks a watcher, which forks the launch, writes its pid as a line,
waits for it and writes its returncode as a line.
"""
from __future__ import annotations

import array
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

# Prefixes of environment variables that torch, OpenMP, MKL, accelerate or Python read when they load: a launch
# that changes one is spawned, so that it gets what a fresh interpreter would.
IMPORT_TIME_VARIABLES = ("TORCH", "PYTORCH", "OMP_", "MKL", "KMP_", "GOMP", "OPENBLAS", "CUDA", "NCCL", "ACCELERATE",
                         "PYTHON", "LD_", "MALLOC", "TOKENIZERS")


# What train.py imports, and the torch._dynamo that its optimizer's construction imports.
PRELOADED = ("torch._dynamo", "lmdist.errors", "lmdist.config", "lmdist.run", "lmdist.stopping")


def serve(socket_path: str) -> None:
    for name in PRELOADED:
        importlib.import_module(name)
    if threading.active_count() != 1:
        raise SystemExit(f"prewarmed: the imports started threads ({threading.enumerate()}); forked launches would "
                         "hold them dead")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(8)
    listener.settimeout(1.0)  # to reap finished watchers now and then
    print("ready", flush=True)
    while True:
        try:
            _reap()
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        connection.settimeout(None)
        request, fds = _receive(connection)
        if os.fork() == 0:  # the watcher
            listener.close()
            pid = os.fork()
            if pid == 0:  # the launch: from here on, the interpreter is train.py's
                connection.close()
                _become_launch(request, fds)
                return  # the script's end (or SystemExit, or its traceback) ends this process as `python train.py`'s
            try:
                for fd in fds:
                    os.close(fd)
                connection.sendall(f"{pid}\n".encode())
                _, status = os.waitpid(pid, 0)
                connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            finally:  # a client gone (timed out) is no error of the server's
                os._exit(0)
        connection.close()
        for fd in fds:
            os.close(fd)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancillary, _, _ = connection.recvmsg(1 << 20, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    while not data.endswith(b"\n"):
        data += connection.recv(1 << 20)
    return json.loads(data), list(fds)


def _become_launch(request: dict, fds: list[int]) -> None:
    for target, fd in enumerate(fds):  # stdin, stdout, stderr
        os.dup2(fd, target)
        os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(script)  # as `python script` sets it
    import runpy

    runpy.run_path(script, run_name="__main__")


class Server:
    """The server process of one test session, started on first use."""

    def __init__(self, folder: Path, env: dict):
        self.socket_path = str(folder / "prewarmed.sock")
        self.env = env
        self.process = subprocess.Popen([sys.executable, "-m", "tests.prewarmed", self.socket_path], env=env,
                                        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"tests/prewarmed.py did not start: {line!r}")

    def serves(self, env: dict) -> bool:
        """Whether a launch under `env` gets, forked from this server, what a fresh interpreter would give it."""
        changed = {name for name in env.keys() | self.env.keys() if env.get(name) != self.env.get(name)}
        return not any(name.startswith(IMPORT_TIME_VARIABLES) for name in changed)

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """Like subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)."""
        import tempfile

        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull) as stdin, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(self.socket_path)
            request = json.dumps({"argv": [str(a) for a in argv[1:]], "cwd": str(cwd), "env": env}) + "\n"
            descriptors = array.array("i", [stdin.fileno(), out.fileno(), err.fileno()])
            connection.sendmsg([request.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, descriptors)])
            replies = connection.makefile()
            pid = int(replies.readline())
            connection.settimeout(timeout)
            try:
                returncode = int(replies.readline())
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(argv, timeout, _read(out), _read(err)) from None
            return subprocess.CompletedProcess(argv, returncode, _read(out), _read(err))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def _read(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


if __name__ == "__main__":
    serve(sys.argv[1])
