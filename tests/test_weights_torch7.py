"""Torch7 .t7 weights (the paper's official release format).

The test writes real .t7 files in Torch7's binary serialisation format (the
format ``torch.save`` of Lua Torch writes, which the ``torchfile`` package reads)
with the module tree of facebookresearch/ResNeXt's ``models/resnext.lua``
(fb.resnet.torch layout): nn.Sequential(conv, BN, ReLU, max-pool, 4 stage
nn.Sequentials of blocks nn.Sequential(nn.ConcatTable(branch, shortcut),
nn.CAddTable, ReLU), avg-pool, view, linear). The weights are a torchvision
ResNeXt's; the converted checkpoint must give torchvision's features.
"""
import copy
import struct

import numpy as np
import pytest
import torch
import torchfile
from torch import nn

from resnext_det.checkpoint import ConversionError, config_pairs, convert_weights, verify_conversion
from resnext_det.checkpoint.formats import torch7_layout
from resnext_det.checkpoint.layout import trunk_spec
from resnext_det.checkpoint.verify import reference_features
from resnext_det.modeling.resnext import ResNeXt

from weights_helpers import (
    STAGES,
    TOL,
    detector_cfg,
    detector_stages,
    load_detector,
    normalized_input,
    rel_err,
    run_tool,
    tv_resnext,
    tv_stages,
    tv_to_caffe2_blobs,
)


# --------------------------------------------------------------------------
# A minimal Torch7 binary writer (torch7/File.lua: writeObject)
# --------------------------------------------------------------------------
class T7:
    """A Torch7 object: a class name and its fields (an nn module)."""

    def __init__(self, typename: str, **fields):
        self.typename, self.fields = typename, fields


