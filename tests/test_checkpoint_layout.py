"""Tests of resnext_det/checkpoint/layout.py: what a set of Detectron2-named tensors holds,
the ResNeXt architecture read from the shapes (``infer_arch``, ``check_against_model``,
``trunk_spec``), and for a whole detector its trunk and what the file tells about its input
convention (``detector_trunk``, ``detector_convention``), against tensors built here by hand
and Detectron2's own model-zoo configs."""
import pytest
import torch
from torchvision.models.resnet import Bottleneck, ResNet

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import build_resnet_backbone

from resnext_det.checkpoint import ConversionError, WeightsMetadata, config_pairs, convert_weights, detector_convention

from weights_helpers import names, tv_resnext


# --------------------------------------------------------------------------
# The architecture read from the shapes (infer_arch) and the tensors checked against our
# ResNeXt's (check_against_model, trunk_spec)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("layers,groups,width", [((2, 2, 2, 2), 8, 2), ((3, 4, 6, 3), 2, 4), ((1, 2, 1, 1), 1, 64)])
def test_architecture_inferred_from_shapes(tmp_path, layers, groups, width):
    model = ResNet(Bottleneck, list(layers), groups=groups, width_per_group=width)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    r = convert_weights(str(tmp_path / "m.pth"), progress=False)
    a = r.metadata.arch
    assert (a.stage_blocks, a.cardinality, a.bottleneck_width) == (tuple(layers), groups, width)
    assert a.depth == 3 * sum(layers) + 2
    assert a.preset == ""  # none of these is a named model of the paper
    pairs = dict(config_pairs(r.metadata))
    if a.standard_depth is None:  # [1, 2, 1, 1] has no DEPTH: the lines give the block table
        assert pairs["MODEL.RESNEXT.STAGE_BLOCKS"] == list(layers) and pairs["MODEL.RESNEXT.PRESET"] == ""


def hand_sd(blocks=(3, 4, 6, 3), conv2=(128, 4, 3, 3), stem=(64, 3, 7, 7), res2_out=256):
    """The tensors infer_arch reads, typed by hand: block indices, the stem conv, res2.0's
    grouped 3x3 conv (C*d, d, 3, 3) and its last 1x1 conv."""
    sd = {f"res{s + 2}.{b}.conv1.weight": torch.zeros(1) for s, n in enumerate(blocks) for b in range(n)}
    sd["stem.conv1.weight"] = torch.zeros(stem)
    sd["res2.0.conv2.weight"] = torch.zeros(conv2)
    sd["res2.0.conv3.weight"] = torch.zeros(res2_out, conv2[0], 1, 1)
    return sd


@pytest.mark.parametrize("blocks,conv2,depth,c,d", [
    ((3, 4, 6, 3), (128, 4, 3, 3), 50, 32, 4),     # X-50-32x4d (Table 1)
    ((3, 4, 23, 3), (256, 8, 3, 3), 101, 32, 8),   # X-101-32x8d
    ((3, 8, 36, 3), (256, 4, 3, 3), 152, 64, 4),   # X-152-64x4d
    ((3, 4, 6, 3), (64, 64, 3, 3), 50, 1, 64),     # ResNet-50: C=1, d=64
])  # fmt: skip
def test_infer_arch_reads_depth_cardinality_and_width_from_hand_built_tensors(blocks, conv2, depth, c, d):
    """Depth = 3 * blocks + 2; d = the grouped conv's input channels per group, C = its
    output channels / d (Sec. 3.3); stem and res2 widths from their convs."""
    from resnext_det.checkpoint.layout import infer_arch

    a = infer_arch(hand_sd(blocks, conv2, stem=(32, 3, 7, 7), res2_out=128), stride_in_1x1=True)
    assert (a.stage_blocks, a.depth, a.cardinality, a.bottleneck_width) == (blocks, depth, c, d)
    assert (a.stem_out_channels, a.res2_out_channels, a.stride_in_1x1) == (32, 128, True)


