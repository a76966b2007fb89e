"""Tests of resnext_det/utils/io.py (``atomic_write``, ``remove_stale_temporaries``) and the
checkpoints written through it (issue #12): a run killed while model_final.pth is written
resumes, an interrupted write leaves no temporary, and a full disk ends the tool in one line
(resnext_det/cli/tool.py's ``run_tool``)."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from resnext_det.cli.tool import run_tool
from resnext_det.utils.io import atomic_write, remove_stale_temporaries

from reliability_helpers import CONFIG, ROOT, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


_KILLER = textwrap.dedent(
    """
    import os, signal, sys, torch
    real_save = torch.save
    def save(obj, f, *a, **k):
        name = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
        if "model_final" in name:
            f.write(b"PK\\x03\\x04 a few bytes of the start")  # then the machine dies
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = save
    from resnext_det.cli.train_net import cli
    cli(sys.argv[1:])
    """
)


@pytest.mark.slow  # subprocesses, several seconds: left out of `make mutants`
def test_a_kill_while_model_final_is_written_leaves_a_run_that_resumes(tmp_path):
    """SOLVER.CHECKPOINT_PERIOD divides MAX_ITER (as in `make demo`): killed inside the write
    of model_final.pth, the run resumes at MAX_ITER, writes a complete model_final.pth and
    leaves no temporary file; before, model_final.pth was truncated for good."""
    out = tmp_path / "run"
    args = ["--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
            "OUTPUT_DIR", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _KILLER, *args], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (out / "model_final.pth").exists()  # never a prefix under the real name
    assert [f for f in os.listdir(out) if ".tmp-" in f]  # the killed write's temporary
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--resume", *args],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 1 and "backbone.bottom_up.stem.conv1.weight" in final["model"]
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # cleaned on the next start


def test_interrupted_writes_leave_no_temporaries(tmp_path):
    target = tmp_path / "model_final.pth"
    target.write_bytes(b"old")

    def dies(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), dies)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model_final.pth"]
    # What a kill -9 leaves (ours, and the 0.1 writer's names) goes at the next start.
    for name in (".model_final.pth.tmp-x1y2", "config.yaml.tmp4242", ".model_0000001.pth.tmp-ab"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == 3
    assert os.listdir(tmp_path) == ["model_final.pth"]


def test_a_full_disk_is_one_line(tmp_path, capsys):
    def write():
        def no_space(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model_final.pth"))

        atomic_write(str(tmp_path / "model_final.pth"), no_space)

    assert run_tool(write, "train_net.py") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_net.py: error: no space left") and "model_final.pth" in err
    assert os.listdir(tmp_path) == []
