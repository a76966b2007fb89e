"""Tests of resnext_det/checkpoint/matching.py: what a checkpoint's tensors are
(``classify_checkpoint``), and the error of a load that would leave tensors of the model at
their random initialisation (``check_required``): it names them, and when the file's shapes
are another model's, the config keys that set those shapes with the value the file implies
(``shape_fixes``)."""
import re

import pytest
import torch

from detectron2.modeling import build_model

from resnext_det.checkpoint import (
    ConversionError,
    ResNeXtCheckpointer,
    WeightsConfigError,
    config_pairs,
    convert_weights,
)
from resnext_det.checkpoint.loading import attach_weights_record
from resnext_det.checkpoint.readers import CheckpointReadError

from weights_helpers import detector_cfg, load_detector, names, tiny_cfg


# --------------------------------------------------------------------------
# What a checkpoint's tensors are (classify_checkpoint)
# --------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_heads_only_weights_are_a_detector_checkpoint_and_errors_name_the_file(tmp_path):
    """A dict of head tensors (no trunk) is a detector's, not a backbone; a fresh
    checkpointer reading a bad file names that file."""
    from resnext_det.checkpoint.loading import classify_checkpoint

    t = torch.zeros(1)
    assert classify_checkpoint({"roi_heads.box_predictor.cls_score.weight": t}) == "detector"
    assert classify_checkpoint({"res2.0.conv1.weight": t, "stem.conv1.weight": t}) == "backbone"
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CheckpointReadError) as e:
        ResNeXtCheckpointer(torch.nn.Linear(1, 1))._load_file(str(tmp_path / "cut.pth"))
    assert repr(str(tmp_path / "cut.pth")) in str(e.value)


# --------------------------------------------------------------------------
# A load that would leave tensors at their random initialisation: refused naming them
# --------------------------------------------------------------------------
def test_checkpoint_missing_a_stage_is_refused(tmp_path, tv26):
    _, d, r = tv26
    ckpt = torch.load(d / "tv26-d2.pth", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("res4.1.")}
    torch.save(ckpt, tmp_path / "holey.pth")
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(tmp_path / "holey.pth")))
    with pytest.raises(WeightsConfigError, match=r"would leave 15 of the \d+ backbone tensors at their random"):
        load_detector(cfg)
    # The converter refuses a source with a tensor missing.
    sd = {k: v for k, v in tv26[0].state_dict().items() if k != "layer3.1.bn2.running_var"}
    torch.save(sd, tmp_path / "holey-tv.pth")
    with pytest.raises(ConversionError, match=r"1 tensors missing, e.g. \['res4.1.conv2.norm.running_var'\]"):
        convert_weights(str(tmp_path / "holey-tv.pth"), progress=False)


