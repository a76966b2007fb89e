"""The first hour (issue #15): from a fresh clone to fine-tuning on your own data, on a CPU or
on 8 GPUs, without reading the source. The README is the reference: its fenced commands are
parsed by the tools' own parsers, its smoke run is run as written (on a small COCO-format
dataset drawn here), and its Python snippet is run from another folder."""
import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from unittest import mock

import pytest
import torch
from PIL import Image, ImageDraw

import resnext_det
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from resnext_det.data import check_num_classes, dataset_classes, register_coco
from resnext_det.engine import setup_cfg
from resnext_det.cli.tool import run_tool
from resnext_det.cli.train_net import cli
from resnext_det.engine.setup import available_cores
from resnext_det.errors import ConfigError, MissingFileError, UserError
from resnext_det.inference import build_inference_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CONFIGS = os.path.join(ROOT, "configs")
FPN_1X = os.path.join(CONFIGS, "COCO-Detection", "faster_rcnn_X_50_32x4d_FPN_1x.yaml")
#: A tiny model for in-process checks (as tests/test_structure.py).
TINY = [
    "MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.DEPTH", "26", "MODEL.RESNEXT.CARDINALITY", "2",
    "MODEL.RESNEXT.BOTTLENECK_WIDTH", "4", "MODEL.RESNEXT.STEM_OUT_CHANNELS", "8",
    "MODEL.RESNEXT.RES2_OUT_CHANNELS", "16", "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "16", "MODEL.ROI_MASK_HEAD.CONV_DIM", "8", "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
]  # fmt: skip
#: Categories of the drawn dataset: 3, with COCO ids that are not 1..3 (Detectron2 maps them).
CATEGORIES = [{"id": 2, "name": "box"}, {"id": 5, "name": "disc"}, {"id": 9, "name": "bar"}]
CPU_ONLY = not torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ helpers
def draw_coco(folder: str, splits=(("train", 4), ("val", 2)), size=(160, 128)) -> None:
    """``folder/data/{train,val}.json`` and ``folder/data/images/*.jpg``: a small COCO
    instances dataset of the README's layout, drawn with PIL."""
    images_dir = os.path.join(folder, "data", "images")
    os.makedirs(images_dir, exist_ok=True)
    colors = [(220, 40, 40), (40, 160, 60), (40, 60, 220)]
    ann_id = 1
    for split, count in splits:
        images, anns = [], []
        for i in range(count):
            image_id = len(images) + 1
            name = f"{split}_{i:03d}.jpg"
            img = Image.new("RGB", size, (200 + 10 * (i % 3), 200, 190))
            draw = ImageDraw.Draw(img)
            for j, cat in enumerate(CATEGORIES):
                x, y = 10 + 48 * j, 20 + 8 * ((i + j) % 4)
                w, h = (30, 30) if cat["name"] != "bar" else (14, 60)
                box = [x, y, x + w, y + h]
                (draw.ellipse if cat["name"] == "disc" else draw.rectangle)(box, fill=colors[j])
                poly = [x, y, x + w, y, x + w, y + h, x, y + h]
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat["id"],
                             "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0,
                             "segmentation": [poly]})
                ann_id += 1
            img.save(os.path.join(images_dir, name), quality=95)
            images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        with open(os.path.join(folder, "data", f"{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)


def readme_blocks(lang=None):
    """The fenced code blocks of the README: [(language, text)]."""
    text = open(README).read()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    return [(lg, body) for lg, body in blocks if lang is None or lg == lang]


def readme_smoke():
    """The README's smoke-run overrides (the bash array SMOKE=(...)), as bash splits them."""
    for _, body in readme_blocks("bash"):
        m = re.search(r"^SMOKE=\((.*?)\)\s*$", body, re.S | re.M)
        if m:
            return shlex.split(m.group(1))
    raise AssertionError("README: no SMOKE=(...) smoke-run overrides")


def readme_commands():
    """Every ``python tools/X.py ...`` / ``python datasets/X.py ...`` command of the README's
    fenced blocks: [(script, argv as bash splits it)], ``"${SMOKE[@]}"`` left as a word."""
    out = []
    for _, body in readme_blocks():
        for line in body.replace("\\\n", " ").splitlines():
            m = re.match(r"\s*\S*python\S*\s+((?:tools|datasets)/\S+\.py)(.*)$", line)
            if m:
                out.append((m.group(1), shlex.split(m.group(2), comments=True)))
    return out


def expand_smoke(argv):
    smoke = readme_smoke()
    return [w for a in argv for w in (smoke if a == "${SMOKE[@]}" else [a])]


def readme_command(*, contains):
    """The one README command whose argv contains all of ``contains``."""
    found = [(s, a) for s, a in readme_commands() if all(c in a for c in contains)]
    assert len(found) == 1, (contains, found)
    return found[0]


class _Parsed(Exception):
    pass


def parse_with_the_tools_parser(script, argv):
    """``argv`` parsed by ``script``'s own parser: its entry point (``cli`` or ``main``) runs
    until its first ``parse_args``, which returns the namespace here instead of running on."""
    path = os.path.join(ROOT, script)
    spec = importlib.util.spec_from_file_location("readme_" + re.sub(r"\W", "_", script), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = getattr(module, "cli", None) or module.main
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse):
        try:
            entry(argv)
        except _Parsed as e:
            return e.args[0]
        except SystemExit as e:
            raise AssertionError(f"README: {script} {shlex.join(argv)}: its parser refuses it ({e})")
    raise AssertionError(f"{script}: no parse_args")


def run_readme(argv, cwd, script="tools/train_net.py"):
    """A README command run as a user runs it from ``cwd`` (no GPU, no traceback variable)."""
    env = {k: v for k, v in os.environ.items() if k != "RESNEXT_DET_TRACEBACK"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a machine without a GPU, whatever this one has
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, script, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A user's folder: the README's data/ layout (3 categories), and tools/ and configs/
    of this checkout (the README's commands name them relative to the repository root)."""
    folder = str(tmp_path_factory.mktemp("user"))
    draw_coco(folder)
    for name in ("tools", "configs"):
        os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
    return folder


@pytest.fixture(scope="module")
def smoke_run(user_folder):
    """The README's smoke run of the fine-tuning command, as written: the completed process."""
    script, argv = readme_command(contains=["--register-coco", "${SMOKE[@]}", "DATASETS.TRAIN"])
    return run_readme(expand_smoke(argv), user_folder, script)


# --------------------------------------------------------------------- the README itself
def test_readme_commands_name_existing_tools_flags_and_configs():
    """Every fenced ``python tools/X.py`` / ``python datasets/X.py`` command: the script exists,
    its own parser accepts the flags, and the configs it names exist (or an earlier command of
    the README writes them)."""
    commands = readme_commands()
    assert len(commands) >= 10 and any("--register-coco" in a for _, a in commands)
    written = set()
    for script, argv in commands:
        assert os.path.isfile(os.path.join(ROOT, script)), script
        args = parse_with_the_tools_parser(script, expand_smoke(argv))
        config = getattr(args, "config_file", None)
        if config and "..." not in config and config not in written and not config.startswith("output/"):
            assert os.path.isfile(os.path.join(ROOT, config)), f"README: {script} names {config}"
        if getattr(args, "config_out", None):
            written.add(args.config_out)
    for _, body in readme_blocks("python"):
        for name in re.findall(r"get_config_file\(\"([^\"]+)\"\)", body):
            assert os.path.isfile(resnext_det.get_config_file(name))


@pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="this machine has 8 GPUs")
def test_readme_multi_gpu_commands_stop_with_one_line_naming_the_fix(user_folder, monkeypatch, capsys):
    """On a machine without N GPUs, each README command with --num-gpus N > 1 (and without
    MODEL.DEVICE cpu) stops before any process starts: one line naming --num-gpus 1 and
    MODEL.DEVICE cpu, exit status 2."""
    monkeypatch.chdir(user_folder)
    ran = 0
    for script, argv in readme_commands():
        if script != "tools/train_net.py" or "--num-gpus" not in argv:
            continue
        n = int(argv[argv.index("--num-gpus") + 1])
        if n <= max(1, torch.cuda.device_count()) or "..." in argv or "cpu" in argv \
                or "configs/my-X-50-FPN.yaml" in argv:  # would start training / written by another command
            continue
        assert run_tool(lambda: cli(expand_smoke(argv)), "train_net.py") == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"--num-gpus {n}" in err and "MODEL.DEVICE cpu" in err, err
        ran += 1
    assert ran >= 2  # the Appendix B command and the 8-GPU fine-tuning


# ------------------------------------------------------------ fine-tuning on your own data
def test_readme_smoke_run_fine_tunes_on_registered_coco_data_and_evaluates(smoke_run, user_folder):
    """--register-coco twice, DATASETS.TRAIN/TEST by name, no MODEL.DEVICE on a machine without
    a GPU: trains 2 iterations, evaluates COCO AP on the registered val set, and says in one
    line that it runs on the CPU and how many loader processes it uses."""
    r = smoke_run
    out = os.path.join(user_folder, "output", "mydata_smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    log = r.stdout + r.stderr
    assert "Traceback" not in log and "torch.jit.script" not in log
    assert "no CUDA device: running on the CPU" in log
    if available_cores() < 4:  # Detectron2's default is 4 loader processes
        assert f"DATALOADER.NUM_WORKERS 4 -> {available_cores()}" in log
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["iteration"] for r in rows if "total_loss" in r][-1] == 1  # iterations 0, 1
    assert any("bbox/AP" in r for r in rows)
    with open(os.path.join(out, "inference", "mydata_val", "coco_instances_results.json")) as f:
        assert isinstance(json.load(f), list)


def test_readme_eval_only_line_runs_on_a_cpu_without_model_device(smoke_run, user_folder):
    """The README's --eval-only command on the checkpoint the smoke run wrote, on a machine
    without a GPU and without MODEL.DEVICE: COCO AP, no CUDA traceback."""
    assert smoke_run.returncode == 0, smoke_run.stderr[-3000:]
    script, argv = readme_command(contains=["--eval-only", "${SMOKE[@]}"])
    assert "MODEL.DEVICE" not in argv
    r = run_readme(expand_smoke(argv), user_folder, script)
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in log, r.stdout[-3000:] + r.stderr[-5000:]
    assert "no CUDA device: running on the CPU" in log and "bbox" in log


def test_a_num_classes_that_disagrees_with_the_json_stops_before_training(user_folder, tmp_path):
    """The smoke run without MODEL.ROI_HEADS.NUM_CLASSES 3 (the config's 80): exit status 2 and
    one line naming the key and the json's 3, before any model or data loader is built."""
    script, argv = readme_command(contains=["--register-coco", "${SMOKE[@]}", "DATASETS.TRAIN"])
    i = argv.index("MODEL.ROI_HEADS.NUM_CLASSES")
    argv = argv[:i] + argv[i + 2:]
    out = str(tmp_path / "out")
    argv[argv.index("OUTPUT_DIR") + 1] = out
    r = run_readme(expand_smoke(argv), user_folder, script)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train_net.py: error: MODEL.ROI_HEADS.NUM_CLASSES is 80"), last
    assert "'mydata_train'" in last and last.endswith("append MODEL.ROI_HEADS.NUM_CLASSES 3"), last
    assert "Traceback" not in r.stderr and "Starting training" not in r.stdout + r.stderr
    assert not os.path.exists(os.path.join(out, "model_final.pth"))


def test_register_coco_refuses_missing_files_in_one_line_and_taken_names(user_folder, capsys, monkeypatch):
    monkeypatch.chdir(user_folder)
    for json_file, folder, words in (("data/nope.json", "data/images", "'data/nope.json' does not exist"),
                                     ("data/train.json", "data/nope", "'data/nope' does not exist")):
        argv = ["--config-file", FPN_1X, "--register-coco", "x_missing", json_file, folder]
        assert run_tool(lambda: cli(argv), "train_net.py") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("train_net.py: error: --register-coco x_missing") and words in err, err
    with pytest.raises(ConfigError, match="'shapes_train' is already registered"):
        register_coco("shapes_train", "data/train.json", "data/images")
    register_coco("first_hour_train", "data/train.json", "data/images")
    register_coco("first_hour_train", "data/train.json", "data/images")  # again (each process): fine
    assert dataset_classes("first_hour_train") == ["box", "disc", "bar"]  # in COCO id order
    assert len(DatasetCatalog.get("first_hour_train")) == 4
    assert MetadataCatalog.get("first_hour_train").thing_classes == ["box", "disc", "bar"]


def test_retinanet_class_count_is_checked_against_its_own_key(user_folder, monkeypatch):
    monkeypatch.chdir(user_folder)
    register_coco("first_hour_val", "data/val.json", "data/images")
    cfg = setup_cfg(os.path.join(CONFIGS, "COCO-Detection", "retinanet_X_50_32x4d_FPN_1x.yaml"),
                    ["MODEL.DEVICE", "cpu"])
    with pytest.raises(ConfigError, match=r"MODEL.RETINANET.NUM_CLASSES is 80.*append MODEL.RETINANET.NUM_CLASSES 3$"):
        check_num_classes(cfg, ["first_hour_val"])
    cfg = setup_cfg(FPN_1X, ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    check_num_classes(cfg, ["first_hour_val"])
    with pytest.raises(ConfigError, match="'coco_2017_val'.* has 80 categories"):
        check_num_classes(cfg, ["coco_2017_val"])  # builtin metadata: no file needed


# ------------------------------------------------------------ errors that name the fix
def _checkpoint(tmp_path, name, cfg_file, *opts):
    cfg = setup_cfg(cfg_file, TINY + list(opts))
    torch.manual_seed(0)
    path = str(tmp_path / name)
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path


@pytest.mark.parametrize(
    "cfg_file, extra, key",
    [
        (FPN_1X, ["MODEL.MASK_ON", "True"], "MODEL.ROI_HEADS.NUM_CLASSES 3"),
        (os.path.join(CONFIGS, "COCO-Detection", "retinanet_X_50_32x4d_FPN_1x.yaml"), [],
         "MODEL.RETINANET.NUM_CLASSES 3"),
    ],
    ids=["mask_rcnn", "retinanet"],
)
def test_a_3_class_checkpoint_in_an_80_class_config_names_num_classes_3(tmp_path, cfg_file, extra, key):
    """The issue's case: fine-tuned with 3 classes, evaluated with a COCO config. The message
    names the head's key and the value the file implies, not the backbone's keys."""
    n = "MODEL.RETINANET.NUM_CLASSES" if "retinanet" in cfg_file else "MODEL.ROI_HEADS.NUM_CLASSES"
    three = _checkpoint(tmp_path, "three.pth", cfg_file, *extra, n, "3")
    with pytest.raises(UserError) as e:
        build_inference_model(setup_cfg(cfg_file, TINY + extra), three)
    msg = str(e.value)
    assert f"set {key} (the number of classes the file's heads were trained for)" in msg, msg
    assert "MODEL.RESNEXT" not in msg and msg.count(key) == 1, msg


@pytest.mark.parametrize(
    "opts, names",
    [
        (["MODEL.RESNEXT.CARDINALITY", "4"], "MODEL.RESNEXT.CARDINALITY 4"),
        (["MODEL.FPN.OUT_CHANNELS", "32"], "set MODEL.FPN.OUT_CHANNELS 32 (the file's FPN width; the heads on it follow)."),
    ],
    ids=["backbone", "fpn"],
)
def test_other_shapes_outside_the_heads_name_their_own_keys(tmp_path, opts, names):
    """A wider backbone or FPN in the file: the message names those keys, not NUM_CLASSES."""
    other = _checkpoint(tmp_path, "other.pth", FPN_1X, *opts)
    with pytest.raises(UserError) as e:
        build_inference_model(setup_cfg(FPN_1X, TINY), other)
    msg = str(e.value)
    assert names in msg and "NUM_CLASSES" not in msg, msg


def test_get_config_file_finds_shipped_configs_from_anywhere_and_names_close_matches(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    path = resnext_det.get_config_file("COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml")
    assert os.path.isabs(path) and os.path.samefile(path, FPN_1X)
    assert os.path.samefile(resnext_det.get_config_file("configs/Base-ResNeXt-FPN.yaml"),
                            os.path.join(CONFIGS, "Base-ResNeXt-FPN.yaml"))
    setup_cfg(path, ["MODEL.DEVICE", "cpu"])  # its _BASE_ resolves too
    with pytest.raises(MissingFileError, match="close matches: COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml"):
        resnext_det.get_config_file("COCO-Detection/faster_rcnn_X50_32x4d_FPN_1x.yaml")


# ----------------------------------------------------------- the snippet, from anywhere
def test_readme_snippet_runs_from_another_folder_on_a_machine_without_a_gpu(tmp_path):
    """The README's Python snippet, as written, from a folder that is not the repository,
    CUDA hidden: it builds the model and Detectron2's DefaultPredictor on the CPU, says so in
    one line, and prints no traceback and no torch.jit.script warning."""
    snippets = [b for _, b in readme_blocks("python") if "get_config_file" in b]
    assert len(snippets) == 1
    check = ("\nassert next(model.parameters()).device.type == 'cpu'\n"
             "assert next(predictor.model.parameters()).device.type == 'cpu'\nprint('SNIPPET OK')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RESNEXT_DET_TRACEBACK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", snippets[0] + check], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "SNIPPET OK" in r.stdout, r.stderr[-5000:]
    assert "Traceback" not in r.stderr and "torch.jit.script" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("running on the CPU") == 1, r.stderr[-3000:]


# ------------------------------------------------------------------- smaller things
def test_dataloader_workers_default_to_the_cores_of_each_process(caplog):
    cores = available_cores()
    with caplog.at_level("INFO", logger="resnext_det"):
        cfg = setup_cfg(FPN_1X, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", str(cores + 3)])
    assert cfg.DATALOADER.NUM_WORKERS == cores
    assert f"DATALOADER.NUM_WORKERS {cores + 3} -> {cores}" in caplog.text
    assert setup_cfg(FPN_1X, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"]).DATALOADER.NUM_WORKERS == 0


def test_tools_import_resnext_det_before_detectron2():
    """The torch.jit.script FutureWarning of detectron2's import is filtered in one place,
    resnext_det/__init__.py: every tool imports resnext_det before anything of detectron2."""
    for folder in ("tools", "datasets"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not f.endswith(".py"):
                continue
            lines = open(os.path.join(ROOT, folder, f)).read().splitlines()
            first = {}
            for i, line in enumerate(lines):
                m = re.match(r"\s*(?:from|import)\s+(resnext_det|detectron2)\b", line)
                if m:
                    first.setdefault(m.group(1), i)
            if "detectron2" in first:
                assert first.get("resnext_det", 10**9) < first["detectron2"], f"{folder}/{f}"


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")), reason="not a git checkout")
def test_weights_and_downloaded_checkpoints_are_ignored_by_git():
    paths = ["weights/X-50-32x4d.pth", "ImageNetPretrained/FAIR/X-101-32x8d.pkl",
             "resnext50_32x4d-7cdf4587.pth", "model_final_2d9806.pkl"]
    r = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.split() == paths, r.stdout + r.stderr
    r = subprocess.run(["git", "check-ignore", "configs/Base-ResNeXt-FPN.yaml"], cwd=ROOT)
    assert r.returncode == 1  # not ignored


def test_a_built_wheel_ships_every_config(tmp_path):
    """pip builds a wheel (offline, from a copy of the sources) whose resnext_det/configs holds
    every config of configs/, where get_config_file looks for them."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "configs"), src / "configs")
    shutil.copytree(os.path.join(ROOT, "resnext_det"), src / "resnext_det", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert os.path.islink(src / "resnext_det" / "configs")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("resnext_det-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {os.path.relpath(os.path.join(d, f), CONFIGS).replace(os.sep, "/")
               for d, _, files in os.walk(CONFIGS) for f in files if f.endswith((".yaml", ".py"))}
    assert len(shipped) > 50
    missing = sorted(c for c in shipped if f"resnext_det/configs/{c}" not in names)
    assert not missing, missing
    assert "resnext_det/__init__.py" in names
