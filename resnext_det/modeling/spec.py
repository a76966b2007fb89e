# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The one value that describes a ResNeXt trunk: :class:`ResNeXtSpec`.

It validates itself when created, so a yaml config (``MODEL.RESNEXT``), a
LazyConfig that builds it directly and a Python user get the same checks and the
same messages, which name the ``MODEL.RESNEXT`` key to change. The names follow
the paper (Xie et al., CVPR 2017, Sec. 3.3, Table 1): C is the cardinality, d the
bottleneck width of one path in res2; the width doubles each stage.
"""
from dataclasses import dataclass, fields
from typing import Optional, Tuple

from ..config import RESNEXT_ARCH_DEFAULTS
from ..presets import PRESETS, STAGE_BLOCKS, preset_name, standard_depth
from ..errors import ConfigError

__all__ = ["BLOCK_FORMS", "FEATURE_NAMES", "NORMS", "STAGE_NAMES", "ResNeXtSpec", "ResNeXtSpecError"]

BLOCK_FORMS = ("a", "b", "c")
#: The four stages of the trunk (Table 1: conv2..conv5), in Detectron2's names.
STAGE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_NAMES = ("stem",) + STAGE_NAMES
NORMS = ("FrozenBN", "BN", "SyncBN", "GN", "nnSyncBN", "naiveSyncBN", "LN", "")
# Group norm's groups in Detectron2's get_norm("GN", c).
_GN_GROUPS = 32


class ResNeXtSpecError(ConfigError):
    """An invalid architecture; the message names the ``MODEL.RESNEXT`` key."""


def _bad(key: str, value, allowed: str) -> ResNeXtSpecError:
    return ResNeXtSpecError(f"MODEL.RESNEXT.{key} = {value!r} is not valid: {allowed}.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_tuple(v) -> Optional[tuple]:
    """A list, tuple or LazyConfig (omegaconf) list as a tuple; None for anything else."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        return None
    return tuple(v)


