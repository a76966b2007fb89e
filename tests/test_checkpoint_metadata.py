"""Tests of resnext_det/checkpoint/metadata.py: what a checkpoint records about its weights
(``WeightsMetadata``, ``InputConvention``, ``metadata_from_model``), the config lines it
needs (``config_pairs``, ``format_opts``, ``config_yaml``) and the check against a config
(``check_weights_against_config``): each disagreement names its key, and the printed fix
makes it agree."""
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from resnext_det import add_resnext_config
from resnext_det.checkpoint import config_yaml
from resnext_det.checkpoint.metadata import WeightsConfigError

from weights_helpers import ROOT, _record_cfg_model, tiny_cfg


# --------------------------------------------------------------------------
# The record: WeightsMetadata, InputConvention, metadata_from_model
# --------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_metadata_round_trips_with_its_version_and_refuses_a_newer_one():
    """to_dict records METADATA_VERSION under "version" and from_dict reads back the same
    record (input, architecture, norm kind, provenance); a record of a newer resnext_det is
    refused, telling to update."""
    import dataclasses

    from resnext_det.checkpoint.metadata import CONVENTIONS, METADATA_VERSION, WeightsMetadata, spec_of_model

    cfg, model = _record_cfg_model()
    for norm in ("BN", "affine", "GN"):
        meta = WeightsMetadata(kind="backbone", input=CONVENTIONS["msra"][0], arch=spec_of_model(model),
                               source={"format": "caffe2", "sha256": "ab"}, weights_norm=norm)
        d = meta.to_dict()
        assert d["version"] == METADATA_VERSION == 1
        back = WeightsMetadata.from_dict(d)
        assert back.to_dict() == d and back.input == meta.input and back.weights_norm == norm
        assert back.arch.same_shapes(meta.arch) and back.source == {"format": "caffe2", "sha256": "ab"}
    with pytest.raises(ValueError, match="update resnext_det"):
        WeightsMetadata.from_dict(dict(d, version=METADATA_VERSION + 1))
    # The stride's place survives the trip; nothing known is null, and reads back as nothing.
    arch = dataclasses.replace(spec_of_model(model), stride_in_1x1=True)
    d = WeightsMetadata(kind="backbone", input=None, arch=arch, weights_norm="affine").to_dict()
    assert d["arch"]["stride_in_1x1"] is True and WeightsMetadata.from_dict(d).arch.stride_in_1x1 is True
    bare = WeightsMetadata(kind="detector", input=None, arch=None)
    assert bare.to_dict() == {"version": 1, "kind": "detector", "input": None, "arch": None, "source": None}
    assert WeightsMetadata.from_dict(bare.to_dict()) == bare
    # A record written before "version" and "norm" existed: version 1, BN-trained weights.
    old = {"kind": "backbone", "input": None, "arch": {k: v for k, v in d["arch"].items() if k != "norm"}}
    back = WeightsMetadata.from_dict(old)
    assert back.weights_norm == "BN" and back.arch.stride_in_1x1 is True and back.arch.same_shapes(arch)
    for bad in ({"version": 1, "input": None}, ["kind"], None):
        with pytest.raises(ValueError, match="not resnext_det weights metadata"):
            WeightsMetadata.from_dict(bad)


