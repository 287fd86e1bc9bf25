# DINO 5-scale, 12 epochs on COCO with TransNeXt-Base.
# Published: box mAP 57.1.
_base_ = './dino-5scale_transnext-tiny_12e_coco.py'

checkpoint = 'checkpoints/transnext_base_224_1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))