class _Writer:
    NIL, NUMBER, STRING, TABLE, TORCH, BOOLEAN = 0, 1, 2, 3, 4, 5

    def __init__(self, f):
        self.f, self.index = f, 0

    def _int(self, v):
        self.f.write(struct.pack("=i", v))

    def _long(self, v):
        self.f.write(struct.pack("l", v))  # native C long (8 bytes on 64-bit Linux), as torchfile reads it

    def _string(self, s: str):
        b = s.encode()
        self._int(len(b))
        self.f.write(b)

    def _new_index(self):
        self.index += 1
        return self.index

    def write(self, o):
        if o is None:
            self._int(self.NIL)
        elif isinstance(o, bool):
            self._int(self.BOOLEAN)
            self._int(int(o))
        elif isinstance(o, (int, float)):
            self._int(self.NUMBER)
            self.f.write(struct.pack("=d", float(o)))
        elif isinstance(o, str):
            self._int(self.STRING)
            self._string(o)
        elif isinstance(o, (list, dict)):
            items = list(enumerate(o, start=1)) if isinstance(o, list) else list(o.items())
            self._int(self.TABLE)
            self._int(self._new_index())
            self._int(len(items))
            for k, v in items:
                self.write(k)
                self.write(v)
        elif isinstance(o, np.ndarray):  # float64 arrays as a DoubleTensor (model:double())
            kind = "Double" if o.dtype == np.float64 else "Float"
            a = np.ascontiguousarray(o, dtype=np.float64 if kind == "Double" else np.float32)
            self._int(self.TORCH)
            self._int(self._new_index())
            self._string("V 1")
            self._string(f"torch.{kind}Tensor")
            if a.size == 0:  # an empty Torch7 tensor: no dimensions, no storage
                self._int(0)
                self._long(1)
                self._int(self.NIL)
                return
            self._int(a.ndim)
            for n in a.shape:
                self._long(n)
            for s in a.strides:
                self._long(s // a.itemsize)
            self._long(1)  # storage offset, 1-based
            self._int(self.TORCH)
            self._int(self._new_index())
            self._string("V 1")
            self._string(f"torch.{kind}Storage")
            self._long(a.size)
            self.f.write(a.tobytes())
        elif isinstance(o, T7):
            self._int(self.TORCH)
            self._int(self._new_index())
            self._string("V 1")
            self._string(o.typename)
            self.write(dict(o.fields))
        else:
            raise TypeError(type(o))


def write_t7(path, obj):
    with open(path, "wb") as f:
        _Writer(f).write(obj)


def _np(t):
    return t.detach().numpy().copy()


def conv(w, stride=1, pad=0, groups=1, bias=None, typename="cudnn.SpatialConvolution"):
    f = dict(
        nInputPlane=w.shape[1] * groups, nOutputPlane=w.shape[0], kW=w.shape[3], kH=w.shape[2],
        dW=stride, dH=stride, padW=pad, padH=pad, weight=_np(w), bias=None if bias is None else _np(bias),
    )
    if typename.endswith("MM"):  # nn.SpatialConvolutionMM stores the weight as a matrix
        f["weight"] = f["weight"].reshape(w.shape[0], -1)
    else:
        f["groups"] = groups
    return T7(typename, **f)


def bn(sd, p, *, eps=1e-5, mean_shift=None, legacy_std=False):
    mean = sd[p + ".running_mean"] + (0 if mean_shift is None else mean_shift)
    f = dict(weight=_np(sd[p + ".weight"]), bias=_np(sd[p + ".bias"]), eps=eps, momentum=0.1, affine=True,
             running_mean=_np(mean))
    var = sd[p + ".running_var"]
    if legacy_std:  # old nn: running_std = 1 / sqrt(var + eps)
        f["running_std"] = _np(1.0 / torch.sqrt(var + eps))
    else:  # the same function with another eps: var + eps must be unchanged
        f["running_var"] = _np(var + 1e-5 - eps)
    return T7("nn.SpatialBatchNormalization", **f)


def seq(*mods, typename="nn.Sequential"):
    return T7(typename, modules=list(mods), train=False)


def resnext_t7_from_torchvision(tv, *, quirks=True, biases=False, bn_edit=None):
    """fb.resnet.torch's module tree holding ``tv``'s weights. With ``quirks``,
    also the variations of real files: conv biases (folded into BN), other BN
    eps, legacy running_std, nn.SpatialConvolutionMM matrices. ``biases`` gives
    every conv a bias (BN's mean shifted to match); ``bn_edit(name, fields)``
    edits a BN's fields (name: torchvision's)."""
    sd = tv.state_dict()
    g = torch.Generator().manual_seed(11)
    relu = lambda: T7("cudnn.ReLU", inplace=True)  # noqa: E731

    def conv_bn(p_conv, p_bn, stride=1, pad=0, groups=1, typename="cudnn.SpatialConvolution", bias=None, **kw):
        w = sd[p_conv + ".weight"]
        if bias is None and biases:
            bias = torch.randn(w.shape[0], generator=g)
        b = bn(sd, p_bn, mean_shift=bias, **kw)  # BN(conv + b) needs mean + b to equal torchvision
        if bn_edit is not None:
            bn_edit(p_bn, b.fields)
        return conv(w, stride, pad, groups=groups, bias=bias, typename=typename), b

    stem_bias = torch.randn(sd["conv1.weight"].shape[0], generator=g) if quirks else None
    model = [
        *conv_bn("conv1", "bn1", 2, 3, bias=stem_bias, typename="nn.SpatialConvolution"),
        relu(),
        T7("cudnn.SpatialMaxPooling", kW=3, kH=3, dW=2, dH=2, padW=1, padH=1, ceil_mode=False),
    ]
    for i, layer in enumerate((tv.layer1, tv.layer2, tv.layer3, tv.layer4), start=1):
        blocks = []
        for j, block in enumerate(layer):
            p = f"layer{i}.{j}"
            stride = block.conv2.stride[0]
            groups = block.conv2.groups
            eps2 = 1e-3 if (quirks and i == 2) else 1e-5
            branch = seq(
                *conv_bn(p + ".conv1", p + ".bn1", legacy_std=quirks and i == 3),
                relu(),
                *conv_bn(p + ".conv2", p + ".bn2", stride, 1, groups=groups, eps=eps2),
                relu(),
                *conv_bn(p + ".conv3", p + ".bn3",
                         typename="nn.SpatialConvolutionMM" if quirks else "cudnn.SpatialConvolution"),
            )
            if block.downsample is not None:
                shortcut = seq(*conv_bn(p + ".downsample.0", p + ".downsample.1", stride))
            else:
                shortcut = T7("nn.Identity")
            blocks.append(seq(T7("nn.ConcatTable", modules=[branch, shortcut]), T7("nn.CAddTable", inplace=True), relu()))
        model.append(seq(*blocks))
    model += [
        T7("cudnn.SpatialAveragePooling", kW=7, kH=7, dW=1, dH=1),
        T7("nn.View", size=[2048], numInputDims=3),
        T7("nn.Linear", weight=_np(sd["fc.weight"]), bias=_np(sd["fc.bias"])),
    ]
    return seq(*model)


@pytest.fixture(scope="module")
def tv_and_t7(tmp_path_factory):
    d = tmp_path_factory.mktemp("t7")
    tv = tv_resnext(groups=4, width=4, seed=2)
    write_t7(d / "resnext_26_4x4d.t7", resnext_t7_from_torchvision(tv))
    return tv, d


def test_torchfile_reads_the_written_file(tv_and_t7):
    """The writer is faithful: torchfile (an independent reader) gets the tree back."""
    tv, d = tv_and_t7
    tree = torchfile.load(str(d / "resnext_26_4x4d.t7"))
    assert tree.torch_typename() == b"nn.Sequential" and len(tree.modules) == 11
    block = tree.modules[5].modules[0]  # res3.0
    conv2 = block.modules[0].modules[0].modules[3]
    assert conv2.torch_typename() == b"cudnn.SpatialConvolution" and conv2.groups == 4 and conv2.dW == 2
    np.testing.assert_array_equal(conv2.weight, tv.state_dict()["layer2.0.conv2.weight"].numpy())


def test_t7_converts_to_torchvision_features(tv_and_t7):
    tv, d = tv_and_t7
    p = run_tool(d / "resnext_26_4x4d.t7", d / "out.pth", "--verify", "--verify-size", 64)
    assert "torch7 source model vs resnext_det backbone" in p.stdout and "--verify passed" in p.stdout
    r = convert_weights(str(d / "resnext_26_4x4d.t7"), progress=False)
    assert r.format == "torch7" and r.metadata.input.format == "RGB"
    a = r.metadata.arch
    assert (a.stage_blocks, a.cardinality, a.bottleneck_width, a.stride_in_1x1) == ((2, 2, 2, 2), 4, 4, False)
    cfg = detector_cfg("FPN", config_pairs(r.metadata, str(d / "out.pth")))
    x = normalized_input(seed=4)
    ours, ref = detector_stages(load_detector(cfg), x), tv_stages(tv, x)
    for s in STAGES:
        assert rel_err(ours[s], ref[s]) < TOL, (s, rel_err(ours[s], ref[s]))
    # --verify's reference interpreter runs the stored tree (bias, eps and all):
    diffs = verify_conversion(r, size=64)
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL


def test_t7_form_a_and_basic_blocks_are_refused(tmp_path):
    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4)
    tree = resnext_t7_from_torchvision(tv, quirks=False)
    # Make res2.0 a form-(a) block: a ConcatTable of C paths plus the shortcut.
    block = tree.fields["modules"][4].fields["modules"][0]
    concat = block.fields["modules"][0]
    concat.fields["modules"] = [concat.fields["modules"][0]] * 3 + [concat.fields["modules"][1]]
    write_t7(tmp_path / "form_a.t7", tree)
    with pytest.raises(ConversionError, match=r"res2.0: a Torch7 residual block with 4 branches.*form \(c\)"):
        convert_weights(str(tmp_path / "form_a.t7"), progress=False)
    tree = resnext_t7_from_torchvision(tv, quirks=False)
    branch = tree.fields["modules"][5].fields["modules"][0].fields["modules"][0].fields["modules"][0]
    branch.fields["modules"] = branch.fields["modules"][:5]  # two convs: a basic block
    write_t7(tmp_path / "basic.t7", tree)
    with pytest.raises(ConversionError, match="res3.0: the residual branch has 2 conv"):
        convert_weights(str(tmp_path / "basic.t7"), progress=False)
    with pytest.raises(ConversionError, match="Torch7 file, not --format caffe2"):
        convert_weights(str(tmp_path / "basic.t7"), fmt="caffe2", progress=False)