def test_infer_arch_refuses_hand_built_tensors_that_make_no_resnext_naming_why():
    """Each malformed layout is refused with what is wrong: a gap in a stage's block
    indices, a missing stage, a grouped conv whose width is no multiple of its group width,
    a stem that is not a 7x7 conv on 3 channels, a missing res2.0 conv."""
    from resnext_det.checkpoint.layout import infer_arch

    sd = hand_sd()
    sd["res4.7.conv1.weight"] = sd.pop("res4.5.conv1.weight")  # indices 0..4, 7
    with pytest.raises(ConversionError, match=r"res4 block indices.*\[0, 1, 2, 3, 4, 7\]"):
        infer_arch(sd)
    sd = {k: v for k, v in hand_sd().items() if not k.startswith("res5.")}
    with pytest.raises(ConversionError, match="no res5 blocks"):
        infer_arch(sd)
    with pytest.raises(ConversionError) as e:
        infer_arch(hand_sd(conv2=(126, 4, 3, 3)))  # 126 channels, groups of 4
    assert "res2.0 conv2" in str(e.value) and "126" in str(e.value) and "4" in str(e.value)
    with pytest.raises(ConversionError, match=r"stem conv weight has shape \(64, 3, 3, 3\)"):
        infer_arch(hand_sd(stem=(64, 3, 3, 3)))
    with pytest.raises(ConversionError, match=r"res2\.0 conv2 weight has shape \(128, 4, 1, 1\), expected a 3x3"):
        infer_arch(hand_sd(conv2=(128, 4, 1, 1)))  # a 1x1 where the grouped 3x3 should be
    sd = hand_sd()
    del sd["res2.0.conv3.weight"]
    with pytest.raises(ConversionError, match=r"res2\.0\.conv3\.weight"):
        infer_arch(sd)


def test_a_backbone_with_one_tensor_too_many_or_too_few_is_refused_naming_it(tv26):
    """The converted trunk must be exactly our ResNeXt's: one extra tensor (typed here) or
    one missing is a ConversionError that names it, not a file with a stray tensor."""
    from resnext_det.checkpoint.layout import check_against_model, infer_arch

    _, _, r = tv26
    sd = dict(r.state_dict)
    arch = infer_arch(sd)
    check_against_model(sd, arch)  # complete: no error
    with pytest.raises(ConversionError, match=r"1 unexpected, e\.g\. \['res6\.0\.conv1\.weight'\]"):
        check_against_model({**sd, "res6.0.conv1.weight": torch.zeros(1)}, arch)
    sd.pop("res4.0.conv2.weight")
    with pytest.raises(ConversionError, match=r"1 tensors missing, e\.g\. \['res4\.0\.conv2\.weight'\]"):
        check_against_model(sd, arch)


def test_a_backbone_with_a_tensor_of_another_shape_is_refused_naming_it(tv26):
    """Same keys, one tensor of another shape (a res3 conv of other width): refused, the
    message names the key and both shapes."""
    from resnext_det.checkpoint.layout import check_against_model, infer_arch

    _, _, r = tv26
    sd = dict(r.state_dict)
    arch = infer_arch(sd)
    good = tuple(sd["res3.1.conv1.weight"].shape)
    sd["res3.1.conv1.weight"] = torch.zeros(good[0] + 2, *good[1:])
    with pytest.raises(ConversionError) as e:
        check_against_model(sd, arch)
    msg = str(e.value)
    assert "1 of another shape" in msg and "res3.1.conv1.weight" in msg
    assert str((good[0] + 2, *good[1:])) in msg and str(good) in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_converted_trunk_is_checked_as_the_whole_frozen_bn_imagenet_trunk(tv26):
    """trunk_spec: whatever the spec's norm, outputs and freezing (a detector config's), the
    reference is the ImageNet trunk: FrozenBN (no num_batches_tracked), res2..res5 out,
    nothing frozen, same shapes; a converted file passes against a SyncBN spec too."""
    from resnext_det.checkpoint.layout import check_against_model, infer_arch, trunk_spec

    _, _, r = tv26
    arch = infer_arch(r.state_dict).replace(norm="SyncBN", freeze_at=3, out_features=("res4",))
    t = trunk_spec(arch)
    assert (t.norm, t.freeze_at, tuple(t.out_features)) == ("FrozenBN", 0, ("res2", "res3", "res4", "res5"))
    assert (t.stage_blocks, t.cardinality, t.bottleneck_width) == ((2, 2, 2, 2), 4, 4)
    check_against_model(dict(r.state_dict), arch)  # no error


