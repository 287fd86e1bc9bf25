"""The TransNeXt backbone: equal to the released reference, buildable from configs."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import golden_arch
from mmtransnext.models import TransNeXt, filter_backbone_state_dict, transnext
from mmtransnext.models.attention import (AggregatedAttention, FullAttention, _stats_dtype,
                                          _unit_divisor, _unit_vectors, _UnitVectors)
from mmtransnext.models.transnext import _Block

OUT_TOL = dict(atol=1e-4, rtol=1e-4)

SMALL_ARCH = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1],
                  mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1], window_size=[3, 3, 3, None])


# Gradients that are zero in theory: the last stage's position-bias MLP output bias
# is one shift of every logit of a softmax. The golden value of such a gradient is the
# reference's own float32 rounding noise (up to 6e-7 here, against a limit of 1e-6), so
# comparing two noise draws can exceed the limit on one CPU and not on another. They
# are held to the same limit around their true value, zero.
ZERO_IN_THEORY = ('block4.0.attn.cpb_fc2.bias', )


def assert_grad_close(grad, ref, name):
    """The golden README's per-tensor gradient tolerance."""
    limit = 1e-3 * max(ref.abs().max().item(), 1e-3)
    if name in ZERO_IN_THEORY:
        ref = torch.zeros_like(ref)
    err = (grad - ref).abs().max().item()
    assert err <= limit, f'{name}: max |g - g_ref| = {err:.3g} > {limit:.3g}'


def golden_model(golden, mode, **kwargs):
    model = TransNeXt(**golden_arch(golden), is_extrapolation=mode == 'extrapolation', **kwargs)
    model.load_state_dict(golden['state_dict'], strict=True)
    return model


@pytest.mark.parametrize('case', ['interpolation_at_img_size', 'interpolation_other_size',
                                  'extrapolation_other_size'])
def test_outputs_equal_reference(dense_golden, attention_path, case):
    data = dense_golden['cases'][case]
    model = golden_model(dense_golden, data['mode']).eval()
    with torch.no_grad():
        outs = model(data['input'])
    assert len(outs) == len(data['outputs'])
    for i, (out, ref) in enumerate(zip(outs, data['outputs'])):
        assert out.shape == ref.shape, f'stage {i}'
        torch.testing.assert_close(out, ref, **OUT_TOL, msg=lambda m: f'stage {i}: {m}')


def test_gradients_equal_reference(dense_golden, attention_path):
    data = dense_golden['cases']['interpolation_grad']
    model = golden_model(dense_golden, data['mode']).train()
    x = data['input'].clone().requires_grad_()
    outs = model(x)
    loss = sum((out * w).sum() for out, w in zip(outs, data['weights']))
    torch.testing.assert_close(loss, data['loss'], **OUT_TOL)
    loss.backward()
    assert_grad_close(x.grad, data['input_grad'], 'input')
    params = dict(model.named_parameters())
    assert set(params) == set(data['param_grads'])
    for name, ref in data['param_grads'].items():
        assert params[name].grad is not None, name
        assert_grad_close(params[name].grad, ref, name)


@pytest.mark.parametrize('fixed_pool_size', [None, 3])
def test_classifier_equals_reference(cls_golden, attention_path, fixed_pool_size):
    data = cls_golden['cases'][f'classify_fixed_pool_{fixed_pool_size}']
    model = TransNeXt(**golden_arch(cls_golden), fixed_pool_size=fixed_pool_size,
                      out_indices=(3, )).eval()
    weights = cls_golden['state_dict']
    model.load_state_dict(filter_backbone_state_dict(weights), strict=True)
    with torch.no_grad():
        last, = model(data['input'])
        logits = F.linear(last.mean(dim=(2, 3)), weights['head.weight'], weights['head.bias'])
    torch.testing.assert_close(logits, data['logits'], **OUT_TOL)


@pytest.mark.parametrize('arch', ['micro', 'tiny', 'small', 'base'])
def test_names_and_shapes_equal_released_checkpoints(official_keys, arch):
    released = official_keys[f'transnext_{arch}']
    expected = {name: tuple(shape) for name, shape in released['state_dict']
                if not name.startswith('head.')}
    model = TransNeXt(arch=arch)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert ours == expected
    head = sum(math.prod(shape) for name, shape in released['state_dict']
               if name.startswith('head.'))
    assert sum(p.numel() for p in model.parameters()) == released['num_params'] - head


