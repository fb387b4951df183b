"""The client of tests/prewarmed.py: imported by every Python process started with conftest.launch_env()'s
environment, before its script.

A process running a script or a module (not `-c`, not the REPL) sends its request to the prewarmed server. If the
server forks the launch, this process stands in for it until it ends: it forwards the signals it is sent and exits
as the launch did, and never returns to run the script itself. If the server declines, or is gone, this returns
and the interpreter runs the script itself (after any other sitecustomize this one shadows). It imports only a few
stdlib modules, so that a declined or unserved process starts as fast as without it.
"""
import os
import signal
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGCONT, signal.SIGALRM)


def _hand_over() -> None:
    socket_path = os.environ.get("LMDIST_PREWARMED_SOCKET")
    arguments = sys.orig_argv[1:]
    target = next((a for a in arguments if a in ("-m", "-c") or not a.startswith("-")), "-c")
    if not socket_path or target == "-c" or (target != "-m" and not target.endswith(".py")):
        return
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:  # a closed standard stream cannot be handed over
        return
    import array
    import contextlib
    import json
    import socket

    state = process_state()
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    # Until the forwarding below is in place, a signal waits (blocked) instead of killing this process unforwarded.
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(socket_path)
        connection.settimeout(30)
        request = json.dumps({"executable": sys.executable, "argv": arguments, "cwd": os.getcwd(),
                              "env": dict(os.environ), "state": state}).encode() + b"\n"
        sent = connection.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        connection.sendall(request[sent:])
        answer, ancillary, _, _ = connection.recvmsg(64, socket.CMSG_LEN(array.array("i").itemsize))
    except Exception:  # noqa: BLE001 (no server: the session that started it has ended; or none answering): run here
        signal.pthread_sigmask(signal.SIG_SETMASK, state["blocked"])
        return
    answer, _, rest = answer.partition(b"\n")
    if not answer.isdigit():  # declined: run here
        connection.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, state["blocked"])
        return
    try:  # served: from here on this process only stands in for the launch, and ends with it
        pidfd = array.array("i", ancillary[0][2])[0]
        connection.settimeout(None)

        def forward(signum, _frame):
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                signal.pidfd_send_signal(pidfd, signum)

        for signum in FORWARDED:
            signal.signal(signum, forward)
        signal.pthread_sigmask(signal.SIG_SETMASK, state["blocked"])
        while b"\n" not in rest and (more := connection.recv(64)):
            rest += more
        returncode = int(rest) if rest.strip() else 1  # no line: the watcher died, which it never should
        if returncode < 0:  # killed by a signal: die of the same one
            if -returncode != signal.SIGKILL:
                signal.signal(-returncode, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [-returncode])
            os.kill(os.getpid(), -returncode)
            returncode = 128 - returncode
    except BaseException as e:  # noqa: BLE001 (never fall through to running the script a second time)
        sys.stderr.write(f"prewarmed stand-in: {e!r}\n")
        returncode = 1
    os._exit(returncode)


def process_state() -> dict:
    """What a process inherits from its parent besides its environment (tests/prewarmed.py compares or applies it)."""
    import resource

    umask = os.umask(0o22)
    os.umask(umask)
    limits = sorted(name for name in dir(resource) if name.startswith("RLIMIT_"))
    return {"umask": umask, "blocked": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            "ignored": [s for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)
                        and signal.getsignal(s) == signal.SIG_IGN],
            "affinity": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "limits": [list(resource.getrlimit(getattr(resource, name))) for name in limits]}


def _chain() -> None:
    """Run the sitecustomize this one shadows, as the interpreter would have without the hook."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path if os.path.abspath(p or ".")
                                                                      != here])
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


if __name__ == "sitecustomize":  # (tests/prewarmed.py loads it under another name for process_state)
    _hand_over()
    _chain()
