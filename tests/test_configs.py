"""The user-facing configs: every one builds, matches the spec, and trains.

* every config under ``configs/`` parses and builds its whole model from its
  own library's registry (mmdet or mmseg), and a released variant's backbone has
  the spec's parameter count (spec counts include a 1000-class head);
* the published backbone settings reach the backbone (img_size, pretrain_size,
  drop-path rate, checkpoint, stage outputs wired to the neck/head channels);
* the built optimizer gives every backbone parameter the right learning rate
  and the spec's no-decay parameters weight decay 0, and leaves the heads alone;
* for each family (Mask R-CNN, DINO, UperNet, Mask2Former) one training step
  (loss, backward, optimizer step) and one prediction run on the CPU with the
  real heads, the backbone shrunk to one block per stage by config override.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import BaseTTAModel, revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData, PixelData

import mmdet.registry
import mmseg.registry
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmdet.utils import register_all_modules as register_mmdet
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules as register_mmseg

import mmtransnext  # noqa: F401  (registers TransNeXt)
from mmtransnext.models import ARCH_SETTINGS

register_mmdet(init_default_scope=False)
register_mmseg(init_default_scope=False)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / 'configs').rglob('*.py') if '_base_' not in p.parts)
CONFIG_IDS = [str(p.relative_to(REPO / 'configs')) for p in CONFIGS]
PUBLISHED = [p for p in CONFIGS if p.parent.name in ('detection', 'segmentation')]

# From docs/transnext-spec.md: parameters with a 1000-class head, last-stage channels.
SPEC_PARAMS = {'micro': (12_809_304, 384), 'tiny': (28_258_960, 576),
               'small': (49_741_564, 576), 'base': (89_721_496, 768)}
DROP_PATH = {  # (tiny, small, base); Mask2Former: the released models' values
    'mask-rcnn': (0.3, 0.5, 0.6), 'dino': (0.3, 0.5, 0.6),
    'upernet': (0.4, 0.6, 0.7), 'mask2former': (0.3, 0.5, 0.6)}
# family: (base lr, weight decay, backbone lr multiplier)
OPTIM = {'mask-rcnn': (1e-4, 0.05, 1.0), 'dino': (1e-4, 0.05, 0.1),
         'upernet': (6e-5, 0.05, 1.0), 'mask2former': (1e-4, 0.05, 0.1)}
NO_DECAY_NAMES = ('query_embedding', 'relative_pos_bias_local', 'cpb', 'temperature')


def family(path):
    head = Path(path).name.split('_')[0]
    return 'dino' if head.startswith('dino') else head


def load(path, **overrides):
    """The config with dotted keys replaced (not merged: an arch name becomes a dict)."""
    cfg = Config.fromfile(str(path))
    for key, value in overrides.items():
        *parents, last = key.split('.')
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def registry(cfg):
    scope = cfg.get('default_scope')
    assert scope in ('mmdet', 'mmseg'), f'unexpected default_scope {scope!r}'
    return scope, (mmdet.registry.MODELS if scope == 'mmdet' else mmseg.registry.MODELS)


def build(cfg):
    """The whole model, built from the config's own library (mmdet or mmseg)."""
    scope, models = registry(cfg)
    with DefaultScope.overwrite_default_scope(scope):
        model = models.build(cfg.model)
    return revert_sync_batchnorm(model)  # SyncBN needs a process group; the Runner does the same


def inner(model):
    """The segmentor inside a test-time-augmentation wrapper, else the model."""
    return model.module if isinstance(model, BaseTTAModel) else model


def model_cfg(cfg):
    return cfg.model.module if cfg.model.type == 'SegTTAModel' else cfg.model


def shrunk_arch(name):
    """The variant's widths with one block per stage."""
    arch = dict(ARCH_SETTINGS[name])
    arch['depths'] = [1] * len(arch['depths'])
    return arch


def no_decay_params(backbone):
    """The spec's exemptions, found independently of the config's key strings:
    parameters named after the four attention exemptions, and every LayerNorm's."""
    found = {}
    for mod_name, module in backbone.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f'{mod_name}.{p_name}' if mod_name else p_name
            if isinstance(module, nn.LayerNorm) or any(k in p_name or k in mod_name.split('.')[-1]
                                                       for k in NO_DECAY_NAMES):
                found[id(param)] = full
    return found


