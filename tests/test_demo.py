"""`make demo` (tools/run_demo.py), tools/demo.py and tools/plot_results.py.

The demo pipeline runs at a few iterations on a tiny shapes set (8 train / 8 val
images, generated here) and every output is checked against an independent
reading: PNG sizes against the source images read with PIL, the AP of
final_results.json against pycocotools run on the stored detections, APl against
the ground truth's object areas. The full-length AP target is checked by `make demo`
itself, not here.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from resnext_det import plots as plot_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plot_tool(*args):
    """tools/plot_results.py as a user runs it: its exit status and standard error."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_results.py"), *args],
                       capture_output=True, text=True)
    return r.returncode, r.stderr

CONFIG = "configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes_appendixB.yaml"
# A tiny model and input on top of the demo config: the pipeline, not the accuracy.
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "UNSHARED.RPN.IMS_PER_BATCH", "2", "UNSHARED.FAST_RCNN.IMS_PER_BATCH", "2",
    "UNSHARED.PROPOSALS.TRAIN_POST_NMS_TOPK", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "DATALOADER.NUM_WORKERS", "0",
]
BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
NUM_VAL = 8


def _run(script, args, env, check=True, timeout=900):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", script), *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


# ----------------------------------------------------------------------------- plot_results
def _fake_metrics(path, losses, evals=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for it, row in losses:
            f.write(json.dumps({"iteration": it, "lr": 0.01, **row}) + "\n")
        for it, ap in evals:
            f.write(json.dumps({"iteration": it, "bbox/AP": ap, "bbox/AP50": ap + 20, "bbox/AP75": ap - 5}) + "\n")


def test_plot_results_on_fake_metrics(tmp_path):
    out = tmp_path / "run"
    _fake_metrics(str(out / "stage1_rpn" / "metrics.json"),
                  [(i, {"total_loss": 1.0 / (i + 1), "loss_rpn_cls": 0.6 / (i + 1), "loss_rpn_loc": 0.4 / (i + 1)})
                   for i in range(19, 200, 20)])
    _fake_metrics(str(out / "stage3_fast_rcnn" / "metrics.json"),
                  [(i, {"total_loss": 2.0 / (i + 1), "loss_cls": 1.5 / (i + 1), "loss_box_reg": 0.5 / (i + 1)})
                   for i in range(19, 200, 20)], evals=[(99, 20.0), (199, 40.0)])
    # A run killed while writing leaves a half line at the end: skipped.
    with open(out / "stage3_fast_rcnn" / "metrics.json", "a") as f:
        f.write('{"iteration": 219, "total_lo')

    runs = plot_results.find_runs(str(out))
    assert list(runs) == ["stage1_rpn", "stage3_fast_rcnn"]
    rows = plot_results.read_metrics(runs["stage3_fast_rcnn"])
    assert len(rows) == 12 and rows[-1]["bbox/AP"] == 40.0
    assert plot_results.loss_keys(rows) == ["total_loss", "loss_box_reg", "loss_cls"]

    assert _plot_tool(str(out))[0] == 0
    # One panel of 6.4 x 4.2 inches at 100 dpi (matplotlib's figsize x dpi) per run:
    # both runs have losses, only the second one evaluated.
    for name, size in (("loss_curves.png", (1280, 420)), ("ap_curves.png", (640, 420))):
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.size == size, (name, im.size)
            assert np.asarray(im.convert("L")).std() > 5  # something is drawn
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # no temp files left


def test_plot_results_errors(tmp_path):
    bad = tmp_path / "bad" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"iteration": 0, "total_loss": 1}\nnot json\n{"iteration": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        plot_results.read_metrics(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _plot_tool(str(empty))
    assert code == 2 and "metrics.json" in err and "Traceback" not in err  # a message, not a traceback
    with pytest.raises(FileNotFoundError, match="no such folder"):
        plot_results.find_runs(str(tmp_path / "missing"))
    no_loss = tmp_path / "noloss" / "metrics.json"
    no_loss.parent.mkdir()
    no_loss.write_text('{"iteration": 0, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="No losses"):
        plot_results.plot_loss_curves({"x": str(no_loss)}, str(tmp_path / "x.png"))
    assert plot_results.plot_ap_curves({"x": str(no_loss)}, str(tmp_path / "ap.png")) is None


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo at 3 (stage 0) + 3 + 3 iterations on 8 + 8 tiny shapes images."""
    from resnext_det.data import generate_shapes

    base = tmp_path_factory.mktemp("demo")
    data = base / "datasets"
    generate_shapes(str(data / "shapes"), num_train=8, num_val=NUM_VAL, seed=3)
    env = dict(os.environ, DETECTRON2_DATASETS=str(data))
    out = str(base / "out")
    args = ["--output-dir", out, "--pretrain-iters", "3", "--rpn-iters", "3", "--fast-rcnn-iters", "3",
            "--quiet", *TINY]
    r = _run("run_demo.py", args, env)
    return {"out": out, "env": env, "data": str(data / "shapes"), "args": args, "log": r.stdout}


@pytest.mark.slow
def test_demo_writes_every_output(demo_run):
    out, log = demo_run["out"], demo_run["log"]
    # Per stage: Detectron2's metrics.json (with losses) and TensorBoard events.
    for stage, loss in (("stage1_rpn", "loss_rpn_cls"), ("stage3_fast_rcnn", "loss_cls")):
        rows = plot_results.read_metrics(os.path.join(out, stage, "metrics.json"))
        assert any(loss in r for r in rows), stage
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, stage)))

    with open(os.path.join(out, "final_results.json")) as f:
        final = json.load(f)
    assert list(final) == ["bbox"]
    box = final["bbox"]
    for k in BBOX_KEYS:
        assert k in box
    for c in ("circle", "ellipse", "triangle"):
        assert f"AP-{c}" in box
    # APl is undefined (null) exactly when shapes_val has no COCO-large object.
    with open(os.path.join(demo_run["data"], "annotations", "instances_val.json")) as f:
        gt = json.load(f)
    has_large = any(a["area"] > 96 ** 2 for a in gt["annotations"])
    assert (box["APl"] is None) == (not has_large)
    for k in ("AP", "AP50", "AP75"):
        assert isinstance(box[k], float) and 0.0 <= box[k] <= 100.0

    # The AP is the one pycocotools computes on the stored end-to-end detections.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets_file = os.path.join(out, "stage4_eval", "end_to_end", "shapes_val", "coco_instances_results.json")
    with open(dets_file) as f:
        dets = json.load(f)
    if dets:
        coco = COCO(os.path.join(demo_run["data"], "annotations", "instances_val.json"))
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert box["AP"] == pytest.approx(100 * max(ev.stats[0], 0), abs=1e-6)
        assert box["AP50"] == pytest.approx(100 * max(ev.stats[1], 0), abs=1e-6)
    else:
        assert box["AP"] == 0.0

    md = open(os.path.join(out, "results.md")).read()
    assert "| model | AP | AP50 | AP75 | APs | APm | APl |" in md
    row = next(line for line in md.splitlines() if line.startswith("| ours, end to end |"))
    assert row.count("|") == len(BBOX_KEYS) + 2 and f"{box['AP']:.1f}" in row
    assert "| rpn |" in md and "| fast_rcnn |" in md

    with Image.open(os.path.join(out, "loss_curves.png")) as im:
        im.load()
        assert im.format == "PNG" and im.size == (1280, 420)  # two panels, 6.4 x 4.2 in at 100 dpi

    # val_*.png: ground truth | predictions, each 2x the image, under a 28 px caption strip.
    pics = sorted(f for f in os.listdir(out) if f.startswith("val_") and f.endswith(".png"))
    assert len(pics) == NUM_VAL
    first = sorted(gt["images"], key=lambda i: i["id"])[0]
    assert pics[0] == "val_" + os.path.splitext(os.path.basename(first["file_name"]))[0] + ".png"
    for p in pics:
        src = os.path.join(demo_run["data"], "val", p[len("val_"):-4] + ".jpg")
        with Image.open(src) as s:
            w, h = s.size
        with Image.open(os.path.join(out, p)) as im:
            im.load()
            assert im.format == "PNG" and im.size == (4 * w, 2 * h + 28), (p, im.size)

    # The summary names the folder and the stages' times.
    assert out in log and "stage time" in log and "AP50" in log


@pytest.mark.slow
def test_demo_fine_tunes_the_stage0_classifier(demo_run):
    """Stage 0 writes torchvision weights; both detector stages start from them: the
    frozen stem and res2 (FREEZE_AT 2) of the final RPN and Fast R-CNN checkpoints
    are torchvision's conv1 / layer1 tensors, bit for bit."""
    import torch

    out = demo_run["out"]
    tv = torch.load(os.path.join(out, "stage0_pretrain", "shapes_classifier_torchvision.pth"))
    done = json.load(open(os.path.join(out, "stage0_pretrain", "pretrain_done.json")))
    assert done["settings"]["iters"] == 3 and 0.0 <= done["val_accuracy"] <= 100.0
    pairs = {"backbone.bottom_up.stem.conv1.weight": "conv1.weight",
             "backbone.bottom_up.res2.0.conv2.weight": "layer1.0.conv2.weight",
             "backbone.bottom_up.res2.1.conv3.norm.running_var": "layer1.1.bn3.running_var"}
    for stage in ("stage1_rpn", "stage3_fast_rcnn"):
        model = torch.load(os.path.join(out, stage, "model_final.pth"), weights_only=False)["model"]
        for ours, theirs in pairs.items():
            torch.testing.assert_close(model[ours], tv[theirs], rtol=0, atol=0, msg=f"{stage} {ours}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert list(summary["stage_seconds"])[0] == "pretrain"


@pytest.mark.slow
def test_demo_rerun_skips_finished_stages_and_refuses_other_settings(demo_run):
    out, env = demo_run["out"], demo_run["env"]
    marker = os.path.join(out, "stage3_fast_rcnn", "stage_done.json")
    before = open(marker).read()
    final = json.load(open(os.path.join(out, "final_results.json")))
    _run("run_demo.py", demo_run["args"], env)
    assert open(marker).read() == before  # not retrained
    assert json.load(open(os.path.join(out, "final_results.json"))) == final

    args = list(demo_run["args"])
    args[args.index("--rpn-iters") + 1] = "5"
    r = _run("run_demo.py", args, env, check=False)
    assert r.returncode != 0 and "--fresh" in r.stderr + r.stdout


# ----------------------------------------------------------------------------- tools/demo.py
@pytest.mark.slow
def test_demo_py_on_folder_image_and_video(demo_run, tmp_path):
    import cv2

    out, env = demo_run["out"], demo_run["env"]
    common = ["--config-file", CONFIG, "--confidence-threshold", "0.0", "--opts", *TINY, "OUTPUT_DIR", out]
    val = os.path.join(demo_run["data"], "val")

    # A folder of images: one drawn image per input, same size, and predictions.json.
    vis = tmp_path / "vis"
    _run("demo.py", ["--input", val, "--output", str(vis), *common], env)
    inputs = sorted(os.listdir(val))
    assert sorted(f for f in os.listdir(vis) if f != "predictions.json") == inputs
    for name in inputs:
        with Image.open(os.path.join(val, name)) as a, Image.open(vis / name) as b:
            assert a.size == b.size
    pred = json.load(open(vis / "predictions.json"))
    assert pred["weights"] == os.path.join(out, "model_final.pth")
    assert [os.path.basename(r["file"]) for r in pred["results"]] == inputs
    for r in pred["results"]:
        for d in r["instances"]:
            assert d["category"] in ("circle", "ellipse", "triangle") and 0.0 <= d["score"] <= 1.0

    # One image to one file.
    one = tmp_path / "one.png"
    _run("demo.py", ["--input", os.path.join(val, inputs[0]), "--output", str(one), *common], env)
    with Image.open(one) as im:
        assert im.format == "PNG"

    # A video made here: 5 frames of 96 x 80 in, 5 drawn frames of 96 x 80 out.
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (96, 80))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(5):
        frame = np.full((80, 96, 3), 40, np.uint8) + rng.integers(0, 20, (80, 96, 3), dtype=np.uint8)
        cv2.circle(frame, (20 + 10 * i, 40), 15, (0, 0, 230), -1)
        writer.write(frame)
    writer.release()
    vout = tmp_path / "vout"
    _run("demo.py", ["--input", video, "--output", str(vout), *common], env)
    cap = cv2.VideoCapture(str(vout / "clip.mp4"))
    frames = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (80, 96, 3)
        frames += 1
    cap.release()
    assert frames == 5
    assert len(json.load(open(vout / "predictions.json"))["results"][0]["frames"]) == 5

    # The RPN stage's own config and checkpoint (a ProposalNetwork) runs too.
    rpn = os.path.join(out, "stage1_rpn")
    rvis = tmp_path / "rpn_vis"
    _run("demo.py", ["--config-file", os.path.join(rpn, "config.yaml"), "--input", val, "--output",
                     str(rvis), "--confidence-threshold", "0.0"], env)
    assert len([f for f in os.listdir(rvis) if f.endswith(".jpg")]) == len(inputs)

    # The README's command: the run's own OUTPUT_DIR/config.yaml (train_net writes it), nothing
    # else: its model_final.pth, its sizes, its classes; the same detections as above.
    cvis = tmp_path / "cfg_vis"
    _run("demo.py", ["--config-file", os.path.join(out, "config.yaml"), "--input", val, "--output", str(cvis),
                     "--confidence-threshold", "0.0"], env)
    again = json.load(open(cvis / "predictions.json"))
    assert again["weights"] == os.path.join(out, "model_final.pth")
    assert [r["instances"] for r in again["results"]] == [r["instances"] for r in pred["results"]]


def test_demo_py_errors_name_the_fix(tmp_path):
    env = dict(os.environ)
    r = _run("demo.py", ["--config-file", CONFIG, "--input", str(tmp_path / "nope.jpg"),
                         "--output", str(tmp_path / "o")], env, check=False)
    assert r.returncode == 2 and "--input" in r.stderr and "nope.jpg" in r.stderr
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    r = _run("demo.py", ["--config-file", CONFIG, "--input", str(img), "--output", str(tmp_path / "o"),
                         "--opts", "OUTPUT_DIR", str(tmp_path / "untrained")], env, check=False)
    assert r.returncode == 2 and "MODEL.WEIGHTS" in r.stderr
    r = _run("demo.py", ["--config-file", CONFIG, "--input", str(img), "--output", str(tmp_path / "o"),
                         "--confidence-threshold", "1.5"], env, check=False)
    assert r.returncode == 2 and "--confidence-threshold" in r.stderr


# ------------------------------------------------- tools/demo.py on a fine-tuned run (issue 22)
# A run as "Fine-tune on your own data" leaves it: OUTPUT_DIR/config.yaml (written by
# Detectron2's cfg.dump(), as default_setup writes it) and OUTPUT_DIR/model_final.pth, for
# a tiny FPN model with 3 classes trained at 96 px; 3 images and their json in data/.
# Paths are relative, as in the README's commands run from the repository root.
FPN_CONFIG = "configs/COCO-Detection/faster_rcnn_X_50_32x4d_FPN_1x.yaml"
TINY_RUN = [
    "MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.STAGE_BLOCKS", "[1, 1, 1, 1]",
    "MODEL.RESNEXT.CARDINALITY", "2", "MODEL.RESNEXT.BOTTLENECK_WIDTH", "4",
    "MODEL.RESNEXT.STEM_OUT_CHANNELS", "8", "MODEL.RESNEXT.RES2_OUT_CHANNELS", "16",
    "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
]  # fmt: skip
RUN_ONLY = [  # what the fine-tune recipe adds: the user's data, 3 classes, its sizes
    "DATASETS.TRAIN", "('mydata_train',)", "DATASETS.TEST", "('mydata_val',)",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160", "OUTPUT_DIR", "output/mydata",
]  # fmt: skip
MY_CLASSES = ["bolt", "nut", "washer"]
REGISTER = ["--register-coco", "mydata_val", "data/val.json", "data/images"]


def _demo(cwd, *args, env=None):
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fine_tuned_run(tmp_path_factory):
    import cv2
    import torch
    from weights_helpers import frozen_bn_as_trained
    from detectron2.modeling import build_model

    from resnext_det.data.shapes import render_image
    from resnext_det.engine import setup_cfg

    base = tmp_path_factory.mktemp("mydata")
    os.makedirs(base / "data" / "images")
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        name = f"{i:03d}.jpg"
        img = render_image(rng, size=128)[0]
        cv2.imwrite(str(base / "data" / "images" / name), img[:, :, ::-1])
        images.append({"id": i + 1, "file_name": name, "height": 128, "width": 128})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(MY_CLASSES)]
    (base / "data" / "val.json").write_text(json.dumps({"images": images, "annotations": [], "categories": cats}))

    cfg = setup_cfg(os.path.join(ROOT, FPN_CONFIG), TINY_RUN + RUN_ONLY + ["MODEL.DEVICE", "cpu"], freeze=False)
    run = base / "output" / "mydata"
    os.makedirs(run)
    (run / "config.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a trained model's FrozenBN statistics and spread-out class scores
        frozen_bn_as_trained(model)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.08)
    torch.save({"model": model.state_dict()}, run / "model_final.pth")
    return base


def _default_predictor_detections(run_dir, image_files, threshold):
    """Detectron2's own DefaultPredictor on the run's config.yaml and weights: the reference."""
    from detectron2.config import get_cfg
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    from resnext_det.config import add_resnext_config

    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(os.path.join(run_dir, "config.yaml"))
    cfg.MODEL.WEIGHTS = os.path.join(run_dir, "model_final.pth")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = threshold
    predictor = DefaultPredictor(cfg)
    out = {}
    for f in image_files:
        inst = predictor(read_image(f, format="BGR"))["instances"].to("cpu")
        out[os.path.basename(f)] = sorted(
            (float(s), int(c), [float(v) for v in b])
            for s, c, b in zip(inst.scores, inst.pred_classes, inst.pred_boxes.tensor)
        )
    return out


def _assert_same_as_reference(pred, ref):
    got = {os.path.basename(r["file"]): r["instances"] for r in pred["results"]}
    assert sorted(got) == sorted(ref)
    n = 0
    for name, dets in got.items():
        mine = sorted((d["score"], d["category"], d["bbox_xyxy"]) for d in dets)
        assert len(mine) == len(ref[name]), (name, len(mine), len(ref[name]))
        for (s, cat, box), (rs, rc, rbox) in zip(mine, ref[name]):
            assert cat == MY_CLASSES[rc] and s == pytest.approx(rs, abs=1e-4)
            assert np.allclose(box, rbox, atol=0.011), (box, rbox)  # json rounds to 0.01 px
        n += len(mine)
    return n


def test_demo_py_with_the_runs_config_yaml_gives_defaultpredictors_detections(fine_tuned_run):
    """The documented command: --config-file OUTPUT_DIR/config.yaml carries NUM_CLASSES and the
    trained test size, the weights are the run's model_final.pth; the detections drawn (score
    >= threshold) are Detectron2's DefaultPredictor's on the same files, with the json's names."""
    base = fine_tuned_run
    r = _demo(base, "--config-file", "output/mydata/config.yaml", *REGISTER, "--input", "data/images",
              "--output", "output/mydata_vis", "--confidence-threshold", "0.35")
    assert r.returncode == 0, r.stderr[-3000:]
    pred = json.load(open(base / "output" / "mydata_vis" / "predictions.json"))
    assert pred["weights"] == os.path.join("output", "mydata", "model_final.pth")
    images = sorted(str(p) for p in (base / "data" / "images").iterdir())
    n = _assert_same_as_reference(pred, _default_predictor_detections(base / "output" / "mydata", images, 0.35))
    assert n > 0, "nothing above the threshold: the comparison is empty"
    assert "trained at" not in r.stderr  # its own sizes: no size warning


def test_demo_py_takes_flags_after_opts_and_trailing_key_value_pairs(fine_tuned_run):
    """Issue 22, point 4: the README's fine-tune demo command with --register-coco placed after
    --opts ended in "Non-existent key: --register-coco"; train_net's trailing KEY VALUE pairs
    were refused. Both are accepted and give the detections of the --opts form."""
    base = fine_tuned_run
    pairs = ["DATASETS.TEST", "('mydata_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", "3", *TINY_RUN,
             "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
             "MODEL.WEIGHTS", "output/mydata/model_final.pth"]  # fmt: skip
    runs = {
        "flags after --opts": ["--config-file", FPN_CONFIG, "--input", "data/images", "--output", "vis_a",
                               "--opts", *pairs, *REGISTER, "--confidence-threshold", "0.35"],
        "trailing pairs": ["--config-file", FPN_CONFIG, *REGISTER, "--output", "vis_b", "--input",
                           "data/images", *pairs, "--confidence-threshold", "0.35"],
    }
    images = sorted(str(p) for p in (base / "data" / "images").iterdir())
    ref = _default_predictor_detections(base / "output" / "mydata", images, 0.35)
    for (what, args), out in zip(runs.items(), ("vis_a", "vis_b")):
        r = _demo(base, *[os.path.join(ROOT, a) if a == FPN_CONFIG else a for a in args])
        assert r.returncode == 0, (what, r.stderr[-3000:])
        assert _assert_same_as_reference(json.load(open(base / out / "predictions.json")), ref) > 0
    # an unknown flag after --opts is named, not taken as a config key
    r = _demo(base, "--config-file", os.path.join(ROOT, FPN_CONFIG), "--input", "data/images", "--output",
              "vis_c", "--opts", "MODEL.DEVICE", "cpu", "--confidence-treshold", "0.3")
    assert r.returncode == 2 and "--confidence-treshold" in r.stderr and "Non-existent key" not in r.stderr


def test_demo_py_readme_recipe_warns_of_the_test_size_and_hints_at_the_threshold(fine_tuned_run):
    """Issue 22, point 4: the README's recipe (shipped config + MODEL.WEIGHTS) runs at the
    config's 800 px, not the 96 px the run was trained at, and every image got "0 detections"
    at 0.5 without a hint. Now it says both: the size it runs at against the trained one (from
    the config.yaml beside the weights), and --confidence-threshold."""
    base = fine_tuned_run
    r = _demo(base, "--config-file", os.path.join(ROOT, FPN_CONFIG), *REGISTER, "--input", "data/images",
              "--output", "vis_readme", "--opts", "DATASETS.TEST", "('mydata_val',)",
              "MODEL.ROI_HEADS.NUM_CLASSES", "3", *TINY_RUN, "MODEL.WEIGHTS", "output/mydata/model_final.pth")
    assert r.returncode == 0, r.stderr[-3000:]
    pred = json.load(open(base / "vis_readme" / "predictions.json"))
    assert all(not x["instances"] for x in pred["results"])  # the case: nothing at 0.5
    # the reference: what the run's own config holds
    from detectron2.config import CfgNode

    trained = CfgNode.load_yaml_with_base(str(base / "output" / "mydata" / "config.yaml"))["INPUT"]
    log = r.stderr + r.stdout
    size_lines = [ln for ln in log.splitlines() if "trained at" in ln]
    assert size_lines and "INPUT.MIN_SIZE_TEST 800" in size_lines[0]
    assert f"INPUT.MIN_SIZE_TEST {trained['MIN_SIZE_TEST']}" in size_lines[0]
    assert "--config-file output/mydata/config.yaml" in size_lines[0]
    hint = [ln for ln in log.splitlines() if "no detection" in ln]
    assert hint and "--confidence-threshold 0.3" in hint[-1] and "INPUT.MIN_SIZE_TEST 800" in hint[-1]
    assert log.rstrip().splitlines()[-1] == hint[-1]  # the last line of the run


def test_demo_py_skips_bad_inputs_by_name_and_counts_them(fine_tuned_run, tmp_path):
    """Issue 22, point 11: a truncated JPEG was processed silently (exit 0, 0 detections, only
    libjpeg's unnamed "Premature end of JPEG file"). Truncated, garbage, 16-bit and missing
    inputs are now skipped by name, counted at the end, and the good images still run."""
    import cv2

    base = fine_tuned_run
    bad = tmp_path / "in"
    bad.mkdir()
    good = sorted((base / "data" / "images").iterdir())[:2]
    for p in good:
        (bad / p.name).write_bytes(p.read_bytes())
    ok, enc = cv2.imencode(".jpg", np.full((120, 160, 3), 128, np.uint8))
    (bad / "truncated.jpg").write_bytes(enc.tobytes()[: len(enc) * 2 // 3])
    (bad / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    Image.fromarray(np.linspace(0, 60000, 64 * 64).astype(np.uint16).reshape(64, 64)).save(bad / "depth16.png")
    missing = str(tmp_path / "nope.jpg")
    common = ["--config-file", "output/mydata/config.yaml", *REGISTER, "--confidence-threshold", "0.35"]

    # the case alone: one truncated JPEG -> nothing usable, exit 2, one line naming it
    r = _demo(base, *common, "--input", str(bad / "truncated.jpg"), "--output", str(tmp_path / "o1"))
    assert r.returncode == 2, r.stderr[-2000:]
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("demo.py: error:")]
    assert len(err_lines) == 1 and "truncated.jpg" in r.stderr and "Traceback" not in r.stderr

    r = _demo(base, *common, "--input", str(bad), missing, "--output", str(tmp_path / "o2"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr + r.stdout
    for name in ("truncated.jpg", "garbage.jpg", "depth16.png", "nope.jpg"):
        assert any("Skipped" in ln and name in ln for ln in log.splitlines()), name
    assert "4 of 6 input(s) skipped" in log
    pred = json.load(open(tmp_path / "o2" / "predictions.json"))
    assert [os.path.basename(x["file"]) for x in pred["results"]] == [p.name for p in good]
    assert sorted(os.path.basename(s["file"]) for s in pred["skipped"]) == sorted(
        ["depth16.png", "garbage.jpg", "nope.jpg", "truncated.jpg"])
    assert not (tmp_path / "o2" / "truncated.jpg").exists()
