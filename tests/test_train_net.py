"""tools/train_net.py end to end on the shapes data: trains, the loss goes down,
COCO evaluation computes an AP; --eval-only reloads the result."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/quickstart/faster_rcnn_X_26_8x4d_FPN_shapes.yaml")
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "64",
    "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "5", "SOLVER.BASE_LR", "0.01",
    "DATALOADER.NUM_WORKERS", "0",
]


def _run(args, env=None):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/train_net.py"), *args],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_train_net_trains_and_evaluates(tmp_path):
    out = str(tmp_path / "run")
    _run(["--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(35,)",
          "TEST.EVAL_PERIOD", "40", "SOLVER.CHECKPOINT_PERIOD", "1000", "OUTPUT_DIR", out])
    rows = _metrics(out)
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert len(losses) >= 2
    # Detectron2 logs the median of the last 20 iterations: the last window must be
    # clearly below the first one.
    assert losses[-1] < 0.85 * losses[0], losses
    evals = [r for r in rows if "bbox/AP" in r]
    assert evals, "no COCO evaluation in metrics.json"
    ap = evals[-1]["bbox/AP"]
    assert ap == ap and 0.0 <= ap <= 100.0  # computed, not NaN
    assert os.path.isfile(os.path.join(out, "model_final.pth"))

    # --eval-only on the written checkpoint gives the same AP.
    r = _run(["--config-file", CONFIG, "--eval-only", *TINY,
              "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out])
    assert "bbox" in r.stdout + r.stderr
    with open(os.path.join(out, "inference", "shapes_val", "coco_instances_results.json")) as f:
        assert isinstance(json.load(f), list)


@pytest.mark.parametrize(
    "opts, names",
    [
        (["MODEL.RESNEXT.CARDINALITY", "0"], "MODEL.RESNEXT.CARDINALITY"),
        (["MODEL.WEIGHTS", "/no/such/weights.pth"], "MODEL.WEIGHTS"),
    ],
)
def test_bad_input_ends_with_one_line_naming_the_fix(tmp_path, opts, names):
    """A bad key or a missing weights file: exit status 2, the last line of stderr is the
    message naming the key, and no traceback (unless RESNEXT_DET_TRACEBACK is set)."""
    env = {k: v for k, v in os.environ.items() if k != "RESNEXT_DET_TRACEBACK"}
    args = [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", CONFIG, *TINY,
            "OUTPUT_DIR", str(tmp_path / "out"), *opts]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith("train_net.py: error: ") and names in last, last
    assert "Traceback" not in r.stderr
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(env, RESNEXT_DET_TRACEBACK="1"))
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_ctrl_c_inside_an_appendix_b_stage_names_the_stage_and_its_checkpoint(tmp_path):
    """Ctrl-C in the trainer of stage 3 says the stage by number and name, the iteration, and
    the checkpoint the rerun resumes from; Ctrl-C outside a stage's trainer says that finished
    stages are skipped (the words written here by hand, from docs/appendix_b.md)."""
    from detectron2.engine import TrainerBase

    from resnext_det.cli import train_net
    from resnext_det.engine.setup import read_cfg

    cfg = read_cfg(os.path.join(ROOT, "configs/COCO-Detection/faster_rcnn_X_101_32x4d_C4_appendixB.yaml"),
                   ["OUTPUT_DIR", str(tmp_path)])
    stage3 = tmp_path / "stage3_fast_rcnn"
    stage3.mkdir()
    (stage3 / "model_0000009.pth").write_bytes(b"x")
    (stage3 / "last_checkpoint").write_text("model_0000009.pth")
    args = train_net.argument_parser().parse_args(["--config-file", "x.yaml"])

    class StageTrainer(TrainerBase):
        def __init__(self, folder):
            super().__init__()
            self.cfg = read_cfg(os.path.join(ROOT, "configs/COCO-Detection/faster_rcnn_X_101_32x4d_C4_appendixB.yaml"),
                                ["OUTPUT_DIR", str(folder)])
            self.iter, self.max_iter = 12, 40

        def run_step(self):
            raise KeyboardInterrupt

    try:
        StageTrainer(stage3).run_step()
    except KeyboardInterrupt as e:
        stopped = train_net._interruption(e, cfg, args)
    assert stopped.where == "in stage 3 (fast_rcnn) at iteration 12 of 40"
    assert stopped.how == ("rerun the same command to continue: finished stages are skipped, and stage 3 "
                           f"resumes from {stage3 / 'model_0000009.pth'}")
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        outside = train_net._interruption(e, cfg, args)
    assert (outside.where, outside.how) == ("", "rerun the same command to continue: finished stages are skipped")


def test_the_schedule_checks_model_weights_only_for_training_stages_without_a_checkpoint(tmp_path):
    """MODEL.WEIGHTS is what stages 1 and 3 start from: a run that resumes both (or the one
    asked for with --stage) does not need it; stages 2 and 4 train nothing."""
    from resnext_det.cli import train_net
    from resnext_det.engine.setup import read_cfg

    cfg = read_cfg(os.path.join(ROOT, "configs/COCO-Detection/faster_rcnn_X_101_32x4d_C4_appendixB.yaml"),
                   ["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", str(tmp_path / "imagenet.pth")])

    def loads(*flags):
        return train_net._loads_weights(cfg, train_net.argument_parser().parse_args(["--config-file", "x.yaml", *flags]))

    assert loads() and loads("--stage", "rpn") and loads("--stage", "fast_rcnn")
    assert not loads("--stage", "proposals") and not loads("--stage", "eval")
    (tmp_path / "stage1_rpn").mkdir()
    (tmp_path / "stage1_rpn" / "last_checkpoint").write_text("model_0000009.pth")
    assert not loads("--stage", "rpn") and loads() and loads("--stage", "fast_rcnn")
    (tmp_path / "stage3_fast_rcnn").mkdir()
    (tmp_path / "stage3_fast_rcnn" / "last_checkpoint").write_text("model_0000009.pth")
    assert not loads()
