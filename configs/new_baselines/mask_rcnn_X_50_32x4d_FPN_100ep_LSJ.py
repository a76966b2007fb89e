"""Mask R-CNN, ResNeXt-50 (32x4d) + FPN from scratch, 100 epochs with large-scale jitter (LSJ).

Detectron2's new baseline ``new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py`` (SyncBN everywhere,
2-conv RPN head, 4conv1fc box head, 1024x1024 LSJ crops, batch 64, lr 0.1, AMP) with our
ResNeXt as the bottom-up network, trained from random initialisation ("Rethinking ImageNet
Pre-training", He et al. 2019). No ImageNet weights are needed. Train with::

    python tools/lazyconfig_train_net.py --num-gpus 8 \\
        --config-file configs/new_baselines/mask_rcnn_X_50_32x4d_FPN_100ep_LSJ.py

AMP needs a GPU: add ``train.amp.enabled=False`` to run it on a CPU. LSJ crops every image,
and cropping COCO's polygon masks needs the package ``shapely`` (in requirements.txt).
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from resnext_det.evaluation import FastCOCOEvaluator
from resnext_det.modeling import ResNeXt, ResNeXtSpec

_base = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader = _base.dataloader
dataloader.evaluator._target_ = FastCOCOEvaluator  # Detectron2's COCOEvaluator with a compiled COCOeval
lr_multiplier = _base.lr_multiplier
model = _base.model
optimizer = _base.optimizer
train = _base.train

# X-50-32x4d with SyncBN, nothing frozen: all of it is trained from scratch.
model.backbone.bottom_up = L(ResNeXt)(
    spec=L(ResNeXtSpec)(
        stage_blocks=[3, 4, 6, 3],
        cardinality=32,
        bottleneck_width=4,
        form="c",
        norm="SyncBN",
        stride_in_1x1=False,
        out_features=["res2", "res3", "res4", "res5"],
        freeze_at=0,
    ),
)
model.backbone.in_features = ["res2", "res3", "res4", "res5"]

# From scratch the input convention is free; keep the one of every other config here.
model.input_format = "RGB"
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
dataloader.train.mapper.image_format = "RGB"

train.init_checkpoint = ""  # from scratch
