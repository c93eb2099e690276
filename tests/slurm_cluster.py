"""Throwaway SLURM clusters for the tests (Debian's slurm-wlm), all state in a temp dir, auth/none,
SLURM_CONF pointing at their slurm.conf. The daemons run in the foreground of child processes and
are stopped by their own PIDs. Job credentials live 10 s (cred_expire; default 120): a requeued job
waits that long before it starts again, which is also how long its old credential stays revoked
on the node (starting it sooner is refused).

- `LocalSlurm`: one node on localhost (slurmctld + slurmd, 127.0.0.1).
- `TwoNodeSlurm`: two nodes on this machine, as a cluster has them. Each node is a network
  namespace with its own hostname (UTS namespace) and /etc/hosts (a bind mount in a private mount
  namespace, so the machine's own file is untouched); a veth pair joins them, with addresses in a
  private range that exist only inside the two namespaces. slurmctld runs on the first node (a
  head node that also computes), each node runs its own slurmd, and everything a job starts on a
  node inherits that node's network, hostname and hosts file. The filesystem is shared, as a
  cluster's is. The test's own commands (sbatch, squeue, chain_stages.sh) run in the first node's
  network namespace (`command`). Needs root and iproute2/util-linux (`two_nodes_unavailable`
  says why not); `stop` stops every daemon and every process left in the namespaces, then
  removes the namespaces (which removes the veth pair).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import List, Optional

NEEDED = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
NETNS_DIR = "/run/netns"
PREFIX = "msgt"  # namespace names: msgt<creator pid><node letter>


def available() -> bool:
    return all(shutil.which(b) for b in NEEDED)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: str, ctl: str, ctl_addr: str, nodes, ctl_port: int, d_port: int, cpus: int) -> str:
    """slurm.conf for `nodes` [(name, address)]: per-node spool, pid and log files (%n)."""
    node_lines = "\n".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={cpus} State=UNKNOWN" for n, a in nodes)
    return f"""ClusterName=msgtest