# --------------------------------------------------------------------------
# A detector's trunk, and what its file tells about its input convention (detector_trunk,
# detector_convention)
# --------------------------------------------------------------------------
def test_detector_trunk_of_fpn_and_c4_layouts_without_bn_counters(tv26):
    """An FPN detector keeps its trunk under backbone.bottom_up., a C4 one under backbone.
    with res5 in roi_heads.res5.: both give the trunk in backbone names, without the
    num_batches_tracked counters of a (Sync)BN training, and nothing of the heads."""
    from resnext_det.checkpoint.layout import check_against_model, detector_trunk, infer_arch

    _, _, r = tv26
    trunk = dict(r.state_dict)
    counters = {k[: -len("running_mean")] + "num_batches_tracked": torch.tensor(7)
                for k in trunk if k.endswith("running_mean")}  # fmt: skip
    heads = {"backbone.fpn_lateral2.weight": torch.zeros(1), "roi_heads.box_predictor.cls_score.weight": torch.zeros(1),
             "proposal_generator.rpn_head.conv.weight": torch.zeros(1)}  # fmt: skip
    fpn = {f"backbone.bottom_up.{k}": v for k, v in {**trunk, **counters}.items()}
    c4 = {(f"roi_heads.{k}" if k.startswith("res5.") else f"backbone.{k}"): v for k, v in {**trunk, **counters}.items()}
    for tensors in ({**fpn, **heads}, {**c4, **heads}):
        got = detector_trunk(tensors)
        assert set(got) == set(trunk)
        assert all(got[k] is tensors[n] for k in got for n in (f"backbone.bottom_up.{k}", f"backbone.{k}",
                                                                  f"roi_heads.{k}") if n in tensors)  # fmt: skip
        check_against_model(got, infer_arch(got))
    assert detector_trunk(heads) == {}


def test_what_a_detector_file_tells_nothing_of_gives_no_metadata():
    """A convention the file does not tell, with no config to assume from: no input record
    and no architecture (not a guess, not an error)."""
    from resnext_det.checkpoint.layout import DetectorConvention

    m = DetectorConvention("a detector checkpoint").metadata()
    assert m.kind == "detector" and m.input is None and m.arch is None
    assert DetectorConvention("a detector checkpoint").unknown_keys() == ["INPUT.FORMAT", "MODEL.PIXEL_MEAN",
                                                                          "MODEL.PIXEL_STD"]  # fmt: skip


@pytest.mark.parametrize("mean,fmt", [
    ((103.53, 116.28, 123.675), "BGR"),    # Detectron2's Caffe2 mean
    ((123.675, 116.28, 103.53), "RGB"),    # torchvision's x 255
    ((103.6, 116.2, 123.6), "BGR"),        # within 0.1 %
    ((103.0, 116.28, 123.675), None),      # 0.5 % off: another mean
    ((0.485, 0.456, 0.406), None),         # torchvision's on the 0-1 scale
    ((116.28, 116.28, 116.28), None),
])  # fmt: skip
def test_channel_order_is_read_from_an_imagenet_mean_buffer_only(mean, fmt):
    """pixel_mean buffers give the channel order only when they are ImageNet's mean (0-255)
    in one order; any other mean leaves INPUT.FORMAT unknown (named in the warning)."""
    from resnext_det.checkpoint.layout import detector_convention

    found = detector_convention({"pixel_mean": torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)}, {})
    assert found.format == fmt and found.pixel_mean == pytest.approx(mean)
    assert ("INPUT.FORMAT" in found.unknown_keys()) == (fmt is None)


