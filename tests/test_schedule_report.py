"""What the Appendix B schedule reports (resnext_det/unshared/report.py; Xie et al., CVPR 2017,
Appendix B): the plan it logs first (fewer GPUs follow the linear scaling rule), the paper's
Table 8 row of the config's architecture, and the results table of stage 4.
"""
import os

import pytest

from detectron2.engine import DefaultTrainer

from resnext_det.engine import setup_cfg
from resnext_det.unshared import stage_configs
from resnext_det.unshared.schedule import _plan
from unshared_runs import DET, PAPER_TABLE8, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fewer_gpus_follow_the_linear_scaling_rule():
    cfg = setup_cfg(os.path.join(DET, "faster_rcnn_X_101_32x4d_C4_appendixB.yaml"), [])
    cfgs = stage_configs(cfg)
    # Goyal et al.: batch x k/8, lr x k/8, iterations x 8/k. By hand for k = 1:
    rpn = DefaultTrainer.auto_scale_workers(cfgs["rpn"], 1).SOLVER
    assert (rpn.IMS_PER_BATCH, rpn.MAX_ITER, tuple(rpn.STEPS)) == (2, 1_440_000, (960_000,))
    assert rpn.BASE_LR == pytest.approx(0.0025)
    frcn = DefaultTrainer.auto_scale_workers(cfgs["fast_rcnn"], 1).SOLVER
    assert (frcn.IMS_PER_BATCH, frcn.MAX_ITER, tuple(frcn.STEPS)) == (1, 1_440_000, (960_000,))
    assert frcn.BASE_LR == pytest.approx(0.000625)
    plan = _plan(cfg, cfgs, 1)  # what the schedule logs first
    assert "batch 16 -> 2, lr 0.02 -> 0.0025" in plan and "batch 8 -> 1" in plan
    assert "iterations 180000 -> 1440000" in plan and "linear scaling rule" in plan


@pytest.mark.parametrize("name", sorted(PAPER_TABLE8))
def test_stage4_names_the_papers_table8_row_of_the_configs_architecture(name):
    from resnext_det.unshared.report import paper_row

    depth, c, d, ap50, ap = PAPER_TABLE8[name]
    row = paper_row(setup_cfg(os.path.join(DET, name), []))
    # PAPER.md, Table 8: "ResNet-50 | 1x64d", ..., "ResNeXt-101 | 32x4d"
    kind = "ResNet" if c == 1 else "ResNeXt"
    assert row == {"backbone": f"{kind}-{depth} ({c}x{d}d)", "AP50": ap50, "AP": ap}


def test_stage4_has_no_paper_row_for_architectures_outside_table8(tmp_path):
    from resnext_det.unshared.report import paper_row

    assert paper_row(tiny_cfg(tmp_path)) is None  # ResNeXt-26 (8x4d)
    # ResNeXt-101 32x8d and 64x4d: in the paper (Table 5), not in Table 8.
    for preset in ("X-101-32x8d", "X-101-64x4d"):
        assert paper_row(setup_cfg(os.path.join(DET, "faster_rcnn_X_101_32x4d_C4_appendixB.yaml"),
                                    ["MODEL.RESNEXT.PRESET", preset])) is None  # fmt: skip
    # Depth 50's blocks with another cardinality/width: not a Table 8 row either.
    assert paper_row(setup_cfg(os.path.join(DET, "faster_rcnn_R_50_C4_appendixB.yaml"),
                                ["MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.DEPTH", "50",
                                 "MODEL.RESNEXT.CARDINALITY", "1", "MODEL.RESNEXT.BOTTLENECK_WIDTH", "4"])) is None  # fmt: skip


def test_stage4_results_table_rows_by_hand():
    from resnext_det.unshared.report import results_markdown

    nan = float("nan")
    results = {
        "stored_proposals": {
            "coco_2014_minival": {"bbox": {"AP": 30.04, "AP50": 51.96, "AP75": 31.25, "APs": 12.0, "APm": 33.3, "APl": 44.44}},
            "tiny_eval": {"bbox": {"AP": nan, "AP50": None, "AP75": 0.0, "APs": float("inf"), "APm": 1.06}},
        },
        "end_to_end": {"coco_2014_minival": {"bbox": {"AP": 29.96, "AP50": 52.0, "AP75": 31.2, "APs": 12.04, "APm": 33.3, "APl": 44.4}}},
        "paper_table8": {"backbone": "ResNeXt-101 (32x4d)", "AP50": 51.9, "AP": 30.0},
    }
    assert results_markdown(results) == (
        "# Appendix B schedule: COCO box AP\n"
        "\n"
        "| model | dataset | AP | AP50 | AP75 | APs | APm | APl |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| ours: Fast R-CNN on stored proposals (stage 4) | coco_2014_minival | 30.0 | 52.0 | 31.2 | 12.0 | 33.3 | 44.4 |\n"
        "| ours: Fast R-CNN on stored proposals (stage 4) | tiny_eval | – | – | 0.0 | – | 1.1 | – |\n"
        "| ours: UnsharedRCNN end to end | coco_2014_minival | 30.0 | 52.0 | 31.2 | 12.0 | 33.3 | 44.4 |\n"
        "| paper, Table 8: ResNeXt-101 (32x4d) | coco_2014_minival | 30.0 | 51.9 | – | – | – | – |\n"
    )
    # Without the end-to-end evaluation and without a paper row: the stored-proposal row only.
    only = {"stored_proposals": {"d": {"bbox": {"AP": 1.0}}}, "end_to_end": None, "paper_table8": None}
    assert results_markdown(only).splitlines()[4:] == ["| ours: Fast R-CNN on stored proposals (stage 4) | d | 1.0 | – | – | – | – | – |"]
    assert results_markdown({"stored_proposals": {"d": {}}}).splitlines()[4:] == [
        "| ours: Fast R-CNN on stored proposals (stage 4) | d | – | – | – | – | – | – |"
    ]