def check_param_groups(path, cfg, model):
    """Build the optimizer as the Runner does and inspect it parameter by parameter."""
    lr, wd, backbone_mult = OPTIM[family(path)]
    scope, _ = registry(cfg)
    with DefaultScope.overwrite_default_scope(scope):
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    groups = {}
    for group in optim_wrapper.optimizer.param_groups:
        for param in group['params']:
            groups[id(param)] = group
    assert optim_wrapper.optimizer.__class__.__name__ == 'AdamW'
    backbone = model.backbone
    exempt = no_decay_params(backbone)
    # every family of exemption is present in the model, so the check is not vacuous
    names = ' '.join(exempt.values())
    for key in NO_DECAY_NAMES + ('norm1', 'norm2', 'attn.norm', 'patch_embed1.norm', 'norm4'):
        assert key in names, key
    for name, param in backbone.named_parameters():
        group = groups[id(param)]
        assert math.isclose(group['lr'], lr * backbone_mult, rel_tol=1e-9), (name, group['lr'])
        want_wd = 0. if id(param) in exempt else wd
        assert math.isclose(group['weight_decay'], want_wd, abs_tol=1e-12), \
            (name, group['weight_decay'], want_wd)
    # the TransNeXt keys touch no head parameter: the heads keep the base lr
    # (mmseg's Mask2Former base already exempts its embeddings and norms from decay)
    keys = set(cfg.transnext_no_decay_names)
    backbone_ids = {id(p) for p in backbone.parameters()}
    heads = [(n, p) for n, p in model.named_parameters() if id(p) not in backbone_ids]
    assert heads
    for name, param in heads:
        assert not any(k in name for k in keys), f'{name} is hit by a TransNeXt key'
        group = groups[id(param)]
        assert math.isclose(group['lr'], lr, rel_tol=1e-9), (name, group['lr'])
        if family(path) in ('mask-rcnn', 'dino', 'upernet'):
            assert math.isclose(group['weight_decay'], wd), (name, group['weight_decay'])


# --------------------------------------------------------------------- all configs
@pytest.mark.parametrize('path', CONFIGS, ids=CONFIG_IDS)
def test_config_builds_whole_model(path):
    cfg = load(path)
    assert 'mmtransnext' in cfg.custom_imports['imports']
    model = build(cfg)
    backbone = inner(model).backbone
    assert type(backbone).__name__ == 'TransNeXt'
    arch = model_cfg(cfg).backbone.arch
    if isinstance(arch, str):  # a released variant: the spec's parameter count
        total, c4 = SPEC_PARAMS[arch]
        count = sum(p.numel() for p in backbone.parameters())
        assert count == total - (c4 * 1000 + 1000), (arch, count)


@pytest.mark.parametrize('path', PUBLISHED, ids=[str(p.name) for p in PUBLISHED])
def test_published_settings_and_param_groups(path):
    cfg = load(path)
    fam = family(path)
    mcfg = model_cfg(cfg)
    bb = mcfg.backbone
    arch = bb.arch
    assert arch in ('tiny', 'small', 'base') and f'transnext-{arch}' in path.name
    assert bb.pretrain_size == 224
    # The release's ms+flip tests (`_ms` configs) built the bias for 800 px, the
    # extrapolation variant too, where img_size plays no part.
    assert bb.img_size == (800 if path.parent.name == 'detection' or 'ms-flip' in path.name
                           else 512)
    assert bb.drop_path_rate == DROP_PATH[fam][('tiny', 'small', 'base').index(arch)]
    assert bb.init_cfg == dict(type='Pretrained',
                               checkpoint=f'checkpoints/transnext_{arch}_224_1k.pth')
    assert bb.get('is_extrapolation', False) == ('extrapolation' in path.name)
    dims = ARCH_SETTINGS[arch]['embed_dims']
    outs = [dims[i] for i in bb.out_indices]
    if fam in ('mask-rcnn', 'dino'):
        assert list(mcfg.neck.in_channels) == outs
        assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
        assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
    else:
        assert list(mcfg.decode_head.in_channels) == outs
        assert cfg.train_dataloader.batch_size == 2
        assert cfg.train_dataloader.dataset.data_root == 'data/ade/ADEChallengeData2016'
    if fam == 'dino':
        levels = 5 if '5scale' in path.name else 4
        assert tuple(bb.out_indices) == ((0, 1, 2, 3) if levels == 5 else (1, 2, 3))
        assert mcfg.get('num_feature_levels', 4) == mcfg.neck.num_outs == levels
        assert mcfg.encoder.layer_cfg.self_attn_cfg.num_levels == levels
        assert mcfg.decoder.layer_cfg.cross_attn_cfg.num_levels == levels
        assert cfg.optim_wrapper.clip_grad.max_norm == 0.1
        assert cfg.train_cfg.max_epochs == 12
    if fam == 'upernet':
        assert mcfg.auxiliary_head.in_channels == dims[2]
        warmup, poly = cfg.param_scheduler
        assert (warmup.type, warmup.end, poly.type, poly.end, poly.power) == \
            ('LinearLR', 1500, 'PolyLR', 160000, 1.0)
        assert cfg.train_cfg.max_iters == 160000
    if 'ms-flip' in path.name:
        assert cfg.model.type == 'SegTTAModel'
        aug = cfg.test_dataloader.dataset.pipeline[1]
        assert aug.type == 'TestTimeAug'
        scales = [t.scale for t in aug.transforms[0]]
        assert scales == [(int(2048 * r), int(512 * r)) for r in (0.5, 0.75, 1., 1.25, 1.5, 1.75)]
        assert [t.prob for t in aug.transforms[1]] == [0., 1.]
        # Otherwise the single-scale segmentor whose checkpoint it tests.
        single = load(path.with_name(path.name.split('_ms-flip')[0] + '.py')).model.to_dict()
        single['backbone'].update(img_size=800)
        if 'extrapolation' in path.name:
            single['backbone'].update(is_extrapolation=True)
        assert mcfg.to_dict() == single
        return  # a test-only config: no optimizer to check
    # the optimizer, on a one-block-per-stage backbone of the same variant
    # (the keys do not depend on block indices; the full models are built above)
    cfg.model.backbone.arch = shrunk_arch(arch)
    check_param_groups(path, cfg, build(cfg))


