"""Small configs of each model family for the tool tests (shrunk TransNeXt backbone),
and checkpoints in the released layouts built from a model's own state dict."""
import argparse
from pathlib import Path

import torch

SMALL_ARCH = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1],
                  mlp_ratios=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1],
                  window_size=[3, 3, 3, None])
DIMS = SMALL_ARCH['embed_dims']
CLASSES = ('circle', 'square', 'triangle')
PALETTE = [[220, 20, 60], [0, 120, 255], [255, 180, 0]]



def _backbone(out):
    return (f"dict(_delete_=True, type='TransNeXt', arch={SMALL_ARCH!r}, img_size=128, "
            f"pretrain_size=224, out_indices={out})")


_CONFIGS = {
    'mask-rcnn': f"""
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_instance.py']
default_scope = 'mmdet'
custom_imports = dict(imports=['mmtransnext'], allow_failed_imports=False)
model = dict(
    backbone={_backbone((0, 1, 2, 3))},
    neck=dict(in_channels={DIMS}, out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes={len(CLASSES)}),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(num_convs=1, in_channels=32, conv_out_channels=32,
                       num_classes={len(CLASSES)})))
""",
    'dino': f"""
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py']
custom_imports = dict(imports=['mmtransnext'], allow_failed_imports=False)
model = dict(
    num_queries=20,
    backbone={_backbone((1, 2, 3))},
    neck=dict(in_channels={DIMS[1:]}, out_channels=32),
    encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=dict(embed_dims=32),
                 ffn_cfg=dict(embed_dims=32, feedforward_channels=64))),
    decoder=dict(num_layers=2, layer_cfg=dict(self_attn_cfg=dict(embed_dims=32),
                 cross_attn_cfg=dict(embed_dims=32),
                 ffn_cfg=dict(embed_dims=32, feedforward_channels=64))),
    positional_encoding=dict(num_feats=16),
    bbox_head=dict(num_classes={len(CLASSES)}, embed_dims=32),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=10)))
""",
    'upernet': f"""
_base_ = ['mmseg::_base_/models/upernet_r50.py', 'mmseg::_base_/datasets/ade20k.py']
default_scope = 'mmseg'
custom_imports = dict(imports=['mmtransnext'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    backbone={_backbone((0, 1, 2, 3))},
    decode_head=dict(in_channels={DIMS}, channels=32, num_classes={len(CLASSES)},
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels={DIMS[2]}, channels=16, num_classes={len(CLASSES)},
                        norm_cfg=norm_cfg))
""",
    'mask2former': f"""
_base_ = ['mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmtransnext'], allow_failed_imports=False)
model = dict(
    backbone={_backbone((0, 1, 2, 3))},
    decode_head=dict(
        in_channels={DIMS}, feat_channels=32, out_channels=32, num_queries=10,
        num_classes={len(CLASSES)},
        pixel_decoder=dict(
            encoder=dict(num_layers=1, layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=32),
                ffn_cfg=dict(embed_dims=32, feedforward_channels=64))),
            positional_encoding=dict(num_feats=16)),
        positional_encoding=dict(num_feats=16),
        transformer_decoder=dict(num_layers=1, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=32), cross_attn_cfg=dict(embed_dims=32),
            ffn_cfg=dict(embed_dims=32, feedforward_channels=64)))))
""",
}


def write_config(directory: Path, family: str) -> Path:
    """A small config of ``family`` ('mask-rcnn', 'dino', 'upernet', 'mask2former')."""
    path = Path(directory) / f'small_{family}.py'
    path.write_text(_CONFIGS[family])
    return path


def _optimizer_state(state_dict):
    return {'state': {0: {'step': torch.tensor(3.), 'exp_avg': torch.zeros(2)}},
            'param_groups': [{'lr': 1e-4, 'weight_decay': 0.05, 'params': [0]}]}


#: Whether this torch reads an ``argparse.Namespace`` weights-only (scoped
#: ``torch.serialization.safe_globals``, torch >= 2.5); before, the converter refuses
#: such files with a message naming the class.
NAMESPACE_LOADS = hasattr(torch.serialization, 'safe_globals')


def released_imagenet(backbone_state, with_args=True):
    """The classification release's layout: 'model' with head.*, trainer state beside
    (with its ``argparse.Namespace`` of arguments unless ``with_args`` is False)."""
    weights = dict(backbone_state)
    weights['head.weight'] = torch.randn(1000, DIMS[-1])
    weights['head.bias'] = torch.randn(1000)
    checkpoint = {'model': weights, 'optimizer': _optimizer_state(weights), 'epoch': 299,
                  'lr_scheduler': {'last_epoch': 299}, 'max_accuracy': 84.0}
    if with_args:
        checkpoint['args'] = argparse.Namespace(model='transnext_tiny', input_size=224)
    return checkpoint


def released_mmdet2(state):
    """mmdet 2.x (mmcv 1.x runner): meta with CLASSES and config text; a stored
    position table in the backbone (as an earlier reference version would have)."""
    weights = dict(state)
    weights['backbone.relative_pos_index1'] = torch.zeros(16, 4, dtype=torch.long)
    weights['backbone.relative_coords_table1'] = torch.zeros(9, 2)
    return {'meta': {'mmdet_version': '2.28.2', 'mmcv_version': '1.7.1', 'CLASSES': CLASSES,
                     'config': "model = dict(type='MaskRCNN')", 'epoch': 12, 'iter': 87960,
                     'hook_msgs': {'last_ckpt': 'work_dirs/epoch_12.pth'}},
            'state_dict': weights, 'optimizer': _optimizer_state(weights)}


def released_mmengine(state, family_version):
    """mmengine runner (mmdet 3.0 / mmseg 1.0): dataset_meta already; trainer state."""
    return {'meta': {'dataset_meta': {'classes': CLASSES, 'palette': PALETTE},
                     'mmengine_version': '0.7.2', family_version[0]: family_version[1],
                     'epoch': 12, 'iter': 90000, 'cfg': "model = dict()", 'seed': 0,
                     'experiment_name': 'run'},
            'state_dict': dict(state), 'message_hub': {'log_scalars': {}},
            'optimizer': _optimizer_state(state),
            'param_schedulers': [{'last_epoch': 12}]}


def released_mmseg0(state):
    """mmseg 0.x (mmcv 1.x runner): meta with CLASSES and PALETTE."""
    return {'meta': {'mmseg_version': '0.30.0', 'mmcv_version': '1.7.1', 'CLASSES': CLASSES,
                     'PALETTE': PALETTE, 'config': '', 'iter': 160000},
            'state_dict': dict(state), 'optimizer': _optimizer_state(state)}
