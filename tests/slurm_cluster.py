"""A throwaway one-node SLURM cluster on localhost (Debian's slurm-wlm): slurmctld + slurmd with
auth/none, all state in a temp dir, SLURM_CONF pointing at its slurm.conf. The daemons run in the
foreground of child processes and are stopped by their own PIDs. Job credentials live 10 s
(cred_expire; default 120): a requeued job waits that long before it starts again, which is also
how long its old credential stays revoked on the node (starting it sooner is refused)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

NEEDED = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")


def available() -> bool:
    return all(shutil.which(b) for b in NEEDED)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: str, cpus: int = 4):
        self.root = root
        self.procs = []
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        self.conf = os.path.join(root, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=msgtest
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/none
AuthInfo=cred_expire=10
CredType=cred/none
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_port()}
SlurmdPort={_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        for daemon in ("slurmctld", "slurmd"):
            log = open(os.path.join(self.root, f"{daemon}.stdout"), "w")
            self.procs.append(subprocess.Popen([daemon, "-D", "-f", self.conf], env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a SLURM daemon exited: {self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM node did not come up in {timeout} s: {self.logs()}")

    def run(self, cmd, check=True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr}")
        return r

    def job_state(self, job: str) -> str:
        """JobState, or DEPENDENCY_NEVER_SATISFIED for a job that can never start."""
        r = self.run(["scontrol", "show", "job", job, "-o"], check=False)
        fields = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
        if fields.get("Reason") == "DependencyNeverSatisfied":
            return "DEPENDENCY_NEVER_SATISFIED"
        return fields.get("JobState", "UNKNOWN")

    def wait(self, job: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                      "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
                                                      "DEPENDENCY_NEVER_SATISFIED")) -> str:
        deadline, unknown = time.time() + timeout, 0
        while time.time() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            unknown = unknown + 1 if state == "UNKNOWN" else 0
            if unknown > 30:
                raise RuntimeError(f"SLURM does not know job {job!r}")
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout} s")

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                with open(path) as f:
                    out.append(f"--- {name}\n" + f.read()[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs = []
