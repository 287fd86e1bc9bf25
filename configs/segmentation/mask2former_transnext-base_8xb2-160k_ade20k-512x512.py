# Mask2Former, 160k iterations on ADE20K 512x512 with TransNeXt-Base.
# Published: mIoU 54.7 (single scale).
_base_ = './mask2former_transnext-tiny_8xb2-160k_ade20k-512x512.py'

checkpoint = 'checkpoints/transnext_base_224_1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[96, 192, 384, 768]))
