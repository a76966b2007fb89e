"""RetinaNet, ResNeXt-50 (32x4d) + FPN (P3-P7), 1x schedule (90k iter x 16 images), as a LazyConfig.

Detectron2's LazyConfig RetinaNet (model zoo ``common/models/retinanet.py``, as its
COCO-Detection/retinanet_R_50_FPN_1x.py) with our ResNeXt as the bottom-up network. Train with::

    python tools/lazyconfig_train_net.py --num-gpus 8 \\
        --config-file configs/new_baselines/retinanet_X_50_32x4d_FPN_1x.py

ImageNet weights: torchvision resnext50_32x4d IMAGENET1K_V1, named by ``train.init_checkpoint``:
downloaded, checked and converted on first use, then cached (docs/weights.md). Offline,
convert the file by hand and set ``train.init_checkpoint`` to the output::

    python tools/convert_pretrained.py resnext50_32x4d-7cdf4587.pth \\
        X-50-32x4d_torchvision.pth --arch X-50-32x4d

Input: RGB, ImageNet mean/std (torchvision's convention).
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from resnext_det.evaluation import FastCOCOEvaluator
from resnext_det.modeling import ResNeXt, ResNeXtSpec

dataloader = get_config("common/data/coco.py").dataloader
dataloader.evaluator._target_ = FastCOCOEvaluator  # Detectron2's COCOEvaluator with a compiled COCOeval
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
model = get_config("common/models/retinanet.py").model
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

dataloader.train.mapper.use_instance_mask = False  # boxes only
optimizer.lr = 0.01  # RetinaNet's learning rate is half of Faster R-CNN's

# X-50-32x4d: blocks [3, 4, 6, 3], C = 32 paths of width d = 4 in res2. RetinaNet has no P2.
model.backbone.bottom_up = L(ResNeXt)(
    spec=L(ResNeXtSpec)(
        stage_blocks=[3, 4, 6, 3],
        cardinality=32,
        bottleneck_width=4,
        form="c",
        norm="FrozenBN",  # the paper fine-tunes detection with frozen BN statistics
        stride_in_1x1=False,  # torchvision / timm / Torch7 weights stride in the 3x3 conv
        out_features=["res3", "res4", "res5"],
        freeze_at=2,
    ),
)
model.backbone.in_features = ["res3", "res4", "res5"]
# P6 is computed from res5, whose width is 256 * 8 = 2048 for every preset of the paper.
model.backbone.top_block.in_channels = 2048

model.input_format = "RGB"
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
dataloader.train.mapper.image_format = "RGB"

train.init_checkpoint = "torchvision://resnext50_32x4d.IMAGENET1K_V1"
