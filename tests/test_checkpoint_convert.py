"""Tests of resnext_det/checkpoint/convert.py (``convert_weights``, ``save_converted``, the
detector conversion, the format, convention and ``--arch`` resolution) and of
tools/convert_pretrained.py, its command line: ImageNet weights converted from torchvision /
timm / Caffe2 files made here, loaded through MODEL.WEIGHTS into C4 and FPN detectors and
compared with the source model on the same input; detector checkpoints in Detectron2 names,
every tensor kept and the input convention recorded, --to-rgb exact. Every bad input is
tried and its message checked. The name mappings of each format: tests/test_checkpoint_formats.py."""
import logging
import os
import pickle
import re

import pytest
import torch
import torchvision

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from resnext_det import add_resnext_config
from resnext_det.checkpoint import (
    ConversionError,
    ResNeXtCheckpointer,
    WeightsMetadata,
    config_pairs,
    convert_weights,
    save_converted,
    verify_conversion,
)
from resnext_det.checkpoint.convert import convert_detector
from resnext_det.checkpoint.metadata import InputConvention
from resnext_det.checkpoint.readers import read_weights_file

from weights_helpers import (
    D2_BGR_MEAN,
    D2_BGR_STD,
    ROOT,
    STAGES,
    TOL,
    TV_RGB_MEAN,
    TV_RGB_STD,
    assert_same_predictions,
    detector_cfg,
    detector_stages,
    load_detector,
    names,
    normalized_input,
    our_detector_cfg,
    predict,
    randomize_bn,
    rel_err,
    run_tool,
    save_detector,
    sha256_of,
    tv_resnext,
    tv_stages,
    tv_to_caffe2_blobs,
)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------
# ImageNet backbones converted from torchvision / timm / Caffe2 files, loaded into C4 and FPN
# detectors: every tensor equal to the source, the same features as the source network
# --------------------------------------------------------------------------
def test_torchvision_resnext50_cli_c4_and_fpn_equal_source(tmp_path):
    tv = randomize_bn(torchvision.models.resnext50_32x4d()).eval()
    torch.save(tv.state_dict(), tmp_path / "resnext50_32x4d.pth")
    out = tmp_path / "X-50-32x4d.pth"
    p = run_tool(
        tmp_path / "resnext50_32x4d.pth", out, "--arch", "X-50-32x4d", "--verify", "--verify-size", 64,
        "--config-out", tmp_path / "x50.yaml", "--base", os.path.join(ROOT, "configs", "Base-ResNeXt-C4.yaml"),
    )
    # The printed lines: what a user copies.
    for line in ("MODEL.RESNEXT.PRESET", "X-50-32x4d", "INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN",
                 "[123.675, 116.28, 103.53]", "[58.395, 57.12, 57.375]", "STRIDE_IN_1X1", "--verify passed"):
        assert line in p.stdout
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["resnext_det"]["arch"]["cardinality"] == 32 and ckpt["resnext_det"]["input"]["format"] == "RGB"

    # Raw 0-255 RGB images through the detector's own normalisation (the printed
    # PIXEL_MEAN/STD) against torchvision's documented preprocessing.
    img = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(3)).float()
    x_tv = torchvision.transforms.functional.normalize(img / 255, IMAGENET_MEAN, IMAGENET_STD)[None]
    ref = tv_stages(tv, x_tv)
    for kind, cfg in (
        ("C4", get_c4_cfg_from_yaml(tmp_path / "x50.yaml")),
        ("FPN", detector_cfg("FPN", config_pairs(_meta(ckpt), str(out)))),
    ):
        model = load_detector(cfg)
        x = model.preprocess_image([{"image": img}]).tensor
        ours = detector_stages(model, x)
        for s in STAGES:
            assert rel_err(ours[s], ref[s]) < TOL, (kind, s, rel_err(ours[s], ref[s]))


def get_c4_cfg_from_yaml(path):
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(str(path))  # _BASE_ Base-ResNeXt-C4.yaml + the weight lines
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    return cfg


def _meta(ckpt):
    from resnext_det.checkpoint import WeightsMetadata

    return WeightsMetadata.from_dict(ckpt["resnext_det"])


