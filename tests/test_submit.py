"""tools/submit.py: the flags and the submitit parameters each maps to (the sbatch script
included, nothing submitted), the one-line errors, the job function (torchrun variables
under the LocalExecutor, failures, checkpoint()), --wait on jobs that end without results;
then end to end through the LocalExecutor, and through a real (single-machine) SLURM."""
import importlib.util
import os
import pickle
import re
import signal
import subprocess
import sys

import pytest

import submitit
from submitit.local.local import LocalJob
from submitit.slurm.slurm import SlurmExecutor, SlurmJob

from resnext_det.cli import job_wait, launch
from resnext_det.engine import preemption
from resnext_det.cli import submit as sub
from resnext_det.cli.tool import run_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes.yaml")
TOOL = os.path.join(ROOT, "tools/submit.py")
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "64",
    "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "5", "SOLVER.BASE_LR", "0.01",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "(5,)",
    "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "1000",
]  # fmt: skip


def _tool():
    spec = importlib.util.spec_from_file_location("submit_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _tool()


@pytest.fixture
def srun_here(monkeypatch):
    """submitit's SLURM executor refuses to exist without ``srun``: pretend it is there."""
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))


@pytest.fixture
def clean_preemption():
    preemption.reset()
    yield
    preemption.reset()


def _args(flags, opts, out):
    args = tool.argument_parser().parse_args([*flags, "--config-file", CONFIG, *opts, "OUTPUT_DIR", str(out)])
    sub.complete_args(args)
    return args


def _sbatch(executor) -> str:
    return executor._executor._make_submission_file_text("CMD", "uid")


# ---------------------------------------------------------------------------------------------
# Flags -> submitit parameters
# ---------------------------------------------------------------------------------------------
def test_every_slurm_flag_reaches_the_sbatch_script(tmp_path, srun_here):
    args = _args(
        ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6", "--mem-gb", "64", "--partition", "gpu",
         "--account", "vision", "--qos", "high", "--constraint", "volta32gb", "--time", "90",
         "--signal-delay-s", "150", "--max-requeues", "5"],
        ["MODEL.DEVICE", "cuda", "SOLVER.IMS_PER_BATCH", "16"], tmp_path / "out",
    )  # fmt: skip
    ex = sub.build_executor(args)
    assert isinstance(ex, submitit.AutoExecutor) and ex.cluster == "slurm"
    p = ex._executor.parameters
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (2, 4, 4, 6)
    assert (p["mem"], p["time"], p["signal_delay_s"], p["partition"]) == ("64GB", 90, 150, "gpu")
    assert (p["account"], p["qos"], p["constraint"]) == ("vision", "high", "volta32gb")
    assert p["srun_args"] == ["--kill-on-bad-exit=1"] and p["stderr_to_stdout"] is True
    assert ex._executor.max_num_timeout == 5
    assert ex.folder == tmp_path / "out" / "submitit"  # --job-dir: OUTPUT_DIR/submitit
    text = _sbatch(ex)
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6", "--mem=64GB",
                 "--time=90", "--signal=USR2@150", "--partition=gpu", "--account=vision", "--qos=high",
                 "--constraint=volta32gb", "--job-name=resnext_det:faster_rcnn_X_26_8x4d_FPN_shapes"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in text, (line, text)
    srun = [x for x in text.splitlines() if x.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0] and "--error" not in srun[0], text
    assert f"--output {tmp_path / 'out' / 'submitit'}/%j_%t_log.out" in srun[0]


def test_slurm_defaults_follow_the_config(tmp_path, srun_here):
    args = _args([], ["MODEL.DEVICE", "cuda", "SOLVER.IMS_PER_BATCH", "16"], tmp_path)
    assert (args.cluster, args.nodes, args.gpus_per_node, args.tasks_per_node) == ("slurm", 1, 8, 8)
    assert "#SBATCH --time=1440\n" in _sbatch(sub.build_executor(args))
    args = _args([], ["MODEL.DEVICE", "cpu"], tmp_path)  # a CPU config: one CPU task, no GPU asked
    assert (args.gpus_per_node, args.tasks_per_node) == (0, 1)
    text = _sbatch(sub.build_executor(args))
    assert "gpus" not in text and "#SBATCH --ntasks-per-node=1\n" in text and "--partition" not in text
    args = _args(["--gpus-per-node", "0", "--tasks-per-node", "2", "--job-dir", str(tmp_path / "jobs")],
                 ["MODEL.DEVICE", "cpu"], tmp_path)  # fmt: skip
    assert args.tasks_per_node == 2 and args.job_dir == str(tmp_path / "jobs")