# --------------------------------------------------------------------------
# Other layouts and quirks of real .t7 files; --verify's Torch7 interpreter
# --------------------------------------------------------------------------
@torch.no_grad()
def converted_stages(r, x):
    """Our backbone, loaded strictly from a conversion result."""
    model = ResNeXt(trunk_spec(r.metadata.arch)).eval()
    model.load_state_dict(r.state_dict, strict=True)
    return model(x)


def assert_same_features(got, ref, what=""):
    for s in STAGES:
        assert got[s].shape == ref[s].shape, (what, s)
        assert rel_err(got[s], ref[s]) < TOL, (what, s, rel_err(got[s], ref[s]))


@pytest.fixture(scope="module")
def tv_small():
    """1, 2, 1, 2 blocks: stages that start with a projection and go on with identities."""
    return tv_resnext(layers=(1, 2, 1, 2), groups=2, width=4, seed=3)


def _mods(t7):
    return t7.fields["modules"]


def test_t7_other_layouts_convert_to_torchvision_features(tv_small, tmp_path):
    """Trees not laid out as fb.resnet.torch's (one container per stage) give torchvision's
    features too, through the converter and through --verify's interpreter: all blocks
    in one flat nn.Sequential (stages start at each projection shortcut); a
    DataParallelTable of two replicas (one is the network) with the stem in its own
    nn.Sequential(conv, BN); a modules table with a hole (torchfile reads it as a dict)."""
    x = normalized_input(size=32, seed=5)
    ref = tv_stages(tv_small, x)

    flat = resnext_t7_from_torchvision(tv_small, quirks=False)
    top = _mods(flat)
    _mods(flat)[:] = top[:4] + [b for stage in top[4:8] for b in _mods(stage)] + top[8:]

    def replica():
        t = resnext_t7_from_torchvision(tv_small, quirks=False)
        _mods(t)[:] = [seq(*_mods(t)[:2])] + _mods(t)[2:]
        return t

    dpt = seq(T7("nn.DataParallelTable", modules=[replica(), replica()], dimension=1))

    holed = resnext_t7_from_torchvision(tv_small, quirks=False)
    ms = _mods(holed)
    holed.fields["modules"] = {k: ms[k - 1 if k < 6 else k - 2] for k in [12, 3, 1, 7, 2, 5, 4, 9, 8, 10, 11]}

    for name, tree in (("flat", flat), ("dpt", dpt), ("holed", holed)):
        write_t7(tmp_path / f"{name}.t7", tree)
        r = convert_weights(str(tmp_path / f"{name}.t7"), progress=False)
        assert r.metadata.arch.stage_blocks == (1, 2, 1, 2), name
        assert_same_features(converted_stages(r, x), ref, name)
        assert_same_features(reference_features(r, x), ref, name)


def test_t7_layout_stages_are_the_stage_containers(tv_small, tmp_path):
    """With a projection shortcut on every block (fb.resnet.torch's shortcutType 'C'), the
    stages are still the 4 containers, each block given by its own nn.Sequential."""
    tv = copy.deepcopy(tv_small)
    for layer in (tv.layer2, tv.layer4):
        layer[1].downsample = copy.deepcopy(layer[0].downsample)
        layer[1].downsample[0].stride = (1, 1)
        layer[1].downsample[0].weight.data = torch.randn(layer[1].downsample[0].weight.shape[0],
                                                        layer[1].conv1.in_channels, 1, 1)
    write_t7(tmp_path / "c.t7", resnext_t7_from_torchvision(tv, quirks=False))
    tree = torchfile.load(str(tmp_path / "c.t7"))
    _, stages = torch7_layout(tree)
    assert [len(s) for s in stages] == [1, 2, 1, 2]
    for i, stage in enumerate(stages):
        for j, (container, concat) in enumerate(stage):
            assert container is tree.modules[4 + i].modules[j]
            assert concat is container.modules[0]


def test_t7_quirks_of_real_files(tmp_path):
    """A DoubleTensor file (model:double()) whose every conv has a bias, BNs without an
    eps field (Torch7's default 1e-5), an affine=false BN (no weight/bias), legacy
    running_std and other eps: converted (to float32) and interpreted, torchvision's
    features, with a 1-block stage and a 3-block stage."""
    tv = tv_resnext(layers=(1, 1, 3, 1), groups=2, width=4, seed=6)
    with torch.no_grad():
        tv.layer3[1].bn2.weight.fill_(1.0)
        tv.layer3[1].bn2.bias.zero_()

    def edit(p, f):
        if p in ("bn1", "layer1.0.bn2", "layer4.0.downsample.1"):
            del f["eps"]
        if p == "layer3.1.bn2":
            del f["weight"], f["bias"]
            f["affine"] = False

    tree = resnext_t7_from_torchvision(tv, biases=True, bn_edit=edit)

    def to_double(t):
        for k, v in t.fields.items():
            if isinstance(v, np.ndarray):
                t.fields[k] = v.astype(np.float64)
        for m in t.fields.get("modules", []):
            to_double(m)

    to_double(tree)
    write_t7(tmp_path / "q.t7", tree)
    assert torchfile.load(str(tmp_path / "q.t7")).modules[0].weight.dtype == np.float64
    r = convert_weights(str(tmp_path / "q.t7"), progress=False)
    assert {v.dtype for v in r.state_dict.values()} == {torch.float32}
    x = normalized_input(size=32, seed=8)
    ref = tv_stages(tv, x)
    assert_same_features(converted_stages(r, x), ref, "converted")
    assert_same_features(reference_features(r, x), ref, "reference")
    diffs = verify_conversion(r, size=32)
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL


