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


def _init_from(path, **options):
    """A SMALL_ARCH backbone after init_weights() from ``path``, and the log lines."""
    model = TransNeXt(arch=SMALL_ARCH, img_size=64,
                      init_cfg=dict(type='Pretrained', checkpoint=str(path), **options))
    logger = MMLogger.get_current_instance()
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        model.init_weights()
    finally:
        logger.removeHandler(handler)
    return model, messages


def _not_fitting_weights():
    weights = dict(_source_model().state_dict())
    weights.pop('norm4.weight')
    weights['block1.0.attn.q.weight'] = torch.zeros(8, 8)
    weights['block9.0.extra'] = torch.zeros(1)
    return weights


def test_checkpoint_that_does_not_fit_is_an_error(tmp_path):
    path = tmp_path / 'partial.pth'
    torch.save(_not_fitting_weights(), path)
    with pytest.raises(ValueError) as error:
        _init_from(path)
    text = str(error.value)
    assert "the checkpoint has the model's variant, a custom TransNeXt (embed dims " \
        '[16, 32, 64, 128], depths [1, 1, 1, 1], heads [1, 2, 4, 8])' in text
    assert '1 missing in the checkpoint: norm4.weight' in text
    assert '1 shape mismatches (checkpoint vs model): block1.0.attn.q.weight: ' \
        'checkpoint (8, 8) vs model (16, 16)' in text
    assert '1 unexpected backbone weights: block9.0.extra' in text
    assert 'allow_partial=True' in text


def test_allow_partial_loads_what_fits_and_warns(tmp_path):
    weights = _not_fitting_weights()
    path = tmp_path / 'partial.pth'
    torch.save(weights, path)
    model, messages = _init_from(path, allow_partial=True)
    assert torch.equal(model.norm1.weight, weights['norm1.weight'])
    assert not torch.equal(model.block1[0].attn.q.weight[:8, :8], torch.zeros(8, 8))
    partial = [m for m in messages if m.startswith('Partial load')]
    assert len(partial) == 1 and 'norm4.weight' in partial[0] and 'block9.0.extra' in partial[0]


def test_wrong_variant_names_what_the_checkpoint_looks_like(tmp_path):
    path = tmp_path / 'micro.pth'
    torch.save({'model': TransNeXt(arch='micro').state_dict()}, path)
    tiny = TransNeXt(arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError) as error:
        tiny.init_weights()
    text = str(error.value)
    assert 'the checkpoint looks like TransNeXt-micro, the model is TransNeXt-tiny' in text
    # 573 mismatches, as the micro file loaded into tiny showed before this was an error.
    assert '573 shape mismatches (checkpoint vs model): block1.0.attn.cpb_fc2.bias: ' \
        'checkpoint (2,) vs model (3,)' in text


def test_head_and_detector_parts_are_dropped_with_one_line(tmp_path):
    weights = dict(_source_model().state_dict())
    classifier = {**weights, 'head.weight': torch.ones(10, 128), 'head.bias': torch.ones(10)}
    detector = {**{f'backbone.{k}': v for k, v in weights.items()},
                'neck.lateral.weight': torch.ones(3), 'roi_head.fc.weight': torch.ones(2),
                'roi_head.fc.bias': torch.ones(2)}
    torch.save({'model': classifier}, tmp_path / 'cls.pth')
    torch.save({'state_dict': detector}, tmp_path / 'det.pth')
    _, messages = _init_from(tmp_path / 'cls.pth')
    assert [m for m in messages if m.startswith('Dropped')] == [
        'Dropped 2 entries that are not backbone weights: head (2)']
    _, messages = _init_from(tmp_path / 'det.pth')
    assert [m for m in messages if m.startswith('Dropped')] == [
        'Dropped 3 entries that are not backbone weights: neck (1), roi_head (2)']


def test_prefix_and_map_location_reach_the_loader(tmp_path):
    source = _source_model().state_dict()
    stored = {**{f'model.encoder.{k}': v for k, v in source.items()},
              'model.decoder.weight': torch.ones(2)}
    torch.save({'state_dict': stored}, tmp_path / 'nested.pth')
    locations = []

    def record(storage, location):
        locations.append(location)
        return storage

    model, _ = _init_from(tmp_path / 'nested.pth', prefix='model.encoder',
                          map_location=record)
    assert locations and set(locations) == {'cpu'}
    for name, value in source.items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(ValueError, match="prefix 'decoder.'"):
        _init_from(tmp_path / 'nested.pth', prefix='decoder.')
    with pytest.raises(ValueError, match=r"unknown keys \['strict'\]"):
        _init_from(tmp_path / 'nested.pth', strict=False)


class _NotWeights:
    """A pickled object a weights-only load must refuse to rebuild."""


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / 'served'``; it stops at the
    end of the test, or by itself after 120 s."""
    import functools
    import http.server
    import threading
    served = tmp_path / 'served'
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopper = threading.Timer(120, server.shutdown)
    stopper.start()
    try:
        yield served, f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_checkpoint_over_http_is_cached_and_weights_only(loopback_server, tmp_path,
                                                         monkeypatch):
    served, address = loopback_server
    for proxy in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy',
                  'ALL_PROXY'):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    source = _source_model().state_dict()
    torch.save({'model': {**source, 'head.weight': torch.ones(3, 128)}},
               served / 'transnext_small_test.pth')
    model, messages = _init_from(f'{address}/transnext_small_test.pth')
    for name, value in source.items():
        assert torch.equal(model.state_dict()[name], value), name
    cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'transnext_small_test.pth'
    assert cached.is_file()
    # The second load reads mmengine's (torch hub's) cache: the server no longer has it.
    (served / 'transnext_small_test.pth').unlink()
    model, _ = _init_from(f'{address}/transnext_small_test.pth')
    assert torch.equal(model.norm4.weight, source['norm4.weight'])
    # torch.hub itself would unpickle anything; the load stays weights-only.
    torch.save({'model': source, 'payload': _NotWeights()}, served / 'code.pth')
    with pytest.raises(Exception, match='[Ww]eights only load failed'):
        _init_from(f'{address}/code.pth')
    torch.save({'model': source, 'payload': _NotWeights()}, tmp_path / 'code.pth')
    with pytest.raises(Exception, match='[Ww]eights only load failed'):
        _init_from(tmp_path / 'code.pth')


def test_checkpoint_that_fits_nothing_is_an_error(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'conv.weight': torch.zeros(3)}, path)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64,
                      init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match='no weight .* looks like no TransNeXt backbone'):
        model.init_weights()
    with pytest.raises(ValueError, match='no weight'):
        _init_from(path, allow_partial=True)
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