@pytest.mark.parametrize("kind,norm", [("C4", "FrozenBN"), ("FPN", "FrozenBN"), ("FPN", "SyncBN"), ("C4", "BN")])
def test_depth26_loads_every_backbone_tensor(tv26, kind, norm):
    tv, d, r = tv26
    cfg = detector_cfg(kind, config_pairs(r.metadata, str(d / "tv26-d2.pth")), "MODEL.RESNEXT.NORM", norm)
    model = load_detector(cfg)
    # Every backbone parameter and BN statistic equals the source tensor.
    src = tv.state_dict()
    trunk = model.backbone.bottom_up if kind == "FPN" else model.backbone
    got = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    if kind == "C4":
        got.update({f"res5.{k}": v for k, v in model.roi_heads.res5.state_dict().items() if "num_batches" not in k})
    assert len(got) == len(r.state_dict) == len([k for k in src if not k.startswith("fc.") and "num_batches" not in k])
    assert torch.equal(got["stem.conv1.norm.running_var"], src["bn1.running_var"])
    assert torch.equal(got["res5.1.conv2.weight"], src["layer4.1.conv2.weight"])
    assert torch.equal(got["res3.0.shortcut.norm.running_mean"], src["layer2.0.downsample.1.running_mean"])
    x = normalized_input()
    ours, ref = detector_stages(model, x), tv_stages(tv, x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, (s, rel_err(ours[s], ref[s]))


def test_plain_detectron2_checkpointer_also_loads_converted_file(tv26):
    """Without resnext_det's checkpointer, Detectron2's name heuristics put the
    converted file's res5 into a C4 model's roi_heads.res5 (and the trunk into
    backbone.*): the file is a standard Detectron2 ImageNet checkpoint."""
    tv, d, r = tv26
    cfg = detector_cfg("C4", config_pairs(r.metadata, str(d / "tv26-d2.pth")))
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    x = normalized_input()
    ours, ref = detector_stages(model, x), tv_stages(tv, x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL


def tv_key_to_d2(k: str):
    """torchvision's name -> Detectron2's, as Detectron2's tools/convert-torchvision-to-d2.py
    renames them (None: not part of the backbone)."""
    if k.startswith("fc.") or k.endswith("num_batches_tracked"):
        return None
    if k.startswith("conv1."):
        return "stem." + k
    if k.startswith("bn1."):
        return "stem.conv1.norm." + k[len("bn1."):]
    m = re.match(r"layer(\d)\.(\d+)\.(.*)", k)
    stage, block, rest = f"res{int(m[1]) + 1}", m[2], m[3]
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"{stage}.{block}.{rest}"


def test_converted_backbone_file_holds_detectron2_names_and_its_record(tv26):
    """The written backbone file is a Detectron2 ImageNet checkpoint: every torchvision tensor
    under the name Detectron2's own converter gives it (fc dropped), float32 and equal,
    ``matching_heuristics`` True (docs/weights.md: plain Detectron2 maps it by suffix), and
    the record of its source: format, file name, sha256, convention, what was dropped."""
    tv, d, _ = tv26
    ckpt = torch.load(d / "tv26-d2.pth", weights_only=True)
    assert set(ckpt) == {"model", "__author__", "matching_heuristics", "resnext_det"}
    assert ckpt["matching_heuristics"] is True and "torchvision" in ckpt["__author__"]
    src = tv.state_dict()
    want = {tv_key_to_d2(k): v for k, v in src.items() if tv_key_to_d2(k)}
    assert set(ckpt["model"]) == set(want)
    for k, v in want.items():
        assert ckpt["model"][k].dtype == torch.float32 and torch.equal(ckpt["model"][k], v), k
    source = ckpt["resnext_det"]["source"]
    assert source["format"] == "torchvision" and source["file"] == "tv26.pth"
    assert source["sha256"] == sha256_of(d / "tv26.pth") and source["convention"] == "torchvision"
    assert source["flipped_to_rgb"] is False and source["dropped"] == ["fc.bias", "fc.weight"]


def test_to_rgb_on_backbones_flips_only_bgr_weights_and_says_so(tmp_path, tv26, caplog):
    """--to-rgb on BGR (Caffe2) weights reverses the stem conv's input channels, records it
    and logs it naming the flag; on torchvision (RGB) weights nothing is flipped and the log
    says so."""
    tv, d, r = tv26
    blobs = tv_to_caffe2_blobs(tv_resnext(layers=(1, 1, 1, 1)).state_dict())
    with open(tmp_path / "X-14.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        r2 = convert_weights(str(tmp_path / "X-14.pkl"), convention="fair", to_rgb=True, progress=False)
    assert torch.equal(r2.state_dict["stem.conv1.weight"], torch.as_tensor(blobs["conv1_w"]).flip(1))
    assert r2.flipped_to_rgb is True and r2.metadata.source["flipped_to_rgb"] is True
    assert r2.metadata.input.format == "RGB" and r2.metadata.source["convention"] == "fair"
    logs = [rec.getMessage() for rec in caplog.records if "--to-rgb" in rec.getMessage()]
    assert len(logs) == 1 and names(logs[0], "--to-rgb") and "BGR -> RGB" in logs[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        r3 = convert_weights(str(d / "tv26.pth"), to_rgb=True, progress=False)
    assert torch.equal(r3.state_dict["stem.conv1.weight"], tv.state_dict()["conv1.weight"])
    assert r3.flipped_to_rgb is False and r3.metadata.source["flipped_to_rgb"] is False
    logs = [rec.getMessage() for rec in caplog.records if "--to-rgb" in rec.getMessage()]
    assert len(logs) == 1 and names(logs[0], "--to-rgb") and "BGR -> RGB" not in logs[0]


def test_conversion_logs_the_file_it_reads_once(tv26, caplog):
    """The converter logs the file it reads with its size; given the file already read
    (``source``, as the tool does after sniffing it) it logs no second read."""
    _, d, _ = tv26
    path = str(d / "tv26.pth")
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        convert_weights(path, progress=False)
    assert any(path in m and "MB" in m for m in (rec.getMessage() for rec in caplog.records))
    src = read_weights_file(path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        convert_weights(path, source=src, progress=False)
    assert not any("MB" in rec.getMessage() for rec in caplog.records)


def test_progress_false_draws_no_progress_bar(tv26, capsys):
    """progress=False (the library default of the tests, --quiet in the tool) writes nothing
    to the terminal: no tqdm bar on stderr."""
    _, d, _ = tv26
    capsys.readouterr()
    convert_weights(str(d / "tv26.pth"), progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


# --------------------------------------------------------------------------
# The format, input convention and architecture the converter is given or finds: each
# refusal with its message
# --------------------------------------------------------------------------
def test_caffe2_files_need_a_convention(tmp_path):
    tv = tv_resnext(groups=1, width=64)
    with open(tmp_path / "R-26.pkl", "wb") as f:
        pickle.dump(tv_to_caffe2_blobs(tv.state_dict()), f, protocol=2)
    with pytest.raises(ConversionError, match="--convention fair.*--convention detectron1.*--convention msra"):
        convert_weights(str(tmp_path / "R-26.pkl"), progress=False)
    r = convert_weights(str(tmp_path / "R-26.pkl"), convention="msra", progress=False)
    assert r.metadata.arch.stride_in_1x1 and r.metadata.input.pixel_std == (1.0, 1.0, 1.0)
    # The MSRA stride placement is honoured by our backbone and the reference alike.
    diffs = verify_conversion(r, size=64)
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL


def test_caffe2_convention_message_names_the_zoo_folders_as_written(tmp_path):
    """Without --convention, a Caffe2 file's message names each convention flag with the
    folder of the zoo files it fits, spelled as docs/weights.md (and the zoo URLs) spell
    them (case matters in a URL), and points to docs/weights.md."""
    from resnext_det.checkpoint.convert import _resolve_convention
    from resnext_det.checkpoint.readers import SourceWeights

    with pytest.raises(ConversionError) as e:
        _resolve_convention("caffe2", SourceWeights("R-26.pkl", "pickle"), None)
    msg = str(e.value)
    # docs/weights.md's table: detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl,
    # Detectron's ImageNetPretrained/20171220/X-101-32x8d.pkl, .../ImageNetPretrained/MSRA/R-50.pkl
    # (docs/ is not copied into mutmut's tree: the spellings are written here).
    for flag, folder in (("fair", "ImageNetPretrained/FAIR/"), ("detectron1", "ImageNetPretrained/20171220/"),
                         ("msra", "ImageNetPretrained/MSRA/R-")):
        assert folder in msg and names(msg, flag)
    assert "docs/weights.md" in msg and names(msg, "--convention") and "BGR" in msg


def test_format_names_are_the_listed_lowercase_choices(tv26):
    """--format takes the names of docs/weights.md as written (argparse ``choices``, case
    sensitive): "torchvision" converts, "TorchVision" is refused naming the choices."""
    from resnext_det.checkpoint.formats import FORMATS

    _, d, _ = tv26
    assert convert_weights(str(d / "tv26.pth"), fmt="torchvision", progress=False).format == "torchvision"
    with pytest.raises(ConversionError) as e:
        convert_weights(str(d / "tv26.pth"), fmt="TorchVision", progress=False)
    msg = str(e.value)
    assert "'TorchVision'" in msg and names(msg, "--format")
    assert all(repr(f) in msg for f in FORMATS) and "'auto'" in msg
    with pytest.raises(SystemExit):  # argparse refuses it before any conversion
        run_tool(d / "tv26.pth", d / "never.pth", "--format", "TORCHVISION", check=False)
    assert not (d / "never.pth").exists()


def test_a_detector_given_to_the_format_resolver_is_sent_to_model_weights():
    """A detector checkpoint is no ImageNet backbone: the format resolver refuses it and
    tells the user to use it as MODEL.WEIGHTS directly."""
    from resnext_det.checkpoint.convert import _resolve_format
    from resnext_det.checkpoint.readers import SourceWeights

    src = SourceWeights("det.pth", "zip", tensors={"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)})
    with pytest.raises(ConversionError) as e:
        _resolve_format(src, "auto")
    # the key, ready to copy (a sentence may end after it)
    assert "'det.pth'" in str(e.value) and re.search(r"(?<![\w.])MODEL\.WEIGHTS(?![\w-]|\.\w)", str(e.value))


def test_torch7_format_is_taken_for_t7_files_only_and_named_when_refused(tv26):
    """--format torch7 (or auto) reads a Torch7 file as torch7; another --format on a .t7
    names the flag to pass; --format torch7 on a file that is no .t7 says it wants a .t7."""
    from resnext_det.checkpoint.convert import _resolve_format
    from resnext_det.checkpoint.readers import SourceWeights

    t7 = SourceWeights("net.t7", "t7")
    assert _resolve_format(t7, "torch7") == "torch7" and _resolve_format(t7, "auto") == "torch7"
    with pytest.raises(ConversionError) as e:
        _resolve_format(t7, "torchvision")
    assert "'net.t7'" in str(e.value) and "--format torch7" in str(e.value)
    _, d, _ = tv26
    pth = read_weights_file(str(d / "tv26.pth"))
    with pytest.raises(ConversionError) as e:
        _resolve_format(pth, "torch7")
    assert repr(pth.path) in str(e.value) and ".t7" in str(e.value)


def test_arch_flag_disagreeing_with_weights_is_refused(tv26):
    _, d, _ = tv26
    p = run_tool(d / "tv26.pth", d / "never.pth", "--arch", "X-50-32x4d", check=False)
    assert p.returncode == 2
    assert "--arch X-50-32x4d (depth 50, C=32, d=4) does not match" in p.stderr
    assert "blocks [2, 2, 2, 2], C=4, d=4" in p.stderr and "Traceback" not in p.stderr
    assert not (d / "never.pth").exists()


def test_arch_flag_unknown_or_of_another_shape_names_the_choices_and_the_file(tv26):
    """--arch must be one of the paper's names (presets.PRESETS, typed here from Table 3/5):
    an unknown one lists them; a known one of another shape names the file and what it holds."""
    _, d, _ = tv26
    with pytest.raises(ConversionError) as e:
        convert_weights(str(d / "tv26.pth"), arch="X-50-64x4d", progress=False)
    for name in ("X-50-32x4d", "X-101-32x4d", "X-101-64x4d", "X-101-32x8d", "X-152-32x8d"):
        assert repr(name) in str(e.value)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(d / "tv26.pth"), arch="X-101-32x8d", progress=False)
    msg = str(e.value)
    assert "(depth 101, C=32, d=8)" in msg and repr(str(d / "tv26.pth")) in msg
    assert msg.count("no named architecture") == 1  # depth 26, C=4, d=4 is none of the presets


# --------------------------------------------------------------------------
# Detector checkpoints in Detectron2 names: every tensor kept, the input
# convention the file tells (or the flags give) recorded, --to-rgb exact
# --------------------------------------------------------------------------
def test_detector_with_bgr_pixel_buffers_made_rgb_flips_stem_and_buffers(tmp_path, tv26, caplog):
    """An old Detectron2 checkpoint with pixel_mean/pixel_std buffers (the mean is Detectron2's
    BGR one, rounded): BGR is read from the file; --to-rgb reverses the stem conv's input
    channels and both buffers, every other tensor is kept as is."""
    _, _, r = tv26
    path = tmp_path / "old_d2.pth"
    src = save_detector(path, r.state_dict, {
        "pixel_mean": torch.tensor([103.5, 116.3, 123.7]).view(3, 1, 1),  # as Detectron2 stored it
        "pixel_std": torch.tensor(D2_BGR_STD),
    })
    # The file does not tell the stride placement: without it, the message names the key and flag.
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), progress=False)
    msg = str(e.value)
    assert repr(str(path)) in msg and names(msg, "MODEL.RESNEXT.STRIDE_IN_1X1") and names(msg, "--stride-in-1x1")
    assert not names(msg, "INPUT.FORMAT") and not names(msg, "MODEL.PIXEL_MEAN")

    with caplog.at_level(logging.INFO, logger="resnext_det"):
        r2 = convert_weights(str(path), stride_in_1x1=False, to_rgb=True, progress=False)
    assert r2.format == "detector" and r2.dropped == [] and r2.flipped_to_rgb is True
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(r2.state_dict[stem], src[stem].flip(1))
    assert torch.equal(r2.state_dict["pixel_mean"], torch.tensor([123.7, 116.3, 103.5]).view(3, 1, 1))
    assert torch.equal(r2.state_dict["pixel_std"], torch.tensor(TV_RGB_STD))
    assert set(r2.state_dict) == set(src)
    assert all(torch.equal(r2.state_dict[k], v) for k, v in src.items() if k not in (stem, "pixel_mean", "pixel_std"))
    m = r2.metadata
    assert m.kind == "detector" and m.input.format == "RGB"
    assert m.input.pixel_mean == pytest.approx((123.7, 116.3, 103.5)) and m.input.pixel_std == pytest.approx(TV_RGB_STD)
    assert (m.arch.cardinality, m.arch.bottleneck_width, m.arch.stage_blocks) == (4, 4, (2, 2, 2, 2))
    assert m.arch.stride_in_1x1 is False
    assert m.source["format"] == "detector" and m.source["file"] == "old_d2.pth"
    assert m.source["sha256"] == sha256_of(path) and m.source["flipped_to_rgb"] is True
    logs = [rec.getMessage() for rec in caplog.records if "--to-rgb" in rec.getMessage()]
    assert len(logs) == 1 and names(logs[0], "--to-rgb") and "BGR -> RGB" in logs[0]
    # Written and read back: the recorded convention is the flipped one.
    save_converted(r2, str(tmp_path / "rgb.pth"))
    ckpt = torch.load(tmp_path / "rgb.pth", weights_only=True)
    assert ckpt["resnext_det"]["input"]["format"] == "RGB" and "matching_heuristics" not in ckpt
    # The library call without to_rgb keeps the file's BGR input, nothing flipped.
    r3 = convert_detector(read_weights_file(str(path)), stride_in_1x1=False)
    assert r3.metadata.input.format == "BGR" and r3.flipped_to_rgb is False
    assert torch.equal(r3.state_dict[stem], src[stem])


def test_detector_with_rgb_pixel_buffers_needs_no_flip(tmp_path, tv26, caplog):
    """pixel_mean in RGB order (torchvision's x 255): RGB, and --to-rgb changes nothing."""
    _, _, r = tv26
    path = tmp_path / "rgb_det.pth"
    src = save_detector(path, r.state_dict, {"pixel_mean": torch.tensor(TV_RGB_MEAN), "pixel_std": torch.tensor(TV_RGB_STD)},
                        __author__="someone")
    with caplog.at_level(logging.INFO, logger="resnext_det"):
        r2 = convert_weights(str(path), stride_in_1x1=False, to_rgb=True, progress=False)
    assert r2.metadata.input.format == "RGB" and r2.metadata.input.pixel_mean == pytest.approx(TV_RGB_MEAN)
    assert r2.flipped_to_rgb is False and r2.metadata.source["flipped_to_rgb"] is False
    assert all(torch.equal(r2.state_dict[k], v) for k, v in src.items())
    logs = [rec.getMessage() for rec in caplog.records if "--to-rgb" in rec.getMessage()]
    assert len(logs) == 1 and names(logs[0], "--to-rgb") and "RGB" in logs[0] and "BGR -> RGB" not in logs[0]
    # Without --to-rgb: nothing flipped either.
    r3 = convert_weights(str(path), stride_in_1x1=False, progress=False)
    assert r3.flipped_to_rgb is False and r3.metadata.source["flipped_to_rgb"] is False


def test_detector_trained_here_keeps_its_recorded_convention(tmp_path, tv26):
    """A checkpoint a resnext_det training wrote (its WeightsRecord: BGR, FAIR's std, stride
    in the 3x3 conv): converted to RGB without any flag; one that records no architecture
    (a Detectron2-ResNet trunk) needs the stride placement."""
    _, _, r = tv26
    arch = r.metadata.arch.replace(stride_in_1x1=False)
    fair = InputConvention("BGR", "0-255", D2_BGR_MEAN, D2_BGR_STD)
    rec = WeightsMetadata(kind="detector", input=fair, arch=arch).to_dict()
    path = tmp_path / "model_final.pth"
    src = save_detector(path, r.state_dict, resnext_det=rec)
    r2 = convert_weights(str(path), to_rgb=True, progress=False)
    m = r2.metadata
    assert m.input.format == "RGB" and m.input.pixel_mean == TV_RGB_MEAN and m.input.pixel_std == TV_RGB_STD
    assert m.arch.stride_in_1x1 is False and m.arch.cardinality == 4
    assert m.source["origin"] == "a resnext_det detector"
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(r2.state_dict[stem], src[stem].flip(1))
    # An explicit --convention wins over the record.
    r3 = convert_weights(str(path), convention="msra", progress=False)
    assert r3.metadata.input.pixel_std == (1.0, 1.0, 1.0) and r3.metadata.arch.stride_in_1x1 is True

    rec["arch"] = None
    save_detector(tmp_path / "no_arch.pth", r.state_dict, resnext_det=rec)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(tmp_path / "no_arch.pth"), progress=False)
    msg = str(e.value)
    assert names(msg, "MODEL.RESNEXT.STRIDE_IN_1X1") and names(msg, "--stride-in-1x1") and not names(msg, "INPUT.FORMAT")
    r4 = convert_weights(str(tmp_path / "no_arch.pth"), stride_in_1x1=True, progress=False)
    assert r4.metadata.input.format == "BGR" and r4.metadata.arch.stride_in_1x1 is True


def test_detector_that_tells_nothing_needs_the_convention_flags(tmp_path, tv26):
    """No buffers, no author, no record: the message names the four keys and the flags; then
    --convention gives them (Detectron's MSRA weights: BGR, std 1, stride in the 1x1 conv),
    and --pixel-mean / --pixel-std / --stride-in-1x1 override it."""
    _, _, r = tv26
    path = tmp_path / "someones.pth"
    save_detector(path, r.state_dict)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), progress=False)
    msg = str(e.value)
    assert repr(str(path)) in msg
    for token in ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.RESNEXT.STRIDE_IN_1X1",
                  "--convention", "--pixel-mean", "--pixel-std", "--stride-in-1x1"):
        assert names(msg, token), token
    for c in ("fair", "detectron1", "msra", "torchvision"):
        assert c in msg

    m = convert_weights(str(path), convention="msra", progress=False).metadata
    assert (m.input.format, m.input.pixel_mean, m.input.pixel_std) == ("BGR", D2_BGR_MEAN, (1.0, 1.0, 1.0))
    assert m.arch.stride_in_1x1 is True
    m = convert_weights(str(path), convention="torchvision", pixel_mean=[1.0, 2.0, 3.0], pixel_std=[4.0, 5.0, 6.0],
                        stride_in_1x1=True, progress=False).metadata
    assert (m.input.format, m.input.pixel_mean, m.input.pixel_std) == ("RGB", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert m.arch.stride_in_1x1 is True

    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), convention="caffe", progress=False)
    assert "'caffe'" in str(e.value) and names(str(e.value), "--convention") and "msra" in str(e.value)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), convention="fair", pixel_std=[0.0, 1.0, 1.0], progress=False)
    assert names(str(e.value), "--pixel-std") and "positive" in str(e.value)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), fmt="torchvision", progress=False)
    assert names(str(e.value), "--format") and "auto" in str(e.value)


