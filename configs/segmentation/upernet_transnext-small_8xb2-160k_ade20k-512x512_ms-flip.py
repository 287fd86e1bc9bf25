# UperNet with TransNeXt-Small, multi-scale + flip test (test-only config; see
# the tiny one). Published: mIoU 52.5-52.8 (ms+flip).
_base_ = './upernet_transnext-tiny_8xb2-160k_ade20k-512x512_ms-flip.py'

checkpoint = 'checkpoints/transnext_small_224_1k.pth'
model = dict(
    module=dict(
        backbone=dict(
            arch='small',
            drop_path_rate=0.6,
            init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
        decode_head=dict(in_channels=[72, 144, 288, 576]),
        auxiliary_head=dict(in_channels=288)))