def test_local_executor_parameters(tmp_path):
    args = _args(["--cluster", "local", "--tasks-per-node", "2", "--gpus-per-node", "0", "--time", "7",
                  "--signal-delay-s", "30", "--max-requeues", "1"], ["MODEL.DEVICE", "cpu"], tmp_path)  # fmt: skip
    ex = sub.build_executor(args)
    assert isinstance(ex, submitit.LocalExecutor)
    p = ex.parameters
    assert (p["tasks_per_node"], p["gpus_per_node"], p["timeout_min"], p["signal_delay_s"]) == (2, 0, 7, 30)
    assert p["stderr_to_stdout"] is True and ex.max_num_timeout == 1


def test_the_job_gets_train_net_flags_not_the_cluster_ones(tmp_path):
    args = tool.argument_parser().parse_args(
        ["--cluster", "local", "--resume", "--eval-only", "--stage", "rpn", "--register-coco", "mine", "a.json",
         "imgs", "--dist-timeout", "5", "--max-requeues", "2", "--tasks-per-node", "2", "--wait",
         "--config-file", CONFIG, "MODEL.DEVICE", "cpu", "SOLVER.STEPS", "(5,)"]
    )  # fmt: skip
    assert sub.train_argv(args) == [
        "--config-file", CONFIG, "--resume", "--eval-only", "--dist-timeout", "5.0", "--max-requeues", "2",
        "--stage", "rpn", "--register-coco", "mine", "a.json", "imgs", "MODEL.DEVICE", "cpu", "SOLVER.STEPS", "(5,)",
    ]  # fmt: skip
    plain = tool.argument_parser().parse_args(["--config-file", CONFIG, "--gpus-per-node", "2"])
    assert sub.train_argv(plain) == ["--config-file", CONFIG]  # no --num-gpus: one task per process


def test_appendix_b_is_one_job_that_resumes_its_schedule(tmp_path, srun_here):
    """UNSHARED.ENABLED: the job runs train_net.py without --stage (every remaining stage;
    finished ones are skipped) and a requeue resumes; the stages' own batches are not
    SOLVER.IMS_PER_BATCH's."""
    config = os.path.join(ROOT, "configs/COCO-Detection/faster_rcnn_X_101_32x4d_C4_appendixB.yaml")
    args = tool.argument_parser().parse_args(
        ["--nodes", "2", "--gpus-per-node", "4", "--config-file", config, "OUTPUT_DIR", str(tmp_path)]
    )
    cfg = sub.complete_args(args)
    assert cfg.UNSHARED.ENABLED and args.tasks_per_node == 4
    argv = sub.train_argv(args)
    assert "--stage" not in argv and "--resume" not in argv
    assert sub.TrainJob(argv).checkpoint().function.argv == ["--resume", *argv]
    assert "#SBATCH --nodes=2\n" in _sbatch(sub.build_executor(args))