def test_detector_without_a_resnet_trunk_or_of_another_arch_is_refused(tmp_path, tv26):
    _, _, r = tv26
    path = tmp_path / "other_backbone.pth"
    keys = [f"backbone.fpn_lateral{i}.weight" for i in range(2, 6)] + ["backbone.vit.blocks.0.w", "roi_heads.x.w"]
    torch.save({"model": {k: torch.zeros(2) for k in keys}}, path)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(path), convention="fair", progress=False)
    msg = str(e.value)
    assert repr(str(path)) in msg and "backbone.bottom_up.stem" in msg and "backbone.fpn_lateral2.weight" in msg
    # --arch is checked against the detector's trunk (the tiny one is no X-50-32x4d).
    save_detector(tmp_path / "tiny.pth", r.state_dict)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(tmp_path / "tiny.pth"), arch="X-50-32x4d", convention="fair", progress=False)
    assert names(str(e.value), "--arch") and "X-50-32x4d" in str(e.value) and "C=4, d=4" in str(e.value)


def test_converted_detector_file_keeps_every_tensor_and_names_its_origin(tmp_path, tv26):
    """A detector written by the converter keeps its own (Detectron2) tensor names, no
    ``matching_heuristics`` (the names are full), and says where it came from: the source
    file's ``__author__`` (or that it is a detector) and the record of its convention."""
    _, _, r = tv26
    bufs = {"pixel_mean": torch.tensor(D2_BGR_MEAN), "pixel_std": torch.tensor(D2_BGR_STD)}
    path = tmp_path / "theirs.pth"
    src = save_detector(path, r.state_dict, bufs, __author__="Lab X trainer")
    r2 = convert_weights(str(path), stride_in_1x1=False, progress=False)
    save_converted(r2, str(tmp_path / "out.pth"))
    ckpt = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(ckpt) == {"model", "__author__", "resnext_det"}
    assert set(ckpt["model"]) == set(src) and all(torch.equal(ckpt["model"][k], v) for k, v in src.items())
    assert "Lab X trainer" in ckpt["__author__"]
    rec = ckpt["resnext_det"]
    assert rec["kind"] == "detector" and rec["input"]["format"] == "BGR"
    assert rec["input"]["pixel_std"] == pytest.approx(D2_BGR_STD) and rec["arch"]["stride_in_1x1"] is False
    assert rec["source"]["format"] == "detector" and "Lab X trainer" in rec["source"]["origin"]
    assert rec["source"]["file"] == "theirs.pth" and rec["source"]["sha256"] == sha256_of(path)
    assert r2.format == "detector" and r2.dropped == []

    save_detector(tmp_path / "anon.pth", r.state_dict, bufs)  # no __author__
    r3 = convert_weights(str(tmp_path / "anon.pth"), stride_in_1x1=False, progress=False)
    author = r3.checkpoint()["__author__"]
    assert "detector" in author and "None" not in author
    assert "(" not in r3.metadata.source["origin"]  # no author to name