# --------------------------------------------------------------------------
# A detector checkpoint of other head shapes than the config builds: the message names
# the config key that made the file's shapes, with the file's value
# --------------------------------------------------------------------------
MASK, KP, PANOPTIC = ["MODEL.MASK_ON", True], ["MODEL.KEYPOINT_ON", True], ["MODEL.META_ARCHITECTURE", "PanopticFPN"]
# (base, the file's config, the loading config, what the message must name, what it must not)
SHAPE_CASES = {
    "classes": ("FPN", [*MASK, "MODEL.ROI_HEADS.NUM_CLASSES", 5], [*MASK, "MODEL.ROI_HEADS.NUM_CLASSES", 3],
                ["MODEL.ROI_HEADS.NUM_CLASSES 5"], ["CLS_AGNOSTIC", "CONV_DIM"]),
    "agnostic": ("FPN", [*MASK, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True, "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True],
                 MASK, ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True", "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True"],
                 ["NUM_CLASSES", "CONV_DIM"]),
    "keypoints": ("FPN", [*KP, "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 17], [*KP, "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 5],
                  ["MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS 17"], ["NUM_CLASSES"]),
    "retinanet_classes": ("RetinaNet", ["MODEL.RETINANET.NUM_CLASSES", 5], ["MODEL.RETINANET.NUM_CLASSES", 3],
                          ["MODEL.RETINANET.NUM_CLASSES 5"], ["MODEL.ANCHOR_GENERATOR", "head.bbox_pred"]),
    "retinanet_anchors": ("RetinaNet", ["MODEL.RETINANET.NUM_CLASSES", 5],
                          ["MODEL.RETINANET.NUM_CLASSES", 5, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]]],
                          ["MODEL.ANCHOR_GENERATOR.SIZES", "ASPECT_RATIOS"], ["NUM_CLASSES", "the keys that build"]),
    "semseg": ("FPN", [*PANOPTIC, *MASK, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 54],
               [*PANOPTIC, *MASK, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 10], ["MODEL.SEM_SEG_HEAD.NUM_CLASSES 54"], ["ROI_HEADS"]),
    # The RPN and box heads' shapes follow the FPN's width: only the width is named for them.
    "fpn_width": ("FPN", [*MASK, "MODEL.FPN.OUT_CHANNELS", 16], [*MASK, "MODEL.FPN.OUT_CHANNELS", 32],
                  ["MODEL.FPN.OUT_CHANNELS 16", "MODEL.ROI_MASK_HEAD.CONV_DIM"], ["MODEL.ANCHOR_GENERATOR", "FC_DIM"]),
    "rpn_anchors": ("FPN", [], ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]]],
                    ["MODEL.ANCHOR_GENERATOR.SIZES", "ASPECT_RATIOS"], ["MODEL.FPN", "ROI_BOX_HEAD"]),
    "box_head": ("FPN", [], ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 5],
                 ["MODEL.ROI_BOX_HEAD.FC_DIM", "POOLER_RESOLUTION"], ["NUM_CLASSES", "MODEL.FPN"]),
    # A predictor whose class dimension agrees differs in its input width: the head's width is
    # named, not the class count the config already has.
    "mask_head": ("FPN", MASK, [*MASK, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16], ["MODEL.ROI_MASK_HEAD.CONV_DIM", "NUM_CONV"],
                  ["ROI_BOX_HEAD", "MODEL.FPN", "NUM_CLASSES"]),
    "box_fc_dim": ("FPN", [], ["MODEL.ROI_BOX_HEAD.FC_DIM", 32], ["MODEL.ROI_BOX_HEAD.FC_DIM"], ["NUM_CLASSES", "MODEL.FPN"]),
    "keypoint_width": ("FPN", KP, [*KP, "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", [16]], ["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS"],
                       ["NUM_KEYPOINTS", "NUM_CLASSES"]),
    "semseg_width": ("FPN", [*PANOPTIC, *MASK], [*PANOPTIC, *MASK, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 64],
                     ["MODEL.SEM_SEG_HEAD.CONVS_DIM"], ["NUM_CLASSES"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_detector_of_other_head_shapes_names_the_key_and_the_file_value(tmp_path, case):
    kind, file_opts, cfg_opts, named, not_named = SHAPE_CASES[case]
    trained_cfg = tiny_cfg(kind, *file_opts)
    trained = build_model(trained_cfg)
    ck = ResNeXtCheckpointer(trained, str(tmp_path))  # as the trainer writes model_final.pth
    attach_weights_record(ck, trained_cfg)
    ck.save("model_final")
    cfg = tiny_cfg(kind, *cfg_opts)
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(build_model(cfg), cfg=cfg, require="all").load(str(tmp_path / "model_final.pth"))
    fixes = str(e.value).split("; set ", 1)[1]
    for token in named:
        key, _, value = token.partition(" ")
        assert names(fixes, key), (token, fixes)
        if value:  # the file's value, and no other
            assert set(re.findall(rf"{re.escape(key)} (\S+?)(?=\.?(?:\s|$))", fixes)) == {value}, (token, fixes)
    for token in not_named:
        assert token not in fixes, (token, fixes)
    assert "None" not in fixes
    assert "the keys that build" not in fixes, fixes  # every tensor here comes from a head the message knows


def test_retinanet_file_without_its_box_branch_names_classes_and_anchors(tmp_path):
    """The class count of a RetinaNet head needs the anchors per position (from its box
    branch): without it, both keys are named."""
    trained = build_model(tiny_cfg("RetinaNet", "MODEL.RETINANET.NUM_CLASSES", 5))
    sd = {k: v for k, v in trained.state_dict().items() if not k.startswith("head.bbox_pred.")}
    torch.save({"model": sd}, tmp_path / "retinanet.pth")
    cfg = tiny_cfg("RetinaNet", "MODEL.RETINANET.NUM_CLASSES", 3)
    with pytest.raises(WeightsConfigError) as e:
        ResNeXtCheckpointer(build_model(cfg), cfg=cfg, require="all").load(str(tmp_path / "retinanet.pth"))
    fixes = str(e.value).split("; set ", 1)[1]
    assert names(fixes, "MODEL.RETINANET.NUM_CLASSES") and names(fixes, "MODEL.ANCHOR_GENERATOR")
    assert "MODEL.RETINANET.NUM_CLASSES 5" not in fixes  # not knowable from the file


@pytest.mark.usefixtures("one_thread")
def test_shape_fixes_name_the_key_and_the_value_the_files_shapes_imply():
    """Hand-made shapes for each head: the class count the file was trained for (K + 1
    scores, 4 K boxes, K masks, K keypoints, anchors x K RetinaNet scores), the
    class-agnostic switches (4 boxes, 1 mask), the width keys when only the input width
    differs, the FPN width alone for the heads that follow it, each fix once."""
    from resnext_det.checkpoint.matching import shape_fixes as _shape_fixes

    z = torch.zeros

    def fixes(file, model):
        return _shape_fixes(list(file), file, model)

    def one(file, model):
        got = fixes(file, model)
        assert len(got) == 1 and "None" not in got[0], got
        return got[0]

    cls = "roi_heads.box_predictor.cls_score.weight"
    assert one({cls: z(6, 16)}, {cls: z(4, 16)}).startswith("MODEL.ROI_HEADS.NUM_CLASSES 5 ")
    cascade = "roi_heads.box_predictor.2.cls_score.bias"
    assert one({cascade: z(9)}, {cascade: z(4)}).startswith("MODEL.ROI_HEADS.NUM_CLASSES 8 ")
    assert one({cls: z(4, 32)}, {cls: z(4, 16)}).startswith("MODEL.ROI_BOX_HEAD.FC_DIM ")
    box = "roi_heads.box_predictor.bbox_pred.weight"
    assert one({box: z(4, 16)}, {box: z(12, 16)}) == "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True"
    assert one({box: z(20, 16)}, {box: z(12, 16)}).startswith("MODEL.ROI_HEADS.NUM_CLASSES 5 ")
    mask = "roi_heads.mask_head.predictor.weight"
    assert one({mask: z(1, 8, 1, 1)}, {mask: z(3, 8, 1, 1)}) == "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK True"
    assert one({mask: z(7, 8, 1, 1)}, {mask: z(3, 8, 1, 1)}).startswith("MODEL.ROI_HEADS.NUM_CLASSES 7 ")
    assert one({mask: z(3, 16, 1, 1)}, {mask: z(3, 8, 1, 1)}).startswith("MODEL.ROI_MASK_HEAD.CONV_DIM ")
    kp, kpb = "roi_heads.keypoint_head.score_lowres.weight", "roi_heads.keypoint_head.score_lowres.bias"
    assert one({kp: z(8, 17, 4, 4)}, {kp: z(8, 5, 4, 4)}).startswith("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS 17 ")
    assert one({kpb: z(17)}, {kpb: z(5)}).startswith("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS 17 ")
    assert one({kp: z(16, 17, 4, 4)}, {kp: z(8, 17, 4, 4)}).startswith("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS ")
    rc, rb = "head.cls_score.weight", "head.bbox_pred.weight"
    assert one({rc: z(45, 16, 3, 3), rb: z(36, 16, 3, 3)},
               {rc: z(27, 16, 3, 3), rb: z(36, 16, 3, 3)}).startswith("MODEL.RETINANET.NUM_CLASSES 5 ")
    anchors = one({rc: z(45, 16, 3, 3), rb: z(36, 16, 3, 3)}, {rc: z(15, 16, 3, 3), rb: z(12, 16, 3, 3)})
    assert anchors.startswith("MODEL.ANCHOR_GENERATOR.") and "9 anchors" in anchors and "model 3)" in anchors
    assert "MODEL.RETINANET.NUM_CLASSES" in one({rc: z(45, 16, 3, 3)}, {rc: z(27, 16, 3, 3), rb: z(36, 16, 3, 3)})
    assert one({rc: z(45, 32, 3, 3), rb: z(36, 32, 3, 3)},
               {rc: z(45, 16, 3, 3), rb: z(36, 16, 3, 3)}).startswith("MODEL.FPN.OUT_CHANNELS / MODEL.RETINANET.NUM_CONVS")
    sem = "sem_seg_head.predictor.weight"
    assert one({sem: z(54, 32, 1, 1)}, {sem: z(10, 32, 1, 1)}).startswith("MODEL.SEM_SEG_HEAD.NUM_CLASSES 54 ")
    assert one({sem: z(10, 64, 1, 1)}, {sem: z(10, 32, 1, 1)}).startswith("MODEL.SEM_SEG_HEAD.CONVS_DIM ")
    trunk = "backbone.bottom_up.res3.0.conv2.weight"
    assert one({trunk: z(8, 2, 3, 3)}, {trunk: z(16, 4, 3, 3)}).startswith("MODEL.RESNEXT.PRESET / DEPTH / CARDINALITY")
    assert one({"roi_heads.res5.0.conv1.weight": z(8, 4, 1, 1)},
               {"roi_heads.res5.0.conv1.weight": z(16, 4, 1, 1)}).startswith("MODEL.RESNEXT.")
    rpn = "proposal_generator.rpn_head.objectness_logits.weight"
    assert one({rpn: z(3, 16, 1, 1)}, {rpn: z(1, 16, 1, 1)}).startswith("MODEL.ANCHOR_GENERATOR.SIZES")
    for key, fix in [("roi_heads.box_head.fc1.weight", "MODEL.ROI_BOX_HEAD.FC_DIM"),
                     ("roi_heads.mask_head.mask_fcn1.weight", "MODEL.ROI_MASK_HEAD.CONV_DIM"),
                     ("roi_heads.keypoint_head.conv_fcn1.weight", "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS")]:
        assert one({key: z(16, 8)}, {key: z(32, 8)}).startswith(fix + " "), key
    assert one({"pixel_decoder.proj.weight": z(2)}, {"pixel_decoder.proj.weight": z(3)}).startswith(
        "the keys that build pixel_decoder.proj ")
    assert one({"pixel_decoder.scale": z(())}, {"pixel_decoder.scale": z(1)}).startswith(  # a 0-d tensor
        "the keys that build pixel_decoder ")
    # The FPN's width decides the RPN's and the box head's: only the width is named for them,
    # the mask head's own width stays; a fix needed by several tensors is named once.
    fpn = {"backbone.fpn_lateral2.weight": z(16, 8, 1, 1), "backbone.fpn_output2.weight": z(16, 16, 3, 3),
           rpn: z(3, 16, 1, 1), "roi_heads.box_head.fc1.weight": z(16, 784), mask: z(3, 16, 1, 1)}
    model = {"backbone.fpn_lateral2.weight": z(32, 8, 1, 1), "backbone.fpn_output2.weight": z(32, 32, 3, 3),
             rpn: z(3, 32, 1, 1), "roi_heads.box_head.fc1.weight": z(16, 1568), mask: z(3, 32, 1, 1)}
    got = fixes(fpn, model)
    assert len(got) == 2 and got[0].startswith("MODEL.FPN.OUT_CHANNELS 16 ") and got[1].startswith("MODEL.ROI_MASK_HEAD.")
    assert fixes({rpn: z(3, 16, 1, 1), "roi_heads.box_head.fc1.weight": z(16, 8)},
                 {rpn: z(1, 16, 1, 1), "roi_heads.box_head.fc1.weight": z(32, 8)})[1].startswith("MODEL.ROI_BOX_HEAD.FC_DIM")
