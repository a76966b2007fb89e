"""A real, private, single-machine SLURM cluster for the tests (not a test file).

``SlurmCluster(folder)`` starts its own ``munged``, ``slurmctld`` and one ``slurmd`` per node,
everything (config, keys, sockets, logs, pid files, state, job scripts and outputs) under
``folder``, on free loopback ports; ``stop()`` cancels the leftover jobs and ends every daemon by
PID. Needs Debian's ``slurmctld slurmd slurm-client munge`` (Slurm 22.05) and root.

Facts checked on this cluster (Slurm 22.05.8; nodes n1, n2 on one host "vm", CPUs=2 each;
KillWait=5), for the launcher's design:
- Batch script of ``sbatch -N2 --ntasks-per-node=2`` (no srun): SLURM_PROCID=0 SLURM_LOCALID=0
  SLURM_NODEID=0 ARE set, as are SLURM_NTASKS=4 SLURM_NPROCS=4 SLURM_NNODES=2
  SLURM_JOB_NUM_NODES=2 SLURM_JOB_NODELIST=n[1-2] SLURM_TASKS_PER_NODE=2(x2)
  SLURM_NTASKS_PER_NODE=2 SLURM_JOB_ID SLURMD_NODENAME=n1; UNSET: SLURM_STEP_ID, SLURM_STEPID,
  SLURM_STEP_NUM_TASKS, SLURM_STEP_NUM_NODES, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE,
  SLURM_RESTART_COUNT (set, to 1, 2, ..., only after a requeue). So SLURM_PROCID does not mean
  "inside srun": SLURM_STEP_ID does.
- Tasks of ``srun -N2 --ntasks-per-node 2`` in it: SLURM_PROCID 0..3, SLURM_LOCALID 0,1,0,1,
  SLURM_NODEID 0,0,1,1, SLURMD_NODENAME n1,n1,n2,n2, SLURM_STEP_ID=SLURM_STEPID=0,
  SLURM_STEP_NUM_TASKS=4 SLURM_STEP_NUM_NODES=2 SLURM_STEP_NODELIST=n[1-2]
  SLURM_STEP_TASKS_PER_NODE=2(x2), the job-level ones as above, SLURM_LAUNCH_NODE_IPADDR=127.0.0.1.
- ``scontrol show hostnames n[1-2]`` prints n1 and n2; n1 does NOT resolve
  (socket.gethostbyname: "Name or service not known"); ``scontrol show node n1`` prints
  NodeAddr=127.0.0.1 NodeHostName=vm: take the master address from NodeAddr.
- Signals (tasks = srun's tasks and their subprocess and multiprocessing-spawn children alike;
  every process of a step is signalled, not only the task):
  ``#SBATCH --time=1 --signal=USR2@50`` + srun: USR2 (then CONT) to every task process, not to
  the batch shell; it came ~28 s after the start (SLURM checks every ~30 s, not at 10 s), the
  time limit ~28 s late too (CONT+TERM to all, SIGKILL after KillWait; TIMEOUT, ExitCode 0:9).
  ``scancel --signal=TERM J``: every task process, not the batch shell; the job runs on.
  ``scancel --signal=USR2 --batch J``: the batch shell only.
  ``scancel --signal=TERM --full J``: the batch shell AND srun get TERM; srun then aborts its
  step: the tasks are SIGKILLed at once (no TERM seen).
  ``scancel J`` and ``scontrol requeue J``: SIGCONT+SIGTERM to every task process (children
  included) and to the batch shell (srun survives it), SIGKILL to all after KillWait.
  ``srun --kill-on-bad-exit=1``: a task exiting non-zero gets the others SIGTERMed at once.
- Requeue: the job is PENDING (Reason=BeginTime) ~121 s (EligibleTime = credential lifetime),
  then waits for the main scheduler's next pass: restarted at +178 s with the default
  sched_interval=60, at +122 s with sched_interval=1 (set here). ``scontrol update JobId=J
  StartTime=now`` sent once PENDING failed 2 times in ~9 (relaunch in the same second as the
  credential's revocation: "Job credential revoked", job FAILED); StartTime=now+2 restarted
  12 of 12 in ~2 s (requeue_now). A requeued job's --output file is truncated unless
  --open-mode=append.
- submitit 1.5.4 (AutoExecutor(cluster="slurm"), slurm_partition="debug", nodes=2,
  tasks_per_node=2, no additional parameters): job.results() returns the 4 ranks, read from
  the per-task result pickles (polled every 1 s). Its watcher's ``sacct`` fails
  ("Slurm accounting storage is disabled"): it logs "Bypassing sacct error" at each poll and
  job.state stays "UNKNOWN", so a job that ends without a result pickle (cancelled, killed,
  node failure) is never done: job.wait()/result() block forever. On USR2 a Checkpointable
  job's rank 0 requeues it (``scontrol requeue``): PENDING, BeginTime +121 s, like any requeue.
  TorchDistributedEnvironment().export() sets MASTER_ADDR=n1 (first of ``scontrol show
  hostnames``), MASTER_PORT (random in 20000-60000 seeded by the job id, unless set), RANK,
  WORLD_SIZE=4, LOCAL_RANK, LOCAL_WORLD_SIZE=2 and CUDA_VISIBLE_DEVICES=<local rank>; it raises
  if one is set already (overwrite=False). MASTER_ADDR=n1 does not resolve here: a TCPStore on
  it times out.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
PACKAGES = "slurmctld slurmd slurm-client munge"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")

#: Job states after which a job does not run again (unless requeued by hand).
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def _which(name: str):
    path = shutil.which(name)
    if path:
        return path
    for folder in _SBIN:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def slurm_available():
    """(True, "") when the SLURM daemons and client commands and munged are installed and we
    are root (the daemons run as root here), else (False, why)."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return False, (f"SLURM is not installed ({', '.join(missing)} not found): "
                       f"apt-get install {PACKAGES}")
    if os.geteuid() != 0:
        return False, "the private SLURM cluster runs its daemons as root: run the tests as root"
    return True, ""


