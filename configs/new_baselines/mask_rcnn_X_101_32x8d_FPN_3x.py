"""Mask R-CNN, ResNeXt-101 (32x8d) + FPN, 3x schedule (270k iter x 16 images), as a LazyConfig.

The recipe of ``mask_rcnn_X_50_32x4d_FPN_1x.py`` with the deeper, wider backbone and the 3x
schedule: the LazyConfig counterpart of Detectron2's mask_rcnn_X_101_32x8d_FPN_3x.yaml.

ImageNet weights: torchvision resnext101_32x8d IMAGENET1K_V1, named by ``train.init_checkpoint``:
downloaded, checked and converted on first use, then cached (docs/weights.md). Offline,
convert the file by hand and set ``train.init_checkpoint`` to the output::

    python tools/convert_pretrained.py resnext101_32x8d-8ba56ff5.pth \\
        X-101-32x8d_torchvision.pth --arch X-101-32x8d

PITFALL: Detectron2's own ImageNetPretrained/FAIR/X-101-32x8d.pkl is a Caffe2 model with
another input convention: BGR, pixel_mean [103.530, 116.280, 123.675], pixel_std
[57.375, 57.120, 58.395]. With that file set ``model.input_format``,
``dataloader.train.mapper.image_format``, ``model.pixel_mean`` and ``model.pixel_std`` to those.
"""
from detectron2.model_zoo import get_config

from .mask_rcnn_X_50_32x4d_FPN_1x import dataloader, model, optimizer, train

# X-101-32x8d: blocks [3, 4, 23, 3], C = 32 paths of width d = 8 in res2.
model.backbone.bottom_up.spec.stage_blocks = [3, 4, 23, 3]
model.backbone.bottom_up.spec.cardinality = 32
model.backbone.bottom_up.spec.bottleneck_width = 8

# 3x: 270k iterations, lr x0.1 at 210k and 250k (Detectron2's default_X_scheduler(3)).
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x
train.max_iter = 270000

train.init_checkpoint = "torchvision://resnext101_32x8d.IMAGENET1K_V1"