SlurmctldHost={ctl}({ctl_addr})
AuthType=auth/none
AuthInfo=cred_expire=10
CredType=cred/none
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
# a requeued job (and a dependent one) starts at the main scheduler's periodic pass: 60 s by default
SchedulerParameters=sched_interval=2
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
{node_lines}
PartitionName=debug Nodes={",".join(n for n, _ in nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class LocalSlurm:
    """One node on localhost."""

    def __init__(self, root: str, cpus: int = 4):
        self.root = root
        self.procs: List[subprocess.Popen] = []
        host = socket.gethostname().split(".")[0]
        self.nodes = [host]
        self._setup(_conf(root, host, "127.0.0.1", [(host, "127.0.0.1")], _port(), _port(), cpus))

    def _setup(self, conf: str) -> None:
        for d in ["state"] + [f"spool/{n}" for n in self.nodes]:
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.conf = os.path.join(self.root, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    # ---- where things run -----------------------------------------------------------------
    def command(self, argv: List[str]) -> List[str]:
        """`argv` as the test runs it against this cluster (a submit host's view)."""
        return list(argv)

    def _daemon(self, node: Optional[str], argv: List[str]) -> List[str]:
        return list(argv)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        daemons = [(None, "slurmctld", ["slurmctld", "-D", "-f", self.conf])]
        daemons += [(n, f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", self.conf]) for n in self.nodes]
        for node, name, argv in daemons:
            log = open(os.path.join(self.root, f"{name}.stdout"), "w")
            self.procs.append(subprocess.Popen(self._daemon(node, argv), env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            states = r.stdout.split()
            if r.returncode == 0 and len(states) == len(self.nodes) and \
                    all(s in ("idle", "mixed", "allocated") for s in states):
                return self
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a SLURM daemon exited: {self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node(s) {self.nodes} did not come up in {timeout} s: {self.logs()}")

    def run(self, cmd, check=True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.command(cmd), env=self.env, capture_output=True, text=True, timeout=60, **kw)
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
        for name in ["slurmctld.log"] + [f"slurmd-{n}.log" for n in self.nodes]:
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


def two_nodes_unavailable() -> Optional[str]:
    """Why TwoNodeSlurm cannot run here, or None."""
    if not available():
        return "slurm-wlm (slurmctld, slurmd, sbatch) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [b for b in ("ip", "nsenter", "unshare", "mount", "hostname") if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not installed (iproute2, util-linux)"
    # what the nodes need, tried once: a network namespace, and in it a mount and UTS namespace
    # (a container without CAP_SYS_ADMIN refuses these)
    ns = f"{PREFIX}{os.getpid()}p"
    r = _sh("ip", "netns", "add", ns, check=False)
    if r.returncode:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    try:
        r = _sh("nsenter", f"--net={NETNS_DIR}/{ns}", "unshare", "--mount", "--uts", "sh", "-c",
                "mount --bind /etc/hosts /etc/hosts && hostname msg-probe", check=False)
        if r.returncode:
            return f"cannot give a namespace its own hostname and /etc/hosts here: {r.stderr.strip()}"
    finally:
        _sh("ip", "netns", "del", ns, check=False)
    return None


def _sh(*argv, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def remove_stale_namespaces() -> None:
    """Namespaces an earlier test process made and could not remove (it was killed): by name,
    when that process is gone."""
    if not os.path.isdir(NETNS_DIR):
        return
    for ns in os.listdir(NETNS_DIR):
        if ns.startswith(PREFIX) and ns[len(PREFIX):-1].isdigit() and not _pid_alive(int(ns[len(PREFIX):-1])):
            _kill_namespace(ns)


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in network namespace `ns`, then remove it."""
    r = _sh("ip", "netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _sh("ip", "netns", "del", ns, check=False)


class TwoNodeSlurm(LocalSlurm):
    """nodea (10.213.0.1, slurmctld + slurmd) and nodeb (10.213.0.2, slurmd), see the module docstring."""

    SUBNET = "10.213.0"

    def __init__(self, root: str, cpus: int = 4):
        self.root = root
        self.procs = []
        self.nodes = ["nodea", "nodeb"]
        self.addr = {n: f"{self.SUBNET}.{i + 1}" for i, n in enumerate(self.nodes)}
        self.netns = {n: f"{PREFIX}{os.getpid()}{n[-1]}" for n in self.nodes}
        self._made: List[str] = []
        self.hosts = os.path.join(root, "hosts")
        os.makedirs(root, exist_ok=True)
        with open(self.hosts, "w") as f:  # what each node's /etc/hosts says
            f.write("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addr.items()))
        # (fixed ports: nothing else listens inside namespaces made for this cluster)
        self._setup(_conf(root, "nodea", self.addr["nodea"], list(self.addr.items()), 6817, 6818, cpus))

    def start(self, timeout: float = 60) -> "TwoNodeSlurm":
        remove_stale_namespaces()
        try:
            self._network()
        except Exception:
            self.stop()
            raise
        return super().start(timeout)

    def _network(self) -> None:
        a, b = (self.netns[n] for n in self.nodes)
        veth = {n: f"{self.netns[n]}v" for n in self.nodes}  # (<= 15 characters)
        for ns in (a, b):
            _sh("ip", "netns", "add", ns)
            self._made.append(ns)
        _sh("ip", "link", "add", veth["nodea"], "netns", a, "type", "veth", "peer", "name", veth["nodeb"], "netns", b)
        for n in self.nodes:
            ns = self.netns[n]
            _sh("ip", "-n", ns, "addr", "add", f"{self.addr[n]}/24", "dev", veth[n])
            _sh("ip", "-n", ns, "link", "set", veth[n], "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def command(self, argv: List[str]) -> List[str]:
        return ["nsenter", f"--net={NETNS_DIR}/{self.netns['nodea']}"] + list(argv)

    def _daemon(self, node: Optional[str], argv: List[str]) -> List[str]:
        """`argv` on `node` (slurmctld: on nodea): its network, its hostname, its /etc/hosts."""
        node = node or "nodea"
        return ["nsenter", f"--net={NETNS_DIR}/{self.netns[node]}", "unshare", "--mount", "--uts", "sh", "-c",
                'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"', self.hosts, node] + argv

    def hide_on(self, node: str, path: str) -> None:
        """`node` sees an empty directory at `path` from now on (a tmpfs mounted over it in that
        node's mount namespace): a node that lacks a filesystem the others share."""
        slurmd = self.procs[1 + self.nodes.index(node)].pid  # (the daemons in start's order)
        _sh("nsenter", f"--target={slurmd}", "--mount", "mount", "-t", "tmpfs", "tmpfs", str(path))

    def node_pids(self, node: str, pattern: str) -> List[int]:
        """PIDs on `node` whose command line contains `pattern`."""
        out = []
        for pid in _sh("ip", "netns", "pids", self.netns[node]).stdout.split():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if pattern.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
        return out

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for ns in self._made:  # job processes still running (a failed test): killed with the node
                _kill_namespace(ns)
            self._made = []
