"""The second hour (issue #22, points 2, 5, 7, 10 and the empty ``last_checkpoint``): a recipe
that cannot run says so in one line before Detectron2 dumps the environment and the config;
Ctrl-C anywhere is one line saying where the work stopped and how to continue, and stage 0
of the demo resumes like the other stages; a misspelt config key names the real one; the
smaller messages say what the user needs. Each case is reproduced first as the user meets
it: the README's own command or the tool in a subprocess where the whole output is the
claim, in this process otherwise."""
import ast
import inspect
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.engine import defaults as d2_defaults
from resnext_det.checkpoint import CheckpointReadError, ResNeXtCheckpointer, WeightsConfigError
from resnext_det.checkpoint.readers import torch_load_weights
from resnext_det.config import add_resnext_config
from resnext_det.cli.tool import INTERRUPT_NOTE_ENV, run_tool
from resnext_det.cli.train_net import cli
from resnext_det.errors import Interrupted
from test_first_hour import FPN_1X, TINY, draw_coco, readme_command, run_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
#: What Detectron2's default_setup logs: the environment, the arguments, the whole config.
DUMP = ("Rank of current process", "Environment info", "Command line arguments",
        "Running with full config", "Full config saved to")  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """The README's layout (data/train.json, data/val.json, data/images/; 3 categories), with
    tools/ and configs/ of this checkout."""
    folder = str(tmp_path_factory.mktemp("second_hour"))
    draw_coco(folder)
    for name in ("tools", "configs"):
        os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
    return folder


def closed_port() -> int:
    """A local TCP port nothing listens on: a mirror there is 'no internet'."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def user_env(**extra):
    """A user's shell: no GPU, one thread, no traceback variable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RESNEXT_DET_TRACEBACK", INTERRUPT_NOTE_ENV)}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


def assert_no_dump(text: str):
    """None of what Detectron2's default_setup logs is in ``text``."""
    found = [m for m in DUMP if m in text]
    assert not found, (found, text[-3000:])


def ctrl_c(cmd, *, when, env, cwd=ROOT, delay=0.0, timeout=600):
    """``cmd`` as a terminal's foreground job (its own process group); once a line of its
    standard output matches ``when`` (a regex), SIGINT to the whole group after ``delay`` s,
    as Ctrl-C does. Returns (exit status, stdout, stderr, the match)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
    watchdog.start()
    err = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()))
    reader.start()
    out, match = [], None
    try:
        for line in p.stdout:
            out.append(line)
            match = re.search(when, line)
            if match:
                time.sleep(delay)
                os.killpg(p.pid, signal.SIGINT)
                break
        out.append(p.stdout.read())
        p.wait()
    finally:
        watchdog.cancel()
        reader.join()
    stdout, stderr = "".join(out), "".join(err)
    assert match is not None, f"never printed {when!r}: exit {p.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return p.returncode, stdout, stderr, match


def one_line(stderr: str, prog: str) -> str:
    """The tool's only line on standard error (warnings of libraries aside): no traceback."""
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    mine = [line for line in stderr.splitlines() if line.startswith(f"{prog}:")]
    assert len(mine) == 1 and stderr.strip().splitlines()[-1] == mine[0], stderr[-3000:]
    return mine[0]


def test_the_dump_markers_are_what_detectron2_logs():
    """The markers above are Detectron2's own words (the tests below assert their absence)."""
    source = inspect.getsource(d2_defaults.default_setup)
    assert all(m in source for m in DUMP), [m for m in DUMP if m not in source]


# ------------------------------------------------- point 2: errors before the dump
def test_readme_cpu_fine_tune_offline_stops_in_one_line_before_the_dump(user_folder, tmp_path):
    """The README's CPU fine-tuning command as written, without internet and with an empty
    cache: exit 2, and the line naming the URL and the manual conversion is all it prints
    (it came after 735 lines of environment and config before)."""
    script, argv = readme_command(contains=["--register-coco", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "5000"])
    env = user_env(RESNEXT_DET_CACHE=str(tmp_path / "cache"),
                   RESNEXT_DET_MIRROR=f"http://127.0.0.1:{closed_port()}")
    r = subprocess.run([sys.executable, script, *argv], cwd=user_folder, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "train_net.py: error: MODEL.WEIGHTS = 'torchvision://resnext50_32x4d.IMAGENET1K_V1': cannot download"
    ), last
    assert "tools/convert_pretrained.py resnext50_32x4d-7cdf4587.pth" in last, last
    assert_no_dump(r.stdout + r.stderr)
    # What it prints before the line: the dataset check (a line per dataset, and Detectron2's
    # note on the json's category ids) and the download it tried; nothing of the dump.
    assert "Traceback" not in r.stderr and len((r.stdout + r.stderr).strip().splitlines()) <= 12, r.stdout + r.stderr
    assert not os.listdir(tmp_path / "cache" / "downloads" / "torchvision")  # nothing half-downloaded