def _refused(tmp_path, name, tree):
    write_t7(tmp_path / f"{name}.t7", tree)
    with pytest.raises(ConversionError) as e:
        convert_weights(str(tmp_path / f"{name}.t7"), progress=False)
    return str(e.value)


def test_t7_malformed_trees_are_refused_with_the_place(tmp_path):
    """Each malformed tree is a ConversionError saying what is wrong and where."""
    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4)

    def good():  # without the classifier (avg-pool, view, linear: 8 MB)
        t = resnext_t7_from_torchvision(tv, quirks=False)
        del _mods(t)[8:]
        return t

    # Not a module: a Lua list holding the network.
    assert "holds a list, not a Torch7 nn module" in _refused(tmp_path, "list", [good()])
    # A module, but no network (an nn.Identity, no fields at all).
    assert "no stem convolution found" in _refused(tmp_path, "identity", T7("nn.Identity"))
    # Residual blocks (inlined: ConcatTable, CAddTable, ReLU) first, then a conv + BN: no stem.
    t = good()
    _mods(t)[:] = [m for stage in _mods(t)[4:8] for b in _mods(stage) for m in _mods(b)] + _mods(t)[:2]
    assert "no stem convolution found" in _refused(tmp_path, "headless", t)
    # The stem conv followed by ReLU; the stem conv last in its container.
    t = good()
    _mods(t)[:] = [_mods(t)[0]] + _mods(t)[2:]
    assert "stem conv is not followed by SpatialBatchNormalization" in _refused(tmp_path, "stem_relu", t)
    t = good()
    _mods(t)[:] = [seq(_mods(t)[0])] + _mods(t)[1:]
    assert "stem conv is not followed by SpatialBatchNormalization" in _refused(tmp_path, "stem_last", t)
    # No residual blocks.
    t = good()
    _mods(t)[:] = _mods(t)[:4] + _mods(t)[8:]
    assert "no residual blocks (nn.ConcatTable)" in _refused(tmp_path, "noblocks", t)
    # Three stages.
    t = good()
    del _mods(t)[7]
    msg = _refused(tmp_path, "3stages", t)
    assert "found 3 stages" in msg and "expected 4" in msg

    def branch(t, s):  # the residual branch of res{s}.0
        return _mods(_mods(_mods(_mods(t)[s + 2])[0])[0])[0]

    # A branch conv not followed by BN: in the middle, and last in the branch.
    t = good()
    del _mods(branch(t, 3))[1]
    assert "convolution is not followed by SpatialBatchNormalization" in _refused(tmp_path, "conv_relu", t)
    t = good()
    del _mods(branch(t, 3))[-1]
    assert "convolution is not followed by SpatialBatchNormalization" in _refused(tmp_path, "conv_last", t)
    # A BN without running statistics: no mean; a mean but neither running_var nor running_std.
    for field in ("running_mean", "running_var"):
        t = good()
        del _mods(branch(t, 4))[4].fields[field]
        msg = _refused(tmp_path, "nostats", t)
        assert "SpatialBatchNormalization has no running statistics" in msg, field
    # A conv with an empty weight tensor.
    t = good()
    _mods(branch(t, 2))[3].fields["weight"] = np.zeros(0, np.float32)
    assert "cudnn.SpatialConvolution has no weight" in _refused(tmp_path, "noweight", t)
    # A basic block: the message says which layers the paper's block has.
    t = good()
    _mods(branch(t, 3))[:] = _mods(branch(t, 3))[:5]
    msg = _refused(tmp_path, "basic", t)
    assert "res3.0: the residual branch has 2 conv" in msg and "1x1, grouped 3x3, 1x1" in msg
    # fb.resnet.torch's shortcutType 'A' (avg-pool + zero-padding concat): not type B.
    t = good()
    block = _mods(_mods(t)[5])[0]
    _mods(_mods(block)[0])[1] = seq(
        T7("nn.SpatialAveragePooling", kW=1, kH=1, dW=2, dH=2),
        T7("nn.Concat", dimension=2, modules=[T7("nn.Identity"), T7("nn.MulConstant", constant_scalar=0)]),
    )
    msg = _refused(tmp_path, "typeA", t)
    assert "res3.0: shortcut nn.Sequential is neither nn.Identity nor a 1x1 conv + BN projection" in msg
    # A shortcut that is not a module at all (a plain Lua list).
    t = good()
    _mods(_mods(_mods(_mods(t)[4])[0])[0])[1] = [1, 2]
    assert "res2.0: shortcut list is neither nn.Identity" in _refused(tmp_path, "table", t)
    # A shortcut that is a Lua table with string keys (torchfile answers any attribute of
    # it with None): refused like the list, not a TypeError.
    t = good()
    _mods(_mods(_mods(_mods(t)[4])[0])[0])[1] = {"weight": 1.0}
    assert "res2.0: shortcut a Lua table is neither nn.Identity" in _refused(tmp_path, "strtable", t)


