"""A real single-node SLURM for the tests: munged, slurmctld and slurmd on this machine.

`start_slurm` starts the daemons of SLURM's Debian packages (``apt-get install -y
--no-install-recommends slurm-wlm munge``, done by ``.ci/run``) with a generated
``slurm.conf`` whose state, spool, pid and log files all live under one directory, and
stops them by pid on exit. Commands (``sbatch``, ``squeue``, ``scontrol``, and
dask-jobqueue's calls to them) find this SLURM through ``SLURM_CONF``: `Slurm.environ`
is the environment to run them in.

It needs root (slurmd starts jobs as their user) and the two packages; `slurm_missing`
says what is missing, for a skip reason. munged runs as the ``munge`` user with the
package's key and socket; one that already answers is used as it is and left running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cli_helpers import dask_em_command, wait_for

SLURM_PACKAGES = "apt-get install -y --no-install-recommends slurm-wlm munge"
PARTITION = "debug"
MUNGE_SOCKET_DIR = Path("/run/munge")


def slurm_missing() -> str | None:
    """Why a test SLURM cannot be started here (None if it can)."""
    missing = [
        name for name in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(name) is None
    ]
    if missing and not Path("/usr/sbin/slurmctld").exists():
        return f"SLURM is not installed ({', '.join(missing)} not found): {SLURM_PACKAGES}"
    if os.geteuid() != 0:
        return "a test SLURM needs root (slurmd starts jobs as their user)"
    return None


def _sbin(name: str) -> str:
    """The path of a daemon (``/usr/sbin`` is not on every root PATH)."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_line() -> str:
    """This machine's ``NodeName=...`` line as ``slurmd -C`` prints it (CPUs, sockets,
    cores, memory), so SLURM offers the jobs exactly the machine's CPUs."""
    out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


def slurm_conf(root: Path, node: str) -> str:
    """A ``slurm.conf`` for one node (``node``: a `node_line`) whose files are under ``root``."""
    name = node.split()[0].split("=", 1)[1]
    return "\n".join(
        [
            "ClusterName=dask-em-test",
            f"SlurmctldHost={name}(127.0.0.1)",
            "SlurmUser=root",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "AuthInfo=cred_expire=10",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "KillWait=5",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={name} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@dataclass
class Slurm:
    """A running test SLURM.

    Attributes
    ----------
    conf : Path
        Its ``slurm.conf``.
    root : Path
        The directory of its state, spool and log files.
    node : str
        The node's name.
    """

    conf: Path
    root: Path
    node: str

    @property
    def environ(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at this SLURM."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(
        self, *args: str, check: bool = True, environ: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM command (``sbatch``, ``squeue``...) against this SLURM, with
        ``environ`` added to the environment; fails on a non-zero status if ``check``."""
        result = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            env={**self.environ, **(environ or {})},
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}: {result.stderr}")
        return result

    def dask_em(
        self, *args: object, cwd: Path, extra_environ: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``dask-em ARGS`` to completion with this SLURM's environment (plus
        ``extra_environ``) in ``cwd`` (where dask-jobqueue's jobs write their output)."""
        return subprocess.run(
            [*dask_em_command(), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            env={**self.environ, **(extra_environ or {})},
        )

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o``'s fields of job ``job_id`` (empty once forgotten)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields: dict[str, str] = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def jobs(self) -> list[dict[str, str]]:
        """The fields of every job SLURM still knows of (running, pending or recently ended)."""
        out = self.run("scontrol", "show", "job", "-o", check=False).stdout
        return [
            {k: v for k, _, v in (item.partition("=") for item in line.split())}
            for line in out.splitlines()
            if line.startswith("JobId=")
        ]


def _munge_answers() -> bool:
    """Whether a munged answers on the package's socket (encodes a credential)."""
    result = subprocess.run(["munge", "-n"], capture_output=True)
    return result.returncode == 0


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process`` (a daemon in the foreground) by pid and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@contextmanager
def start_slurm(root: Path) -> Iterator[Slurm]:
    """munged (unless one answers already), slurmctld and slurmd in the foreground, up
    and the node idle; every daemon started here is stopped by pid on exit (their logs
    stay under ``root``)."""
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    node = node_line()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node))
    slurm = Slurm(conf, root, node.split()[0].split("=", 1)[1])
    started: list[subprocess.Popen[bytes]] = []
    try:
        if not _munge_answers():
            MUNGE_SOCKET_DIR.mkdir(mode=0o755, exist_ok=True)
            shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
            with open(root / "munged.out", "wb") as log:
                started.append(
                    subprocess.Popen(
                        [_sbin("munged"), "--foreground"],
                        user="munge",
                        group="munge",
                        extra_groups=[],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
            wait_for(_munge_answers, 30, "munged to answer", interval=0.2)
        daemons = (
            ("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)]),
            ("slurmd", [_sbin("slurmd"), "-D", "-f", str(conf), "-N", slurm.node]),
        )
        for name, argv in daemons:
            with open(root / f"{name}.out", "wb") as log:
                started.append(
                    subprocess.Popen(
                        argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=slurm.environ,
                    )
                )

        def idle() -> bool:
            for process in started:
                if process.poll() is not None:
                    logs = {p.name: p.read_text() for p in root.glob("*.log")}
                    raise AssertionError(f"a SLURM daemon exited: {process.args}\n{logs}")
            state = slurm.run("sinfo", "-h", "-n", slurm.node, "-o", "%t", check=False)
            return state.stdout.strip() == "idle"

        wait_for(idle, 60, "the SLURM node to be idle", interval=0.2)
        yield slurm
    finally:
        if started:
            with suppress(OSError, subprocess.SubprocessError):
                slurm.run("scancel", "--full", "--partition", PARTITION, check=False)
        for process in reversed(started):
            _stop(process)
