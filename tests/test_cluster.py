"""The cluster path against a real scheduler (issue #21): a SLURM cluster started on this
machine (tests/slurm_cluster.py: munged, slurmctld, two slurmd "nodes" n1 and n2 of 2 CPUs),
jobs submitted with tools/submit.py as a user submits them, CPU processes (gloo), the tiny
shapes detector. The reference for every loss is Detectron2's own ``launch`` of the same world
size, seed and total batch.

- a 2-node x 2-task job gives the losses of ``launch`` with 4 processes, and so does torchrun
  with two "nodes" of 2 processes;
- a job stopped by the time-limit signal (USR2, what SLURM sends ``--signal-delay-s`` before the
  end), then by ``scontrol requeue`` (SIGTERM), resumes each time at the iteration it was at when
  signalled (no periodic checkpoint exists) and finishes all MAX_ITER iterations;
- an Appendix B job requeued inside stage 1 and inside stage 2 finishes all four stages, stage 2
  keeping the proposal chunks it had written;
- a task killed with ``kill -9`` ends the job within a bounded time, and ``--wait`` says so.

Without SLURM's commands the tests that need the cluster are skipped (``make test`` says which
Debian packages bring them; ``.ci/run`` installs them).
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from detectron2.data import DatasetCatalog

import resnext_det  # noqa: F401  registers the shapes data
from resnext_det.data.shapes import shapes_json_file
from resnext_det.unshared import STAGE_DIRS

from runs import (CONFIG, ROOT, TIMEOUT, TRAIN_NET, clean_env, finish, free_port, iterations_logged, losses,
                  opts, read, start, starts, stopped_at, wait_for)  # fmt: skip

APPENDIX_B = os.path.join(ROOT, "configs/COCO-Detection/Base-AppendixB-C4.yaml")
SUBMIT = os.path.join(ROOT, "tools/submit.py")

pytestmark = pytest.mark.slow


def _submit_cmd(out, *flags, opts, nodes=2, tasks=2):
    return [sys.executable, SUBMIT, "--cluster", "slurm", "--partition", "debug", "--nodes", str(nodes),
            "--tasks-per-node", str(tasks), "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "30",
            "--wait", *flags, *opts]  # fmt: skip


def _assert_samelosses(got, ref):
    assert got.keys() == ref.keys() and got, (got, ref)
    for it in got:
        for k, v in ref[it].items():
            assert got[it][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (it, k, got[it][k], v)


def _job(stdout_path, timeout=120):
    """The job id and task 0's log, from the submitter's 'Submitted job' line."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        with open(stdout_path) as f:
            m = re.search(r"^Submitted job (\S+): .*; logs: (\S+); follow:", f.read(), re.M)
        if m:
            return m.group(1), m.group(2)
        time.sleep(0.2)
    raise AssertionError(open(stdout_path).read()[-3000:])


class _Job:
    """A batch job seen as a process for :func:`_wait_for`: ``poll()`` is None while it is
    in the queue (pending, running, requeued), else its final state."""

    def __init__(self, cluster, job):
        self.cluster, self.job = cluster, job

    def poll(self):
        state = self.cluster.state(self.job)
        return None if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED") else state

    @property
    def returncode(self):
        return self.poll()


@pytest.fixture(scope="module")
def launch_4(tmp_path_factory):
    """The reference: Detectron2's own launch of 4 processes on one machine."""
    out = tmp_path_factory.mktemp("launch4") / "out"
    cmd = [sys.executable, TRAIN_NET, "--config-file", CONFIG, "--num-gpus", "4", "--dist-url", "auto", *opts(out, 6)]
    rc, log = finish(start(cmd, f"{out}.log", clean_env()), f"{out}.log")
    assert rc == 0, log[-4000:]
    assert "Processes started by Detectron2's launch: world size 4" in log
    return losses(out)


def test_a_two_node_slurm_job_gives_the_losses_of_launch(slurm_cluster, tmp_path, launch_4):
    out = tmp_path / "out"
    cmd = _submit_cmd(out, "--config-file", CONFIG, opts=opts(out, 6))
    rc, text = finish(start(cmd, f"{out}.submit", clean_env(slurm_cluster.env)), f"{out}.submit")
    assert rc == 0, text[-4000:]
    job, log = _job(f"{out}.submit")
    assert f"Submitted job {job}: 2 node(s) x 2 task(s) (0 GPU(s) per node) on debug" in text
    task0 = read(log)
    assert "Processes started by SLURM (one task per process): world size 4 = 2 machine(s) x 2 process(es)" in task0
    assert f"job {job}, rendezvous tcp://127.0.0.1:" in task0  # n1's NodeAddr: node names do not resolve
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    scripts = list((out / "submitit").glob("*_submission.sh"))
    assert scripts and "--kill-on-bad-exit=1" in scripts[0].read_text()
    _assert_samelosses(losses(out), launch_4)