def test_readme_eval_only_with_a_misspelt_weights_path_says_what_evaluation_wants(user_folder, tmp_path):
    """The README's --eval-only line with MODEL.WEIGHTS misspelt (model_finall.pth beside a
    model_final.pth): one line, before the dump, naming the real file and what evaluation
    takes (a trained checkpoint or --resume with OUTPUT_DIR), not "train from scratch"."""
    script, argv = readme_command(contains=["--eval-only", "${SMOKE[@]}"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_final.pth").write_bytes(b"")
    argv = [a for a in argv if a != "${SMOKE[@]}"] + TINY
    argv[argv.index("OUTPUT_DIR") + 1] = str(run)
    argv += ["MODEL.WEIGHTS", str(run / "model_finall.pth")]
    r = run_readme(argv, user_folder, script)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train_net.py: error: MODEL.WEIGHTS = '{run / 'model_finall.pth'}': no such file"), last
    assert f"did you mean '{run / 'model_final.pth'}'?" in last and "--resume" in last and "OUTPUT_DIR" in last, last
    assert "train from scratch" not in last and "MODEL.WEIGHTS ''" not in last, last
    assert_no_dump(r.stdout + r.stderr)
    # Training from the same misspelt path keeps the fine-tuning advice.
    with pytest.raises(Exception, match="train from scratch"):
        cli(["--config-file", FPN_1X, "--register-coco", "sh_train", f"{user_folder}/data/train.json",
             f"{user_folder}/data/images", *TINY, "DATASETS.TRAIN", "('sh_train',)", "DATASETS.TEST", "()",
             "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.WEIGHTS", str(run / "model_finall.pth"),
             "OUTPUT_DIR", str(tmp_path / "train")])  # fmt: skip


# ---------------------------------------------------------- point 7: a misspelt key
def _is_key(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("typo, real", [
    ("MODEL.ROI_HEADS.NUM_CLASS", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("MODEL.ROI_HEAD.NUM_CLASSES", "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("MODEL.RESNEXT.CARDINALTY", "MODEL.RESNEXT.CARDINALITY"),
    ("SOLVER.BASE_LRR", "SOLVER.BASE_LR"),
])
def test_a_misspelt_override_names_the_real_key(typo, real, capsys):
    """``KEY VALUE`` on train_net's command line with a typo: exit 2, one line "did you mean"
    the key that Detectron2's get_cfg() (plus MODEL.RESNEXT) really has."""
    reference = get_cfg()
    add_resnext_config(reference)
    assert _is_key(reference, real) and not _is_key(reference, typo)
    assert run_tool(lambda: cli(["--config-file", FPN_1X, typo, "3"]), "train_net.py") == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(f"train_net.py: error: config override: {typo} is not"), err
    assert re.search(rf"did you mean {re.escape(real)}( or [A-Z_.]+)*\?$", err), err


def test_a_misspelt_key_in_a_yaml_names_the_real_key(tmp_path, capsys):
    """The same typo in a config file (on top of a shipped one through _BASE_)."""
    cfg_file = tmp_path / "mine.yaml"
    cfg_file.write_text(f'_BASE_: "{FPN_1X}"\nMODEL:\n  ROI_HEADS:\n    NUM_CLASS: 3\n')
    assert run_tool(lambda: cli(["--config-file", str(cfg_file)]), "train_net.py") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"train_net.py: error: --config-file '{cfg_file}': MODEL.ROI_HEADS.NUM_CLASS is not a config "
                   "key: did you mean MODEL.ROI_HEADS.NUM_CLASSES?"), err
    assert _is_key(get_cfg(), "MODEL.ROI_HEADS.NUM_CLASSES")
    # Nothing close: where to look instead of a guess.
    assert run_tool(lambda: cli(["--config-file", FPN_1X, "FOO.BAR", "1"]), "train_net.py") == 2
    err = capsys.readouterr().err
    assert "FOO.BAR is not a config key: check its spelling" in err and "did you mean" not in err


# -------------------------------------------------------- point 10: smaller messages
def _torch_unpickler_index_error(tmp_path):
    """Bytes that PyTorch's safe loader fails on with "IndexError: pop from empty list" (the
    message users saw), found by trying seeds; None when this PyTorch raises no such error."""
    for seed in range(200):
        path = tmp_path / f"garbage{seed}.pth"
        path.write_bytes(np.random.default_rng(seed).bytes(200))
        try:
            torch_load_weights(str(path))
        except IndexError as e:
            if "pop from empty list" in str(e):
                return path
        except Exception:
            pass
        path.unlink()
    return None


def test_a_file_that_is_not_a_checkpoint_says_what_it_holds(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"model": [torch.zeros(1)]}, tmp_path / "model_list.pth")
    for name, holds in (("list.pth", "a list of 3 item(s)"), ("tensor.pth", "one tensor of shape (3,)"),
                        ("model_list.pth", "a list of 1 item(s)")):
        with pytest.raises(CheckpointReadError) as e:
            ResNeXtCheckpointer(model).load(str(tmp_path / name))
        assert f"is not a checkpoint: it holds {holds}, not a dict of named weights" in str(e.value), str(e.value)
        assert "Error:" not in str(e.value), str(e.value)  # no exception of the reader's internals
    garbage = _torch_unpickler_index_error(tmp_path)
    if garbage is None:
        pytest.skip("this PyTorch's unpickler raises no IndexError on random bytes")
    with pytest.raises(CheckpointReadError) as e:
        ResNeXtCheckpointer(model).load(str(garbage))
    msg = str(e.value)
    assert "pop from empty list" not in msg and "IndexError" not in msg, msg
    assert msg.startswith(f"MODEL.WEIGHTS = '{garbage}' (200 bytes) is not a readable checkpoint:"), msg
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointReadError, match="the file is empty"):
        ResNeXtCheckpointer(model).load(str(tmp_path / "empty.pth"))


def test_a_shape_error_names_the_fix_without_an_aside_on_detectron2(tmp_path):
    """A detector checkpoint with 3 classes into the 80-class config: the key and value that
    fix it, and no "Detectron2 would only warn" aside."""
    from detectron2.modeling import build_model

    from resnext_det.engine import setup_cfg

    three = build_model(setup_cfg(FPN_1X, TINY + ["MODEL.ROI_HEADS.NUM_CLASSES", "3"]))
    torch.save({"model": three.state_dict()}, tmp_path / "three.pth")
    cfg = setup_cfg(FPN_1X, TINY)
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(build_model(cfg), cfg=cfg, require="all").load(str(tmp_path / "three.pth"))
    msg = str(e.value)
    assert "MODEL.ROI_HEADS.NUM_CLASSES 3" in msg and msg.endswith("Fix MODEL.WEIGHTS or the config."), msg
    assert "Detectron2 would" not in msg and "only warn" not in msg, msg


def test_convert_pretrained_ends_a_weights_name_error_like_every_tool(tmp_path):
    """tools/convert_pretrained.py given a weights name torchvision does not have
    (WeightsSourceError): "convert_pretrained.py: error: ..." in one line, exit 2."""
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "convert_pretrained.py"), "torchvision://resnext51_32x4d",
                        str(tmp_path / "out.pth"), "--quiet"], env=user_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_line(r.stderr, "convert_pretrained.py")
    assert line.startswith("convert_pretrained.py: error: 'torchvision://resnext51_32x4d': torchvision has no model"), line
    # A name it knows is not a file to convert: it says where the name goes and what to download.
    from weights_helpers import run_tool as convert

    p = convert("torchvision://resnext50_32x4d.IMAGENET1K_V1", tmp_path / "out.pth", check=False)
    assert p.returncode == 2 and "set MODEL.WEIGHTS torchvision://resnext50_32x4d.IMAGENET1K_V1" in p.stderr, p.stderr
    assert "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth" in p.stderr


