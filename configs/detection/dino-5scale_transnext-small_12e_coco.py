# DINO 5-scale, 12 epochs on COCO with TransNeXt-Small.
# Published: box mAP 56.6.
_base_ = './dino-5scale_transnext-tiny_12e_coco.py'

checkpoint = 'checkpoints/transnext_small_224_1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[72, 144, 288, 576]))
