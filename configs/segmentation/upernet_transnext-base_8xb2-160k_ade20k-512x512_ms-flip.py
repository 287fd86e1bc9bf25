# UperNet with TransNeXt-Base, multi-scale + flip test (test-only config; see
# the tiny one). Published: mIoU 53.5-53.7 (ms+flip).
_base_ = './upernet_transnext-tiny_8xb2-160k_ade20k-512x512_ms-flip.py'

checkpoint = 'checkpoints/transnext_base_224_1k.pth'
model = dict(
    module=dict(
        backbone=dict(
            arch='base',
            drop_path_rate=0.7,
            init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
        decode_head=dict(in_channels=[96, 192, 384, 768]),
        auxiliary_head=dict(in_channels=384)))
