# Mask R-CNN 1x (12 epochs) on COCO with TransNeXt-Tiny.
# Published: box mAP 49.9, mask mAP 44.6.
# mmdet's own R-50 config gives the data (data/coco/), the heads and the 1x
# schedule (500 linear warm-up iterations, steps at epochs 8 and 11); only the
# backbone, the neck's input channels and the optimizer change.
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    './_base_/transnext_paramwise.py',
]
custom_imports = dict(imports=['mmtransnext'], allow_failed_imports=False)

# The ImageNet-1K checkpoint of the released TransNeXt-Tiny, placed by hand
# (see README.md); it is read only when the model's init_weights() runs, i.e.
# at the start of training. Nothing is downloaded.
checkpoint = 'checkpoints/transnext_tiny_224_1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='TransNeXt',
        arch='tiny',
        # The position bias is built for 800 px inputs and resized to others;
        # offsets are measured in units of the 224 px pretraining grid.
        img_size=800,
        pretrain_size=224,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[72, 144, 288, 576]))

# AdamW 1e-4, weight decay 0.05, none on the parameters the TransNeXt paper
# exempts (see _base_/transnext_paramwise.py); no gradient clipping.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={{_base_.transnext_no_decay}}))

# 8 GPUs x 2 images = 16 images per iteration, the published setting (and
# auto_scale_lr's base_batch_size in mmdet's base config).
train_dataloader = dict(batch_size=2)
