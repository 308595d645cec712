"""A real one-node Slurm cluster on this machine, for tests/paper/test_slurm.py: munged, slurmctld and slurmd
(Debian's slurm-wlm and munge, which .ci/run installs) started under a temporary folder with their own key, socket,
ports, state and logs, and stopped again.  Nothing system-wide is written: the clients find the cluster through
``SLURM_CONF``.

``python tests/paper/slurm_cluster.py FOLDER`` starts one and keeps it until Ctrl-C (to try the Slurm executor by
hand: ``export SLURM_CONF=FOLDER/slurm.conf``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun", "scontrol", "scancel")


def unavailable() -> str | None:
    """Why a cluster cannot be started here (None when it can): a missing command, or not root."""
    missing = [c for c in DAEMONS if shutil.which(c) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not on PATH; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not: reaped here when it is our child)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A running one-node cluster: its folder, ``slurm.conf`` and the daemons' pid files."""

    folder: Path
    node: str
    pids: dict[str, Path] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, submitit) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log(self, daemon: str) -> str:
        """The log of ``slurmctld`` or ``slurmd`` so far."""
        path = self.folder / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Cancel what is left of the jobs, then stop slurmd, slurmctld and munged (by their pid files)."""
        subprocess.run(["scancel", "--full", "-u", "root"], env={**os.environ, **self.env()}, capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):
            pidfile = self.pids.get(name)
            if pidfile is None or not pidfile.exists():
                continue
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (ValueError, ProcessLookupError, IndexError):
                continue
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)


def start(folder: Path, timeout_s: float = 60.0) -> Cluster:
    """Start munged, slurmctld and slurmd under ``folder`` (one node: this machine, all its CPUs,
    proctrack/linuxproc, task/none, no accounting) and wait until the node is idle; RuntimeError with the
    daemons' logs if it does not come up within ``timeout_s``."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    folder = Path(folder).resolve()
    for sub in ("munge", "state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    os.chmod(folder / "munge", 0o755)
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    cluster = Cluster(folder, node, {"munged": folder / "munge" / "munged.pid",
                                     "slurmctld": folder / "slurmctld.pid", "slurmd": folder / "slurmd.pid"})
    munge = folder / "munge"
    subprocess.run(["mungekey", "-c", "-f", "-k", str(munge / "munge.key")], check=True, capture_output=True)
    subprocess.run(["munged", "--force", f"--socket={munge / 'munge.socket'}", f"--key-file={munge / 'munge.key'}",
                    f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                    f"--seed-file={munge / 'munged.seed'}"], check=True, capture_output=True)
    cluster.conf.write_text("\n".join([
        "ClusterName=spvrtest", f"SlurmctldHost={node}", f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        f"AuthInfo=socket={munge / 'munge.socket'}", f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}", f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}", f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none", "KillWait=5",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, **cluster.env()}
    try:
        subprocess.run(["slurmctld", "-f", str(cluster.conf), "-c", "-i"], env=env, check=True, capture_output=True)
        subprocess.run(["slurmd", "-f", str(cluster.conf)], env=env, check=True, capture_output=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise RuntimeError(f"the one-node cluster in {folder} did not come up within {timeout_s:.0f} s (sinfo: "
                           f"{state!r})\nslurmctld:\n{cluster.log('slurmctld')[-2000:]}\n"
                           f"slurmd:\n{cluster.log('slurmd')[-2000:]}")
    except BaseException:
        cluster.stop()
        raise


if __name__ == "__main__":
    c = start(Path(sys.argv[1]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))      # kill PID stops the daemons too
    print(f"cluster up: export SLURM_CONF={c.conf}  (Ctrl-C or kill {os.getpid()} stops it)", flush=True)
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        c.stop()