def test_torchrun_on_two_nodes_gives_the_losses_of_launch(tmp_path, launch_4):
    out = tmp_path / "out"
    port = free_port()
    procs = [
        start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
                "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
                TRAIN_NET, "--config-file", CONFIG, *opts(out, 6)], f"{out}.log{k}", clean_env())
        for k in (0, 1)
    ]  # fmt: skip
    logs = [finish(p, f"{out}.log{k}") for k, p in enumerate(procs)]
    for rc, log in logs:
        assert rc == 0, log[-4000:]
    assert "Processes started by torchrun: world size 4 = 2 machine(s) x 2 process(es), this machine 0" in logs[0][1]
    assert logs[0][1].count("Starting training from iteration 0") == 1
    _assert_samelosses(losses(out), launch_4)


def test_a_preempted_job_resumes_at_the_iteration_it_was_signalled_in(slurm_cluster, tmp_path):
    """The time-limit signal (USR2 to the job's tasks, as SLURM sends it --signal-delay-s before
    the end): the job saves, submitit requeues it, it resumes there. Then `scontrol requeue`
    (SIGTERM to the tasks, as a preemption): the job saves, SLURM requeues it, it resumes there.
    No periodic checkpoint exists (CHECKPOINT_PERIOD 1000): the resumed iteration can only come
    from the stop. It ends COMPLETED with all MAX_ITER iterations."""
    out = tmp_path / "out"
    iters = 140
    cmd = _submit_cmd(out, "--config-file", CONFIG, opts=opts(out, iters), nodes=1, tasks=2)
    submitter = start(cmd, f"{out}.submit", clean_env(slurm_cluster.env))
    job, log = _job(f"{out}.submit")

    # 1. the time-limit signal, once iteration 19 was logged
    wait_for(lambda: 19 in iterations_logged(read(log)), "iteration 19", submitter)
    slurm_cluster.signal(job, "USR2")
    wait_for(lambda: stopped_at(read(log)), "the stop", submitter)
    first = stopped_at(read(log))[0]
    slurm_cluster.release_now(job, timeout=120)  # submitit requeued it: skip SLURM's ~120 s hold
    wait_for(lambda: first + 1 in starts(read(log)), f"the resume at {first + 1}", submitter)

    # 2. a preemption-like requeue by the admin: SIGTERM, then SIGKILL after KillWait (5 s)
    wait_for(lambda: any(i >= first + 20 for i in iterations_logged(read(log))), "20 more iterations", submitter)
    slurm_cluster.requeue_now(job, timeout=120)
    wait_for(lambda: len(stopped_at(read(log))) == 2, "the second stop", submitter)
    second = stopped_at(read(log))[1]
    wait_for(lambda: second + 1 in starts(read(log)), f"the resume at {second + 1}", submitter)

    rc, text = finish(submitter, f"{out}.submit")
    assert rc == 0, text[-3000:] + read(log)[-5000:]
    task0 = read(log)  # submitit's logs are opened in append mode: every run of the job
    assert "stopped by SIGUSR2" in task0 and "stopped by SIGTERM" in task0
    assert starts(task0) == [0, first + 1, second + 1] and second > first >= 19
    assert "restart 1" in task0 and "restart 2" in task0
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    assert max(losses(out)) == iters - 1 and os.path.isfile(out / "model_final.pth")
    assert not [f for f in os.listdir(out) if re.fullmatch(r"model_\d{7}\.pth", f) and int(f[6:13]) not in (first, second)]


