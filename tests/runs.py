"""Helpers of the tests that run the tools as processes (tests/test_launch.py, tests/test_cluster.py):
the tiny shapes detector's command line, a clean environment, starting and ending a run, and
what its logs and metrics say. Not a test file."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes.yaml")
TRAIN_NET = os.path.join(ROOT, "tools/train_net.py")
#: The shapes quickstart detector at 160 px, 4 images per iteration (1, 2 or 4 processes), no
#: periodic checkpoint or evaluation: a checkpoint in OUTPUT_DIR comes from a stop.
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "64",
    "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "5", "SOLVER.BASE_LR", "0.01",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "1000",
]  # fmt: skip
TIMEOUT = 900
_PLACEMENT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def opts(out, iters):
    """TINY for ``iters`` iterations (lr step at the last one) into ``out``."""
    return [*TINY, "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({iters - 1},)", "OUTPUT_DIR", str(out)]


def clean_env(base=None, **extra):
    """``base`` (os.environ) without what would place a process (torchrun's and SLURM's
    variables, SLURM_CONF kept), one thread, unbuffered, the shapes data where the tests keep them."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k == "SLURM_CONF" or not (k.startswith(("SLURM_", "TORCHELASTIC_")) or k in _PLACEMENT_VARS
                                        or k == "RESNEXT_DET_TRACEBACK")}  # fmt: skip
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    env.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log, env=None):
    """``cmd`` in its own session, stdout and stderr into the file ``log``."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=clean_env() if env is None else env, start_new_session=True)  # fmt: skip


def finish(proc, log, timeout=TIMEOUT):
    """Wait for ``proc`` (killed with its session after ``timeout``); its exit status and log."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, read(log)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def wait_for(predicate, what, proc=None, timeout=TIMEOUT, poll=0.05):
    """Poll ``predicate`` until it is true (returned); fails when ``proc`` (anything with
    ``poll()``) ended first, or after ``timeout``."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = predicate()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.poll()}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def losses(out):
    """``{iteration: {loss name: value}}`` of a run's metrics.json."""
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["iteration"]: {k: v for k, v in r.items() if "loss" in k} for r in rows if "total_loss" in r}


def starts(text):
    """The iterations a log's trainings started from."""
    return [int(m) for m in re.findall(r"Starting training from iteration (\d+)", text)]


def iterations_logged(text):
    return [int(i) for i in re.findall(r"iter: (\d+) ", text)]


def stopped_at(text):
    """The iterations a run saved at when a stop signal ended it, from its log lines."""
    return [int(m) for m in re.findall(r"Stopped at a safe point: stopped by SIG\w+; saved \S+model_(\d{7})\.pth", text)]


def python(*args):
    return [sys.executable, *map(str, args)]