# ---------------------------------------------------------------------------------------------
# One-line errors, before anything is submitted
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, opts, names",
    [
        (["--nodes", "0"], [], "--nodes"),
        (["--cluster", "pbs"], [], "--cluster"),
        (["--time", "soon"], [], "--time"),
        (["--cluster", "local", "--nodes", "2"], [], "--nodes"),
        (["--cluster", "local", "--partition", "gpu"], [], "--partition"),
        (["--cluster", "local", "--mem-gb", "8"], [], "--mem-gb"),
        (["--cluster", "local", "--cpus-per-task", "4"], [], "--cpus-per-task"),
        (["--num-gpus", "2"], [], "--num-gpus"),
        (["--gpus-per-node", "0"], ["MODEL.DEVICE", "cuda"], "MODEL.DEVICE cpu"),
        (["--gpus-per-node", "2", "--tasks-per-node", "3"], ["MODEL.DEVICE", "cuda"], "--tasks-per-node"),
        (["--time", "1", "--signal-delay-s", "60"], [], "--signal-delay-s"),
        (["--max-requeues", "-1"], [], "--max-requeues"),
        (["--tasks-per-node", "3"], ["SOLVER.IMS_PER_BATCH", "4"], "SOLVER.IMS_PER_BATCH"),
        (["--stage", "rpn"], [], "--stage"),
        ([], ["MODEL.RESNEXT.CARDINALTY", "8"], "MODEL.RESNEXT.CARDINALTY"),
        ([], ["MODEL.DEVICE", "cpu", "--wait"], "--wait"),
        (["--register-coco", "mine", "/no/such.json", "/no/imgs"], [], "--register-coco"),
    ],
)
def test_bad_flags_are_one_line_before_submitting(tmp_path, capsys, srun_here, flags, opts, names):
    out = tmp_path / "out"
    argv = [*flags, "--config-file", CONFIG, "OUTPUT_DIR", str(out), *opts]
    assert run_tool(lambda: tool.main(argv), "submit.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("submit.py: error: ") and names in err[0], err
    assert not out.exists()  # nothing submitted


def test_missing_config_file_and_gpus_this_machine_lacks(tmp_path, capsys):
    assert run_tool(lambda: tool.main(["--cluster", "local"]), "submit.py") == 2
    assert "--config-file" in capsys.readouterr().err
    import torch

    n = torch.cuda.device_count()
    argv = ["--cluster", "local", "--gpus-per-node", str(n + 1), "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path)]
    assert run_tool(lambda: tool.main(argv + ["MODEL.DEVICE", "cuda"]), "submit.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--gpus-per-node {n + 1}" in err[0], err


def test_a_job_sbatch_refuses_is_one_line(tmp_path, monkeypatch, capsys, srun_here):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nosuch' >&2\n"
                      "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
                      "exit 1\n")  # fmt: skip
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["--partition", "nosuch", "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path / "out"),
            "MODEL.DEVICE", "cpu"]  # fmt: skip
    assert run_tool(lambda: tool.main(argv), "submit.py") == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("submit.py: error: sbatch refused the job: "), err
    assert "invalid partition specified: nosuch" in err[0] and not captured.out


# ---------------------------------------------------------------------------------------------
# The job function
# ---------------------------------------------------------------------------------------------
def test_checkpoint_resubmits_with_resume_once():
    job = sub.TrainJob(["--config-file", CONFIG, "MODEL.DEVICE", "cpu"])
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission) and isinstance(again.function, sub.TrainJob)
    assert again.function.argv == ["--resume", "--config-file", CONFIG, "MODEL.DEVICE", "cpu"]  # before the opts
    twice = again.function.checkpoint()
    assert twice.function.argv == again.function.argv
    assert pickle.loads(pickle.dumps(twice)).function.argv == again.function.argv


LOCAL_TASK_1 = {
    "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "12345", "SUBMITIT_LOCAL_NTASKS": "2",
    "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
    "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
}  # fmt: skip


@pytest.fixture
def local_task(monkeypatch):
    """This process as task 1 of 2 of LocalExecutor job 12345; the torchrun variables it
    exports are undone afterwards."""
    for name, value in LOCAL_TASK_1.items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "stale")
    return monkeypatch


def _fake_cli(local_task, fn):
    seen = {}

    def cli(argv):
        seen["argv"] = list(argv)
        seen["env"] = dict(os.environ)
        return fn()

    local_task.setattr("resnext_det.cli.submit.cli", cli)
    return seen


def test_local_task_exports_torchrun_variables(local_task, clean_preemption):
    seen = _fake_cli(local_task, lambda: None)
    assert sub.TrainJob(["--config-file", CONFIG])() == 0
    env = seen["env"]
    assert seen["argv"] == ["--config-file", CONFIG]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("1", "2", "1", "2")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", str(launch.slurm_port("12345")))


def _raise(e):
    raise e


@pytest.mark.parametrize(
    "outcome, message",
    [
        (lambda: _raise(sub.ConfigError("MODEL.FOO is bad")), "train_net.py: error: MODEL.FOO is bad"),
        (lambda: 2, "exit status 2"),
        (lambda: _raise(SystemExit(2)), "exit status 2"),
    ],
)
def test_a_task_that_does_not_end_well_fails(local_task, clean_preemption, capsys, outcome, message):
    _fake_cli(local_task, outcome)
    with pytest.raises(sub.TaskFailed, match=re.escape(message)):
        sub.TrainJob(["--config-file", CONFIG])()


def test_stop_signals_end_tasks_as_submitit_expects(local_task, clean_preemption, capsys):
    # SIGTERM (preemption, scancel): saved, then no result and status 143 (submitit writes
    # no result for a SystemExit): a requeued job writes it later; --wait reads a cancelled
    # job's state. An error result here would end --wait of a job that SLURM requeued.
    _fake_cli(local_task, lambda: (preemption.request_stop(signal.SIGTERM), 143)[1])
    with pytest.raises(SystemExit) as e:
        sub.TrainJob(["--config-file", CONFIG])()
    assert e.value.code == 143 and "stopped by SIGTERM, state saved" in capsys.readouterr().err
    # The time limit, with submitit's handler: task 1 leaves without a result and status 0
    # (task 0 requeues; srun --kill-on-bad-exit must not kill it meanwhile) ...
    preemption.reset()
    local_task.setitem(preemption._previous, signal.SIGUSR2, lambda *a: None)
    _fake_cli(local_task, lambda: (preemption.request_stop(signal.SIGUSR2), 140)[1])
    with pytest.raises(SystemExit) as e:
        sub.TrainJob(["--config-file", CONFIG])()
    assert e.value.code == 0
    # ... and on task 0, submitit's exit (local requeue: 144) goes through untouched.
    preemption.reset()
    local_task.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
    _fake_cli(local_task, lambda: (preemption.request_stop(signal.SIGUSR2), _raise(SystemExit(144))))
    with pytest.raises(SystemExit) as e:
        sub.TrainJob(["--config-file", CONFIG])()
    assert e.value.code == 144