def test_t7_reference_runs_strides_padding_and_pooling_as_stored(tmp_path):
    """--verify's reference runs the stored tree: a stem conv with other vertical and
    horizontal stride/padding, a max-pool with another kernel/stride/padding per axis and
    ceil_mode give torchvision's features of the same modified network."""
    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4, seed=4)
    t = resnext_t7_from_torchvision(tv, quirks=False)
    _mods(t)[0].fields.update(dH=2, dW=1, padH=3, padW=2)
    _mods(t)[3].fields.update(kH=3, kW=2, dH=2, dW=1, padH=1, padW=0, ceil_mode=True)
    write_t7(tmp_path / "asym.t7", t)
    r = convert_weights(str(tmp_path / "asym.t7"), progress=False)
    tv_mod = copy.deepcopy(tv)
    tv_mod.conv1.stride, tv_mod.conv1.padding = (2, 1), (3, 2)
    tv_mod.maxpool = nn.MaxPool2d((3, 2), (2, 1), (1, 0), ceil_mode=True)
    x = normalized_input(size=32, seed=9)
    assert_same_features(reference_features(r, x), tv_stages(tv_mod, x))


def test_t7_verify_reports_a_module_it_cannot_run(tmp_path):
    """A tree with a module the interpreter does not know before res5 converts (its conv/BN
    weights are all there), but --verify says which module it could not run."""
    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4, seed=4)
    t = resnext_t7_from_torchvision(tv, quirks=False)
    branch = _mods(_mods(_mods(_mods(t)[4])[0])[0])[0]
    _mods(branch).insert(3, T7("nn.Dropout", p=0.5, train=False))
    write_t7(tmp_path / "dropout.t7", t)
    r = convert_weights(str(tmp_path / "dropout.t7"), progress=False)
    with pytest.raises(ConversionError, match=r"--verify could not run the torch7 source model: .*nn\.Dropout"):
        verify_conversion(r, size=32)


# --------------------------------------------------------------------------
# --verify's references for the other formats
# --------------------------------------------------------------------------
def _stride_in_1x1(tv):
    """``tv`` with each stage's stride moved to the first 1x1 conv (MSRA/Caffe2 style)."""
    tv = copy.deepcopy(tv)
    for layer in (tv.layer2, tv.layer3, tv.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return tv


def test_caffe2_reference_with_bn_statistics(tmp_path):
    """Caffe2 files with BN statistics (_bn_s, _bn_b, _bn_rm, _bn_riv) are run as BN with
    eps 1e-5: the reference equals torchvision's network of the same weights."""
    import pickle

    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4, seed=7)
    sd = tv.state_dict()
    blobs = {"conv1_w": sd["conv1.weight"].numpy()}

    def bn(name, p):
        for suffix, k in (("s", "weight"), ("b", "bias"), ("rm", "running_mean"), ("riv", "running_var")):
            blobs[f"{name}_bn_{suffix}"] = sd[f"{p}.{k}"].numpy()

    bn("res_conv1", "bn1")
    for i in range(1, 5):
        c2, p = f"res{i + 1}_0", f"layer{i}.0"
        for br, n in (("branch2a", 1), ("branch2b", 2), ("branch2c", 3)):
            blobs[f"{c2}_{br}_w"] = sd[f"{p}.conv{n}.weight"].numpy()
            bn(f"{c2}_{br}", f"{p}.bn{n}")
        blobs[f"{c2}_branch1_w"] = sd[f"{p}.downsample.0.weight"].numpy()
        bn(f"{c2}_branch1", f"{p}.downsample.1")
    with open(tmp_path / "stats.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    r = convert_weights(str(tmp_path / "stats.pkl"), convention="fair", progress=False)
    assert r.format == "caffe2"
    x = normalized_input(size=32, seed=3)
    assert_same_features(reference_features(r, x), tv_stages(tv, x))
    diffs = verify_conversion(r, size=32)
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL


@pytest.fixture(scope="module")
def d2_affine(tmp_path_factory):
    """A file in Detectron2 names with affine-only norms (no running statistics), from a
    torchvision model with BN folded the way Detectron2 runs such files: its FrozenBN
    loads a norm without statistics as running_mean 0, running_var 1 (eps still 1e-5)."""
    import pickle

    d = tmp_path_factory.mktemp("d2affine")
    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4, seed=8)
    torch.save(tv.state_dict(), d / "tv.pth")
    sd = dict(convert_weights(str(d / "tv.pth"), progress=False).state_dict)
    for k in [k for k in sd if k.endswith(".norm.weight")]:
        p = k[: -len("weight")]
        scale = sd[k] / torch.sqrt(sd.pop(p + "running_var") + 1e-5)
        sd[p + "bias"] = sd[p + "bias"] - sd.pop(p + "running_mean") * scale
        sd[k] = scale * (1 + 1e-5) ** 0.5  # / sqrt(1 + eps) in Detectron2's FrozenBN
    with open(d / "affine.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "test"}, f)
    return tv, d / "affine.pkl"


def test_detectron2_reference_runs_affine_files_as_detectron2(d2_affine):
    """Detectron2's reference runs affine-only files as Detectron2 does, with the stride
    where the file says: torchvision's features, stride in the 3x3 conv or
    (--stride-in-1x1 true) in the 1x1 conv."""
    tv, path = d2_affine
    x = normalized_input(size=32, seed=2)
    r = convert_weights(str(path), convention="torchvision", progress=False)
    assert r.format == "detectron2" and not r.metadata.arch.stride_in_1x1
    assert_same_features(reference_features(r, x), tv_stages(tv, x), "3x3")
    r = convert_weights(str(path), convention="torchvision", stride_in_1x1=True, progress=False)
    assert_same_features(reference_features(r, x), tv_stages(_stride_in_1x1(tv), x), "1x1")


def test_verify_reports_source_weights_the_reference_cannot_take(d2_affine):
    import dataclasses

    _, path = d2_affine
    r = convert_weights(str(path), convention="torchvision", progress=False)
    tensors = {k: v for k, v in r.source.tensors.items() if k != "res3.0.conv2.weight"}
    r = dataclasses.replace(r, source=dataclasses.replace(r.source, tensors=tensors))
    with pytest.raises(ConversionError, match=r"--verify could not run the detectron2 source.*res3\.0\.conv2\.weight"):
        verify_conversion(r, size=32)


def test_torchvision_and_timm_references_take_any_classifier(tmp_path, monkeypatch, caplog):
    """Source files with a 10-class classifier are verified against torchvision's / timm's
    network of that classifier; without timm, a timm file is verified with torchvision's
    ResNet (same names) and a warning says so."""
    import logging
    import sys

    from safetensors.torch import save_file
    from timm.models.resnet import Bottleneck as TimmBottleneck
    from timm.models.resnet import ResNet as TimmResNet

    from torchvision.models.resnet import Bottleneck, ResNet

    from weights_helpers import randomize_bn

    torch.manual_seed(3)
    tv = randomize_bn(ResNet(Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=4, num_classes=10), 3).eval()
    torch.save(tv.state_dict(), tmp_path / "tv10.pth")
    r = convert_weights(str(tmp_path / "tv10.pth"), progress=False)
    diffs = verify_conversion(r, size=32)
    assert max(dd / max(1, m) for dd, m in diffs.values()) < TOL

    tm = TimmResNet(block=TimmBottleneck, layers=[1, 1, 1, 1], cardinality=2, base_width=4, num_classes=10)
    tm = randomize_bn(tm, 4).eval()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp_path / "tm10.safetensors"))
    r = convert_weights(str(tmp_path / "tm10.safetensors"), progress=False)
    assert r.format == "timm"
    x = normalized_input(size=32, seed=6)
    assert_same_features(reference_features(r, x), tv_stages(tm, x), "timm")
    monkeypatch.setitem(sys.modules, "timm.models.resnet", None)  # import fails: no timm
    with caplog.at_level(logging.WARNING, logger="resnext_det.checkpoint.verify"):
        assert_same_features(reference_features(r, x), tv_stages(tm, x), "no timm")
    assert any("timm" in m and "torchvision" in m for m in caplog.messages), caplog.messages