def test_compiled_and_reference_paths_agree_on_odd_sizes(monkeypatch):
    # float64, so that the two algorithms (joint softmax vs merged log-sum-exp) must
    # agree to rounding; float32 agreement is what the golden tests check.
    torch.manual_seed(0)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64, pretrain_size=48).double().train()
    for size in [(33, 47), (9, 70), (5, 5)]:
        x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
        results = []
        for disable in ('0', '1'):
            monkeypatch.setenv('MMTRANSNEXT_DISABLE_EXT', disable)
            x.grad = None
            model.zero_grad()
            outs = model(x)
            sum((o * o).sum() for o in outs).backward()
            results.append(([o.detach() for o in outs], x.grad.clone(),
                            {n: p.grad.clone() for n, p in model.named_parameters()}))
        (outs_a, gx_a, gp_a), (outs_b, gx_b, gp_b) = results
        for a, b in zip(outs_a, outs_b):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx_a, gx_b, rtol=1e-9, atol=1e-12)
        for name in gp_a:
            torch.testing.assert_close(gp_a[name], gp_b[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f'{name} at {size}: {m}')


@pytest.mark.parametrize('size,expected', [
    ((32, 32), [(8, 8), (4, 4), (2, 2), (1, 1)]),          # below every pooling ratio
    ((1, 1), [(1, 1), (1, 1), (1, 1), (1, 1)]),
    ((150, 210), [(38, 53), (19, 27), (10, 14), (5, 7)]),  # the spec's example
    ((17, 300), [(5, 75), (3, 38), (2, 19), (1, 10)]),
])
def test_any_input_size(attention_path, size, expected):
    model = TransNeXt(arch=SMALL_ARCH, img_size=64).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert [o.shape[1] for o in outs] == SMALL_ARCH['embed_dims']
    assert all(torch.isfinite(o).all() for o in outs)


def test_tiny_stage_map_pools_to_one_cell():
    attn = AggregatedAttention(16, 1, 3, sr_ratio=8, build_size=8, build_pool_size=1,
                               pretrain_size=8)
    assert attn.pool_size(3, 20) == (1, 2)
    assert AggregatedAttention(16, 1, 3, 8, None, None, 8, fixed_pool_size=3).pool_size(1, 1) \
        == (3, 3)


@pytest.mark.parametrize('bad,message', [
    (torch.randn(3, 64, 64), '4-D'),
    (torch.randn(1, 4, 64, 64), 'input channels'),
    (torch.randn(0, 3, 64, 64), 'empty'),
    (torch.randn(1, 3, 0, 64), 'empty'),
    (torch.zeros(1, 3, 8, 8, dtype=torch.long), 'floating-point'),
])
def test_bad_input_raises_named_error(bad, message):
    model = TransNeXt(arch=SMALL_ARCH, img_size=64)
    with pytest.raises(ValueError, match=message):
        model(bad)


@pytest.mark.parametrize('kwargs,message', [
    (dict(arch='huge'), 'unknown TransNeXt arch'),
    (dict(arch=dict(SMALL_ARCH, depths=[1, 1])), 'one entry per stage'),
    (dict(arch=dict(SMALL_ARCH, window_size=[2, 3, 3, None])), 'odd window_size'),
    (dict(arch=dict(SMALL_ARCH, num_heads=[3, 2, 4, 8])), 'do not split'),
    (dict(arch={k: v for k, v in SMALL_ARCH.items() if k != 'depths'}), 'missing keys'),
    (dict(arch=dict(SMALL_ARCH, window_size=[3, 3, 3, 3])), 'stage 4: window_size must be None'),
    (dict(arch=dict(SMALL_ARCH, num_heads=[1, 2, 0, 8])), 'stage 3: num_heads must be a positive'),
    (dict(arch=dict(SMALL_ARCH, embed_dims=[16, 32.0, 64, 128])), 'embed_dims must be a positive'),
    (dict(arch=dict(SMALL_ARCH, depths=[1, -1, 1, 1])), 'depths must be a positive'),
    (dict(arch=dict(SMALL_ARCH, sr_ratios=[8, 4, 0, 1])), 'sr_ratios must be a positive'),
    (dict(arch=dict(SMALL_ARCH, mlp_ratios=[4, 4, 0, 4])), 'mlp_ratios must be a positive'),
    (dict(out_indices=(4, )), 'out_indices'),
    (dict(out_indices=(3, 1)), r'increasing without repeats, got \(3, 1\)'),
    (dict(out_indices=(1, 1)), r'increasing without repeats, got \(1, 1\)'),
    (dict(fixed_pool_size=0), 'fixed_pool_size'),
])
def test_bad_configuration_raises(kwargs, message):
    kwargs = dict(dict(arch=SMALL_ARCH), **kwargs)
    with pytest.raises(ValueError, match=message):
        TransNeXt(**kwargs)


def test_out_indices_select_stages():
    model = TransNeXt(arch=SMALL_ARCH, img_size=64, out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]
    # Plain NCHW memory, as necks and mmcv's ops (RoIAlign reads raw NCHW) expect.
    assert all(o.is_contiguous() for o in outs)


def test_runs_under_autocast(attention_path):
    """bfloat16 autocast (mmdet's --amp on a GPU; the CPU's here): projections come out
    in bfloat16 and softmax in float32, yet the window op takes one dtype. The
    attention core runs in float32, so outputs stay close to a float32 run."""
    torch.manual_seed(0)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64).train()
    x = torch.randn(2, 3, 64, 96)
    expected = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
        sum(out.float().sum() for out in outs).backward()
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out.float(), ref.detach(), atol=0.1, rtol=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _cpu_convolves(dtype) -> bool:
    """Whether this torch convolves ``dtype`` on the CPU (torch 2.1 has no float16 there)."""
    try:
        F.conv2d(torch.ones(1, 1, 2, 2, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize('dtype, tol', [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_model_without_autocast(attention_path, dtype, tol):
    """A model cast to bfloat16 or float16 and run without autocast: its outputs keep
    that dtype and stay close to float32 (largest error over largest magnitude; seen
    1.1e-2 and 1.6e-3), and every gradient is finite. Its attention core runs in float32
    (the CPU's policy) and hands its output back in the model's dtype."""
    if not _cpu_convolves(dtype):
        pytest.skip(f'this torch has no {dtype} convolution on the CPU')
    torch.manual_seed(0)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64)
    x = torch.randn(2, 3, 64, 96)
    expected = model(x)
    low = TransNeXt(arch=SMALL_ARCH, img_size=64)
    low.load_state_dict(model.state_dict())
    low = low.to(dtype)
    outs = low(x.to(dtype))
    for out, ref in zip(outs, expected):
        assert out.dtype == dtype
        assert (out.float() - ref).abs().max() <= tol * ref.abs().max()
    sum(out.float().sum() for out in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in low.parameters() if p.grad is not None)


def test_training_from_scratch_initialisation():
    torch.manual_seed(0)
    model = TransNeXt(arch='tiny', drop_path_rate=0.3)
    attn = model.block1[0].attn
    torch.testing.assert_close(F.softplus(attn.temperature), torch.full((3, 1, 1), 1 / 0.24))
    assert attn.learnable_bias.abs().max() == 0
    assert 0 < attn.relative_pos_bias_local.std() < 0.001
    assert 0.015 < attn.learnable_tokens.std() < 0.025
    assert 0.015 < model.block3[0].mlp.fc1.weight.std() < 0.025
    assert model.block3[0].mlp.fc1.bias.abs().max() == 0
    conv = model.block1[0].mlp.dwconv.dwconv  # fan_out = 9 * out / groups = 9
    assert abs(conv.weight.std().item() - math.sqrt(2 / 9)) < 0.05
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.0
             for i in range(1, 5) for b in getattr(model, f'block{i}')]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 21))