@dataclass(frozen=True)
class ResNeXtSpec:
    """A validated, fully resolved ResNeXt architecture (``MODEL.RESNEXT``).

    Attributes (the ``MODEL.RESNEXT`` key of each in capitals):
        stage_blocks: blocks in res2..res5 (``STAGE_BLOCKS``, or from ``DEPTH``).
        cardinality: C, the number of paths (groups of the 3x3 conv).
        bottleneck_width: d, the width of one path in res2.
        form: the block form of Fig. 3, "a", "b" or "c" (``BLOCK_FORM``).
        norm: a Detectron2 norm name.
        stride_in_1x1: stride of downsampling blocks on the first 1x1 conv.
        res5_dilation: 1, or 2 to keep res5 at stride 16.
        out_features: names of the outputs ("stem", "res2".."res5").
        freeze_at: freeze the stem (1) and res2.. (2..5); 0 freezes nothing.
        stem_out_channels: output channels of the 7x7 stem conv (64).
        res2_out_channels: output channels of res2 (256); doubles each stage.
        channels_last: NHWC activations.
    """

    stage_blocks: Tuple[int, int, int, int]
    cardinality: int
    bottleneck_width: int
    form: str = "c"
    norm: str = "FrozenBN"
    stride_in_1x1: bool = False
    res5_dilation: int = 1
    out_features: Tuple[str, ...] = ("res4",)
    freeze_at: int = 2
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    channels_last: bool = False

    def __post_init__(self):
        blocks = _as_tuple(self.stage_blocks)
        if blocks is None or len(blocks) != 4 or not all(_is_int(b) and b > 0 for b in blocks):
            raise _bad("STAGE_BLOCKS", self.stage_blocks, "give 4 positive block counts for res2..res5")
        object.__setattr__(self, "stage_blocks", blocks)
        if not _is_int(self.cardinality) or self.cardinality < 1:
            raise _bad("CARDINALITY", self.cardinality, "the paper's C must be an integer >= 1 (e.g. 32)")
        if not _is_int(self.bottleneck_width) or self.bottleneck_width < 1:
            raise _bad(
                "BOTTLENECK_WIDTH", self.bottleneck_width, "the paper's d must be an integer >= 1 (e.g. 4)"
            )
        if self.form not in BLOCK_FORMS:
            raise _bad("BLOCK_FORM", self.form, f"choose one of {list(BLOCK_FORMS)} (Fig. 3)")
        if self.norm not in NORMS:
            raise _bad("NORM", self.norm, f"choose one of {list(NORMS)}")
        for key in ("STEM_OUT_CHANNELS", "RES2_OUT_CHANNELS"):
            v = getattr(self, key.lower())
            if not _is_int(v) or v < 1:
                raise _bad(key, v, "must be a positive integer")
        if self.norm == "GN":
            self._check_group_norm()
        if self.res5_dilation not in (1, 2):
            raise _bad("RES5_DILATION", self.res5_dilation, "choose 1 or 2")
        out = _as_tuple(self.out_features)
        if not out or any(f not in FEATURE_NAMES for f in out):
            raise _bad("OUT_FEATURES", self.out_features, f"name one or more of {list(FEATURE_NAMES)}")
        object.__setattr__(self, "out_features", out)
        if not _is_int(self.freeze_at) or not 0 <= self.freeze_at <= 5:
            raise _bad("FREEZE_AT", self.freeze_at, "choose 0 (train all) .. 5 (freeze stem and res2..res5)")
        object.__setattr__(self, "stride_in_1x1", bool(self.stride_in_1x1))
        object.__setattr__(self, "channels_last", bool(self.channels_last))

    def _check_group_norm(self) -> None:
        """Every normalised width must split into GN's 32 groups: the stem, the
        C*d of each stage's bottleneck and each stage's output."""
        widths = [("MODEL.RESNEXT.STEM_OUT_CHANNELS", self.stem_out_channels)]
        for i in range(4):
            widths.append(
                (
                    "MODEL.RESNEXT.CARDINALITY x MODEL.RESNEXT.BOTTLENECK_WIDTH (C*d of res2, doubled "
                    "per stage)",
                    self.cardinality * self.bottleneck_width * 2**i,
                )
            )
            widths.append(("MODEL.RESNEXT.RES2_OUT_CHANNELS (doubled per stage)", self.res2_out_channels * 2**i))
        for what, c in widths:
            if c % _GN_GROUPS:
                raise ResNeXtSpecError(
                    f"MODEL.RESNEXT.NORM = 'GN' splits channels into {_GN_GROUPS} groups, but {what} "
                    f"gives {c} channels, not a multiple of {_GN_GROUPS}: change that key or the norm."
                )

    # -- constructors --------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "ResNeXtSpec":
        """The spec of a named model of the paper (``"X-101-32x8d"``, ``"R-50"``,
        a Table 2 setting such as ``"8x14d"``); ``kwargs`` set the other fields."""
        if name not in PRESETS:
            raise _bad("PRESET", name, f"choose one of {sorted(PRESETS)} or '' (none)")
        p = PRESETS[name]
        return cls(
            stage_blocks=tuple(STAGE_BLOCKS[p.depth]),
            cardinality=p.cardinality,
            bottleneck_width=p.bottleneck_width,
            **kwargs,
        )

    @classmethod
    def from_config(cls, cfg) -> "ResNeXtSpec":
        """Read ``cfg.MODEL.RESNEXT``; errors name the key to change."""
        r = cfg.MODEL.RESNEXT
        # fmt: off
        depth             = r.DEPTH
        cardinality       = r.CARDINALITY
        bottleneck_width  = r.BOTTLENECK_WIDTH
        # fmt: on
        if r.PRESET:
            if r.PRESET not in PRESETS:
                raise _bad("PRESET", r.PRESET, f"choose one of {sorted(PRESETS)} or '' (none)")
            preset = PRESETS[r.PRESET]
            for key, ours, theirs in (
                ("DEPTH", depth, preset.depth),
                ("CARDINALITY", cardinality, preset.cardinality),
                ("BOTTLENECK_WIDTH", bottleneck_width, preset.bottleneck_width),
            ):
                # A key left at its default does not disagree with the preset.
                if ours not in (theirs, RESNEXT_ARCH_DEFAULTS[key]):
                    raise ResNeXtSpecError(
                        f"MODEL.RESNEXT.PRESET = {r.PRESET!r} sets {key} = {theirs}, but "
                        f"MODEL.RESNEXT.{key} = {ours}: remove one of the two."
                    )
            depth, cardinality, bottleneck_width = preset
        if r.STAGE_BLOCKS:
            blocks = list(r.STAGE_BLOCKS)
        elif depth in STAGE_BLOCKS:
            blocks = STAGE_BLOCKS[depth]
        else:
            raise _bad(
                "DEPTH",
                depth,
                f"choose one of {sorted(STAGE_BLOCKS)}, or set MODEL.RESNEXT.STAGE_BLOCKS "
                "to 4 block counts for a custom depth",
            )
        return cls(
            stage_blocks=tuple(blocks),
            cardinality=cardinality,
            bottleneck_width=bottleneck_width,
            form=r.BLOCK_FORM,
            norm=r.NORM,
            stride_in_1x1=r.STRIDE_IN_1X1,
            res5_dilation=r.RES5_DILATION,
            out_features=tuple(r.OUT_FEATURES),
            freeze_at=r.FREEZE_AT,
            stem_out_channels=r.STEM_OUT_CHANNELS,
            res2_out_channels=r.RES2_OUT_CHANNELS,
            channels_last=r.get("CHANNELS_LAST", False),
        )

    # -- what it is ----------------------------------------------------------
    @property
    def depth(self) -> int:
        """3 layers a block, plus the stem conv and the classifier, as the paper counts."""
        return 3 * sum(self.stage_blocks) + 2

    @property
    def standard_depth(self) -> Optional[int]:
        """The ``MODEL.RESNEXT.DEPTH`` whose block table is ``stage_blocks``, if any."""
        return standard_depth(self.stage_blocks)

    @property
    def preset(self) -> str:
        """The name of this architecture in :data:`~resnext_det.presets.PRESETS`, or ""."""
        return preset_name(
            self.stage_blocks,
            self.cardinality,
            self.bottleneck_width,
            stem_out_channels=self.stem_out_channels,
            res2_out_channels=self.res2_out_channels,
        )

    #: The fields that decide the shapes of the weights (what a checkpoint must match).
    SHAPE_FIELDS = ("stage_blocks", "cardinality", "bottleneck_width", "stem_out_channels", "res2_out_channels")

    def same_shapes(self, other: "ResNeXtSpec") -> bool:
        """Whether weights of ``self`` have the shapes of ``other``'s."""
        return all(getattr(self, k) == getattr(other, k) for k in self.SHAPE_FIELDS)

    def describe(self) -> str:
        name = self.preset or f"depth {self.depth}"
        return (
            f"{name} (blocks {list(self.stage_blocks)}, C={self.cardinality}, "
            f"d={self.bottleneck_width}, stem {self.stem_out_channels}, "
            f"res2 {self.res2_out_channels} channels)"
        )

    def replace(self, **changes) -> "ResNeXtSpec":
        """A copy with ``changes`` (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return type(self)(**values)

    def stage_args(self, stage: int) -> dict:
        """Keyword arguments of :func:`make_resnext_stage` for res{stage} (2..5)."""
        i = stage - 2
        dilation = self.res5_dilation if stage == 5 else 1
        first_stride = 1 if stage == 2 or dilation > 1 else 2
        in_channels = self.stem_out_channels if stage == 2 else self.res2_out_channels * 2 ** (i - 1)
        return dict(
            num_blocks=self.stage_blocks[i],
            in_channels=in_channels,
            out_channels=self.res2_out_channels * 2**i,
            # "the width of the bottleneck doubles when the feature map is downsampled"
            bottleneck_width=self.bottleneck_width * 2**i,
            cardinality=self.cardinality,
            first_stride=first_stride,
            dilation=dilation,
            norm=self.norm,
            stride_in_1x1=self.stride_in_1x1,
            form=self.form,
        )
