"""Torch7 .t7 weights (the paper's official release format).

The test writes real .t7 files in Torch7's binary serialisation format (the
format ``torch.save`` of Lua Torch writes, which the ``torchfile`` package reads)
with the module tree of facebookresearch/ResNeXt's ``models/resnext.lua``
(fb.resnet.torch layout): nn.Sequential(conv, BN, ReLU, max-pool, 4 stage
nn.Sequentials of blocks nn.Sequential(nn.ConcatTable(branch, shortcut),
nn.CAddTable, ReLU), avg-pool, view, linear). The weights are a torchvision
ResNeXt's; the converted checkpoint must give torchvision's features.
"""
import struct

import numpy as np
import pytest
import torch

from resnext_det.checkpoint import ConversionError, config_pairs, convert_weights, verify_conversion

from test_convert_pretrained import (
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
        elif isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o, dtype=np.float32)
            self._int(self.TORCH)
            self._int(self._new_index())
            self._string("V 1")
            self._string("torch.FloatTensor")
            self._int(a.ndim)
            for n in a.shape:
                self._long(n)
            for s in a.strides:
                self._long(s // 4)
            self._long(1)  # storage offset, 1-based
            self._int(self.TORCH)
            self._int(self._new_index())
            self._string("V 1")
            self._string("torch.FloatStorage")
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


def resnext_t7_from_torchvision(tv, *, quirks=True):
    """fb.resnet.torch's module tree holding ``tv``'s weights. With ``quirks``,
    also the variations of real files: conv biases (folded into BN), other BN
    eps, legacy running_std, nn.SpatialConvolutionMM matrices."""
    sd = tv.state_dict()
    g = torch.Generator().manual_seed(11)
    relu = lambda: T7("cudnn.ReLU", inplace=True)  # noqa: E731
    stem_bias = torch.randn(sd["conv1.weight"].shape[0], generator=g) if quirks else None
    model = [
        conv(sd["conv1.weight"], 2, 3, bias=stem_bias, typename="nn.SpatialConvolution"),
        bn(sd, "bn1", mean_shift=stem_bias),  # BN(conv + b) needs mean + b to equal torchvision
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
                conv(sd[p + ".conv1.weight"]),
                bn(sd, p + ".bn1", legacy_std=quirks and i == 3),
                relu(),
                conv(sd[p + ".conv2.weight"], stride, 1, groups=groups),
                bn(sd, p + ".bn2", eps=eps2),
                relu(),
                conv(sd[p + ".conv3.weight"], typename="nn.SpatialConvolutionMM" if quirks else "cudnn.SpatialConvolution"),
                bn(sd, p + ".bn3"),
            )
            if block.downsample is not None:
                shortcut = seq(conv(sd[p + ".downsample.0.weight"], stride), bn(sd, p + ".downsample.1"))
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
    import torchfile

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
