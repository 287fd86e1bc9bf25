# UperNet, 160k iterations on ADE20K 512x512 with TransNeXt-Tiny,
# single-scale test. Published: mIoU 51.1.
# mmseg's own R-50 config gives the data (data/ade/ADEChallengeData2016/), the
# UperNet and FCN heads and the 160k loop; the backbone, the heads' input
# channels, the optimizer, the schedule and the batch change.
_base_ = [
    'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py',
    './_base_/transnext_paramwise.py',
]
custom_imports = dict(imports=['mmtransnext'], allow_failed_imports=False)

# The ImageNet-1K checkpoint of the released TransNeXt-Tiny, placed by hand
# (see README.md); read only when init_weights() runs. Nothing is downloaded.
checkpoint = 'checkpoints/transnext_tiny_224_1k.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='TransNeXt',
        arch='tiny',
        # The position bias is built for 512 px inputs and resized to others;
        # offsets are measured in units of the 224 px pretraining grid.
        img_size=512,
        pretrain_size=224,
        drop_path_rate=0.4,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[72, 144, 288, 576], num_classes=150),
    auxiliary_head=dict(in_channels=288, num_classes=150))

# AdamW 6e-5, weight decay 0.05, none on the parameters the TransNeXt paper
# exempts (see _base_/transnext_paramwise.py).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={{_base_.transnext_no_decay}}))

# 1500 iterations of linear warm-up, then poly (power 1) decay to 0 at 160k.
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False),
]

# 8 GPUs x 2 images = 16 images per iteration, the published setting (mmseg's
# R-50 base runs 4 x 4, also 16).
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