def _calls(tree: ast.Module):
    """Module-level function name -> the names it calls; and the names the __main__ block calls."""
    def called(node):
        return {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
                for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}

    funcs = {n.name: called(n) for n in tree.body if isinstance(n, ast.FunctionDef)}
    main = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    return funcs, called(main[0]) if main else set()


def test_every_tool_ends_through_run_tool():
    """One way to end for every tool of tools/ (user errors: one line, exit 2; Ctrl-C: one
    line, exit 130): its ``__main__`` block calls ``run_tool``, or a function that does.
    tools/mutants_report.py is the mutation-testing report, a developer's script."""
    checked = []
    for name in sorted(os.listdir(TOOLS)):
        if not name.endswith(".py") or name == "mutants_report.py":
            continue
        funcs, main = _calls(ast.parse(open(os.path.join(TOOLS, name)).read()))
        seen, todo = set(), set(main)
        while todo:
            f = todo.pop()
            seen.add(f)
            todo |= funcs.get(f, set()) - seen
        assert "run_tool" in seen, f"tools/{name} does not end through run_tool"
        checked.append(name)
    assert {"run_demo.py", "pretrain_shapes.py", "benchmark.py", "convert_pretrained.py", "train_net.py"} <= set(checked)


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")), reason="not a git checkout")
def test_what_the_readme_recipes_write_is_ignored_by_git():
    """The paths the fenced commands of README.md and docs/*.md write into the repository
    (your data/, export/, tools/demo.py's out/, converter configs/my-*.yaml) are ignored;
    the package's own data/ and export/ are not."""
    texts = [open(os.path.join(ROOT, "README.md")).read()]
    texts += [open(os.path.join(ROOT, "docs", f)).read() for f in os.listdir(os.path.join(ROOT, "docs"))
              if f.endswith(".md")]
    blocks = [b for t in texts for b in re.findall(r"^```\w*\n(.*?)^```", t, re.S | re.M)]
    paths = sorted({p for b in blocks for p in re.findall(r"(?<![\w/.])((?:data|export|out)/[\w./-]+|configs/my-[\w.-]+)", b)})
    assert any(p.startswith("data/") for p in paths) and any(p.startswith("export/") for p in paths), paths
    r = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == paths, (paths, r.stdout, r.stderr)
    tracked = subprocess.run(["git", "ls-files", "resnext_det/data", "resnext_det/export"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert tracked
    r = subprocess.run(["git", "check-ignore", "--no-index", *tracked], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and not r.stdout, r.stdout


# -------------------------------------------- issue 11's item: an empty last_checkpoint
def test_an_empty_last_checkpoint_falls_back_with_the_promised_warning(tmp_path, caplog):
    torch.manual_seed(3)
    saved = torch.nn.Linear(3, 2)
    ResNeXtCheckpointer(saved, str(tmp_path)).save("model_0000004")
    (tmp_path / "last_checkpoint").write_text("")  # e.g. a disk that filled up while it was written
    fresh = torch.nn.Linear(3, 2)
    log = logging.getLogger("resnext_det.checkpoint.loading")  # whether or not "resnext_det" propagates
    log.addHandler(caplog.handler)
    try:
        ResNeXtCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
        assert torch.equal(fresh.weight, saved.weight) and torch.equal(fresh.bias, saved.bias)
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(f"{tmp_path / 'last_checkpoint'} is empty: resuming from the newest complete checkpoint" in w
                   for w in warned), warned
        # One that names a file that is gone says which.
        (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
        caplog.clear()
        ResNeXtCheckpointer(torch.nn.Linear(3, 2), str(tmp_path)).resume_or_load("", resume=True)
        assert any("names 'model_0000009.pth', which does not exist" in r.getMessage() for r in caplog.records)
    finally:
        log.removeHandler(caplog.handler)


# ------------------------------------------------------------------- point 5: Ctrl-C
def test_run_tool_ends_ctrl_c_in_one_line_with_status_130(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("RESNEXT_DET_TRACEBACK", raising=False)
    monkeypatch.delenv(INTERRUPT_NOTE_ENV, raising=False)

    def plain():
        raise KeyboardInterrupt

    def known():
        raise Interrupted("at iteration 7 of 9", "rerun the same command to continue")

    assert run_tool(plain, "x.py") == 130
    assert capsys.readouterr().err == "x.py: interrupted: rerun the same command to start again\n"
    assert run_tool(known, "x.py") == 130
    assert capsys.readouterr().err == "x.py: interrupted at iteration 7 of 9: rerun the same command to continue\n"
    monkeypatch.setenv("RESNEXT_DET_TRACEBACK", "1")
    assert run_tool(known, "x.py") == 130
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("x.py: interrupted at iteration 7 of 9: rerun the same command to continue\n")
    # Run by another tool (make demo): the note, for the other tool's own line; nothing printed.
    monkeypatch.delenv("RESNEXT_DET_TRACEBACK")
    monkeypatch.setenv(INTERRUPT_NOTE_ENV, str(tmp_path / "note.json"))
    assert run_tool(known, "x.py") == 130
    assert capsys.readouterr().err == ""
    assert json.load(open(tmp_path / "note.json")) == {"where": "at iteration 7 of 9",
                                                       "how": "rerun the same command to continue"}


def _train_argv(out):
    return ["--config-file", FPN_1X, "--register-coco", "sh_train", "data/train.json", "data/images",
            "DATASETS.TRAIN", "('sh_train',)", "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "3", *TINY,
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(out)]


def test_ctrl_c_in_train_net_is_one_line_naming_the_checkpoint_that_resume_continues_from(user_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "tools/train_net.py", *_train_argv(out)]
    # Ctrl-C while model_0000005.pth is being written: model_0000003.pth is whole by then.
    rc, stdout, stderr, _ = ctrl_c(cmd, when=r"Saving checkpoint to .*model_0000005\.pth", env=user_env(),
                                   cwd=user_folder)
    assert rc == 130, stderr[-3000:]
    line = one_line(stderr, "train_net.py")
    m = re.fullmatch(r"train_net\.py: interrupted at iteration (\d+) of 1000: rerun the same command with --resume "
                     r"to continue from (.+)", line)
    assert m, line
    ckpt = m.group(2)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["iteration"]
    assert open(out / "last_checkpoint").read().strip() == os.path.basename(ckpt)
    assert 3 <= saved < int(m.group(1)), (saved, line)
    # The rerun with --resume starts right after it (Detectron2: the saved iteration + 1).
    rc, stdout, stderr, started = ctrl_c(cmd[:2] + ["--resume"] + cmd[2:], when=r"Starting training from iteration (\d+)",
                                         env=user_env(), cwd=user_folder)
    assert int(started.group(1)) == saved + 1, started.group(0)
    assert rc == 130 and one_line(stderr, "train_net.py").startswith("train_net.py: interrupted at iteration"), stderr


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """8 + 4 shapes images (DETECTRON2_DATASETS for the demo, registered as sh_pt_* here)."""
    from detectron2.data import DatasetCatalog

    from resnext_det.data import generate_shapes
    from resnext_det.data.shapes import register_shapes

    root = tmp_path_factory.mktemp("shapes_data")
    generate_shapes(str(root / "shapes"), num_train=8, num_val=4, seed=5)
    for name, split in (("sh_pt_train", "train"), ("sh_pt_val", "val")):
        if name not in DatasetCatalog.list():
            register_shapes(name, split=split, root=str(root / "shapes"))
    return root


def test_ctrl_c_in_stage_0_saves_its_iteration_and_the_rerun_gives_the_uninterrupted_weights(shapes_root, tmp_path,
                                                                                            monkeypatch):
    """Stage 0 in this process, Ctrl-C (a real SIGINT) during its 3rd iteration, long before its
    periodic checkpoint (every 100): it finishes that iteration, saves it and stops; the rerun
    starts at iteration 3, not 0, and ends with the weights of a run never interrupted."""
    from resnext_det.pretrain import (TORCHVISION_FILE, PretrainSettings, ShapeCrops, pretrain_shapes_classifier,
                                      read_pretrain_marker)

    s = PretrainSettings(iters=5, stage_blocks=(1, 1, 1, 1), cardinality=2, bottleneck_width=4, batch_size=8,
                         crop_size=32, val_crops=16, warmup_iters=1)
    kw = dict(train_dataset="sh_pt_train", val_dataset="sh_pt_val")
    pretrain_shapes_classifier(s, output_dir=str(tmp_path / "ref"), **kw)

    real, calls = ShapeCrops.sample, {"n": 0}

    def ctrl_c_in_the_third(self, n, rng):
        calls["n"] += n == s.batch_size  # a training batch (the val crops are sampled once, 16)
        if calls["n"] == 3 and n == s.batch_size:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C, in the middle of the iteration
        return real(self, n, rng)

    monkeypatch.setattr(ShapeCrops, "sample", ctrl_c_in_the_third)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        pretrain_shapes_classifier(s, output_dir=str(out), **kw)
    assert e.value.where.startswith("at iteration 3 of 5 (stage 0: pretraining; saved in"), e.value.where
    assert read_pretrain_marker(str(out)) is None
    assert torch.load(out / "pretrain_last.pth", weights_only=True)["iter"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is itself again
    monkeypatch.setattr(ShapeCrops, "sample", real)
    calls["n"] = 0
    pretrain_shapes_classifier(s, output_dir=str(out), **kw)
    a = torch.load(out / TORCHVISION_FILE, weights_only=True)
    b = torch.load(tmp_path / "ref" / TORCHVISION_FILE, weights_only=True)
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_ctrl_c_in_make_demo_is_one_line_and_stage_0_resumes_after_it(shapes_root, tmp_path):
    """`make demo` (tools/run_demo.py, stage 0 in a subprocess), Ctrl-C in a terminal: one line
    in all (it printed two KeyboardInterrupt tracebacks), exit 130, and the rerun resumes stage
    0 at the iteration the line names (it started at 0 again)."""
    env = user_env(DETECTRON2_DATASETS=str(shapes_root))
    cmd = [sys.executable, os.path.join(TOOLS, "run_demo.py"), "--output-dir", str(tmp_path / "demo"),
           "--pretrain-iters", "200", "--rpn-iters", "2", "--fast-rcnn-iters", "2", "DATALOADER.NUM_WORKERS", "0"]
    pattern = (r"run_demo\.py: interrupted at iteration (\d+) of 200 \(stage 0: pretraining; saved in (\S+)\): "
               r"rerun the same command to continue from there")
    rc, _, stderr, _ = ctrl_c(cmd, when=r"Stage 0 \(ImageNet stand-in\)", env=env)
    assert rc == 130, stderr[-3000:]
    m = re.fullmatch(pattern, one_line(stderr, "run_demo.py"))
    assert m, stderr[-2000:]
    stopped = int(m.group(1))
    assert stopped >= 1 and torch.load(m.group(2), weights_only=True)["iter"] == stopped
    rc, stdout, stderr, _ = ctrl_c(cmd, when=r"Stage 0 \(ImageNet stand-in\)", env=env)
    assert re.search(rf"Stage 0: resuming from iteration {stopped} \(", stdout), stdout[-3000:]
    m = re.fullmatch(pattern, one_line(stderr, "run_demo.py"))
    assert rc == 130 and m and int(m.group(1)) > stopped, stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_under_launch_with_two_processes_is_one_line(user_folder, tmp_path):
    """--num-gpus 2 on the CPU (Detectron2's launch spawns 2 workers; a terminal's Ctrl-C
    reaches all three processes): one line in all, after the workers' last log lines."""
    out = tmp_path / "run"
    cmd = [sys.executable, "tools/train_net.py", "--num-gpus", "2", *_train_argv(out), "MODEL.DEVICE", "cpu"]
    rc, stdout, stderr, _ = ctrl_c(cmd, when=r"Saving checkpoint to .*model_0000005\.pth", env=user_env(),
                                   cwd=user_folder)
    assert rc == 130, stderr[-3000:]
    line = one_line(stderr, "train_net.py")
    assert re.fullmatch(r"train_net\.py: interrupted: rerun the same command with --resume to continue from "
                        rf"{re.escape(str(out))}/model_\d+\.pth", line), line
    assert "is gone" not in stderr and "rank 1" not in stderr, stderr[-3000:]
