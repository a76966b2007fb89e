"""A detector fine-tuned from converted ImageNet weights, end to end through
tools/train_net.py with the config file tools/convert_pretrained.py writes, on
the shapes data; then the detector checkpoint it saved is checked like a
converted backbone."""
import os
import subprocess
import sys

import pytest
import torch

from detectron2.config import get_cfg

from resnext_det import add_resnext_config
from resnext_det.checkpoint import ResNeXtCheckpointer, WeightsConfigError
from resnext_det.engine import Trainer

from weights_helpers import ROOT, run_tool, tv_resnext

TINY = [
    "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001",
    "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1000",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128", "DATASETS.TRAIN", '("shapes_train",)', "DATASETS.TEST", "()",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
]


@pytest.mark.slow
def test_train_net_fine_tunes_from_converted_weights(tmp_path):
    tv = tv_resnext(groups=2, width=4, seed=4)
    torch.save(tv.state_dict(), tmp_path / "imagenet.pth")
    cfg_file = tmp_path / "x26-c4.yaml"
    run_tool(tmp_path / "imagenet.pth", tmp_path / "x26.pth", "--config-out", cfg_file,
             "--base", os.path.join(ROOT, "configs", "Base-ResNeXt-C4.yaml"))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", str(cfg_file),
         *TINY, "OUTPUT_DIR", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # The package's own INFO lines reach plain train_net's log (console and log.txt).
    with open(out / "log.txt") as f:
        log = f.read()
    assert "Loaded all" in log and "backbone tensors of MODEL.WEIGHTS" in log, log[-3000:]
    final = torch.load(out / "model_final.pth", weights_only=True)
    # The trainer's checkpoints record the config's input convention and architecture.
    meta = final["resnext_det"]
    assert meta["kind"] == "detector" and meta["input"]["format"] == "RGB"
    assert meta["arch"]["cardinality"] == 2 and list(meta["arch"]["stage_blocks"]) == [2, 2, 2, 2]
    # FrozenBN (the default) kept the ImageNet statistics; the frozen stem its weights.
    assert torch.equal(final["model"]["backbone.stem.conv1.weight"], tv.state_dict()["conv1.weight"])
    assert torch.equal(final["model"]["backbone.res2.0.conv1.norm.running_mean"], tv.state_dict()["layer1.0.bn1.running_mean"])

    # The detector checkpoint loads (every tensor, as for evaluation) with its config ...
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(str(cfg_file))
    cfg.merge_from_list(TINY)
    model = Trainer.build_model(cfg)
    ResNeXtCheckpointer(model, cfg=cfg, require="all").load(str(out / "model_final.pth"))
    # ... while the backbone-only ImageNet file is refused for evaluation (heads would be random).
    with pytest.raises(WeightsConfigError, match="backbone weights only.*model_final.pth"):
        ResNeXtCheckpointer(model, cfg=cfg, require="all").load(str(tmp_path / "x26.pth"))
    # ... and is refused with a BGR config, naming the keys.
    cfg.merge_from_list(["INPUT.FORMAT", "BGR"])
    with pytest.raises(WeightsConfigError, match="INPUT.FORMAT: the weights were trained on RGB input, the config feeds BGR"):
        ResNeXtCheckpointer(model, cfg=cfg, require="all").load(str(out / "model_final.pth"))

    # Resuming the run: the same config continues after the last iteration; a
    # config whose input convention changed since is refused.
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(str(cfg_file))
    cfg.merge_from_list([*TINY, "OUTPUT_DIR", str(out)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3
    cfg.merge_from_list(["MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"])
    with pytest.raises(WeightsConfigError, match="(?s)last checkpoint of OUTPUT_DIR.*MODEL.PIXEL_STD"):
        Trainer(cfg).resume_or_load(resume=True)
