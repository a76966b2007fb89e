"""One command under Detectron2's launch, torchrun and SLURM's variables (resnext_det.cli.launch),
stopped by the cluster's signals at a safe point (resnext_det.engine.preemption), and never hung
by a dead process (issue #21).

The placement tests feed the variables torchrun and srun set (as their documentation and the
real cluster of tests/slurm_cluster.py show them); the runs are 2-4 CPU processes (gloo) of a
tiny detector on the shapes data, compared with Detectron2's own ``launch`` of the same config.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from detectron2.engine import default_argument_parser

from resnext_det.engine import preemption
from resnext_det.cli.launch import (
    add_cluster_arguments,
    describe_placement,
    resolve_placement,
    slurm_port,
)
from resnext_det.errors import ConfigError

from runs import (CONFIG, TRAIN_NET, clean_env, finish, free_port, iterations_logged, losses, opts,
                  python, read, start, starts, wait_for)  # fmt: skip


def _args(*argv):
    return add_cluster_arguments(default_argument_parser()).parse_args(["--config-file", "x.yaml", *argv])


# ---------------------------------------------------------------------------------------------
# Where a process stands
# ---------------------------------------------------------------------------------------------
# What `torchrun --nnodes 2 --nproc-per-node 2` gives the second process of the second node
# (torch.distributed.run's documented variables).
TORCHRUN_2x2_RANK3 = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="1",
                          MASTER_ADDR="node0", MASTER_PORT="29500", TORCHELASTIC_RESTART_COUNT="0")  # fmt: skip
# What `srun -N2 --ntasks-per-node 2` gives task 3 of job 4242 (as the local cluster shows).
SLURM_2x2_TASK3 = dict(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID="3", SLURM_LOCALID="1",
                       SLURM_NODEID="1", SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4", SLURM_STEP_NUM_NODES="2",
                       SLURM_NNODES="2", SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_STEP_NODELIST="localhost",
                       SLURM_JOB_NODELIST="localhost")  # fmt: skip


def test_torchrun_variables_place_the_process_without_a_second_spawn():
    p = resolve_placement(_args(), TORCHRUN_2x2_RANK3)
    assert (p.how, p.rank, p.local_rank, p.world_size) == ("torchrun", 3, 1, 4)
    assert (p.num_machines, p.machine_rank, p.processes_per_machine) == (2, 1, 2)
    assert p.dist_url == "env://" and not p.spawns and not p.leads_job
    # --num-gpus equal to torchrun's processes per node is no contradiction
    assert resolve_placement(_args("--num-gpus", "2"), TORCHRUN_2x2_RANK3).world_size == 4
    line = describe_placement(p)
    assert "torchrun" in line and "world size 4 = 2 machine(s) x 2 process(es)" in line and "ranks 2-3" in line


def test_torchrun_with_a_contradicting_num_gpus_is_one_line_naming_both():
    with pytest.raises(ConfigError) as e:
        resolve_placement(_args("--num-gpus", "8"), TORCHRUN_2x2_RANK3)
    msg = str(e.value)
    assert "--num-gpus 8" in msg and "--nproc-per-node 8" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="--num-machines 3"):
        resolve_placement(_args("--num-machines", "3"), TORCHRUN_2x2_RANK3)


def test_slurm_task_per_process_reads_srun_variables():
    p = resolve_placement(_args(), SLURM_2x2_TASK3)
    assert (p.how, p.rank, p.local_rank, p.world_size, p.machine_rank) == ("slurm", 3, 1, 4, 1)
    assert p.dist_url == f"tcp://localhost:{slurm_port('4242')}" and p.job_id == "4242"
    with pytest.raises(ConfigError, match=r"--num-gpus 8 .*one task per node"):
        resolve_placement(_args("--num-gpus", "8"), SLURM_2x2_TASK3)
    # torchrun's variables win over SLURM's (torchrun started inside an srun step)
    assert resolve_placement(_args(), {**SLURM_2x2_TASK3, **TORCHRUN_2x2_RANK3}).how == "torchrun"
    # MASTER_ADDR / MASTER_PORT set by the user win over the derived ones
    p = resolve_placement(_args(), {**SLURM_2x2_TASK3, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"})
    assert p.dist_url == "tcp://10.1.2.3:1234"


def test_slurm_one_task_per_node_starts_num_gpus_processes_with_launch():
    env = dict(SLURM_2x2_TASK3, SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NODEID="1", SLURM_NTASKS="2",
               SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)")  # fmt: skip
    p = resolve_placement(_args("--num-gpus", "8"), env)
    assert (p.how, p.world_size, p.machine_rank, p.processes_per_machine) == ("slurm+launch", 16, 1, 8)
    assert p.spawns and not p.leads_job


def test_slurm_batch_script_and_odd_layouts():
    # The batch script itself (no step): Detectron2's flags decide, the job id is known.
    batch = {k: v for k, v in SLURM_2x2_TASK3.items() if k not in ("SLURM_STEP_ID",)}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_RESTART_COUNT="2")
    p = resolve_placement(_args("--num-gpus", "2"), batch)
    assert (p.how, p.world_size, p.restart, p.job_id) == ("launch", 2, 2, "4242")
    with pytest.raises(ConfigError, match="same number"):
        resolve_placement(_args(), dict(SLURM_2x2_TASK3, SLURM_STEP_TASKS_PER_NODE="3,1"))
    with pytest.raises(ConfigError, match="--distribution=block"):  # cyclic: task 1 of node 1 is rank 2
        resolve_placement(_args(), dict(SLURM_2x2_TASK3, SLURM_PROCID="2"))


def test_slurm_port_is_shared_by_the_tasks_of_a_job_and_in_range():
    assert slurm_port("4242") == slurm_port("4242") == 20000 + 4242
    assert slurm_port("123_7") == 20000 + 1237 % 20000  # array jobs
    assert all(20000 <= slurm_port(str(j)) < 40000 for j in (0, 1, 19999, 20000, 987654321))


def test_a_node_name_that_does_not_resolve_needs_scontrol_or_master_addr(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol
    env = dict(SLURM_2x2_TASK3, SLURM_STEP_NODELIST="nosuchnode-xyz[1-2]")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        resolve_placement(_args(), env)
    assert resolve_placement(_args(), dict(env, MASTER_ADDR="127.0.0.1")).dist_url.startswith("tcp://127.0.0.1:")


def test_preemption_flag_and_exit_codes():
    preemption.reset()
    try:
        assert preemption.stop_requested() is None and preemption.agree() is None
        preemption.request_stop(signal.SIGUSR2)
        preemption.request_stop(signal.SIGTERM)  # the first signal counts
        assert preemption.stop_requested() == signal.SIGUSR2 == preemption.agree()
        assert preemption.is_time_limit(signal.SIGUSR1) and not preemption.is_time_limit(signal.SIGTERM)
        assert preemption.exit_code(signal.SIGTERM) == 143  # the shell's 128 + 15
        assert not issubclass(preemption.Preempted, Exception)  # Detectron2's loop must not log it as a failure
    finally:
        preemption.reset()


# ---------------------------------------------------------------------------------------------
# Runs: 2 CPU processes (gloo) of a tiny detector
# ---------------------------------------------------------------------------------------------
def _train(out, *flags, launcher=(), iters=6, extra=()):
    return [*(launcher or python())] + [TRAIN_NET, "--config-file", CONFIG, *flags, *opts(out, iters), *extra]


def _until_iteration_19(proc, log):
    wait_for(lambda: 19 in iterations_logged(read(log)), "iteration 19", proc)


@pytest.fixture(scope="module")
def launch_2(tmp_path_factory):
    """The reference: Detectron2's own launch of 2 processes (--num-gpus 2)."""
    out = tmp_path_factory.mktemp("launch2") / "out"
    rc, log = finish(start(_train(out, "--num-gpus", "2", "--dist-url", "auto"), str(out) + ".log"), str(out) + ".log")
    assert rc == 0, log[-4000:]
    assert "Processes started by Detectron2's launch: world size 2" in log
    return losses(out)