# ---------------------------------------------------------------------------------------------
# --wait
# ---------------------------------------------------------------------------------------------
def _result(job, k, outcome, value):
    with open(job.task(k).paths.result_pickle, "wb") as f:
        pickle.dump((outcome, value), f)


def _states(monkeypatch, states, then=None):
    """slurm_state answers ``states`` one per call (the last one from then on); ``then``
    (call index -> action) writes result files along the way."""
    calls = []

    def state(job_id):
        calls.append(job_id)
        k = len(calls) - 1
        if then and k in then:
            then[k]()
        return states[min(k, len(states) - 1)]

    monkeypatch.setattr(job_wait, "slurm_state", state)
    return calls


def _wait(job, cluster="slurm", **kw):
    return job_wait.wait_for_job(job, cluster, poll_s=0.01, max_poll_s=0.01, **kw)


def test_wait_keeps_waiting_through_a_requeue(tmp_path, monkeypatch, capsys):
    job = SlurmJob(folder=tmp_path, job_id="77", tasks=[0, 1])
    done = {5: lambda: [_result(job, k, "success", 0) for k in (0, 1)]}
    calls = _states(monkeypatch, [("RUNNING", ""), ("COMPLETING", ""), ("PENDING", ""), ("REQUEUED", ""),
                                  ("RUNNING", ""), ("RUNNING", "")], done)  # fmt: skip
    assert _wait(job) == 0
    assert len(calls) == 6 and "Job 77 finished: 2 task(s) succeeded." in capsys.readouterr().out


def test_wait_never_hangs_on_a_job_that_died_without_results(tmp_path, monkeypatch, capsys):
    # scancel, kill -9, a lost node: SLURM says CANCELLED / NODE_FAIL, or forgets the job.
    for states in ([("RUNNING", ""), ("CANCELLED", "exit code 0:15")], [("RUNNING", ""), ("", "no longer known")]):
        job = SlurmJob(folder=tmp_path, job_id="78", tasks=[0, 1])
        (tmp_path / "78_0_log.out").write_text("".join(f"line {i}\n" for i in range(50)))
        _states(monkeypatch, states)
        assert _wait(job) == 1
        err = capsys.readouterr().err
        assert "job 78 failed" in err and "tasks 0, 1: no result" in err
        assert "line 49" in err and "line 29" not in err  # the last 20 lines of task 0's log


def test_wait_reports_the_failing_task(tmp_path, monkeypatch, capsys):
    job = SlurmJob(folder=tmp_path, job_id="79", tasks=[0, 1])
    _result(job, 0, "success", 0)
    _result(job, 1, "error", "Traceback ...\nTaskFailed: train_net.py: error: MODEL.FOO is bad\n")
    (tmp_path / "79_1_log.out").write_text("task 1 says MODEL.FOO is bad\n")
    # A task's error while the job still runs (the other tasks being killed): wait for the end.
    calls = _states(monkeypatch, [("RUNNING", ""), ("RUNNING", ""), ("FAILED", "exit code 1:0")])
    assert _wait(job) == 1
    assert len(calls) >= 5
    err = capsys.readouterr().err
    assert "job 79 failed (FAILED, exit code 1:0): task 1: TaskFailed: train_net.py: error: MODEL.FOO" in err
    assert "task 1's log" in err and "task 1 says MODEL.FOO is bad" in err


def test_wait_gives_up_when_slurm_does_not_answer(tmp_path, monkeypatch, capsys):
    job = SlurmJob(folder=tmp_path, job_id="80", tasks=[0])
    _states(monkeypatch, [(None, "Unable to contact slurm controller")])
    assert _wait(job, unreachable_s=0.05) == 1
    assert "cannot ask SLURM about job 80" in capsys.readouterr().err