def test_detector_convention_metadata_takes_the_stride_from_the_config_and_names_its_origin(tv26):
    """A detector file that does not tell its stride placement takes the config's
    (``assume``: the model being loaded); without a config architecture it records none
    (not an error). The record names where the file comes from (its provenance)."""
    from resnext_det.checkpoint.layout import detector_convention

    _, _, r = tv26
    found = detector_convention(detector_trunk_tensors(r), {})
    assert found.arch is not None and found.stride_in_1x1 is None
    for stride in (True, False):
        assume = WeightsMetadata(kind="detector", input=None, arch=r.metadata.arch.replace(stride_in_1x1=stride))
        m = found.metadata(assume=assume)
        assert m.arch.stride_in_1x1 is stride and m.arch.cardinality == r.metadata.arch.cardinality
        assert m.source == {"origin": found.origin} and found.origin
    assert found.metadata(assume=WeightsMetadata(kind="detector", input=None, arch=None)).arch is None


def detector_trunk_tensors(r):
    """``r``'s backbone as the trunk of an FPN detector (Detectron2 names)."""
    return {f"backbone.bottom_up.{k}": v for k, v in r.state_dict.items()}


def test_zoo_resnet_detector_warning_gives_the_zoo_values_to_check(tmp_path):
    """A Detectron2 model-zoo ResNet (C=1) detector does not tell its PIXEL_STD or stride
    placement: the one-line warning names both keys, with the values Detectron2's zoo trained
    them with (MSRA R-*: std [1, 1, 1], stride in the 1x1 conv; 2021 LSJ baselines: FAIR's std;
    GN models: [1, 1, 1], stride in the 3x3); another project's detector gets no zoo hint."""
    from resnext_det.checkpoint.layout import detector_convention

    torch.save(tv_resnext(layers=(1, 1, 1, 1), groups=1, width=64).state_dict(), tmp_path / "r14.pth")
    trunk = convert_weights(str(tmp_path / "r14.pth"), progress=False).state_dict
    tensors = {f"backbone.bottom_up.{k}": v for k, v in trunk.items()}
    w = detector_convention(tensors, {"__author__": "Detectron2 Model Zoo"}).warning("MODEL.WEIGHTS = 'zoo.pkl'")
    assert "\n" not in w and "MODEL.WEIGHTS = 'zoo.pkl'" in w and not names(w, "INPUT.FORMAT")
    assert names(w, "MODEL.PIXEL_STD") and names(w, "MODEL.RESNEXT.STRIDE_IN_1X1")
    assert "MODEL.PIXEL_STD, MODEL.RESNEXT.STRIDE_IN_1X1" in w  # the unknown keys, listed
    assert names(w, "MODEL.PIXEL_STD [1, 1, 1]") and names(w, "MODEL.RESNEXT.STRIDE_IN_1X1 True")  # MSRA R-*
    assert "[57.375, 57.12, 58.395] and True" in w and "[1, 1, 1] and False" in w  # LSJ; GN
    assert "MSRA" in w and "GN" in w and "None" not in w
    other = detector_convention(tensors, {"__author__": "someone"}).warning("MODEL.WEIGHTS = 'x.pth'")
    assert names(other, "INPUT.FORMAT") and names(other, "MODEL.PIXEL_STD") and "[1, 1, 1]" not in other
    assert "None" not in other


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("zoo_config", [
    "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml",
    "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml",
    "Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml",
    "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
    "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml",
])
def test_zoo_convention_from_the_key_layout_is_detectron2s_config(zoo_config):
    """What the file's author and trunk tell equals Detectron2's own config of that
    model; for its ResNets, std and stride are reported unknown (they vary)."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4  # same tensors for the trunk's shapes
    with torch.device("meta"):
        trunk = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    sd = {f"backbone.bottom_up.{k}": v for k, v in trunk.state_dict().items()}
    found = detector_convention(sd, {"__author__": "Detectron2 Model Zoo"})
    assert found.format == cfg.INPUT.FORMAT
    assert list(found.pixel_mean) == pytest.approx(cfg.MODEL.PIXEL_MEAN)
    if cfg.MODEL.RESNETS.NUM_GROUPS > 1:
        assert found.unknown_keys() == []
        assert list(found.pixel_std) == pytest.approx(cfg.MODEL.PIXEL_STD)
        assert found.stride_in_1x1 == cfg.MODEL.RESNETS.STRIDE_IN_1X1
    else:
        assert found.unknown_keys() == ["MODEL.PIXEL_STD", "MODEL.RESNEXT.STRIDE_IN_1X1"]