@pytest.mark.slow
def test_torchrun_trains_once_with_the_losses_of_launch(tmp_path, launch_2):
    """Was: two independent world-size-1 trainings into one OUTPUT_DIR."""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]  # fmt: skip
    rc, log = finish(start(_train(out, launcher=torchrun), str(out) + ".log"), str(out) + ".log")
    assert rc == 0, log[-4000:]
    assert log.count("Processes started by torchrun: world size 2 = 1 machine(s) x 2 process(es)") == 1
    assert log.count("Starting training from iteration 0") == 1  # one training, not two
    got = losses(out)
    assert got.keys() == launch_2.keys() and got
    for it in got:
        for k, v in launch_2[it].items():
            assert got[it][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (it, k)


@pytest.mark.slow
def test_two_machines_on_one_host_share_its_cores(tmp_path):
    """Two 'machines' of 2 processes on this host: every process counts all 4 (was: 2 each)."""
    out = tmp_path / "out"
    port = free_port()
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
    procs = [
        start(_train(out, "--num-gpus", "2", "--num-machines", "2", "--machine-rank", str(m),
                      "--dist-url", f"tcp://127.0.0.1:{port}"), f"{out}.log{m}", env=env)
        for m in (0, 1)
    ]  # fmt: skip
    results = [finish(p, f"{out}.log{m}") for m, p in enumerate(procs)]
    for rc, log in results:
        assert rc == 0, log[-4000:]
    cores = len(os.sched_getaffinity(0))
    assert f"4 CPU processes on this machine: {max(1, cores // 4)} thread(s) each" in results[0][1]


@pytest.mark.slow
def test_machines_that_do_not_share_output_dir_stop_before_training(tmp_path):
    """Was: rank 0 resumed at iteration 20, rank 1 silently from scratch, then both hung."""
    port = free_port()
    procs = [
        start(_train(tmp_path / f"node{m}", "--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(m),
                      "--dist-url", f"tcp://127.0.0.1:{port}", "--resume"), f"{tmp_path}/log{m}")
        for m in (0, 1)
    ]  # fmt: skip
    for m, p in enumerate(procs):
        rc, log = finish(p, f"{tmp_path}/log{m}", timeout=300)
        assert rc == 2, log[-3000:]
        last = log.strip().splitlines()[-1]
        assert "OUTPUT_DIR" in last and "file system all nodes share" in last, last
        assert "Starting training" not in log


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_the_iteration_it_arrived_in_and_resume_finishes(tmp_path, sig):
    """Was: SIGTERM lost up to CHECKPOINT_PERIOD - 1 iterations; SIGUSR1 killed the run (exit 138)."""
    out = tmp_path / "out"
    log = str(out) + ".log"
    proc = start(_train(out, "--num-gpus", "2", "--dist-url", "auto", iters=400), log)
    _until_iteration_19(proc, log)
    os.kill(proc.pid, sig)  # the launcher alone: it passes the signal on to its processes
    rc, text = finish(proc, log)
    assert rc == 128 + sig, text[-3000:]
    saved = re.findall(r"saved (\S+model_(\d{7})\.pth) \(iteration (\d+) of 400\)", text)
    assert saved, text[-3000:]
    path, it, n = saved[0]
    assert os.path.isfile(path) and int(n) == int(it) + 1 and int(it) >= 19
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == os.path.basename(path)
    # The last logged iteration is the saved one: nothing after it ran.
    logged = [int(i) for i in re.findall(r"iter: (\d+) ", text)]
    assert max(logged) <= int(it)
    rc, text2 = finish(start(_train(out, "--num-gpus", "2", "--dist-url", "auto", "--resume", iters=int(it) + 4),
                               log + "2"), log + "2")  # fmt: skip
    assert rc == 0, text2[-3000:]
    assert starts(text2) == [int(it) + 1]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


@pytest.mark.slow
def test_a_requeued_job_resumes_without_being_told(tmp_path):
    """SLURM's restart count (a requeued batch job) turns --resume on."""
    out = tmp_path / "out"
    rc, log = finish(start(_train(out, extra=("SOLVER.CHECKPOINT_PERIOD", "3")), str(out) + ".log"), str(out) + ".log")
    assert rc == 0, log[-3000:]
    os.remove(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    rc, log = finish(start(_train(out, extra=("SOLVER.CHECKPOINT_PERIOD", "3")), str(out) + ".log2",
                             env=clean_env(SLURM_JOB_ID="77", SLURM_RESTART_COUNT="1")), str(out) + ".log2")  # fmt: skip
    assert rc == 0, log[-3000:]
    assert starts(log) == [3]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_ends_the_others_with_one_line(tmp_path, victim):
    out = tmp_path / "out"
    log = str(out) + ".log"
    proc = start(_train(out, "--num-gpus", "2", "--dist-url", "auto", iters=400), log)
    _until_iteration_19(proc, log)
    kids = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True, text=True)
    pids = sorted(int(x) for x in kids.stdout.split())
    assert len(pids) == 2, kids
    os.kill(pids[victim], signal.SIGKILL)  # processes are started in rank order
    t_kill = time.time()
    rc, text = finish(proc, log, timeout=120)
    took = time.time() - t_kill
    assert rc == 1, text[-3000:]
    assert f"rank {victim} (pid {pids[victim]}) is gone (killed by SIGKILL)" in text
    assert "--resume" in text.strip().splitlines()[-1]
    assert took < 60, took  # bounded (measured ~4 s); far below --dist-timeout
