"""Launches forked from an interpreter that has already imported what they import.

Every `python train.py` spends about 3.5 s of this 2-core machine importing torch (and, through the optimizer,
torch._dynamo), accelerate and lmdist before its first step; a 2-rank torchrun launch pays it three times (the
launcher and each worker). The suite makes hundreds of them. Here one server process imports those once, and each
launch is a process forked from it that takes the launch's argv, folder, environment, stdin, stdout and stderr,
then runs train.py (or torchrun's, or `accelerate launch`'s module) as `__main__` and exits through the
interpreter's own shutdown (threads joined, atexit handlers run).

How a launch reaches the server: `conftest.launch_env()` puts tests/prewarmed_hook/ first on PYTHONPATH and this
server's socket in LMDIST_PREWARMED_SOCKET. Every Python process started with that environment (the test's
`python train.py`, `python -m torch.distributed.run ...`, and the `python -u train.py` workers those launchers
start) imports the hook's sitecustomize.py before its script. The hook sends its request and its three standard
file descriptors; if the server serves it, the hook's process stays as the launch's stand-in: it forwards the
signals it gets (SIGTERM, SIGINT, SIGUSR1, ...) to the forked launch and exits as the launch did (by the same
signal, if one killed it), and if it is SIGKILLed, the launch is SIGKILLed too. If the server declines, or is not
there, the interpreter carries on and runs the script itself, as it would without the hook.

What a forked launch cannot have, and what the server therefore declines or carries over:
- a different import: state read from the environment when torch, OpenMP, accelerate or Python load, or a fault
  injected before lmdist is imported. The server declines any script but train.py and any module but the two
  launchers, and any launch whose environment differs from its own in a variable not known to be read only at run
  time (RUNTIME_VARIABLES: the ranks and ports torchrun sets, ACCELERATE_*, FSDP_*, WANDB_*, ...; accelerate reads
  HF_HOME and XDG_CACHE_HOME at import, so those are declined). It applies two itself: OMP_NUM_THREADS, which the
  launchers set for their workers, through torch.set_num_threads; and PYTHONPATH, whose entries must be the
  server's plus the hook's.
- the process's own state: its umask, signal mask and ignored signals are carried over; another CPU affinity, nice
  value or resource limit is declined.
- its place in the process tree: the launch is the grandchild of the server, not the child of the process its
  launcher started, and /proc/<its parent>/cmdline is the server's. A test that looks for a launch's children or
  parent, stops it with SIGSTOP, or needs its death at the instant of a SIGKILL asks for
  `launch_env(prewarmed=False)`.
- a string hash secret and numpy global RandomState of its own: every forked process shares the server's, so two
  ranks iterate a set of strings in the same order where fresh ones might not. `LMDIST_TEST_SPAWN=1` runs the
  suite with every launch spawned, which would show a rank disagreement hidden that way.

The server holds no Python thread but its main one when it forks (it checks; numpy's OpenBLAS pool is a native
one, stopped and restarted around a fork by OpenBLAS itself, as for every DataLoader worker), and it never
computes, so no OpenMP pool is copied half-alive.

Protocol, one connection per launch on a Unix socket: the hook sends its request as one JSON line and the standard
streams' file descriptors; the server answers `declined: <why>`, or forks a watcher, which forks the launch and
sends its pid as a line with a pidfd of it (the hook signals the launch through the pidfd, so never another
process that reuses the pid), waits for it and writes its returncode (negative for a signal) as a line. If the
hook's process goes away first (SIGKILLed), the watcher SIGKILLs the launch. Each answer is also appended to
served.log beside the socket.
"""
from __future__ import annotations

import array
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "tests" / "prewarmed_hook"  # its sitecustomize.py is the client
SOCKET_VARIABLE = "LMDIST_PREWARMED_SOCKET"

# Variables a launch's environment may hold otherwise than the server's: each is read at run time, not at import.
# Torch's inductor, compiling in the test process, sets the last two there: Intel OpenMP's duplicate check (torch's
# Linux CPU build loads GNU OpenMP) and a pointer each compiled module's loading sets afresh.
RUNTIME_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "TORCH_NCCL_ASYNC_ERROR_HANDLING", "PATH", "PYTEST_CURRENT_TEST", SOCKET_VARIABLE,
                     "KMP_DUPLICATE_LIB_OK", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR")
