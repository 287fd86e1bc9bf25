# Mask R-CNN 1x on COCO with TransNeXt-Base.
# Published: box mAP 51.7, mask mAP 45.9.
_base_ = './mask-rcnn_transnext-tiny_fpn_1x_coco.py'

checkpoint = 'checkpoints/transnext_base_224_1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))