@pytest.mark.usefixtures("one_thread")
def test_zoo_detector_converted_to_rgb_loads_into_the_shipped_config_and_predicts_as_detectron2(
    zoo_detector, bgr_image, tmp_path
):
    _, d2_model, path = zoo_detector
    out = tmp_path / "mask_rcnn_rgb.pth"
    p = run_tool(path, out, "--to-rgb", "--verify", "--verify-size", 64)
    assert "--verify passed" in p.stdout and "INPUT.FORMAT" in p.stdout and "RGB" in p.stdout
    cfg = our_detector_cfg(out)  # the shipped RGB convention, unchanged
    model = build_model(cfg).eval()
    ResNeXtCheckpointer(model, cfg=cfg, require="all").load(cfg.MODEL.WEIGHTS)
    # Only the stem's input channels changed.
    src = pickle.load(open(path, "rb"))["model"]
    conv = torch.load(out, weights_only=True)["model"]
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(conv[stem], torch.from_numpy(src[stem]).flip(1))
    assert all(torch.equal(conv[k], torch.from_numpy(v)) for k, v in src.items() if k != stem)
    # RGB in (the same image, channels reversed) gives Detectron2's predictions on BGR ...
    ref = predict(d2_model, bgr_image)
    assert_same_predictions(predict(model, bgr_image.flip(0)), ref)
    # ... and the channel order matters: BGR into the RGB model predicts otherwise.
    wrong = predict(model, bgr_image)
    assert not torch.equal(wrong.pred_classes, ref.pred_classes)
