# Mask R-CNN 1x on COCO with TransNeXt-Small.
# Published: box mAP 51.1, mask mAP 45.5.
_base_ = './mask-rcnn_transnext-tiny_fpn_1x_coco.py'

checkpoint = 'checkpoints/transnext_small_224_1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[72, 144, 288, 576]))