# --------------------------------------------------------------------- training steps
def small_cfg(path, size):
    """The family's tiny config with one block per stage and a small bias grid."""
    return load(path, **{'model.backbone.arch': shrunk_arch('tiny'),
                         'model.backbone.img_size': size,
                         'model.backbone.init_cfg': None})  # no checkpoint file in tests


def det_batch(size, with_mask, rng):
    inputs, samples = [], []
    for h, w in ((size, size), (size - 32, size)):
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                             scale_factor=(1., 1.), img_id=0))
        boxes = torch.tensor([[4., 6., 40., 50.], [30., 20., w - 5., h - 8.]])
        gt = InstanceData(bboxes=boxes, labels=torch.tensor([3, 17]))
        if with_mask:
            masks = np.zeros((2, h, w), dtype=np.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            gt.masks = BitmapMasks(masks, h, w)
        sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def seg_batch(size, rng, num_classes=150):
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, size, size), dtype=np.uint8)))
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size)))
        seg = torch.from_numpy(rng.integers(0, 4, (1, size, size))).long() * 37 % num_classes
        seg[:, : size // 4] = 255  # some ignored pixels, as ADE20K's unlabelled
        sample.gt_sem_seg = PixelData(data=seg)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def train_and_predict(cfg, data):
    """One step as the Runner runs it, then a prediction; returns (losses, predictions)."""
    torch.manual_seed(0)
    model = build(cfg)
    model.init_weights()  # as the Runner does (the heads' own initialisation, e.g. DINO's)
    scope, _ = registry(cfg)
    with DefaultScope.overwrite_default_scope(scope):
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    watched = model.backbone.patch_embed1.proj.weight
    before = watched.detach().clone()
    batch = model.data_preprocessor(data, True)
    losses = model(**batch, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss), log_vars
    assert all(math.isfinite(float(v)) for v in log_vars.values()), log_vars
    optim_wrapper.backward(loss)
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert watched.grad.abs().sum() > 0  # the heads' losses reach the first stage
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    assert not torch.equal(before, watched.detach())
    model.eval()
    with torch.no_grad():
        preds = model.test_step(data)
    return log_vars, preds


@pytest.mark.parametrize('name', ['mask-rcnn_transnext-tiny_fpn_1x_coco.py'])
def test_mask_rcnn_train_step_and_predict(name):
    cfg = small_cfg(REPO / 'configs/detection' / name, 128)
    data = det_batch(128, True, np.random.default_rng(0))
    log_vars, preds = train_and_predict(cfg, data)
    for key in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'):
        assert key in log_vars
    assert len(preds) == 2
    for pred, sample in zip(preds, data['data_samples']):
        inst = pred.pred_instances
        h, w = sample.ori_shape
        assert inst.bboxes.shape[1:] == (4,) and len(inst.scores) == len(inst.labels) == len(inst)
        assert inst.masks.shape[1:] == (h, w)
        assert ((inst.labels >= 0) & (inst.labels < 80)).all()


def test_mask_rcnn_roi_features_are_read_in_the_right_layout():
    """mmcv's CPU RoIAlign reads its input as contiguous NCHW whatever its strides; a
    channels-last map (what a transposed token view turns into through the neck's
    convolutions) gave silently scrambled RoI features and a detector that never
    learned. The neck's maps must be read the same as their NCHW copies."""
    cfg = small_cfg(REPO / 'configs/detection/mask-rcnn_transnext-tiny_fpn_1x_coco.py', 128)
    model = build(cfg).eval()
    data = model.data_preprocessor(det_batch(128, True, np.random.default_rng(0)), False)
    rois = torch.tensor([[0, 4., 6., 40., 50.], [1, 30., 20., 120., 90.]])
    extractor = model.roi_head.bbox_roi_extractor
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])
        got = extractor(feats[:extractor.num_inputs], rois)
        want = extractor([f.contiguous() for f in feats[:extractor.num_inputs]], rois)
    torch.testing.assert_close(got, want)