RUNTIME_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "FSDP_", "WANDB_", "LMDIST_", "SLURM_", "MLFLOW_")
APPLIED_VARIABLES = ("OMP_NUM_THREADS", "PYTHONPATH")
# Modules that read the variables above at import: the server must not have imported them.
NOT_PRELOADED = ("wandb", "mlflow", "datasets", "transformers", "huggingface_hub")
SCRIPTS = (str(REPO / "train.py"),)
MODULES = ("torch.distributed.run", "accelerate.commands.launch")

# What train.py imports, the torch._dynamo that its optimizer's construction imports, and the launchers.
PRELOADED = ("torch._dynamo", "torch.distributed.run", "accelerate.commands.launch", "lmdist.errors",
             "lmdist.config", "lmdist.run", "lmdist.stopping")


def serve(socket_path: str) -> None:
    environ = dict(os.environ)  # what launches are compared with: the imports below may add to os.environ
    for name in PRELOADED:
        importlib.import_module(name)
    # What the imports set (TORCHINDUCTOR_CACHE_DIR, their default for it) a launch may hold or not: a fresh one
    # sets it the same way when it imports them, and one started by a process that had imported them inherits it.
    imports_set = {k: v for k, v in os.environ.items() if k not in environ}
    if threading.active_count() != 1:
        raise SystemExit(f"prewarmed: the imports started threads ({threading.enumerate()}); forked launches would "
                         "hold them dead")
    if imported := [name for name in NOT_PRELOADED if name in sys.modules]:
        raise SystemExit(f"prewarmed: the imports loaded {imported}, which read variables launches may change")
    own = _client().process_state()
    pythonpath = _entries(environ.get("PYTHONPATH", ""), os.getcwd())
    site_path = [entry for entry in sys.path[1:] if entry not in pythonpath]  # the interpreter's own part
    log = open(Path(socket_path).parent / "served.log", "a", buffering=1)  # noqa: SIM115 (open for the server's life)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)
    listener.settimeout(1.0)  # to reap finished watchers, and to notice a session gone, now and then
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # pytest killed without its teardown: do not outlive it
        try:
            _reap()
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        fds: list[int] = []
        try:
            connection.settimeout(10)
            request, fds = _receive(connection)
            declined = _declined(request, environ, imports_set, own, pythonpath)
            log.write(f"{'declined: ' + declined if declined else 'served'}\t{' '.join(request['argv'])}\n")
            if declined:
                connection.sendall(f"declined: {declined}\n".encode())
        except (OSError, ValueError, KeyError) as e:  # a client gone or garbled: nothing of it runs
            declined = f"bad request: {e!r}"
            log.write(f"{declined}\n")
        if not declined and os.fork() == 0:  # the watcher
            _watcher(request, fds, connection, (listener, log), site_path)
            return  # only the launch gets here, at its script's end (or SystemExit, or its traceback)
        connection.close()
        for fd in fds:
            os.close(fd)


def _watcher(request: dict, fds: list[int], connection: socket.socket, server_files: tuple, site_path: list[str]):
    """Fork the launch and watch it for the client; returns in the launch only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the launch through its stand-in, not here
    connection.settimeout(None)
    for file in server_files:
        file.close()
    pid = os.fork()
    if pid == 0:  # the launch: from here on, the interpreter is the script's
        connection.close()
        _become_launch(request, fds, site_path)
        return
    try:
        for fd in fds:
            os.close(fd)
        _watch(pid, connection)
    finally:
        os._exit(0)


def _declined(request: dict, environ: dict, imports_set: dict, own: dict, pythonpath: list[str]) -> str | None:
    """Why a fresh interpreter would run `request` otherwise than a fork of this one, or None."""
    if request["executable"] != sys.executable:
        return f"another interpreter ({request['executable']})"
    flags, target = _split(request["argv"])
    if set(flags) - {"-u"}:  # -u matches, as PYTHONUNBUFFERED must (it is compared below)
        return f"interpreter options {flags}"
    if target[0] == "-m":
        if target[1:2] not in [[module] for module in MODULES]:
            return "not a served module"
    elif os.path.realpath(os.path.join(request["cwd"], target[0])) not in SCRIPTS:
        return "not a served script"
    env = request["env"]
    changed = {name for name in env.keys() | environ.keys() if env.get(name) != environ.get(name)
               and not (name in imports_set and env.get(name) in (None, imports_set[name]))}
    changed = sorted(name for name in changed - {*RUNTIME_VARIABLES, *APPLIED_VARIABLES}
                     if not name.startswith(RUNTIME_PREFIXES))
    if changed:
        return f"variables that may be read at import differ: {changed}"
    if not _threads_applicable(env.get("OMP_NUM_THREADS"), environ):
        return f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}, which set_num_threads cannot give"
    extra = [e for e in _entries(env.get("PYTHONPATH", ""), request["cwd"]) if e != str(HOOK)]
    if extra != pythonpath:
        return f"PYTHONPATH {extra} instead of {pythonpath}: modules it could shadow are imported already"
    if differing := [name for name in ("affinity", "nice", "limits") if request["state"][name] != own[name]]:
        return f"process state differs: {differing}"
    return None


def _threads_applicable(threads: str | None, environ: dict) -> bool:
    """Whether set_num_threads gives a launch what OpenMP would read from OMP_NUM_THREADS=`threads` at load."""
    if threads is None:
        return "OMP_NUM_THREADS" not in environ  # the default, as the server's
    return threads.isdigit() and int(threads) > 0


def _client():
    """The hook's module, under a name that does not hand this process over."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prewarmed_client", HOOK / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """python's arguments as (interpreter options, [script, ...] or ["-m", module, ...])."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        i += 1
    return argv[:i], argv[i:] or [""]