@pytest.mark.parametrize('module', ['aggregated', 'full'])
def test_attention_built_alone_is_initialised(module):
    # Fresh memory from the caching allocator first, so that a parameter left as
    # torch.empty would show it (NaN under CUDA autocast came from such garbage).
    torch.full((1 << 16, ), float('nan')).sum()
    torch.manual_seed(0)
    attn = (AggregatedAttention(64, 2, 3, 2, None, None, 16) if module == 'aggregated'
            else FullAttention(64, 2, None, 16))
    assert all(torch.isfinite(p).all() for p in attn.parameters())
    assert 0.015 < attn.query_embedding.std() < 0.025
    if module == 'aggregated':
        assert 0.015 < attn.learnable_tokens.std() < 0.025
        assert 0 < attn.relative_pos_bias_local.std() < 0.001


@pytest.mark.parametrize('frozen_stages, prefixes', [
    (-1, ()),
    (0, ('patch_embed1.',)),
    (1, ('patch_embed1.', 'block1.', 'norm1.')),
    (2, ('patch_embed1.', 'block1.', 'norm1.', 'patch_embed2.', 'block2.', 'norm2.')),
    (4, ('patch_embed', 'block', 'norm')),
])
def test_frozen_stages_follow_mmdet_and_stay_frozen(frozen_stages, prefixes):
    """k freezes the first k stages with their patch embeddings (0: the stem only), as
    mmdet's Swin / ResNet count; train() keeps them frozen and the optimizer leaves them."""
    model = TransNeXt(arch=SMALL_ARCH, img_size=64, frozen_stages=frozen_stages)
    model.train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if name and name.startswith(prefixes):
            assert not module.training, name
    for part in ('patch_embed4', 'block4', 'norm4'):
        assert modules[part].training == (frozen_stages < 4), part
    if frozen_stages == 4:      # nothing left to train
        return
    before = {n: p.clone() for n, p in model.named_parameters()}
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    # Squares: a plain sum of LayerNorm outputs has (nearly) no gradient.
    sum(o.square().sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
    optim.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None and torch.equal(before[name], param), name
    first_trained = f'block{max(frozen_stages, 0) + 1}.0.mlp.fc1.weight'
    assert not torch.equal(before[first_trained], model.state_dict()[first_trained])


@pytest.mark.parametrize('frozen_stages', [-2, 5])
def test_frozen_stages_out_of_range_is_an_error(frozen_stages):
    with pytest.raises(ValueError, match='frozen_stages'):
        TransNeXt(arch=SMALL_ARCH, img_size=64, frozen_stages=frozen_stages)


def test_with_cp_gives_the_same_gradients(attention_path, monkeypatch):
    torch.manual_seed(0)
    plain = TransNeXt(arch=SMALL_ARCH, img_size=64)
    checkpointed = TransNeXt(arch=SMALL_ARCH, img_size=64, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    # What torch.utils.checkpoint is asked to recompute: whole blocks only with with_cp
    # (the default path also checkpoints each GLU's hidden part, a bound method).
    checkpointed_blocks = []
    checkpoint = transnext.cp.checkpoint

    def spy(function, *args, **kwargs):
        if isinstance(function, _Block):
            checkpointed_blocks.append(function)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transnext.cp, 'checkpoint', spy)
    x = torch.randn(1, 3, 48, 56)
    grads, counts = [], []
    for model in (plain, checkpointed):
        checkpointed_blocks.clear()
        sum((o**2).sum() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        counts.append(len(checkpointed_blocks))
    assert counts == [0, sum(SMALL_ARCH['depths'])]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


class _WithBatchNorm(TransNeXt):
    """A subclass that adds a batch norm, what ``norm_eval`` acts on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extra_bn = torch.nn.BatchNorm2d(4)


@pytest.mark.parametrize('norm_eval', [False, True])
def test_norm_eval_keeps_batch_norms_in_eval_mode(norm_eval):
    model = _WithBatchNorm(arch=SMALL_ARCH, img_size=64, norm_eval=norm_eval)
    model.train()
    assert model.extra_bn.training == (not norm_eval)
    assert all(m.training for m in model.modules() if m is not model.extra_bn)
    before = model.extra_bn.running_mean.clone()
    if norm_eval:   # running statistics stay as they are
        model.extra_bn(torch.randn(2, 4, 3, 3) + 5)
        assert torch.equal(model.extra_bn.running_mean, before)
    model.eval()
    assert not any(m.training for m in model.modules())


def test_norm_eval_changes_nothing_in_transnext_itself():
    """Only LayerNorms, which keep no running statistics: norm_eval is accepted for
    configs written for ResNet-style backbones and leaves the model as it is."""
    assert not any(isinstance(m, _BatchNorm) for m in TransNeXt(arch=SMALL_ARCH).modules())
    torch.manual_seed(0)
    plain = TransNeXt(arch=SMALL_ARCH, img_size=64).train()
    with_norm_eval = TransNeXt(arch=SMALL_ARCH, img_size=64, norm_eval=True).train()
    with_norm_eval.load_state_dict(plain.state_dict())
    assert all(m.training for m in with_norm_eval.modules())
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(plain(x), with_norm_eval(x)):
        torch.testing.assert_close(a, b)


def _save(tmp_path, name, weights):
    path = tmp_path / name
    torch.save(weights, path)
    return str(path)


def test_pretrained_in_an_init_cfg_list_is_loaded_strictly(tmp_path):
    """init_cfg=[dict(type='Pretrained', ...)] goes through the same strict loader as
    the dict form: a checkpoint that does not fit is an error, not a silent no-op."""
    unrelated = _save(tmp_path, 'unrelated.pth', {'conv.weight': torch.zeros(3)})
    model = TransNeXt(arch=SMALL_ARCH, img_size=64,
                      init_cfg=[dict(type='Pretrained', checkpoint=unrelated)])
    with pytest.raises(ValueError, match='no weight .* fits the model'):
        model.init_weights()
    other_variant = _save(tmp_path, 'other.pth',
                          TransNeXt(arch=dict(SMALL_ARCH, depths=[1, 1, 2, 1])).state_dict())
    model = TransNeXt(arch=SMALL_ARCH, img_size=64,
                      init_cfg=[dict(type='Pretrained', checkpoint=other_variant)])
    with pytest.raises(ValueError, match='does not fit the backbone'):
        model.init_weights()
    torch.manual_seed(1)
    source = TransNeXt(arch=SMALL_ARCH, img_size=64)
    fitting = _save(tmp_path, 'fits.pth', {'state_dict': source.state_dict()})
    model = TransNeXt(arch=SMALL_ARCH, img_size=64,
                      init_cfg=[dict(type='Pretrained', checkpoint=fitting)])
    model.init_weights()
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_init_cfg_list_applies_the_other_inits_before_the_checkpoint(tmp_path):
    """mmengine's order: the other entries first, the checkpoint over them."""
    torch.manual_seed(1)
    source = TransNeXt(arch=SMALL_ARCH, img_size=64).state_dict()
    fourth = [name for name in source if name.startswith(('block4.', 'norm4.'))]
    partial = _save(tmp_path, 'partial.pth',
                    {k: v for k, v in source.items() if k not in fourth})
    constant = dict(type='Constant', layer='Linear', val=0.5, bias=0.)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64, init_cfg=[
        constant, dict(type='Pretrained', checkpoint=partial, allow_partial=True)])
    model.init_weights()
    assert torch.equal(model.block1[0].attn.q.weight, source['block1.0.attn.q.weight'])
    assert (model.block4[0].attn.qkv.weight == 0.5).all()       # not in the checkpoint
    # Without allow_partial the same list is refused, whatever else it holds.
    model = TransNeXt(arch=SMALL_ARCH, img_size=64,
                      init_cfg=[constant, dict(type='Pretrained', checkpoint=partial)])
    with pytest.raises(ValueError, match='missing in the checkpoint'):
        model.init_weights()


@pytest.mark.parametrize('init_cfg,error,message', [
    ([dict(type='Pretrained', checkpoint='a.pth'), dict(type='Pretrained', checkpoint='b.pth')],
     ValueError, "2 entries of type 'Pretrained'"),
    ([dict(type='Pretrained')], ValueError, "needs a 'checkpoint'"),
    ([dict(type='Pretrained', checkpoint='a.pth', strict=True)], ValueError,
     r"unknown keys \['strict'\]"),
    ([dict(type='Pretrained', checkpoint='a.pth'), 'Constant'], TypeError,
     'entries must be dicts, got str'),
])
def test_bad_init_cfg_list_is_an_error(init_cfg, error, message):
    model = TransNeXt(arch=SMALL_ARCH, img_size=64, init_cfg=init_cfg)
    with pytest.raises(error, match=message):
        model.init_weights()


def test_released_alias_scales_pick_the_last_stages():
    build = MODELS.get('transnext_micro')
    assert build(scales=4).out_indices == (1, 2, 3)
    assert build(scales=5).out_indices == (0, 1, 2, 3)


def test_eval_bias_cache_follows_weight_changes(attention_path):
    torch.manual_seed(0)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = model(x)[0]
        assert torch.equal(model(x)[0], first)
        model.block1[0].attn.cpb_fc2.bias.add_(1.0)   # in-place update, as an optimizer does
        second = model(x)[0]
        model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()})
        third = model(x)[0]
    fresh = TransNeXt(arch=SMALL_ARCH, img_size=64).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = fresh(x)[0]
    assert not torch.equal(first, second)
    torch.testing.assert_close(third, expected)