# --------------------------------------------------------------------------
# --verify must fail a wrong conversion, whatever the source format
# --------------------------------------------------------------------------
def _source_file(fmt, tmp_path):
    """A (1, 3, 1, 1)-block ResNeXt (C=2, d=4) written in ``fmt``; returns (path, convert kwargs)."""
    import pickle

    from safetensors.torch import save_file


    tv = tv_resnext(layers=(1, 3, 1, 1), groups=2, width=4, seed=12)
    sd = tv.state_dict()
    if fmt == "torchvision":
        torch.save(sd, tmp_path / "tv.pth")
        return tmp_path / "tv.pth", {}
    if fmt == "timm":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "tm.safetensors"))
        return tmp_path / "tm.safetensors", {}
    if fmt in ("caffe2-stats", "caffe2-affine"):
        blobs = tv_to_caffe2_blobs(sd, stats=fmt == "caffe2-stats")
        with open(tmp_path / "c2.pkl", "wb") as f:
            pickle.dump({"blobs": blobs}, f, protocol=2)
        return tmp_path / "c2.pkl", dict(convention="fair", to_rgb=fmt == "caffe2-affine")
    if fmt == "detectron2":
        torch.save(sd, tmp_path / "tv.pth")
        d2 = convert_weights(str(tmp_path / "tv.pth"), progress=False).state_dict
        with open(tmp_path / "d2.pkl", "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in d2.items()}, "__author__": "test"}, f)
        return tmp_path / "d2.pkl", dict(convention="torchvision")
    t = resnext_t7_from_torchvision(tv, quirks=False)
    del _mods(t)[8:]  # no classifier
    write_t7(tmp_path / "m.t7", t)
    return tmp_path / "m.t7", {}


def _swap_blocks(sd, a, b):
    out = dict(sd)
    for k in sd:
        if k.startswith(a + "."):
            out[k], out[b + k[len(a):]] = sd[b + k[len(a):]], sd[k]
    return out


WRONG_CONVERSIONS = {
    "res3.1 and res3.2 swapped": lambda sd: _swap_blocks(sd, "res3.1", "res3.2"),
    "a BN's running_var x4": lambda sd: {**sd, "res4.0.conv2.norm.running_var": sd["res4.0.conv2.norm.running_var"] * 4},
    "RGB/BGR stem flipped": lambda sd: {**sd, "stem.conv1.weight": sd["stem.conv1.weight"].flip(1)},
    "stem for 0-255 pixels": lambda sd: {**sd, "stem.conv1.weight": sd["stem.conv1.weight"] / 255},
}


@pytest.mark.parametrize("fmt", ["torch7", "caffe2-stats", "caffe2-affine", "detectron2", "torchvision", "timm"])
def test_verify_fails_a_wrong_conversion_of_every_format(fmt, tmp_path):
    """Each --verify reference computes the source network from the source file itself, not
    from the converted tensors: the right conversion passes and a conversion with two blocks
    swapped fails by far (a reference built from the converted weights would agree with it);
    for Torch7 also a BN statistic altered, the stem's channels reversed or scaled for
    another pixel range; for --to-rgb Caffe2 weights, verifying them as if not flipped. The
    references give res2..res5 and nothing else (the docstring's contract)."""
    import dataclasses

    from resnext_det.checkpoint import max_relative_error

    path, kw = _source_file(fmt, tmp_path)
    r = convert_weights(str(path), progress=False, **kw)
    assert r.format == fmt.split("-")[0] and r.metadata.arch.stage_blocks == (1, 3, 1, 1)
    x = normalized_input(size=32, seed=13)
    assert sorted(reference_features(r, x)) == list(STAGES)
    assert max_relative_error(verify_conversion(r, size=32, batch=1)) < TOL
    edits = WRONG_CONVERSIONS if fmt == "torch7" else dict(list(WRONG_CONVERSIONS.items())[:1])
    wrong = {name: dataclasses.replace(r, state_dict=edit(r.state_dict)) for name, edit in edits.items()}
    if r.flipped_to_rgb:  # --to-rgb weights verified as if they were not flipped
        wrong["--to-rgb not applied"] = dataclasses.replace(r, flipped_to_rgb=False)
    for name, bad in wrong.items():
        err = max_relative_error(verify_conversion(bad, size=32, batch=1))
        assert err > 1e-2, (name, err)


# --------------------------------------------------------------------------
# Layouts: stages found without stage containers; blocks refused at their place
# --------------------------------------------------------------------------
def _flat(tv):
    """All blocks (each its nn.Sequential) in the top nn.Sequential, no classifier: the
    stages can only be told apart by their projection shortcuts."""
    t = resnext_t7_from_torchvision(tv, quirks=False)
    top = _mods(t)
    _mods(t)[:] = top[:4] + [b for stage in top[4:8] for b in _mods(stage)]
    return t


def test_t7_flat_tree_with_a_form_a_block_names_that_block(tv_small, tmp_path):
    """In a flat tree a stage starts at a block whose shortcut is a conv + BN projection, and
    only a two-branch block has one: a form-(a) block (C paths + identity in its
    ConcatTable) inside res3 stays res3.1 and is refused as such, not miscounted as a new
    stage because its second branch (a path) holds conv + BN."""
    t = _flat(tv_small)
    concat = _mods(_mods(t)[6])[0]  # res3.1: stem (4 modules), res2.0, res3.0, res3.1
    branch, shortcut = _mods(concat)
    assert shortcut.typename == "nn.Identity"
    _mods(concat)[:] = [branch, branch, branch, shortcut]
    msg = _refused(tmp_path, "flat_form_a", t)
    assert "res3.1: a Torch7 residual block with 4 branches" in msg and "form (c)" in msg


def test_t7_stage_containers_with_inlined_blocks_convert_and_verify(tv_small, tmp_path):
    """Stage containers holding each block's modules inline (ConcatTable, CAddTable, ReLU with
    no nn.Sequential per block): the stages start at the projection shortcuts, the converted
    weights give torchvision's features and --verify's interpreter ends each stage where its
    container ends."""
    t = resnext_t7_from_torchvision(tv_small, quirks=False)
    for stage in _mods(t)[4:8]:
        _mods(stage)[:] = [m for b in _mods(stage) for m in _mods(b)]
    write_t7(tmp_path / "inline.t7", t)
    r = convert_weights(str(tmp_path / "inline.t7"), progress=False)
    assert r.metadata.arch.stage_blocks == (1, 2, 1, 2)
    x = normalized_input(size=32, seed=5)
    ref = tv_stages(tv_small, x)
    assert_same_features(converted_stages(r, x), ref, "converted")
    assert_same_features(reference_features(r, x), ref, "reference")


def _inlined_in_top(tv, *, classifier=False):
    """Every block's modules (ConcatTable, CAddTable, ReLU) inline in the network's top
    nn.Sequential (with or without the classifier after them): a block's ConcatTable has no
    container but the network."""
    t = resnext_t7_from_torchvision(tv, quirks=False)
    top = _mods(t)
    _mods(t)[:] = (top[:4] + [m for stage in top[4:8] for b in _mods(stage) for m in _mods(b)]
                   + (top[8:] if classifier else []))
    return t


def test_t7_blocks_inlined_in_the_top_sequential_convert(tv_small, tmp_path):
    """Blocks whose ConcatTable sits in the network's top nn.Sequential (no parent container
    above it) convert: the stages start at the projection shortcuts and the converted
    weights give torchvision's features."""
    write_t7(tmp_path / "inline_top.t7", _inlined_in_top(tv_small))
    r = convert_weights(str(tmp_path / "inline_top.t7"), progress=False)
    assert r.metadata.arch.stage_blocks == (1, 2, 1, 2)
    x = normalized_input(size=32, seed=5)
    assert_same_features(converted_stages(r, x), tv_stages(tv_small, x))


@pytest.mark.parametrize("classifier", [False, True])
def test_t7_blocks_inlined_in_the_top_sequential_can_be_verified(tv_small, tmp_path, classifier):
    """--verify's reference gives res2..res5 of a network whose blocks are inlined in its top
    nn.Sequential, as it does for the other layouts the converter takes (it recorded a stage
    when the container of its last block ended: here the whole network, so res5 only, or
    "cannot run a SpatialAveragePooling before res5" with the classifier there)."""
    write_t7(tmp_path / "inline_top.t7", _inlined_in_top(tv_small, classifier=classifier))
    r = convert_weights(str(tmp_path / "inline_top.t7"), progress=False)
    x = normalized_input(size=32, seed=5)
    assert_same_features(reference_features(r, x), tv_stages(tv_small, x))


def test_caffe2_file_with_bn_statistics_keeps_them_and_is_not_affine(tmp_path):
    """A Caffe2 file with _bn_rm/_bn_riv is BN-trained: its statistics are kept as the running
    mean/var (Detectron2's naming: riv is the running variance) and the metadata says "BN",
    not "affine" (which would warn about folded BN under a training-mode norm)."""
    import pickle

    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4, seed=7)
    blobs = tv_to_caffe2_blobs(tv.state_dict(), stats=True)
    with open(tmp_path / "stats.pkl", "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    r = convert_weights(str(tmp_path / "stats.pkl"), convention="fair", progress=False)
    assert r.metadata.weights_norm == "BN"
    for d2, c2 in (("stem.conv1.norm", "res_conv1"), ("res4.0.conv2.norm", "res4_0_branch2b"),
                   ("res5.0.shortcut.norm", "res5_0_branch1")):
        assert torch.equal(r.state_dict[d2 + ".running_mean"], torch.as_tensor(blobs[c2 + "_bn_rm"]))
        assert torch.equal(r.state_dict[d2 + ".running_var"], torch.as_tensor(blobs[c2 + "_bn_riv"]))


def test_t7_conv_fields_that_do_not_fit_its_weight_are_refused_clearly(tmp_path):
    """A convolution without kH (or nOutputPlane), or whose kH does not fit its weight, is a
    ConversionError naming the Torch7 module, like the other malformed trees."""
    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4)
    for name, edit in (("no_kH", lambda f: f.pop("kH")), ("no_nOutputPlane", lambda f: f.pop("nOutputPlane")),
                       ("kH_5", lambda f: f.update(kH=5))):
        t = resnext_t7_from_torchvision(tv, quirks=False)
        del _mods(t)[8:]
        edit(_mods(_mods(_mods(_mods(_mods(t)[5])[0])[0])[0])[3].fields)  # res3.0's grouped 3x3 conv
        msg = _refused(tmp_path, name, t)
        assert "res3.0.conv2" in msg and "SpatialConvolution" in msg and "kH" in msg, (name, msg)


