"""UnsharedRCNN (resnext_det/modeling/unshared_rcnn.py), the paper's Appendix B detector as one
model (Xie et al., CVPR 2017, Appendix B): two backbones, and each loss reaches only its own
network; in eval mode its proposals are those of Detectron2's ProposalNetwork and its detections
those of Detectron2's GeneralizedRCNN on them; the solver of each of its two networks
(UNSHARED.RPN, UNSHARED.FAST_RCNN) is checked at its bounds.
"""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from resnext_det.unshared import UnsharedRCNN, stage_configs
from unshared_runs import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unshared_rcnn_has_two_backbones_and_trains_both_networks(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg)
    assert isinstance(model, UnsharedRCNN) and model.fast_rcnn.proposal_generator is None
    topk = model.rpn.proposal_generator.post_nms_topk
    assert topk == {True: cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, False: cfg.MODEL.RPN.POST_NMS_TOPK_TEST}
    rpn_ptrs = {t.untyped_storage().data_ptr() for t in model.rpn.state_dict().values()}
    frcn_ptrs = {t.untyped_storage().data_ptr() for t in model.fast_rcnn.state_dict().values()}
    assert not rpn_ptrs & frcn_ptrs
    # Training mode (plain train_net without the schedule): the losses of both networks, and
    # each loss reaches only its own network (the proposals carry no gradient).
    data = [{"image": torch.rand(3, 256, 256) * 255, "instances": _two_boxes()}]
    model.train()
    with EventStorage(0):
        losses = model(data)
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"} <= set(losses)
    (losses["loss_cls"] + losses["loss_box_reg"]).backward()
    assert all(p.grad is None for p in model.rpn.parameters())
    assert any(p.grad is not None for p in model.fast_rcnn.backbone.parameters())


def _two_boxes():
    inst = Instances((256, 256))
    inst.gt_boxes = Boxes(torch.tensor([[30.0, 40.0, 120.0, 150.0], [150.0, 20.0, 220.0, 90.0]]))
    inst.gt_classes = torch.tensor([0, 0])
    return inst


def _same_instances(a, b, fields):
    assert len(a) == len(b) > 0
    for f in fields:
        x, y = a.get(f), b.get(f)
        x, y = (x.tensor, y.tensor) if isinstance(x, Boxes) else (x, y)
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f)


@torch.no_grad()
def test_unshared_rcnn_detects_as_detectron2s_rpn_then_fast_rcnn(tmp_path):
    """Eval mode: UnsharedRCNN's proposals are those of Detectron2's ProposalNetwork (its RPN,
    normalisation and padding included) and its detections those of Detectron2's
    GeneralizedRCNN given these proposals, on the same weights (untrained: only the data flow
    is checked). Two images of different sizes; no 'height'/'width', so both report boxes in
    the input tensors' pixels."""
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128")
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(3)
    inputs = [{"image": torch.rand(3, 96, 120, generator=g) * 255},
              {"image": torch.rand(3, 80, 104, generator=g) * 255}]  # fmt: skip
    ref_props = [o["proposals"] for o in model.rpn(inputs)]
    ours_props = model.propose(inputs)
    for a, b in zip(ours_props, ref_props):
        _same_instances(a, b, ("proposal_boxes", "objectness_logits"))
    ref = model.fast_rcnn([dict(x, proposals=p) for x, p in zip(inputs, ref_props)])
    ours = model(inputs)
    assert len(ours) == len(inputs)
    for a, b in zip(ours, ref):
        _same_instances(a["instances"], b["instances"], ("pred_boxes", "scores", "pred_classes"))


