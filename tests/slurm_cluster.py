"""A real two-node Slurm cluster on this one machine, for the tests of slurm/*.sbatch.

Debian's slurmctld and two slurmd daemons (nodes n1 and n2, both at 127.0.0.1), munge for auth,
every state and log file in one scratch folder. `SlurmCluster.start()` installs the packages if
they are missing (apt-get, as root) and waits until both nodes are idle; `stop()` ends it all.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> SlurmCluster:
        install()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            os.makedirs("/run/munge", exist_ok=True)  # its socket folder; no systemd here to make it
            subprocess.run(["munged", "--force"], check=True, capture_output=True)
        for folder in ("state", "spool-n1", "spool-n2"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        # -D: stay in the foreground, so the daemons are our children and die with stop().
        self.daemons = [subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        for cmd in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", "n1"],
                                    ["slurmd", "-D", "-N", "n2"])]
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            if sum(line.endswith("idle") for line in states) == 2:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm cluster did not come up:\n{self.logs()}")

    def stop(self) -> None:
        self.run("scancel", "--user", "root", check=False)
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None, env: dict | None = None):
        return subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              check=check, timeout=60)

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        out = self.run("sbatch", *args, cwd=cwd, env=env).stdout
        return re.search(r"Submitted batch job (\d+)", out).group(1)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float = 300, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")

    def start_when_requeued(self, job_id: str, timeout: float = 120) -> None:
        """Start a requeued job at once: Slurm holds one back for two to three minutes (Reason=BeginTime), a
        policy against requeue loops that tests need not wait out. Returns early if the job ends instead."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                return
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
                return
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} was not requeued within {timeout} s: {self.job(job_id)}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def _config(self) -> str:
        host = socket.gethostname().split(".")[0]
        r, controller_port = self.root, free_ports(1)
        node_port = free_ports(2, start=controller_port + 1)
        return f"""ClusterName=lmdist-test
SlurmctldHost={host}
SlurmctldPort={controller_port}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={node_port}-{node_port + 1} CPUs=2 RealMemory=8000
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def install() -> None:
    """Install Debian's Slurm and munge packages when sbatch is missing (needs root and apt)."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, timeout=900,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def free_ports(count: int, start: int = 17000) -> int:
    """The first of `count` consecutive free TCP ports on this machine, from `start` on."""
    for base in range(start, 40000, count):
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports")