def test_t7_form_b_block_of_the_resnext_release_is_refused_naming_it(tmp_path):
    """facebookresearch/ResNeXt's bottleneckType 'resnext_B' (form (b)): the residual branch
    is nn.Sequential(ConcatTable of C paths (1x1, 3x3), JoinTable, 1x1 conv, BN). Its inner
    ConcatTable is not taken for blocks of their own; the block is refused as not form (c),
    naming it."""
    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4)
    t = resnext_t7_from_torchvision(tv, quirks=False)
    del _mods(t)[8:]
    concat = _mods(_mods(_mods(t)[6])[0])[0]  # res4.0
    branch = _mods(concat)[0]
    c1, b1, relu, c2, b2, _, c3, b3 = _mods(branch)
    paths = T7("nn.ConcatTable", modules=[seq(c1, b1, relu, c2, b2, relu), seq(c1, b1, relu, c2, b2, relu)])
    _mods(concat)[0] = seq(paths, T7("nn.JoinTable", dimension=2), c3, b3)
    msg = _refused(tmp_path, "form_b", t)
    assert "res4.0: the residual branch has 1 conv" in msg and "forms (a)/(b)" in msg


def test_t7_flat_replica_in_a_data_parallel_table_converts_and_verifies(tv_small, tmp_path):
    """A flat network (blocks one after another, stages told by their projections) saved as
    replicas in an nn.DataParallelTable: each block is the nn.Sequential right above its
    ConcatTable (not the replica holding all of them), so the converted weights and --verify's
    interpreter both give torchvision's res2..res5."""
    t = seq(T7("nn.DataParallelTable", modules=[_flat(tv_small), _flat(tv_small)], dimension=1))
    write_t7(tmp_path / "dpt_flat.t7", t)
    tree = torchfile.load(str(tmp_path / "dpt_flat.t7"))
    _, stages = torch7_layout(tree)
    replica = tree.modules[0].modules[0]
    assert [[container for container, _ in s] for s in stages] == [
        replica.modules[4:5], replica.modules[5:7], replica.modules[7:8], replica.modules[8:10]]
    r = convert_weights(str(tmp_path / "dpt_flat.t7"), progress=False)
    x = normalized_input(size=32, seed=5)
    ref = tv_stages(tv_small, x)
    assert_same_features(converted_stages(r, x), ref, "converted")
    assert_same_features(reference_features(r, x), ref, "reference")


