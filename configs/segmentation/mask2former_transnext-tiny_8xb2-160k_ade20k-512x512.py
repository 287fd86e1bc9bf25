# Mask2Former, 160k iterations on ADE20K 512x512 with TransNeXt-Tiny.
# Published: mIoU 53.4 (single scale).
# mmseg's own R-50 config gives the data (data/ade/ADEChallengeData2016/), the
# head (mmdet's pixel decoder and transformer decoder), AdamW 1e-4 with weight
# decay 0.05, gradient clipping at 0.01, the poly schedule and the batch;
# only the backbone, the head's input channels and the backbone's
# parameter-wise settings change.
_base_ = [
    'mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py',
    './_base_/transnext_paramwise.py',
]
# mmdet.models for the head's parts (as in the base), mmtransnext for ours.
custom_imports = dict(
    imports=['mmdet.models', 'mmtransnext'], allow_failed_imports=False)

# The ImageNet-1K checkpoint of the released TransNeXt-Tiny, placed by hand
# (see README.md); read only when init_weights() runs. Nothing is downloaded.
checkpoint = 'checkpoints/transnext_tiny_224_1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='TransNeXt',
        arch='tiny',
        img_size=512,
        pretrain_size=224,
        # The released Mask2Former models use the detection rates.
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[72, 144, 288, 576]))

# The backbone learns at 0.1 x lr (as the base already sets) and the
# parameters the TransNeXt paper exempts get no decay; the base keeps the
# head's query_embed / query_feat / level_embed and norms without decay.
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={{_base_.transnext_backbone_lr_01}}))

# 8 GPUs x 2 images = 16 images per iteration (the base's batch_size=2),
# the published setting; auto_scale_lr's base_batch_size is 16 in the base.
train_dataloader = dict(batch_size=2)