def test_slurm_state_reads_scontrol_and_squeue(monkeypatch):
    answers = {
        "scontrol": (0, "JobId=5 JobName=x JobState=PENDING Reason=BeginTime Dependency=(null) ExitCode=0:0\n"),
        "squeue": (1, "never asked"),
    }
    monkeypatch.setattr(job_wait, "_run", lambda cmd: answers[cmd[0]])
    assert job_wait.slurm_state("5") == ("PENDING", "exit code 0:0, reason BeginTime")
    answers["scontrol"] = (1, "slurm_load_jobs error: Invalid job id specified\n")
    assert job_wait.slurm_state("5")[0] == ""
    answers["scontrol"] = (None, "No such file or directory: 'scontrol'")
    answers["squeue"] = (0, "RUNNING\n")
    assert job_wait.slurm_state("5") == ("RUNNING", "")
    answers["squeue"] = (1, "slurm_load_jobs error: Unable to contact slurm controller\n")
    assert job_wait.slurm_state("5") == (
        None, "scontrol: No such file or directory: 'scontrol'; squeue: slurm_load_jobs error: Unable to contact "
        "slurm controller"
    )  # fmt: skip


def test_wait_on_a_local_job_whose_processes_were_killed(tmp_path, capsys):
    proc = subprocess.Popen(["sleep", "60"])
    job = LocalJob(folder=tmp_path, job_id=str(proc.pid), tasks=[0, 1], process=proc)
    proc.kill()
    assert _wait(job, "local") == 1
    assert "tasks 0, 1: no result" in capsys.readouterr().err


def test_the_submitted_line(tmp_path):
    args = tool.argument_parser().parse_args(["--config-file", CONFIG, "--nodes", "2", "--partition", "gpu"])
    args.gpus_per_node, args.tasks_per_node = 8, 8
    job = SlurmJob(folder=tmp_path, job_id="81", tasks=list(range(16)))
    log = tmp_path / "81_0_log.out"
    assert sub.describe_submission(job, args) == (
        f"Submitted job 81: 2 node(s) x 8 task(s) (8 GPU(s) per node) on gpu; logs: {log}; "
        f"follow: tail -f {log}, squeue -j 81"
    )


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def _submit(args, env=None, timeout=600):
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    env.setdefault("DETECTRON2_DATASETS", os.environ.get("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets")))
    env.pop("RESNEXT_DET_TRACEBACK", None)
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def _log_of(stdout):
    m = re.search(r"^Submitted job (\S+): .*; logs: (\S+); follow: tail -f \2", stdout, re.M)
    assert m, stdout
    return m.group(2)


@pytest.mark.slow
def test_local_job_trains_with_two_processes(tmp_path):
    out = tmp_path / "run"
    r = _submit(["--cluster", "local", "--tasks-per-node", "2", "--gpus-per-node", "0", "--time", "15", "--wait",
                 "--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"])  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("Submitted job ") and " 1 node(s) x 2 task(s) (0 GPU(s) per node) on local" in lines[0]
    log = _log_of(r.stdout)
    assert log.startswith(str(out / "submitit"))
    with open(log) as f:
        assert "Processes started by torchrun: world size 2" in f.read()
    assert (out / "metrics.json").is_file() and (out / "model_final.pth").is_file()


def test_local_job_failing_inside_exits_1_with_its_last_lines(tmp_path):
    # setup_cfg does not know which datasets exist: the job's tasks find out.
    r = _submit(["--cluster", "local", "--tasks-per-node", "2", "--gpus-per-node", "0", "--time", "15", "--wait",
                 "--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(tmp_path / "run"), "MODEL.DEVICE", "cpu",
                 "DATASETS.TRAIN", "('no_such_dataset',)"])  # fmt: skip
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-5000:]
    assert r.stdout.startswith("Submitted job ")
    first = r.stderr.strip().splitlines()[0]
    assert re.match(r"submit.py: job \S+ failed \(ended", first) and "no_such_dataset" in first, r.stderr
    assert "last lines of task 0's log" in r.stderr


def test_bad_key_is_refused_before_submitting(tmp_path):
    r = _submit(["--cluster", "local", "--tasks-per-node", "2", "--gpus-per-node", "0", "--wait",
                 "--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(tmp_path / "run"), "MODEL.DEVICE", "cpu",
                 "MODEL.RESNEXT.CARDINALTY", "8"])  # fmt: skip
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-5000:]
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("submit.py: error: ") and "MODEL.RESNEXT.CARDINALTY" in err[-1], r.stderr
    assert "Traceback" not in r.stderr and "Submitted" not in r.stdout
    assert not (tmp_path / "run").exists()