def test_attention_maps_are_the_joint_softmax():
    torch.manual_seed(0)
    attn = TransNeXt(arch=SMALL_ARCH, img_size=64).block1[0].attn
    height, width = 6, 9
    local, pooled = attn.attention_maps(torch.randn(2, height * width, 16), height, width)
    assert local.shape == (2, 1, height * width, 9) and pooled.shape == (2, 1, height * width, 1)
    torch.testing.assert_close(local.sum(-1) + pooled.sum(-1), torch.ones(2, 1, height * width))
    # The top-left token's window reaches above and left of the map: those weights are 0.
    assert torch.all(local[:, :, 0, [0, 1, 2, 3, 6]] == 0) and torch.all(local[:, :, 0, 4] > 0)


def _normalize_grads(unit, x):
    x = x.clone().requires_grad_()
    out = unit(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out, x.grad


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_unit_vectors_are_f_normalize_but_at_zero(dtype):
    """Where the norm exceeds 1e-12, F.normalize's value bit for bit and its gradient;
    a zero vector gives zero and takes no gradient (F.normalize's is 1e12 times the
    upstream one)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 24, dtype=dtype)
    x[0, 1, 2] = 0
    x[1, 0, 5] = 1e-9 * x[1, 0, 5]
    out, grad = _normalize_grads(_unit_vectors, x)
    ref, ref_grad = _normalize_grads(lambda t: F.normalize(t, dim=-1), x)
    nonzero = torch.ones(2, 3, 7, dtype=torch.bool)
    nonzero[0, 1, 2] = False
    assert torch.equal(out[nonzero], ref[nonzero])
    torch.testing.assert_close(grad[nonzero], ref_grad[nonzero])
    assert out[0, 1, 2].abs().max() == 0 and grad[0, 1, 2].abs().max() == 0
    assert ref_grad[0, 1, 2].abs().max() > 1e10


def test_unit_vectors_in_float16():
    """The norm in float32: entries whose squares overflow float16 (300) or vanish in
    it (2**-13) are normalised as in float32; a zero vector stays zero (F.normalize in
    float16 gives 0/0 there, its 1e-12 being zero in float16)."""
    x = torch.zeros(4, 24)
    x[0, :3] = 300.
    x[1, :5] = 2 ** -13
    x[2] = torch.linspace(-2, 3, 24)
    out, grad = _normalize_grads(_unit_vectors, x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), F.normalize(x, dim=-1), atol=1e-3, rtol=1e-3)
    assert out[3].abs().max() == 0 and torch.isfinite(grad).all() and grad[3].abs().max() == 0


def test_unit_vectors_gradient_formula():
    """The eager gradient (one formula, _UnitVectors) passes gradcheck in float64 on a
    small odd shape and equals what autograd makes of the traced form (the one a
    captured graph differentiates), zero vectors included."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_UnitVectors.apply, (x, torch.float64))
    # bfloat16: both end in one rounding of a float32 gradient computed in another order.
    tolerances = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1.6e-2}
    for dtype, tol in tolerances.items():
        x = torch.randn(2, 3, 5, 7).to(dtype)
        x[1, 2, 3] = 0
        grad = torch.randn(2, 3, 5, 7, dtype=_stats_dtype(x))
        eager = x.clone().requires_grad_()
        traced = x.clone().requires_grad_()
        torch.autograd.backward(_UnitVectors.apply(eager, _stats_dtype(x)), grad)
        torch.autograd.backward(traced / _unit_divisor(traced), grad)
        assert eager.grad.dtype == dtype
        torch.testing.assert_close(eager.grad, traced.grad, rtol=tol, atol=tol)
        assert eager.grad[1, 2, 3].abs().max() == 0
    # The heads of a projection are strided; the kernels downstream read them contiguous.
    strided = torch.randn(2, 5, 3, 7).transpose(1, 2)
    assert _UnitVectors.apply(strided, torch.float32).is_contiguous()