def test_dino_train_step_and_predict():
    """5-scale (every stage feeds the neck). DINO picks its 900 queries among the
    encoder's tokens: 5 levels (strides 4-64) give 1364 at 128 px."""
    cfg = small_cfg(REPO / 'configs/detection/dino-5scale_transnext-tiny_12e_coco.py', 128)
    data = det_batch(128, False, np.random.default_rng(1))
    log_vars, preds = train_and_predict(cfg, data)
    for key in ('loss_cls', 'loss_bbox', 'loss_iou', 'enc_loss_cls', 'dn_loss_cls', 'd0.loss_cls'):
        assert key in log_vars
    assert len(preds) == 2
    for pred in preds:
        inst = pred.pred_instances
        assert inst.bboxes.shape == (300, 4) and inst.scores.shape == (300,)
        assert torch.isfinite(inst.bboxes).all()


def test_dino_4scale_feature_levels():
    """4-scale: the last three stages, plus the neck's extra level, reach the
    encoder as four 256-channel maps (the full step is the 5-scale test's)."""
    cfg = small_cfg(REPO / 'configs/detection/dino-4scale_transnext-tiny_12e_coco.py', 128)
    model = build(cfg).eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 128, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 256, 16, 12), (1, 256, 8, 6), (1, 256, 4, 3),
                                              (1, 256, 2, 2)]
    assert model.encoder.layers[0].self_attn.num_levels == 4


def test_upernet_train_step_and_predict():
    cfg = small_cfg(REPO / 'configs/segmentation/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py',
                    128)
    cfg.model.data_preprocessor.size = (128, 128)
    data = seg_batch(128, np.random.default_rng(2))
    log_vars, preds = train_and_predict(cfg, data)
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(log_vars)
    check_seg_predictions(preds, 128)


def test_mask2former_train_step_and_predict():
    cfg = small_cfg(
        REPO / 'configs/segmentation/mask2former_transnext-tiny_8xb2-160k_ade20k-512x512.py', 128)
    cfg.model.data_preprocessor.size = (128, 128)
    data = seg_batch(128, np.random.default_rng(3))
    log_vars, preds = train_and_predict(cfg, data)
    for key in ('decode.loss_cls', 'decode.loss_mask', 'decode.loss_dice', 'decode.d0.loss_cls'):
        assert key in log_vars
    check_seg_predictions(preds, 128)


def check_seg_predictions(preds, size):
    assert len(preds) == 2
    for pred in preds:
        assert pred.pred_sem_seg.data.shape == (1, size, size)
        assert pred.seg_logits.data.shape == (150, size, size)
        labels = pred.pred_sem_seg.data
        assert ((labels >= 0) & (labels < 150)).all()


def test_upernet_ms_flip_extrapolation_predicts():
    """The test-time-augmentation wrapper runs every scale and flip and merges them."""
    path = REPO / 'configs/segmentation/upernet_transnext-tiny_8xb2-160k_ade20k-512x512_ms-flip-extrapolation.py'
    cfg = load(path, **{'model.module.backbone.arch': shrunk_arch('tiny')})
    model = build(cfg).eval()
    assert model.module.backbone.is_extrapolation
    rng = np.random.default_rng(4)
    inputs, samples = [], []
    for size, flip in ((64, False), (64, True), (96, False), (96, True)):  # two scales x flip
        inputs.append([torch.from_numpy(rng.integers(0, 256, (3, size, size + 16), dtype=np.uint8))])
        samples.append([SegDataSample(metainfo=dict(
            img_shape=(size, size + 16), ori_shape=(80, 100), pad_shape=(size, size + 16),
            flip=flip, flip_direction='horizontal' if flip else None, img_path='a.jpg'))])
    with torch.no_grad():
        preds = model.test_step(dict(inputs=inputs, data_samples=samples))
    assert len(preds) == 1
    assert preds[0].pred_sem_seg.data.shape == (1, 80, 100)