def _free_ports(n: int):
    """n distinct TCP ports free on all addresses now (held together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent():
    """preexec_fn: the daemon gets SIGTERM if the test process dies without calling stop()."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


def parse_scontrol(line: str) -> dict:
    """``scontrol show ... -o`` output (one record, Key=Value separated by spaces) as a dict;
    a word without '=' belongs to the previous value (values with spaces, e.g. a Command)."""
    info, key = {}, None
    for word in line.strip().split(" "):
        if "=" in word and re.match(r"^[A-Za-z][\w:/.-]*=", word):
            key, value = word.split("=", 1)
            info[key] = value
        elif key is not None:
            info[key] += " " + word
    return info


def _epoch(stamp) -> float:
    """A SLURM time stamp (2026-12-06T05:39:06, local time) in seconds; 0 when not a time."""
    try:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
    except (TypeError, ValueError):
        return 0.0


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """A private SLURM cluster under ``folder``: ``nodes`` nodes named n1, n2, ... of ``cpus``
    CPUs each, all on this host (NodeAddr 127.0.0.1), one partition ``debug``.

    Use as ``with SlurmCluster(tmp) as cluster: ...`` or call ``start()``/``stop()``.
    ``env`` is os.environ without SLURM_*/SBATCH_*/SRUN_*/SALLOC_* and with SLURM_CONF (the
    client commands find munged's socket through the conf's AuthInfo): pass it to anything that
    runs sbatch/srun/scontrol itself (submitit). The daemons get SIGTERM if the thread that
    started them dies without stop() (PR_SET_PDEATHSIG).

    Settings that matter for tests: KillWait (``kill_wait_s``, 5 s): SIGKILL that long after
    SIGTERM; MinJobAge (``min_job_age_s``, 300 s): finished jobs stay in ``scontrol show job``;
    sched_interval=1: a job whose BeginTime passes starts within ~1 s (60 s by default)."""

    def __init__(self, folder, nodes: int = 2, cpus: int = 2, real_memory_mb: int = 1000,
                 kill_wait_s: int = 5, min_job_age_s: int = 300, start_timeout_s: float = 30.0):
        ok, why = slurm_available()
        if not ok:
            raise SlurmError(why)
        self.root = os.path.abspath(str(folder))
        self.n_nodes = nodes
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        self.kill_wait_s = kill_wait_s
        self.min_job_age_s = min_job_age_s
        self.start_timeout_s = start_timeout_s
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.hostname = socket.gethostname()
        self.conf = os.path.join(self.root, "etc", "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "run", "munge.socket")
        if len(self.munge_socket.encode()) > 100:  # a Unix socket's path has 107 bytes at most
            raise SlurmError(f"folder {self.root!r} is too long for munged's socket path")
        self.log_dir = os.path.join(self.root, "log")
        self.work_dir = os.path.join(self.root, "work")  # default cwd of sbatch/srun: outputs
        self.procs = {}  # name -> Popen, in start order
        self._node_states = ""
        self._n_scripts = 0
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_",
                                                                        "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = self.conf
        env["PATH"] = os.pathsep.join([env.get("PATH", "")] + [p for p in _SBIN if p not in
                                                                env.get("PATH", "").split(":")])
        self.env = env

    # ---------------------------------------------------------------- start / stop
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _mkdir(self, *parts, mode=0o700):
        path = os.path.join(self.root, *parts)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
        return path

    def _write_conf(self):
        ctld_port, *node_ports = _free_ports(1 + self.n_nodes)
        state = self._mkdir("state")
        spool = self._mkdir("spool")
        for name in self.node_names:
            self._mkdir("spool", name)
        run = self._mkdir("run")
        self._mkdir("etc", mode=0o755)
        lines = [
            "ClusterName=testcluster",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}/%n",
            f"SlurmctldPidFile={run}/slurmctld.pid",
            f"SlurmdPidFile={run}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "MailProg=/bin/true",  # the default (/bin/mail) is absent: an error in the log
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # sched_interval=1: a job whose BeginTime passes (a requeue) starts ~1 s later, not
            # at the next 60 s pass (backfill runs only after a change)
            "SchedulerParameters=sched_interval=1,sched_min_interval=0,batch_sched_delay=0,"
            "bf_interval=1",
            "ReturnToService=2",
            "JobRequeue=1",
            f"KillWait={self.kill_wait_s}",
            f"MinJobAge={self.min_job_age_s}",  # finished jobs stay visible that long
            "InactiveLimit=0",
            "PropagateResourceLimits=NONE",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=300",
            "MessageTimeout=10",
            "TmpFS=" + self._mkdir("tmpfs"),
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 "
                         f"Port={port} CPUs={self.cpus} RealMemory={self.real_memory_mb} "
                         "State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=NO")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.ports = {"slurmctld": ctld_port, **dict(zip(self.node_names, node_ports))}

    def _spawn(self, name, argv, log):
        out = open(os.path.join(self.log_dir, log), "ab")
        try:
            self.procs[name] = subprocess.Popen(
                argv, env=self.env, cwd=self.root, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            out.close()

    def _start_munged(self):
        munge = self._mkdir("munge")
        sock_dir = self._mkdir("munge", "run", mode=0o755)
        key = os.path.join(munge, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        # --force: munged refuses a socket whose folder's parents are not all world-executable
        # (pytest's /tmp/pytest-of-root is 700); with it, that is a warning.
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--log-file={self.log_dir}/munged.log",
            f"--pid-file={sock_dir}/munged.pid", f"--seed-file={munge}/munged.seed",
            "--num-threads=4"], "munged.out")
        self._wait_for(lambda: os.path.exists(self.munge_socket), "munged's socket", 10)

    def start(self):
        t0 = time.monotonic()
        os.makedirs(self.root, exist_ok=True)
        self._mkdir("log")
        self._mkdir("work", mode=0o755)
        self._mkdir("scripts", mode=0o755)
        try:
            self._write_conf()
            self._start_munged()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", self.conf], "slurmctld.out")
            for name in self.node_names:
                self._spawn(name, [_which("slurmd"), "-D", "-f", self.conf, "-N", name],
                            f"slurmd-{name}.out")
            self._wait_for(self._all_idle, "all nodes IDLE", self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _all_idle(self):
        r = self._run(["scontrol", "show", "nodes", "-o"], check=False, timeout=10)
        if r.returncode != 0:
            return False
        nodes = [parse_scontrol(line) for line in r.stdout.splitlines() if line.strip()]
        states = [n.get("State", "") for n in nodes]
        self._node_states = "; ".join(f"{n.get('NodeName')}: State={n.get('State')} "
                                      f"Reason={n.get('Reason', '')}" for n in nodes)
        return len(states) == self.n_nodes and all(s.split("+")[0] == "IDLE" for s in states)

    def _wait_for(self, predicate, what, timeout, poll=0.05):
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} while waiting for "
                                     f"{what}\n{self.log_tails()}")
            if predicate():
                return
            if time.monotonic() > deadline:
                nodes = f" (nodes: {self._node_states})" if self._node_states else ""
                raise SlurmError(f"timed out after {timeout} s waiting for {what}{nodes}\n"
                                 f"{self.log_tails()}")
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for log in sorted(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else []:
            parts.append(f"--- {log} (last {lines} lines) ---\n{_tail(os.path.join(self.log_dir, log), lines)}")
        return "\n".join(parts)

    def _our_processes(self):
        """PIDs of processes (other than this one and its ancestors) whose environment names
        our slurm.conf: job steps (slurmstepd) and tasks that outlived the daemons."""
        mine = {os.getpid()}
        pid = os.getpid()
        while pid > 1:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
            mine.add(pid)
        needle = f"SLURM_CONF={self.conf}\0".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in mine:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read() + b"\0":
                        found.append(int(entry))
            except OSError:
                pass
        return found

    def stop(self):
        """Cancel leftover jobs, then end every daemon started here (SIGTERM, wait, SIGKILL),
        then any job process of this cluster still alive. Safe to call twice."""
        if not self.procs:
            return
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                r = self._run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                jobs = r.stdout.split()
                if jobs:
                    self._run(["scancel", *jobs], check=False, timeout=10)
                    deadline = time.monotonic() + self.kill_wait_s + 5
                    while time.monotonic() < deadline:
                        r = self._run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                        if r.returncode != 0 or not r.stdout.split():
                            break
                        time.sleep(0.2)
            except (OSError, subprocess.SubprocessError):
                pass
        # slurmds first, then slurmctld, munged last (the others talk to it while stopping).
        order = [n for n in self.procs if n not in ("slurmctld", "munged")] + \
                [n for n in ("slurmctld", "munged") if n in self.procs]
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for name in order:
            proc = self.procs[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs = {}
        for _ in range(3):
            left = self._our_processes()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.2)

    def running_pids(self):
        """The PIDs of the daemons still running (empty after stop())."""
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    # ---------------------------------------------------------------- commands
    def _run(self, argv, check=True, timeout=60, **kw):
        kw.setdefault("cwd", self.work_dir)
        r = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], env=self.env,
                           capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def scontrol(self, *args, check=True):
        return self._run(["scontrol", *args], check=check).stdout

    def script(self, text: str, name: str | None = None) -> str:
        """Write ``text`` as an executable script under the cluster folder; its path."""
        self._n_scripts += 1
        path = os.path.join(self.root, "scripts", name or f"script-{self._n_scripts}.sh")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        return path

    def sbatch(self, script, *args) -> str:
        """Submit a batch script (a path, or the script's text); the job id. Output goes to
        slurm-<id>.out in ``work_dir`` unless ``args`` say --output."""
        if "\n" in script or not os.path.exists(script):
            script = self.script(script)
        out = self._run(["sbatch", "--parsable", *args, script]).stdout.strip()
        return out.split(";")[0]

    def srun(self, args, timeout=60, **kw):
        """Run ``srun args`` to completion: a CompletedProcess (text, captured output unless
        told otherwise)."""
        kw.setdefault("cwd", self.work_dir)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run([_which("srun"), *args], env=self.env, timeout=timeout, **kw)

    def srun_popen(self, args, **kw):
        kw.setdefault("cwd", self.work_dir)
        return subprocess.Popen([_which("srun"), *args], env=self.env, **kw)

    def job_info(self, job_id) -> dict:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, RestartCnt, NodeList, ...);
        {} when SLURM no longer knows the job."""
        r = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if r.returncode != 0 or not r.stdout.strip():
            if "Invalid job id" in r.stderr or "Invalid job id" in r.stdout:
                return {}
            raise SlurmError(f"scontrol show job {job_id}: {r.stdout}{r.stderr}")
        return parse_scontrol(r.stdout.splitlines()[0])

    def state(self, job_id) -> str:
        """The job's state (RUNNING, PENDING, COMPLETING, COMPLETED, FAILED, CANCELLED,
        TIMEOUT, ...); "" when SLURM no longer knows it."""
        return self.job_info(job_id).get("JobState", "")

    def wait(self, job_id, states=FINAL_STATES, timeout=60.0) -> str:
        """Wait until the job's state is one of ``states``; that state. Raises SlurmError on
        timeout or when the job disappears."""
        deadline = time.monotonic() + timeout
        poll = 0.05
        while True:
            s = self.state(job_id)
            if s in states:
                return s
            if s == "":
                raise SlurmError(f"job {job_id} is gone (waited for {states})")
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} still {s} after {timeout} s (waited for "
                                 f"{states}): {self.job_info(job_id)}\n{self.log_tails()}")
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)

    def requeue_now(self, job_id, timeout=30.0):
        """``scontrol requeue`` the job, then (once it is PENDING) make it eligible in 2 s:
        SLURM otherwise holds a requeued job for its credential lifetime (~120 s).

        Not at once: slurmd revokes the job's credential when it kills the job, and refuses a
        relaunch whose credential was made in that same second ("Job credential revoked":
        the job ends FAILED); ``StartTime=now`` loses that race about 1 time in 5."""
        self.scontrol("requeue", str(job_id))
        self.release_now(job_id, timeout)

    def release_now(self, job_id, timeout=30.0):
        """Once a requeued job (by ``scontrol requeue``, or by itself: submitit's handler) is
        PENDING again, make it eligible in 2 s instead of SLURM's ~120 s hold (see
        :meth:`requeue_now`)."""
        deadline = time.monotonic() + timeout
        for _ in range(5):
            self.wait(job_id, states=("PENDING",), timeout=max(1.0, deadline - time.monotonic()))
            self.scontrol("update", f"JobId={job_id}", "StartTime=now+2")
            info = self.job_info(job_id)
            if info.get("JobState") != "PENDING" or _epoch(info.get("EligibleTime")) <= time.time() + 5:
                return
        raise SlurmError(f"job {job_id}'s StartTime did not stay set: {self.job_info(job_id)}")

    def signal(self, job_id, sig="USR2", batch=False, full=False):
        """``scancel --signal=SIG``: to the job's steps' tasks by default, to the batch shell
        only with ``batch``, to the batch shell and every step with ``full``."""
        args = [f"--signal={sig}"]
        if batch:
            args.append("--batch")
        if full:
            args.append("--full")
        self._run(["scancel", *args, str(job_id)])

    def cancel(self, job_id):
        self._run(["scancel", str(job_id)])
