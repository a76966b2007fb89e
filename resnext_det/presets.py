# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Named architectures of the paper, and the block tables of each depth.

"X-50-32x4d" reads as in the paper: depth 50, cardinality C=32, bottleneck
width d=4 (per path, in res2). The Table 2 settings ("1x64d" ... "32x4d") are
the 50-layer models of roughly equal complexity that Table 2/3 compare.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence

__all__ = ["STAGE_BLOCKS", "PRESETS", "Preset", "preset_name", "standard_depth"]

# Blocks in res2..res5 for each depth. 50/101/152 are the paper's (Table 1,
# as ResNet); 26 and 38 are the small models timm and others use ([2]*4, [3]*4)
# and fit a CPU.
STAGE_BLOCKS: Dict[int, List[int]] = {
    26: [2, 2, 2, 2],
    38: [3, 3, 3, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


class Preset(NamedTuple):
    depth: int
    cardinality: int
    bottleneck_width: int


PRESETS: Dict[str, Preset] = {
    # The paper's named models (Table 3/5, and the public ImageNet releases).
    "X-50-32x4d": Preset(50, 32, 4),
    "X-101-32x4d": Preset(101, 32, 4),
    "X-101-64x4d": Preset(101, 64, 4),
    "X-101-32x8d": Preset(101, 32, 8),
    "X-152-32x8d": Preset(152, 32, 8),
    # Their ResNet baselines: C=1, d=64 is exactly a ResNet bottleneck.
    "R-50": Preset(50, 1, 64),
    "R-101": Preset(101, 1, 64),
    "R-152": Preset(152, 1, 64),
    # Table 2: 50-layer settings at (about) equal complexity.
    "1x64d": Preset(50, 1, 64),
    "2x40d": Preset(50, 2, 40),
    "4x24d": Preset(50, 4, 24),
    "8x14d": Preset(50, 8, 14),
    "32x4d": Preset(50, 32, 4),
}


def standard_depth(stage_blocks: Sequence[int]) -> Optional[int]:
    """The depth whose block table (:data:`STAGE_BLOCKS`) is ``stage_blocks``, or None."""
    for depth, blocks in STAGE_BLOCKS.items():
        if list(blocks) == list(stage_blocks):
            return depth
    return None


def preset_name(
    stage_blocks: Sequence[int],
    cardinality: int,
    bottleneck_width: int,
    *,
    stem_out_channels: int = 64,
    res2_out_channels: int = 256,
) -> str:
    """The reverse of :data:`PRESETS`: the name of this architecture, or "".

    The paper's names ("X-50-32x4d", "R-50") win over the Table 2 aliases, which
    come later in the table. Only the paper's widths (stem 64, res2 256) have a name.
    """
    if (stem_out_channels, res2_out_channels) != (64, 256):
        return ""
    for name, p in PRESETS.items():
        if STAGE_BLOCKS[p.depth] == list(stage_blocks) and (p.cardinality, p.bottleneck_width) == (
            cardinality,
            bottleneck_width,
        ):
            return name
    return ""
