# DINO 4-scale, 12 epochs on COCO with TransNeXt-Tiny.
# Published: box mAP 55.1.
# mmdet's own R-50 DINO config gives the data (data/coco/), the detector, the
# 12-epoch schedule (step at epoch 11) and gradient clipping at 0.1; only the
# backbone, the neck's input channels and the optimizer's decay change.
_base_ = [
    'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py',
    './_base_/transnext_paramwise.py',
]
custom_imports = dict(imports=['mmtransnext'], allow_failed_imports=False)

# The ImageNet-1K checkpoint of the released TransNeXt-Tiny, placed by hand
# (see README.md); read only when init_weights() runs. Nothing is downloaded.
checkpoint = 'checkpoints/transnext_tiny_224_1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='TransNeXt',
        arch='tiny',
        img_size=800,
        pretrain_size=224,
        drop_path_rate=0.3,
        # 4-scale: the last three stages (strides 8, 16, 32); the neck adds
        # the fourth level (stride 64) below them.
        out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[144, 288, 576]))

# AdamW 1e-4 (mmdet's base), weight decay 0.05, gradient clipping 0.1 (base);
# the backbone learns at 0.1 x lr = 1e-5, and the parameters the TransNeXt
# paper exempts get no decay (see _base_/transnext_paramwise.py). The rest of
# the detector keeps lr 1e-4 and decay 0.05.
optim_wrapper = dict(
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(custom_keys={{_base_.transnext_backbone_lr_01}}))

# 8 GPUs x 2 images = 16 images per iteration, the published setting (the
# release ran 1 image per GPU with 2-step gradient accumulation, the same 16;
# auto_scale_lr's base_batch_size is 16 in mmdet's base config).
train_dataloader = dict(batch_size=2)
