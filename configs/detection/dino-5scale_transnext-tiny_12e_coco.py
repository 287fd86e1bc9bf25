# DINO 5-scale, 12 epochs on COCO with TransNeXt-Tiny.
# Published: box mAP 55.7.
# As the 4-scale config, with all four stages (strides 4..32) feeding the
# neck, which adds a fifth level (stride 64), as mmdet's
# dino-5scale_swin-l_8xb2-12e_coco.py does.
_base_ = './dino-4scale_transnext-tiny_12e_coco.py'

num_levels = 5
model = dict(
    num_feature_levels=num_levels,
    backbone=dict(out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[72, 144, 288, 576], num_outs=num_levels),
    encoder=dict(layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels))))