def test_unit_vectors_dispatch_fewer_operators():
    """The point of _UnitVectors: its forward and backward dispatch fewer operators than
    autograd through the traced form (11 against 18 with torch 2.13), each one a kernel
    launch on a GPU."""
    from mmtransnext.tools.profiling import count_operators
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    grad = torch.randn(2, 3, 5, 7)

    def counted(unit):
        return count_operators(lambda: torch.autograd.backward(unit(x), grad))['operators']

    eager = counted(lambda t: _UnitVectors.apply(t, torch.float32))
    traced = counted(lambda t: t / _unit_divisor(t))
    assert eager < traced, (eager, traced)


def test_keys_normalised_into_the_core_dtype(monkeypatch):
    """Under autocast the keys' unit vectors come out in the attention core's dtype
    (``into_core``): on CUDA the autocast dtype (here the CPU told so), the same numbers
    and gradient as the float32 unit vectors cast to it, without the cast; the queries'
    stay float32, and on the CPU the core's float32 is what both give."""
    from mmtransnext.models import attention
    x = torch.randn(2, 3, 5, 7).to(torch.bfloat16)
    grad = torch.randn(2, 3, 5, 7).to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert _unit_vectors(x, into_core=True).dtype == torch.float32      # CPU core
        core_dtype = attention.core_dtype
        monkeypatch.setattr(attention, 'core_dtype',
                            lambda device, autocast, dtypes: core_dtype('cuda', autocast, dtypes))
        keys = x.clone().requires_grad_()
        cast = x.clone().requires_grad_()
        direct = _unit_vectors(keys, into_core=True)
        later = _unit_vectors(cast)
        assert direct.dtype == torch.bfloat16 and later.dtype == torch.float32
        later = later.to(torch.bfloat16)
    assert torch.equal(direct, later)
    torch.autograd.backward(direct, grad)
    torch.autograd.backward(later, grad)
    assert torch.equal(keys.grad, cast.grad)


@pytest.mark.parametrize('module', ['aggregated', 'full'])
def test_zero_tokens_take_ordinary_gradients(module):
    """Zero tokens (an image's zero padding under the release's zero biases, training
    from scratch) give zero queries and keys. Their gradients must be no larger than
    other tokens': with F.normalize's gradient at a zero vector they were about 1e12
    times larger, which no float16 loss scale holds."""
    torch.manual_seed(0)
    if module == 'aggregated':
        attn = AggregatedAttention(32, 2, window_size=3, sr_ratio=2, build_size=None,
                                   build_pool_size=None, pretrain_size=8)
    else:
        attn = FullAttention(32, 2, build_size=None, pretrain_size=8)
    for linear in attn.modules():
        if isinstance(linear, torch.nn.Linear):
            torch.nn.init.zeros_(linear.bias)
    x = torch.randn(2, 8 * 12, 32)
    x[1, 40:] = 0
    x.requires_grad_()
    out = attn(x, 8, 12)
    (out * torch.randn_like(out)).sum().backward()
    per_token = x.grad.abs().amax(-1)
    assert torch.isfinite(per_token).all()
    assert per_token[1, 40:].max() <= per_token[0].max()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)