def _coco_subset(src_json, dst_json, n):
    with open(src_json) as f:
        data = json.load(f)
    images = data["images"][:n]
    keep = {im["id"] for im in images}
    data.update(images=images, annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    with open(dst_json, "w") as f:
        json.dump(data, f)
    return dst_json


def _appendix_bopts(out):
    from unshared_runs import TINY as UNSHARED_TINY  # the schedule's tiny settings, 2-process reference

    return [*UNSHARED_TINY, "MODEL.ROI_HEADS.NUM_CLASSES", "3", "DATASETS.TRAIN", "('cl_train',)",
            "DATASETS.TEST", "('cl_val',)", "SOLVER.CHECKPOINT_PERIOD", "1000", "UNSHARED.RPN.MAX_ITER", "400",
            "UNSHARED.RPN.STEPS", "(300,)", "UNSHARED.FAST_RCNN.MAX_ITER", "30", "UNSHARED.FAST_RCNN.STEPS", "(25,)",
            "UNSHARED.PROPOSALS.CHUNK_IMAGES", "5", "UNSHARED.EVAL_END_TO_END", "False", "OUTPUT_DIR", str(out)]  # fmt: skip


def test_an_appendix_b_job_requeued_in_stages_1_and_2_finishes_all_four(slurm_cluster, tmp_path):
    DatasetCatalog.get("shapes_train")  # the shapes data exist (generated on first use)
    train = shapes_json_file("train")  # all 400 images: stage 2 lasts a few seconds
    val = _coco_subset(shapes_json_file("val"), tmp_path / "val.json", 8)
    root = os.path.dirname(os.path.dirname(shapes_json_file("train")))
    out = tmp_path / "out"
    cmd = _submit_cmd(out, "--config-file", APPENDIX_B, "--register-coco", "cl_train", str(train), f"{root}/train",
                      "--register-coco", "cl_val", str(val), f"{root}/val", opts=_appendix_bopts(out), nodes=1, tasks=2)  # fmt: skip
    submitter = start(cmd, f"{out}.submit", clean_env(slurm_cluster.env))
    job, log = _job(f"{out}.submit")
    stage2 = out / STAGE_DIRS["proposals"]

    # inside stage 1 (the RPN's training)
    wait_for(lambda: 19 in iterations_logged(read(log)), "stage 1's iteration 19", submitter)
    slurm_cluster.signal(job, "USR2")
    wait_for(lambda: stopped_at(read(log)), "the stop in stage 1", submitter)
    first = stopped_at(read(log))[0]
    slurm_cluster.release_now(job, timeout=120)

    # inside stage 2 (proposals): as soon as a process has written its first chunk
    wait_for(lambda: any(".part" in f for f in os.listdir(stage2)) if stage2.is_dir() else False,
              "stage 2's first chunk", submitter, poll=0.01)  # fmt: skip
    slurm_cluster.signal(job, "USR2")
    wait_for(lambda: "images of cl_train of process" in read(log), "the stop in stage 2", submitter)
    slurm_cluster.release_now(job, timeout=120)

    rc, text = finish(submitter, f"{out}.submit")
    task0 = read(log)
    assert rc == 0, text[-3000:] + task0[-6000:]
    for stage, folder in STAGE_DIRS.items():
        assert os.path.isfile(out / folder / "stage_done.json"), stage
    assert starts(task0)[:2] == [0, first + 1]  # stage 1 resumed where it stopped
    m = re.search(r"Proposals for cl_train \(process 1/2\): resuming, (\d+) of its (\d+) images found done", task0)
    assert m and 0 < int(m.group(1)) < int(m.group(2)), task0[-6000:]  # stage 2 kept its chunks
    assert "restart 2" in task0
    with open(out / STAGE_DIRS["eval"] / "results.json") as f:
        assert "cl_val" in json.load(f)["stored_proposals"]
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"


def test_a_killed_task_ends_the_job_within_bounded_time(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    cmd = _submit_cmd(out, "--config-file", CONFIG, opts=opts(out, 400))
    submitter = start(cmd, f"{out}.submit", clean_env(slurm_cluster.env))
    job, log = _job(f"{out}.submit")
    wait_for(lambda: 19 in iterations_logged(read(log)), "iteration 19", submitter)
    pattern = f"^{re.escape(sys.executable)} .*submitit.core._submit {re.escape(str(out / 'submitit'))}"  # not srun's
    tasks = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    pids = [int(p) for p in tasks.stdout.split()]
    assert len(pids) == 4, tasks
    os.kill(pids[-1], signal.SIGKILL)
    t_kill = time.time()
    state = slurm_cluster.wait(job, timeout=180)
    took = time.time() - t_kill
    rc, text = finish(submitter, f"{out}.submit", timeout=180)
    assert state == "FAILED" and took < 60, (state, took)  # measured: ~5 s
    assert rc == 1 and f"job {job}" in text.lower(), text[-3000:]


def test_a_plain_sbatch_script_one_task_per_node_requeues_itself_at_the_time_limit(slurm_cluster, tmp_path):
    """docs/cluster.md's sbatch script without submitit, with one task per node that starts
    --num-gpus processes (Detectron2's launch inside each task): the time-limit signal
    (#SBATCH --signal=USR1@N reaches the tasks and their processes) saves the iteration, rank 0
    runs `scontrol requeue`, and the requeued job resumes there without being told --resume."""
    out = tmp_path / "out"
    train = shlex.join([sys.executable, TRAIN_NET, "--config-file", CONFIG, "--num-gpus", "2", *opts(out, 140)])
    script = f"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --partition=debug
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/slurm-%j.out
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
cd {ROOT}
srun --kill-on-bad-exit=1 {train}
"""
    job = slurm_cluster.sbatch(script)
    log = tmp_path / f"slurm-{job}.out"
    running = _Job(slurm_cluster, job)
    wait_for(lambda: 19 in iterations_logged(read(log)), "iteration 19", running)
    slurm_cluster.signal(job, "USR1")
    wait_for(lambda: f"job {job} requeued (1 of --max-requeues 3)" in read(log), "the requeue", running)
    first = stopped_at(read(log))[0]
    slurm_cluster.release_now(job, timeout=120)
    assert slurm_cluster.wait(job, timeout=TIMEOUT) == "COMPLETED", read(log)[-5000:]
    text = read(log)
    line = "Processes started by SLURM (one task per node) + Detectron2's launch: world size 4 = 2 machine(s) x 2"
    assert text.count(line) == 2 and "restart 1" in text  # the first run and the requeued one
    assert "stopped by SIGUSR1" in text and starts(text) == [0, first + 1] and first >= 19
    assert max(losses(out)) == 139 and os.path.isfile(out / "model_final.pth")
