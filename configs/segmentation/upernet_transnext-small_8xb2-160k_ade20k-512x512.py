# UperNet, 160k iterations on ADE20K 512x512 with TransNeXt-Small,
# single-scale test. Published: mIoU 52.2.
_base_ = './upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py'

checkpoint = 'checkpoints/transnext_small_224_1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[72, 144, 288, 576]),
    auxiliary_head=dict(in_channels=288))
