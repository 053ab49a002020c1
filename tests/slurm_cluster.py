"""A real SLURM cluster for tests: Debian's slurm-wlm and munge, started under a short /tmp directory,
stopped by the PIDs it recorded. Facts it relies on: ../shared/reference/local-slurm.md. Two nodes on
this one host (two slurmd, each its own port and NodeHostname): the partitions every test uses hold
the first, named as the host; `multi` holds both, for jobs across nodes.

    cluster = SlurmCluster.start()       # installs slurm-wlm + munge with apt-get when missing (root)
    os.environ.update(cluster.env)       # SLURM_CONF for sbatch / scontrol / squeue
    ...
    cluster.stop()                       # scancel all jobs, scontrol shutdown, TERM munged by PID

`ClusterUnavailable` says why a cluster cannot be had (not root and SLURM missing, apt-get failed); the
fixture turns it into a skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
# More CPUs than the machine has (config_overrides), so 2-task jobs and parallel array tasks fit.
NODE_CPUS = 8


class ClusterUnavailable(RuntimeError):
    """No cluster can be started here; the message says why."""


def _run(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge unless their programs are already on PATH."""
    if all(shutil.which(t) or Path("/usr/sbin", t).exists() for t in TOOLS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            "SLURM is not installed and installing it needs root: apt-get install slurm-wlm munge"
        )
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(
            "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Lock timeout: another apt-get on the same machine must not make the install fail.
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    steps = [
        ["apt-get", *lock, "update", "-q"],
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ]
    for cmd in steps:
        result = _run(cmd, env=env, timeout=900)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-1500:]
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{tail}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


SECOND_NODE = "{host}-b"  # the second node's name; its NodeHostname is localhost (one per slurmd)


def slurm_conf(root: Path, host: str, ctld_port: int, slurmd_port: int, second_port: int) -> str:
    """slurm.conf for two nodes on this host; every path under `root` (see local-slurm.md). The first
    node is named as the host, so a job across both finds its first host (MASTER_ADDR) by name."""
    second = SECOND_NODE.format(host=host)
    return f"""\
ClusterName=biomask-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10 and the short scheduler intervals: a requeued job restarts in ~15 s instead of ~2 min.
AuthInfo=socket={root}/run/munge.socket.2,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=5
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 Port={slurmd_port} CPUs={NODE_CPUS} RealMemory={_memory_mb()} State=UNKNOWN
NodeName={second} NodeHostname=localhost NodeAddr=127.0.0.1 Port={second_port} CPUs={NODE_CPUS} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
# jobs across nodes (nodes: 2): the second node serves no other partition
PartitionName=multi Nodes={host},{second} MaxTime=INFINITE State=UP
# a partition with a time limit: a stage asking for more is refused before sbatch
PartitionName=short Nodes={host} MaxTime=00:10:00 State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    host: str
    pids: dict[str, int] = field(default_factory=dict)  # daemon -> PID, read from the pid files it wrote

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def command(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return _run(list(args), env=self._client_env(), timeout=timeout)

    def log(self, name: str) -> str:
        path = self.root / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""

    @classmethod
    def start(cls, *, timeout: float = 60) -> SlurmCluster:
        ensure_installed()
        # Short path: the munge socket path must stay under ~100 characters.
        root = Path(tempfile.mkdtemp(prefix="bm-slurm-", dir="/tmp"))
        host = socket.gethostname().split(".")[0]
        cluster = cls(root, host)
        try:
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_daemons(self, timeout: float) -> None:
        root = self.root
        for sub in ("etc", "run", "log", "state", "spool", "munge"):
            (root / sub).mkdir(mode=0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(slurm_conf(root, self.host, _free_port(), _free_port(), _free_port()))

        munged = shutil.which("munged") or "/usr/sbin/munged"
        self._daemon(
            "munged",
            [
                munged,
                f"--key-file={key}",
                f"--socket={root}/run/munge.socket.2",
                f"--pid-file={root}/run/munged.pid",
                f"--log-file={root}/log/munged.log",
                f"--seed-file={root}/munge/munged.seed",
                "--force",  # run as root without complaining
            ],
            root / "run" / "munged.pid",
        )
        slurmctld = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
        slurmd = shutil.which("slurmd") or "/usr/sbin/slurmd"
        self._daemon("slurmctld", [slurmctld, "-f", str(self.conf)], root / "run" / "slurmctld.pid")
        for node in (self.host, SECOND_NODE.format(host=self.host)):
            (root / "spool" / node).mkdir(mode=0o700)
            self._daemon(
                f"slurmd-{node}",
                [slurmd, "-f", str(self.conf), "-N", node],
                root / "run" / f"slurmd-{node}.pid",
            )
        self._wait_idle(timeout)

    def _daemon(self, name: str, cmd: list[str], pid_file: Path, timeout: float = 20) -> None:
        """Start a daemon (it forks into the background) and record the PID it writes."""
        result = _run(cmd, env=self._client_env())
        if result.returncode != 0:
            raise ClusterUnavailable(
                f"{name} did not start (exit {result.returncode}): {result.stderr.strip()}"
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            if text.isdigit():
                self.pids[name] = int(text)
                return
            time.sleep(0.1)
        raise ClusterUnavailable(
            f"{name} wrote no pid file {pid_file}; log:\n{self.log(name + '.log')[-2000:]}"
        )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            result = self.command("sinfo", "--noheader", "--Node", "--format=%N %T", timeout=10)
            state = result.stdout.strip()
            nodes = dict(line.split() for line in state.splitlines() if len(line.split()) == 2)
            if result.returncode == 0 and len(nodes) == 2 and set(nodes.values()) == {"idle"}:
                return
            time.sleep(0.5)
        raise ClusterUnavailable(
            f"the nodes did not become idle in {timeout:.0f} s (state {state!r}); slurmctld log:\n"
            + self.log("slurmctld.log")[-2000:]
        )

    def stop(self) -> None:
        """Cancel every job, shut SLURM down, stop munged by its recorded PID, remove the directory."""
        if "slurmctld" in self.pids:
            # scontrol shutdown alone leaves running jobs alive: cancel them first.
            self.command("scancel", "--full", "--user=root", timeout=30)
            self._wait_no_jobs(30)
            self.command("scontrol", "shutdown", timeout=30)
            for name in [n for n in self.pids if n.startswith("slurm")]:
                self._wait_gone(name, 15, kill=True)
        if "munged" in self.pids:
            self._wait_gone("munged", 5, kill=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def _wait_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.command("squeue", "--noheader", "--format=%i", "--states=PD,R,CG,S,RQ", timeout=10)
            if result.returncode != 0 or not result.stdout.strip():
                return
            time.sleep(0.5)

    def _wait_gone(self, name: str, timeout: float, *, kill: bool) -> None:
        """Wait for a recorded daemon to exit; TERM it (only that PID) if `kill`, KILL it if it lingers."""
        pid = self.pids.pop(name, None)
        if pid is None:
            return
        if kill and name == "munged":
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)
        _signal(pid, signal.SIGTERM if name != "munged" else signal.SIGKILL)
        time.sleep(1)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
