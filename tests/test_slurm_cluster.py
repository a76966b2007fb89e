"""The private SLURM cluster of tests/slurm_cluster.py against real SLURM behaviour: srun's
task layout, batch jobs' states, exit codes and outputs, requeue, signals, kill-on-bad-exit,
and that stop() leaves nothing running. Skipped when SLURM is not installed."""
import os
import time

import pytest

from slurm_cluster import SlurmCluster, slurm_available

pytestmark = pytest.mark.skipif(not slurm_available()[0], reason=slurm_available()[1])


def _wait_for_file(path, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
            if predicate(text):
                return text
        time.sleep(0.1)
    raise AssertionError(f"{path} did not get there in {timeout} s; it has:\n{text}")


def _alive(pid):
    """Whether pid is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_srun_two_nodes_two_tasks_each_gives_four_ranks(slurm_cluster):
    r = slurm_cluster.srun(
        ["-N2", "--ntasks-per-node=2", "bash", "-c",
         "echo $SLURM_PROCID $SLURM_NODEID $SLURM_LOCALID $SLURMD_NODENAME $SLURM_NTASKS"])
    assert r.returncode == 0, r.stderr
    tasks = sorted(tuple(line.split()) for line in r.stdout.splitlines() if line.strip())
    assert tasks == [("0", "0", "0", "n1", "4"), ("1", "0", "1", "n1", "4"),
                     ("2", "1", "0", "n2", "4"), ("3", "1", "1", "n2", "4")]


def test_sbatch_job_completes_with_its_exit_code_and_output(slurm_cluster, tmp_path):
    ok_out, bad_out = tmp_path / "ok.out", tmp_path / "bad.out"
    ok = slurm_cluster.sbatch("#!/bin/bash\necho hello from $SLURM_JOB_ID on $SLURMD_NODENAME\n",
                              f"--output={ok_out}")
    bad = slurm_cluster.sbatch("#!/bin/bash\necho failing\nexit 3\n", f"--output={bad_out}")
    assert slurm_cluster.wait(ok, timeout=30) == "COMPLETED"
    assert slurm_cluster.job_info(ok)["ExitCode"] == "0:0"
    assert ok_out.read_text() == f"hello from {ok} on n1\n"
    assert slurm_cluster.wait(bad, timeout=30) == "FAILED"
    assert slurm_cluster.job_info(bad)["ExitCode"] == "3:0"
    assert bad_out.read_text() == "failing\n"
    # finished jobs stay visible (MinJobAge), and an unknown job reads as gone
    assert slurm_cluster.state(ok) == "COMPLETED"
    assert slurm_cluster.state("999999") == ""


def test_requeue_now_restarts_a_running_job_with_restart_count_1(slurm_cluster, tmp_path):
    runs = tmp_path / "runs.txt"
    job = slurm_cluster.sbatch(
        "#!/bin/bash\n"
        f"echo run restart=${{SLURM_RESTART_COUNT-unset}} >> {runs}\n"
        "exec sleep 300\n", f"--output={tmp_path / 'job.out'}")
    _wait_for_file(runs, lambda t: "restart=unset" in t)
    assert slurm_cluster.state(job) == "RUNNING"
    t0 = time.monotonic()
    slurm_cluster.requeue_now(job)
    text = _wait_for_file(runs, lambda t: "restart=1" in t, timeout=15)
    took = time.monotonic() - t0
    assert text.splitlines() == ["run restart=unset", "run restart=1"]
    assert took < 15, took
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "RUNNING" and info["Restarts"] == "1", info
    slurm_cluster.cancel(job)
    assert slurm_cluster.wait(job, timeout=20) == "CANCELLED"


def test_kill_on_bad_exit_ends_the_step_and_kills_the_other_task(slurm_cluster, tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    t0 = time.monotonic()
    r = slurm_cluster.srun(
        ["-N2", "-n2", "--kill-on-bad-exit=1", "bash", "-c",
         f'if [ "$SLURM_PROCID" = 1 ]; then while [ ! -s {pid_file} ]; do sleep 0.1; done; exit 7; fi; '
         f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; exec sleep 300"], timeout=60)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "task 1: Exited with exit code 7" in r.stderr, r.stderr
    assert took < 12, (took, r.stderr)
    sleeper = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(sleeper)


def test_signal_reaches_the_batch_shell_or_the_step_tasks(slurm_cluster, tmp_path):
    log = tmp_path / "signals.log"
    job = slurm_cluster.sbatch(
        "#!/bin/bash\n"
        f"trap 'echo shell-USR2 >> {log}' USR2\n"
        f"srun -N2 -n2 bash -c 'trap \"echo task-USR2-$SLURM_PROCID >> {log}; exit 0\" USR2; "
        f"echo ready-$SLURM_PROCID >> {log}; while :; do sleep 0.2; done' &\n"
        "pid=$!\n"
        "while kill -0 $pid 2>/dev/null; do wait $pid; done\n",
        f"--output={tmp_path / 'job.out'}", "-N2")
    _wait_for_file(log, lambda t: "ready-0" in t and "ready-1" in t)
    slurm_cluster.signal(job, "USR2", batch=True)
    _wait_for_file(log, lambda t: "shell-USR2" in t)
    time.sleep(1)
    assert "task-USR2" not in log.read_text()
    slurm_cluster.signal(job, "USR2")
    text = _wait_for_file(log, lambda t: "task-USR2-0" in t and "task-USR2-1" in t)
    assert text.count("shell-USR2") == 1
    assert slurm_cluster.wait(job, timeout=20) == "COMPLETED"


def test_stop_ends_every_daemon_and_job_process(tmp_path):
    cluster = SlurmCluster(tmp_path / "c", nodes=1)
    pid_file = tmp_path / "job.pid"
    with cluster:
        daemons = cluster.running_pids()
        assert sorted(daemons) == ["munged", "n1", "slurmctld"]
        assert all(_alive(pid) for pid in daemons.values())
        assert cluster.start_seconds < 10
        cluster.sbatch(f"#!/bin/bash\necho $$ > {pid_file}\nexec sleep 300\n",
                       f"--output={tmp_path / 'job.out'}")
        _wait_for_file(pid_file, lambda t: t.strip().isdigit())
        job_pid = int(pid_file.read_text())
        assert _alive(job_pid)
    assert cluster.running_pids() == {}
    assert not any(_alive(pid) for pid in daemons.values())
    assert not _alive(job_pid)
    assert cluster._our_processes() == []