@pytest.mark.usefixtures("one_thread")
def test_metadata_from_a_model_records_its_convention_and_norm_kind():
    """The config's (or, without one, the model's own) input convention on the 0-255 scale,
    the trunk's architecture, and GN weights recorded as GN, BN-family ones as BN; a model
    without these attributes records nothing."""
    from resnext_det.checkpoint.metadata import metadata_from_model, spec_of_model

    opts = ["MODEL.PIXEL_MEAN", [1.0, 2.0, 3.0], "MODEL.PIXEL_STD", [4.0, 5.0, 6.0], "INPUT.FORMAT", "RGB"]
    cfg, model = _record_cfg_model(*opts)
    for m in (metadata_from_model(model, cfg, kind="backbone"), metadata_from_model(model)):
        assert (m.input.format, m.input.scale, m.input.pixel_mean, m.input.pixel_std) == (
            "RGB", "0-255", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
        assert m.arch is spec_of_model(model) and m.weights_norm == "BN"
    assert metadata_from_model(model, cfg, kind="backbone").kind == "backbone"
    assert metadata_from_model(model).kind == "detector"
    gn = ["MODEL.RESNEXT.BOTTLENECK_WIDTH", 16, "MODEL.RESNEXT.RES2_OUT_CHANNELS", 64,
          "MODEL.RESNEXT.STEM_OUT_CHANNELS", 32, "MODEL.RESNEXT.NORM", "GN"]
    cfg, model = _record_cfg_model(*gn)
    assert metadata_from_model(model, cfg).weights_norm == "GN"
    nothing = metadata_from_model(torch.nn.Linear(2, 2))
    assert (nothing.input, nothing.arch, nothing.weights_norm) == (None, None, "BN")


def test_a_lazyconfig_models_own_convention_is_what_its_checkpoint_records(tmp_path):
    """Without a yacs config (LazyConfig users), the record and the check read the input
    convention from the model itself: Detectron2's GeneralizedRCNN's input_format,
    pixel_mean and pixel_std."""
    from resnext_det.checkpoint.metadata import metadata_from_model

    cfg = tiny_cfg("FPN", "MODEL.PIXEL_MEAN", [1.0, 2.0, 3.0], "MODEL.PIXEL_STD", [4.0, 5.0, 6.0])
    model = build_model(cfg)
    inp = metadata_from_model(model).input
    assert (inp.format, tuple(inp.pixel_mean), tuple(inp.pixel_std)) == (cfg.INPUT.FORMAT, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


@pytest.mark.usefixtures("one_thread")
def test_flipped_conventions_swap_the_channel_order_and_back():
    """RGB <-> BGR with mean and std reversed (hand values: torchvision's x 255)."""
    from resnext_det.checkpoint.metadata import InputConvention

    rgb = InputConvention("RGB", "0-1", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    bgr = rgb.flipped()
    assert (bgr.format, bgr.scale, bgr.pixel_mean, bgr.pixel_std) == (
        "BGR", "0-1", (103.53, 116.28, 123.675), (57.375, 57.12, 58.395))
    assert bgr.flipped() == rgb and bgr.flipped().format == "RGB"


# --------------------------------------------------------------------------
# The config lines a record gives: config_pairs, format_opts, config_yaml
# --------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_opt_values_read_back_as_yacs_parses_them():
    """Each value, as one command-line item, is what yacs' merge_from_list decodes back:
    the strings "True"/"False"/"None"/"" stay strings, booleans stay booleans."""
    from yacs.config import CfgNode

    from resnext_det.checkpoint.metadata import _opt_value

    values = ["True", "False", "None", "", "w.pth", "3x", "-x", "[a]", "1e5", "[1, 2]", "-5", "(1,)", "'q'", "BGR",
              True, False, None, 3, 1.5,
              [1.0, 2.5, 3.0], [], ["a", "b"], [True]]
    for v in values:
        s = _opt_value(v)
        assert isinstance(s, str)
        back = CfgNode._decode_cfg_value(s)
        assert back == v and type(back) is type(v), (v, s, back)


@pytest.mark.usefixtures("one_thread")
def test_config_pairs_of_a_custom_depth_give_its_depth_and_blocks():
    """A trunk with a non-standard block table (1, 2, 1, 1): DEPTH 3 x 5 + 2 = 17 (the
    paper's count) and STAGE_BLOCKS [1, 2, 1, 1]; a standard one (3, 4, 6, 3): DEPTH 50 and
    no STAGE_BLOCKS. Merged into a config, the pairs build the same trunk."""
    from detectron2.config import get_cfg

    from resnext_det import add_resnext_config
    from resnext_det.checkpoint.metadata import WeightsMetadata, config_pairs, format_opts
    from resnext_det.modeling.spec import ResNeXtSpec

    for blocks, depth, table in (((1, 2, 1, 1), 17, [1, 2, 1, 1]), ((3, 4, 6, 3), 50, [])):
        spec = ResNeXtSpec(stage_blocks=blocks, cardinality=2, bottleneck_width=4)
        pairs = dict(config_pairs(WeightsMetadata("backbone", None, spec)))
        assert pairs["MODEL.RESNEXT.DEPTH"] == depth and pairs["MODEL.RESNEXT.STAGE_BLOCKS"] == table
        cfg = get_cfg()
        add_resnext_config(cfg)
        cfg.merge_from_list(format_opts(list(pairs.items())))
        assert ResNeXtSpec.from_config(cfg).same_shapes(spec)


def test_config_yaml_reads_back_in_detectron2(tmp_path):
    pairs = [("MODEL.WEIGHTS", "w.pth"), ("MODEL.RESNEXT.CARDINALITY", 4), ("MODEL.PIXEL_STD", [1.0, 2.0, 3.0]),
             ("INPUT.FORMAT", "BGR"), ("MODEL.RESNEXT.STRIDE_IN_1X1", True)]
    base = os.path.join(ROOT, "configs", "Base-ResNeXt-FPN.yaml")
    for header in ("", "Made here.\n\nTwo paragraphs.  "):
        text = config_yaml(pairs, base=base, header=header) if header else config_yaml(pairs, base=base)
        lines = text.splitlines()
        assert all(line == line.rstrip() for line in lines)  # no trailing blanks
        assert sum(line.startswith("#") for line in lines) == len(header.splitlines())
        (tmp_path / "c.yaml").write_text(text)
        cfg = get_cfg()
        add_resnext_config(cfg)
        cfg.merge_from_file(str(tmp_path / "c.yaml"))
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"  # from the base
        for k, v in pairs:
            node = cfg
            for part in k.split("."):
                node = node[part]
            assert (list(node) if isinstance(v, list) else node) == v, k


@pytest.mark.usefixtures("one_thread")
def test_config_yaml_without_a_header_has_no_comment():
    """config_yaml(pairs) with no header: the yaml starts with the keys (no stray comment)."""
    from resnext_det.checkpoint.metadata import config_yaml

    text = config_yaml([("MODEL.WEIGHTS", "w.pth"), ("INPUT.FORMAT", "BGR")])
    assert text.splitlines()[0] == "MODEL:" and "#" not in text
    assert config_yaml([("INPUT.FORMAT", "BGR")], header="made by x").splitlines()[0] == "# made by x"


@pytest.mark.usefixtures("one_thread")
def test_the_written_yaml_takes_keys_added_as_in_the_projects_configs():
    """config_yaml indents by 2 spaces, as Detectron2's and this project's configs do: a
    block copied from configs/*.yaml into the written file (here ROI_HEADS under MODEL)
    still reads back."""
    import yaml

    from resnext_det.checkpoint.metadata import config_yaml

    pairs = [("MODEL.RESNEXT.CARDINALITY", 4), ("MODEL.PIXEL_STD", [1.0, 2.0, 3.0]), ("INPUT.FORMAT", "BGR")]
    with open(os.path.join(ROOT, "configs", "Base-ResNeXt-C4.yaml")) as f:
        assert "\n  RESNEXT:\n    " in f.read()  # the project's indentation
    lines = config_yaml(pairs).splitlines()
    at = lines.index("MODEL:") + 1
    edited = "\n".join(lines[:at] + ["  ROI_HEADS:", "    NUM_CLASSES: 3"] + lines[at:])
    got = yaml.safe_load(edited)
    assert got["MODEL"]["ROI_HEADS"] == {"NUM_CLASSES": 3} and got["MODEL"]["RESNEXT"] == {"CARDINALITY": 4}
    assert got["MODEL"]["PIXEL_STD"] == [1.0, 2.0, 3.0] and got["INPUT"] == {"FORMAT": "BGR"}


# --------------------------------------------------------------------------
# The check against a config (check_weights_against_config): each disagreement named, with
# the line that fixes it
# --------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_close_tolerates_rounding_not_another_value():
    """Means/stds match within 1e-4 relative or 1e-3 absolute (hand values at each edge),
    and only with as many channels."""
    from resnext_det.checkpoint.metadata import _close

    assert _close([0.0, 1.0, 100.0], [0.0009, 1.0009, 100.009])
    assert not _close([0.0], [0.0011])  # outside 1e-3 near zero
    assert not _close([100.0], [100.011])  # outside 1e-4 relative
    assert _close([57.375], [57.3794])  # inside 1e-4 * 57.38 = 0.0057
    assert not _close([1.0, 2.0], [1.0, 2.0, 3.0]) and not _close([1.0, 2.0, 3.0], [1.0, 2.0])


def _mismatch(meta, cfg, model):
    from resnext_det.checkpoint.metadata import check_weights_against_config

    with pytest.raises(WeightsConfigError) as e:
        check_weights_against_config(meta, cfg, model=model)
    problems, _, fix = str(e.value).partition("\nSet in the config (or append to the command line):\n")
    assert problems.startswith("The checkpoint ")  # no file given: not "MODEL.WEIGHTS = ''"
    import shlex

    return problems, shlex.split(fix)  # as a shell splits the line appended to a command


@pytest.mark.usefixtures("one_thread")
def test_each_disagreement_names_its_key_and_the_printed_fix_makes_it_agree():
    """Stride placement, channel order, mean and std: the problem line names the key and
    the stride's place, and the printed KEY VALUE line, merged into the config (the model
    rebuilt), passes the check; an agreeing record passes with no warning."""
    import dataclasses

    from detectron2.modeling import build_model

    from resnext_det.checkpoint.metadata import check_weights_against_config, metadata_from_model

    cfg, model = _record_cfg_model()
    meta = metadata_from_model(model, cfg)
    assert check_weights_against_config(meta, cfg, model=model) == []
    flip = dataclasses.replace(meta.arch, stride_in_1x1=not meta.arch.stride_in_1x1)
    cases = {
        "MODEL.RESNEXT.STRIDE_IN_1X1": dataclasses.replace(meta, arch=flip),
        "INPUT.FORMAT": dataclasses.replace(meta, input=meta.input.flipped()),
        "MODEL.PIXEL_MEAN": dataclasses.replace(meta, input=dataclasses.replace(meta.input, pixel_mean=(1, 2, 3))),
        "MODEL.PIXEL_STD": dataclasses.replace(meta, input=dataclasses.replace(meta.input, pixel_std=(4, 5, 6))),
    }
    for key, bad in cases.items():
        problems, fix = _mismatch(bad, cfg, model)
        assert key in problems and key in fix, (key, problems, fix)
        fixed = cfg.clone()
        fixed.merge_from_list(fix)
        check_weights_against_config(bad, fixed, model=build_model(fixed))  # no error
    # Channel order both ways; BGR weights under an RGB config also get the --to-rgb way out.
    for weights_fmt in ("RGB", "BGR"):
        c, m = _record_cfg_model("INPUT.FORMAT", "BGR" if weights_fmt == "RGB" else "RGB")
        wm = metadata_from_model(m, c)
        other_order = dataclasses.replace(wm, input=dataclasses.replace(wm.input, format=weights_fmt))
        problems, fix = _mismatch(other_order, c, m)
        assert fix == ["INPUT.FORMAT", weights_fmt] and ("--to-rgb" in problems) == (weights_fmt == "BGR")
        assert f"trained on {weights_fmt} input, the config feeds {c.INPUT.FORMAT}" in problems
        assert weights_fmt == "BGR" or problems.endswith(f"the config feeds {c.INPUT.FORMAT}")  # no hint
    # Both ways: the weights' place of the stride and the config's, each named.
    cfg2, model2 = _record_cfg_model("MODEL.RESNEXT.STRIDE_IN_1X1", not meta.arch.stride_in_1x1)
    for weights_meta, c, m in ((cases["MODEL.RESNEXT.STRIDE_IN_1X1"], cfg, model), (meta, cfg2, model2)):
        problems, _ = _mismatch(weights_meta, c, m)
        w, here = ("first 1x1", "3x3") if weights_meta.arch.stride_in_1x1 else ("3x3", "first 1x1")
        assert f"trained with the stride on the {w} conv, the config puts it on the {here} conv" in problems
    other = dataclasses.replace(meta, arch=dataclasses.replace(meta.arch, cardinality=4, bottleneck_width=2))
    problems, fix = _mismatch(other, cfg, model)
    assert "STRIDE_IN_1X1" not in problems + " ".join(fix)  # the stride's place agrees: not named
    assert "MODEL.RESNEXT.PRESET" in problems and "CARDINALITY" in problems
    assert fix[fix.index("MODEL.RESNEXT.CARDINALITY") + 1] == "4"


@pytest.mark.usefixtures("one_thread")
def test_a_config_input_format_without_a_known_convention_is_refused_unless_no_config():
    """A config feeding another INPUT.FORMAT than RGB/BGR (YUV) with weights trained on BGR:
    refused naming INPUT.FORMAT and the config's value. Without a config, a model that does
    not say its input convention cannot be checked: no error."""
    from resnext_det.checkpoint.metadata import CONVENTIONS, WeightsMetadata, check_weights_against_config

    cfg, model = _record_cfg_model()
    meta = WeightsMetadata(kind="backbone", input=CONVENTIONS["fair"][0], arch=None)
    yuv = cfg.clone()
    yuv.INPUT.FORMAT = "YUV-BT.601"
    problems, fix = _mismatch(meta, yuv, model)
    assert "INPUT.FORMAT" in problems and "'YUV-BT.601'" in problems and fix == ["INPUT.FORMAT", "BGR"]
    assert check_weights_against_config(meta, None, model=torch.nn.Linear(2, 2)) == []


@pytest.mark.usefixtures("one_thread")
def test_the_printed_fix_line_can_be_appended_to_a_command_line():
    """The message says to append its KEY VALUE line to the command line: split as a shell
    splits it, a list value ([1.0, 2.0, 3.0]) must stay one item for merge_from_list."""
    import dataclasses
    import shlex

    from resnext_det.checkpoint.metadata import check_weights_against_config, metadata_from_model

    cfg, model = _record_cfg_model()
    meta = metadata_from_model(model, cfg)
    bad = dataclasses.replace(meta, input=dataclasses.replace(meta.input, pixel_mean=(1.0, 2.0, 3.0)))
    with pytest.raises(WeightsConfigError) as e:
        check_weights_against_config(bad, cfg, model=model)
    line = str(e.value).splitlines()[-1]
    fixed = cfg.clone()
    fixed.merge_from_list(shlex.split(line))
    assert list(fixed.MODEL.PIXEL_MEAN) == [1.0, 2.0, 3.0]


def test_affine_weights_warn_under_every_norm_that_normalises_with_batch_statistics():
    """Caffe2 weights (BN folded into an affine, no ImageNet statistics) under a norm that
    normalises with batch statistics in training get the warning; which norms do is read
    from Detectron2's own get_norm (a _BatchNorm that is not FrozenBatchNorm2d), not typed."""
    import dataclasses

    from detectron2.layers import FrozenBatchNorm2d, get_norm
    from torch.nn.modules.batchnorm import _BatchNorm

    from resnext_det.checkpoint.metadata import check_weights_against_config, metadata_from_model
    from resnext_det.modeling.spec import NORMS

    gn = ["MODEL.RESNEXT.BOTTLENECK_WIDTH", 16, "MODEL.RESNEXT.RES2_OUT_CHANNELS", 64, "MODEL.RESNEXT.STEM_OUT_CHANNELS", 32]
    for norm in NORMS:
        layer = get_norm(norm, 32) if norm else None
        batch_stats = isinstance(layer, _BatchNorm) and not isinstance(layer, FrozenBatchNorm2d)
        cfg = tiny_cfg("FPN", *gn, "MODEL.RESNEXT.NORM", norm)
        model = build_model(cfg)
        meta = dataclasses.replace(metadata_from_model(model, cfg), weights_norm="affine")
        warned = [w for w in check_weights_against_config(meta, cfg, model=model) if "Caffe2 weights" in w]
        assert len(warned) == int(batch_stats), (norm, warned)
        if warned:
            assert f"MODEL.RESNEXT.NORM = {norm!r}" in warned[0] and "FrozenBN" in warned[0]