@torch.no_grad()
def test_unshared_rcnn_pads_the_rpn_input_as_its_backbone_asks(tmp_path):
    """With an FPN backbone (size divisibility 32, and a square-padding constraint as ViTDet's
    backbones have), UnsharedRCNN's proposals are still those of Detectron2's ProposalNetwork."""
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "MODEL.BACKBONE.NAME", "build_resnext_fpn_backbone",
                   "MODEL.RESNEXT.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']",
                   "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']", "MODEL.FPN.OUT_CHANNELS", "32",
                   "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
                   "MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'p6']",
                   "MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", "['p2', 'p3', 'p4', 'p5']",
                   "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
                   "MODEL.ROI_BOX_HEAD.FC_DIM", "32")  # fmt: skip
    model = build_model(cfg).eval()
    assert model.rpn.backbone.size_divisibility == 32
    g = torch.Generator().manual_seed(4)
    inputs = [{"image": torch.rand(3, 72, 90, generator=g) * 255}]  # not a multiple of 32
    for square in (0, 128):
        model.rpn.backbone._square_pad = square  # what FPN(square_pad=...) sets
        ref = model.rpn(inputs)[0]["proposals"]
        _same_instances(model.propose(inputs)[0], ref, ("proposal_boxes", "objectness_logits"))


def test_training_unshared_rcnn_without_ground_truth_says_what_is_missing(tmp_path):
    model = build_model(tiny_cfg(tmp_path)).train()
    with pytest.raises(ValueError) as e:
        model([{"image": torch.zeros(3, 64, 64)}])
    assert str(e.value) == "Training UnsharedRCNN needs 'instances' (ground truth) in the inputs."


@pytest.mark.parametrize("node", ["RPN", "FAST_RCNN"])
def test_each_stages_solver_is_checked_at_its_bounds(tmp_path, node):
    """UNSHARED.{RPN,FAST_RCNN}: the smallest valid values pass; one step outside is refused,
    naming the key and the value given."""
    key = f"UNSHARED.{node}"
    ok = [f"{key}.MAX_ITER", "1", f"{key}.STEPS", "()", f"{key}.BASE_LR", "1e-9",
          f"{key}.IMS_PER_BATCH", "2", f"{key}.BATCH_SIZE_PER_IMAGE", "1"]  # fmt: skip
    stage_configs(tiny_cfg(tmp_path, *ok))
    stage_configs(tiny_cfg(tmp_path, f"{key}.MAX_ITER", "3", f"{key}.STEPS", "(1, 2)"))
    stage_configs(tiny_cfg(tmp_path, f"{key}.IMS_PER_BATCH", "3", "SOLVER.REFERENCE_WORLD_SIZE", "0"))
    refused = [
        ([f"{key}.MAX_ITER", "0", f"{key}.STEPS", "()"], f"{key}.MAX_ITER must be > 0, got 0."),
        ([f"{key}.MAX_ITER", "3", f"{key}.STEPS", "(2, 1)"], f"{key}.STEPS must increase and lie in (0, {key}.MAX_ITER=3), got [2, 1]."),
        ([f"{key}.MAX_ITER", "3", f"{key}.STEPS", "(0,)"], "got [0]"),
        ([f"{key}.MAX_ITER", "3", f"{key}.STEPS", "(3,)"], "got [3]"),
        ([f"{key}.BASE_LR", "0.0"], f"{key}.BASE_LR, IMS_PER_BATCH and BATCH_SIZE_PER_IMAGE must be > 0, got 0.0, 2, "),
        ([f"{key}.IMS_PER_BATCH", "0"], "must be > 0, got 0.02, 0, "),
        ([f"{key}.BATCH_SIZE_PER_IMAGE", "0"], ", 2, 0."),
        ([f"{key}.IMS_PER_BATCH", "3"], f"{key}.IMS_PER_BATCH=3 is not a multiple of SOLVER.REFERENCE_WORLD_SIZE=2"),
    ]
    for opts, msg in refused:
        with pytest.raises(ValueError) as e:
            stage_configs(tiny_cfg(tmp_path, *opts))  # BASE_LR 0.02, IMS_PER_BATCH 2 otherwise
        assert msg in str(e.value), (opts, str(e.value))
    with pytest.raises(ValueError, match=r"MODEL\.PROPOSAL_GENERATOR\.NAME to 'RPN'"):
        stage_configs(tiny_cfg(tmp_path, "MODEL.PROPOSAL_GENERATOR.NAME", "PrecomputedProposals"))
