"""Building TransNeXt from OpenMMLab registries and loading released-style checkpoints."""
import logging

import pytest
import torch
from mmengine.logging import MMLogger

import mmtransnext  # noqa: F401  (registers the backbone)
from mmtransnext.models import TransNeXt, filter_backbone_state_dict

SMALL_ARCH = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1],
                  mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1], window_size=[3, 3, 3, None])


@pytest.mark.parametrize('registry', ['mmdet', 'mmseg', 'mmengine'])
def test_built_through_each_registry(registry):
    models = __import__(f'{registry}.registry', fromlist=['MODELS']).MODELS
    model = models.build(dict(type='TransNeXt', arch=SMALL_ARCH, img_size=64,
                              out_indices=(0, 2)))
    assert isinstance(model, TransNeXt)
    assert model.out_indices == (0, 2)


@pytest.mark.parametrize('registry', ['mmdet', 'mmseg'])
def test_released_alias_keeps_released_configs_working(registry, tmp_path):
    models = __import__(f'{registry}.registry', fromlist=['MODELS']).MODELS
    model = models.build(dict(type='transnext_micro', pretrained=None, img_size=256,
                              pretrain_size=224, is_extrapolation=False, scales=4))
    assert isinstance(model, TransNeXt)
    assert model.embed_dims == [48, 96, 192, 384]
    assert model.out_indices == (1, 2, 3)    # 4 levels: the neck adds one below
    assert models.build(dict(type='transnext_micro', scales=5)).out_indices == (0, 1, 2, 3)
    path = tmp_path / 'micro.pth'
    torch.save(model.state_dict(), path)
    from_pretrained = models.build(dict(type='transnext_micro', pretrained=str(path)))
    assert from_pretrained.init_cfg == dict(type='Pretrained', checkpoint=str(path))
    with pytest.raises(ValueError, match='scales'):
        models.build(dict(type='transnext_micro', scales=7))


def _source_model():
    torch.manual_seed(1)
    return TransNeXt(arch=SMALL_ARCH, img_size=64)


@pytest.mark.parametrize('layout', ['raw', 'model', 'state_dict', 'detector'])
def test_checkpoint_round_trip_through_init_cfg(tmp_path, layout):
    source = _source_model()
    weights = dict(source.state_dict())
    if layout == 'detector':
        stored = {'state_dict': {**{f'backbone.{k}': v for k, v in weights.items()},
                                 'neck.lateral.weight': torch.ones(3)},
                  'meta': {'epoch': 12}}
    else:
        weights.update({'head.weight': torch.randn(10, 128), 'head.bias': torch.zeros(10)})
        stored = weights if layout == 'raw' else {layout: weights}
    path = tmp_path / 'ckpt.pth'
    torch.save(stored, path)
    target = TransNeXt(arch=SMALL_ARCH, img_size=64,
                       init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    assert not torch.equal(target.block1[0].attn.q.weight, source.block1[0].attn.q.weight)
    target.init_weights()
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_mismatches_are_reported_by_name(tmp_path, caplog):
    weights = dict(_source_model().state_dict())
    weights.pop('norm4.weight')
    weights['block1.0.attn.q.weight'] = torch.zeros(8, 8)
    weights['block9.0.extra'] = torch.zeros(1)
    path = tmp_path / 'partial.pth'
    torch.save(weights, path)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64,
                      init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    logger = MMLogger.get_current_instance()
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        model.init_weights()
    finally:
        logger.removeHandler(handler)
    text = '\n'.join(messages)
    assert '1 missing in the checkpoint: norm4.weight' in text
    assert '1 unexpected in the checkpoint: block9.0.extra' in text
    assert 'block1.0.attn.q.weight: checkpoint (8, 8) vs model (16, 16)' in text
    assert torch.equal(model.norm1.weight, weights['norm1.weight'])


def test_checkpoint_that_fits_nothing_is_an_error(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'conv.weight': torch.zeros(3)}, path)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64,
                      init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match='no weight'):
        model.init_weights()
    missing = TransNeXt(arch=SMALL_ARCH, init_cfg=dict(type='Pretrained',
                                                       checkpoint=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        missing.init_weights()


def test_checkpoint_filter_is_pure_and_idempotent():
    weights = {'backbone.norm1.weight': torch.ones(2), 'neck.x': torch.ones(1),
               'head.weight': torch.ones(1)}
    snapshot = dict(weights)
    once = filter_backbone_state_dict(weights)
    assert once == {'norm1.weight': weights['backbone.norm1.weight']}
    assert filter_backbone_state_dict(once) == once
    assert weights == snapshot
    classifier = {'norm1.weight': torch.ones(2), 'head.bias': torch.ones(1)}
    assert list(filter_backbone_state_dict(classifier)) == ['norm1.weight']