def _entries(pythonpath: str, cwd: str) -> list[str]:
    return [os.path.normpath(os.path.join(cwd, entry)) for entry in pythonpath.split(os.pathsep) if entry]


def _watch(pid: int, connection: socket.socket) -> None:
    """Tell the client the launch's pid (with a pidfd), then its returncode; SIGKILL it if the client goes first."""
    pidfd = os.pidfd_open(pid)
    try:
        connection.sendmsg([f"{pid}\n".encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
        while True:
            readable, _, _ = select.select([pidfd, connection], [], [])
            if pidfd in readable:
                break
            if not connection.recv(1):
                raise ConnectionResetError
    except OSError:  # the client is gone (or going): so is its launch, which nobody would wait for
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())


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
    try:
        while not data.endswith(b"\n"):
            more = connection.recv(1 << 20)
            if not more:
                raise ConnectionResetError("the client closed before its request's end")
            data += more
        return json.loads(data), list(fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _become_launch(request: dict, fds: list[int], site_path: list[str]) -> None:
    import runpy

    import torch

    for target, fd in enumerate(fds):  # stdin, stdout, stderr
        os.dup2(fd, target)
        os.close(fd)
    state = request["state"]
    os.umask(state["umask"])
    for signum in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}:
        if signum in state["ignored"]:
            signal.signal(signum, signal.SIG_IGN)
        elif signal.getsignal(signum) == signal.SIG_IGN and signum not in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)  # (Python ignores SIGPIPE and SIGXFSZ itself)
    if signal.SIGINT not in state["ignored"]:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, state["blocked"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in os.environ:  # what OpenMP would have read at load
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    _, target = _split(request["argv"])
    sys.orig_argv = [request["executable"], *request["argv"]]
    pythonpath = _entries(os.environ.get("PYTHONPATH", ""), os.getcwd())
    if target[0] == "-m":  # as `python -m module args` runs it
        sys.path[:] = [os.getcwd(), *pythonpath, *site_path]
        sys.argv = [target[1], *target[2:]]
        sys.modules.pop(target[1], None)  # preloaded for its imports; `-m` runs it fresh (and without runpy's warning)
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:  # as `python script args` runs it
        script = os.path.abspath(target[0])
        sys.path[:] = [os.path.dirname(os.path.realpath(script)), *pythonpath, *site_path]
        sys.argv = list(target)
        runpy.run_path(script, run_name="__main__")


class Server:
    """The server process of one test session, started on first use; its socket and log live in a folder of its
    own, removed on close."""

    def __init__(self, env: dict):
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="lmdist-prewarmed-"))
        self.socket_path = str(self.folder / "prewarmed.sock")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.prewarmed", self.socket_path], env=env,
                                        cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"tests/prewarmed.py did not start: {line!r}")

    def env(self, env: dict) -> dict:
        """`env` with the hook that hands its Python processes to this server."""
        if self.process.poll() is not None:  # else every launch would quietly be spawned
            raise RuntimeError(f"the prewarmed server (tests/prewarmed.py) exited with {self.process.returncode}")
        pythonpath = os.pathsep.join(p for p in (str(HOOK), env.get("PYTHONPATH")) if p)
        return {**env, "PYTHONPATH": pythonpath, SOCKET_VARIABLE: self.socket_path}

    def log(self) -> list[str]:
        """One line per request so far: `served` or `declined: why`, a tab, then python's arguments."""
        return (self.folder / "served.log").read_text().splitlines()

    def close(self) -> None:
        import shutil

        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