def test_torchvision_file_without_classifier_is_verified(tmp_path):
    """A torchvision backbone file without its fc (a feature-extractor checkpoint) is verified:
    the reference network's classifier is never run, so its absent weights are no error."""
    from resnext_det.checkpoint import max_relative_error

    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4, seed=14)
    torch.save({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, tmp_path / "nofc.pth")
    r = convert_weights(str(tmp_path / "nofc.pth"), progress=False)
    assert r.format == "torchvision" and r.dropped == []
    assert max_relative_error(verify_conversion(r, size=32, batch=1)) < TOL


def test_t7_conv_with_no_output_planes_or_kernel_fields_not_fitting_is_refused_clearly(tmp_path):
    """nOutputPlane 0 (no division by zero), and kH, kW whose product does not divide the
    weight though kH / kW would (kH=27, kW=3 on a 3x3 conv), are each a ConversionError
    naming the Torch7 module, not an arithmetic or reshape error."""
    tv = tv_resnext(layers=(1, 1, 1, 1), groups=2, width=4)
    for name, edit in (("nOutputPlane_0", lambda f: f.update(nOutputPlane=0)),
                       ("kH_27_kW_3", lambda f: f.update(kH=27, kW=3))):
        t = resnext_t7_from_torchvision(tv, quirks=False)
        del _mods(t)[8:]
        edit(_mods(_mods(_mods(_mods(_mods(t)[5])[0])[0])[0])[3].fields)  # res3.0's grouped 3x3 conv
        msg = _refused(tmp_path, name, t)
        assert "res3.0.conv2" in msg and "SpatialConvolution" in msg and "nOutputPlane" in msg, (name, msg)
