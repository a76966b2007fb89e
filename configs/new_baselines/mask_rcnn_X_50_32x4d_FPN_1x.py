"""Mask R-CNN, ResNeXt-50 (32x4d) + FPN, 1x schedule (90k iter x 16 images), as a LazyConfig.

Detectron2's own LazyConfig recipe (model zoo ``common/models/mask_rcnn_fpn.py``, COCO data,
SGD, the 1x schedule) with its ResNet bottom-up swapped for our ResNeXt (Xie et al., CVPR 2017).
Train with::

    python tools/lazyconfig_train_net.py --num-gpus 8 \\
        --config-file configs/new_baselines/mask_rcnn_X_50_32x4d_FPN_1x.py

ImageNet weights: torchvision resnext50_32x4d IMAGENET1K_V1, named by ``train.init_checkpoint``:
downloaded, checked and converted on first use, then cached (docs/weights.md). Offline,
convert the file by hand and set ``train.init_checkpoint`` to the output::

    python tools/convert_pretrained.py resnext50_32x4d-7cdf4587.pth \\
        X-50-32x4d_torchvision.pth --arch X-50-32x4d

Input: RGB, ImageNet mean/std (torchvision's convention; Detectron2's common recipe uses BGR
for MSRA weights, which these are not).
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from resnext_det.evaluation import FastCOCOEvaluator
from resnext_det.modeling import ResNeXt, ResNeXtSpec

dataloader = get_config("common/data/coco.py").dataloader
dataloader.evaluator._target_ = FastCOCOEvaluator  # Detectron2's COCOEvaluator with a compiled COCOeval
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
model = get_config("common/models/mask_rcnn_fpn.py").model
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

# The bottom-up network: our ResNeXt. X-50-32x4d: blocks [3, 4, 6, 3]
# (resnext_det.STAGE_BLOCKS[50]), C = 32 paths of width d = 4 in res2 (doubling each stage),
# computed as one grouped conv (the paper's Fig. 3c form).
model.backbone.bottom_up = L(ResNeXt)(
    spec=L(ResNeXtSpec)(
        stage_blocks=[3, 4, 6, 3],
        cardinality=32,
        bottleneck_width=4,
        form="c",
        norm="FrozenBN",  # the paper fine-tunes detection with frozen BN statistics
        stride_in_1x1=False,  # torchvision / timm / Torch7 weights stride in the 3x3 conv
        out_features=["res2", "res3", "res4", "res5"],
        freeze_at=2,  # stem and res2 frozen, as Detectron2's R-50 recipes
    ),
)
# Detectron2's recipe reads these from ResNet's own ``out_features`` argument, which ours keeps
# in the spec: name them here.
model.backbone.in_features = ["res2", "res3", "res4", "res5"]

# torchvision's input convention, on Detectron2's 0-255 scale.
model.input_format = "RGB"
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
dataloader.train.mapper.image_format = "RGB"  # the test mapper follows the train mapper

train.init_checkpoint = "torchvision://resnext50_32x4d.IMAGENET1K_V1"
