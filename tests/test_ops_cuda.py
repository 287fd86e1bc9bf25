"""The CUDA path: kernels in every training dtype, the model's dtype policy, golden
cases on the GPU, and Mask R-CNN and UperNet training steps in mixed precision.

Tolerances against a float32 (or float64) reference, as neighbourhood-attention
libraries use them: forward 1e-2 (float16) and 5e-2 (bfloat16), gradients 1e-2; the
float32 golden cases within the golden README's limits (outputs 1e-4, gradients
``1e-3 * max|g_ref|`` per tensor) with TF32 off.

The dtype-policy tests at the top run anywhere; the rest need a GPU and are skipped
with the reason "no CUDA device" elsewhere (``tools/device_check.sh`` runs them).
"""
import contextlib
import math

import numpy as np
import pytest
import torch

import mmtransnext.ops as ops
from conftest import golden_arch
from mmtransnext.models import TransNeXt
from mmtransnext.models.attention import AggregatedAttention, FullAttention, core_dtype
from test_ops_cuda_elements import (accumulation_case, assert_rounded_once, compiled_ops,
                                    kernel_results)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')

FORWARD_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}
GRAD_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}
LOW = [torch.float16, torch.bfloat16]


# ------------------------------------------------------------------- dtype policy
@pytest.mark.parametrize('autocast_dtype', LOW, ids=str)
def test_policy_cuda_autocast_runs_in_the_autocast_dtype(autocast_dtype):
    # Operands as autocast leaves them: projections low, normalised ones float32.
    dtypes = [autocast_dtype, torch.float32, torch.float32]
    assert core_dtype('cuda', autocast_dtype, dtypes) == autocast_dtype


@pytest.mark.parametrize('device_type', ['cpu', 'cuda'])
def test_policy_without_autocast_or_on_cpu(device_type):
    assert core_dtype(device_type, None, [torch.float32]) == torch.float32
    assert core_dtype(device_type, None, [torch.float64, torch.float32]) == torch.float64
    assert core_dtype(device_type, None, [torch.bfloat16]) == torch.float32
    # CPU autocast keeps float32: the band kernels take float32/float64 only.
    assert core_dtype('cpu', torch.bfloat16, [torch.bfloat16, torch.float32]) == torch.float32


def _core_operands(module, x, size, autocast_dtype):
    """The dtypes the core's operands arrive in, and the module's output."""
    seen = {}
    core = '_merged_softmax' if ops.use_compiled_op(x) else '_joint_softmax'
    original = getattr(module, core)

    def spy(*args):
        seen['dtypes'] = [a.dtype for a in args if torch.is_tensor(a)]
        return original(*args)

    setattr(module, core, spy)
    # No autocast context at all without a dtype: torch 2.1's CPU autocast refuses
    # float32 even when disabled.
    context = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype
               else contextlib.nullcontext())
    try:
        with context:
            out = module(x, *size)
    finally:
        delattr(module, core)
    return seen['dtypes'], out


@pytest.mark.parametrize('autocast', [False, True])
def test_cpu_core_runs_in_float32(attention_path, autocast):
    torch.manual_seed(0)
    attn = AggregatedAttention(32, 2, 3, 2, None, None, 16)
    attn.reset_attention_parameters()
    dtypes, out = _core_operands(attn, torch.randn(2, 6 * 10, 32), (6, 10),
                                 torch.bfloat16 if autocast else None)
    assert set(dtypes) == {torch.float32}
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)  # proj autocasts


def test_each_operand_is_cast_once(monkeypatch):
    # Under CPU autocast the bfloat16 projections reach float32 by one cast each.
    from mmtransnext.models import attention
    calls = []
    original = attention._one_dtype

    def counting(items, device_type):
        out = original(items, device_type)
        calls.append([(a.dtype, b.dtype) for a, b in zip(items, out)
                      if torch.is_tensor(a) and a.is_floating_point()])
        return out

    monkeypatch.setattr(attention, '_one_dtype', counting)
    torch.manual_seed(0)
    attn = AggregatedAttention(32, 2, 3, 2, None, None, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        attn(torch.randn(1, 36, 32), 6, 6)
    assert len(calls) == 1  # one cast site for the whole core
    assert {dst for _, dst in calls[0]} == {torch.float32}
    assert torch.bfloat16 in {src for src, _ in calls[0]}  # the projections did need it


def test_block_input_is_cast_once_for_its_projections(monkeypatch):
    """A float32 input under autocast (CUDA's layer norms give float32) is cast to the
    autocast dtype once for ``q``, ``kv`` and ``sr``, not by each; its gradient then
    comes back through one cast, equal to the three casts' within bfloat16 rounding.
    float64 and the autocast dtype are left as they are, as autocast leaves them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmtransnext.models import attention
    from mmtransnext.models.attention import _cast_for_autocast

    class CastsOf(TorchDispatchMode):
        def __init__(self, tensor):
            super().__init__()
            self.tensor, self.casts = tensor, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy and args[0] is self.tensor:
                self.casts += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    attn = AggregatedAttention(32, 2, 3, 2, None, None, 16)
    x = torch.randn(1, 36, 32, requires_grad=True)
    counter = CastsOf(x)
    with torch.autocast('cpu', dtype=torch.bfloat16), counter:
        out = attn(x, 6, 6)
    assert counter.casts == 1
    out.float().sum().backward()
    grad, x.grad = x.grad, None
    monkeypatch.setattr(attention, '_cast_for_autocast', lambda tensor: tensor)
    with torch.autocast('cpu', dtype=torch.bfloat16):   # each projection casting for itself
        attn(x, 6, 6).float().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=2 ** -7, atol=2 ** -7 * x.grad.abs().max())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low, wide = torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)
        assert _cast_for_autocast(low) is low and _cast_for_autocast(wide) is wide
        assert _cast_for_autocast(torch.ones(2)).dtype == torch.bfloat16
    plain = torch.ones(2)
    assert _cast_for_autocast(plain) is plain


def test_block_weights_are_cast_together_under_autocast(monkeypatch):
    """Under autocast each block casts its projections' weights and biases in one
    operator (and their gradients back in one): the same outputs and gradients, bit for
    bit, as autocast casting each layer's, and none of those parameters cast on its own
    (autocast casts them one by one: all 52 of this model on torch 2.13); outside
    autocast, on the reference path and for float64 weights nothing is cast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmtransnext.models import attention, transnext

    class ParameterCasts(TorchDispatchMode):
        def __init__(self, params):
            super().__init__()
            self.params, self.cast = {id(p) for p in params}, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy and id(args[0]) in self.params:
                self.cast.add(id(args[0]))
            return func(*args, **(kwargs or {}))

    def run(model):
        model.zero_grad(set_to_none=True)
        counter = ParameterCasts(list(model.parameters()))
        with torch.autocast('cpu', dtype=torch.bfloat16), counter:
            outs = model(x)
        sum(out.float().square().sum() for out in outs).backward()
        return outs, {n: p.grad for n, p in model.named_parameters()}, counter.cast

    from test_transnext import SMALL_ARCH
    torch.manual_seed(0)
    model = TransNeXt(arch=SMALL_ARCH, img_size=64, pretrain_size=64).train()
    x = torch.randn(2, 3, 64, 64)
    together_outs, together_grads, together_casts = run(model)
    monkeypatch.setattr(transnext, 'autocast_weights', lambda layers, like: None)
    apart_outs, apart_grads, apart_casts = run(model)
    assert all(torch.equal(a, b) for a, b in zip(together_outs, apart_outs))
    for name, grad in apart_grads.items():
        assert torch.equal(together_grads[name], grad), name
    blocks = [block for stage in range(1, 5) for block in getattr(model, f'block{stage}')]
    layer_params = {id(p) for block in blocks
                    for layer in block.attn.autocast_layers() + block.mlp.autocast_layers()
                    for p in layer.parameters()}
    assert len(layer_params) == (3 * 7 + 5) * 2   # a weight and a bias a layer
    assert not together_casts & layer_params and apart_casts & layer_params
    monkeypatch.undo()
    layers = model.block1[0].attn.autocast_layers()
    assert attention.autocast_weights(layers, x) is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        weights = attention.autocast_weights(layers, x)
        assert {w.dtype for w in weights.values()} == {torch.bfloat16}
        assert all(weights[p].shape == p.shape for layer in layers for p in layer.parameters())
        monkeypatch.setenv(ops.DISABLE_ENV, '1')
        assert attention.autocast_weights(layers, x) is None
        monkeypatch.delenv(ops.DISABLE_ENV)
        assert attention.autocast_weights([torch.nn.Linear(2, 2).double()], x) is None


@pytest.mark.parametrize('dtype', LOW, ids=str)
def test_low_precision_core_matches_float32(monkeypatch, dtype):
    """The core as CUDA autocast runs it (every operand in the low dtype, the pooled
    band in plain PyTorch), here on the CPU kernels: against the float32 core on the
    same rounded operands, forward and backward."""
    from mmtransnext.ops import banded_attention
    try:
        torch.ones(1, 2, 2, dtype=dtype) @ torch.ones(1, 2, 2, dtype=dtype)
    except RuntimeError as exc:  # torch 2.1's CPU matmul has no float16
        pytest.skip(f'torch {torch.__version__} has no CPU {dtype} matmul: {exc}')
    monkeypatch.setattr(banded_attention, '_fused_kernels', lambda tensor: False)
    monkeypatch.delenv(ops.DISABLE_ENV, raising=False)
    torch.manual_seed(0)
    attn = AggregatedAttention(32, 2, 3, 2, None, None, 16)
    attn.reset_attention_parameters()
    with torch.no_grad():
        projected = attn._project(torch.randn(2, 6 * 10, 32), 6, 10)

    def run(cast):
        leaves = [t.to(cast).requires_grad_() if torch.is_tensor(t) else t for t in projected]
        out = attn._merged_softmax(*leaves)
        grads = torch.autograd.grad(out.float().square().sum(),
                                    [t for t in leaves if torch.is_tensor(t)])
        return out, grads

    projected = [t.to(dtype).float() if torch.is_tensor(t) else t for t in projected]
    ref, ref_grads = run(torch.float32)
    out, grads = run(dtype)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = FORWARD_TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for got, want in zip(grads, ref_grads):
        err = ((got.float() - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert err <= tol, f'relative gradient error {err:.3g} > {tol}'


# ------------------------------------------------------------------ CUDA kernels
def _op_inputs(shape, dtype, seed=0):
    B, h, H, W, d, ws = shape
    gen = torch.Generator().manual_seed(seed)
    N, L = H * W, ws * ws

    def rnd(*s):
        return torch.randn(*s, generator=gen).to('cuda', dtype)
    return dict(q=rnd(B, h, N, d), k=rnd(B, h, N, d), bias=rnd(h, L), w=rnd(B, h, N, L).softmax(-1),
                v=rnd(B, h, N, d), gl=rnd(B, h, N, L), go=rnd(B, h, N, d))


def _leaf(t, misaligned=False):
    """A leaf copy of ``t``; misaligned: one value into its storage (no 16-byte accesses)."""
    if not misaligned:
        return t.detach().clone().requires_grad_()
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t.detach()).requires_grad_()


def _run(x, H, W, ws, fn_logits, fn_aggregate, misaligned=False):
    q, k, b, w, v = (_leaf(x[n], misaligned) for n in ('q', 'k', 'bias', 'w', 'v'))
    logits = fn_logits(q, k, b, H, W, ws)
    agg = fn_aggregate(w, v, H, W, ws)
    grads = torch.autograd.grad(logits, (q, k, b), x['gl']) + torch.autograd.grad(
        agg, (w, v), x['go'])
    return [logits, agg], list(grads)


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('shape', [(2, 3, 5, 6, 8, 3), (1, 2, 9, 1, 24, 7),
                                   (2, 3, 40, 67, 24, 3), (1, 4, 14, 14, 32, 5)], ids=str)
@pytest.mark.parametrize('misaligned', [False, True], ids=['aligned', 'misaligned'])
def test_cuda_kernels_match_float32_reference(shape, dtype, misaligned):
    # Aligned inputs whose head dim fills 16 bytes take the vector accesses; misaligned
    # ones (and head dims that do not) one value at a time.
    assert ops.extension_available('cuda'), 'mmtransnext._C was built without CUDA kernels'
    B, h, H, W, d, ws = shape
    x = _op_inputs(shape, dtype)
    outs, grads = _run(x, H, W, ws, torch.ops.mmtransnext.sliding_window_logits,
                       torch.ops.mmtransnext.sliding_window_aggregate, misaligned)
    # The reference in float32 on the same rounded inputs.
    x32 = {k: v.float() for k, v in x.items()}
    ref_outs, ref_grads = _run(x32, H, W, ws, ops.sliding_window_logits_reference,
                               ops.sliding_window_aggregate_reference)
    for got, want in zip(outs, ref_outs):
        assert got.dtype == dtype
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        tol = FORWARD_TOL[dtype]
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    for got, want in zip(grads, ref_grads):
        tol = GRAD_TOL[dtype]
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@cuda
@pytest.mark.parametrize('dtype', LOW, ids=str)
def test_cuda_low_precision_accumulates_in_float32(dtype):
    # Sums that an accumulator in the input dtype gets wrong (each logit's 2**16
    # products, each window's taps): every output and gradient must be the exact sum
    # rounded once. The host build and the CPU kernels are held to the same case.
    shape, x, expected = accumulation_case(dtype)
    x = {name: t.cuda() for name, t in x.items()}
    assert_rounded_once(kernel_results(compiled_ops(), x, shape), expected)


@cuda
@pytest.mark.parametrize('dtype', LOW, ids=str)
@pytest.mark.parametrize('module', ['aggregated', 'full'])
def test_cuda_attention_core_in_autocast_dtype(monkeypatch, dtype, module):
    """Under CUDA autocast the core runs in the autocast dtype, on both paths.

    Against float32: outputs within the forward tolerance and all gradients together
    normwise within it. Per tensor, each gradient of the default path is at most twice
    as far from float32 as the released algorithm's in the same dtype (plus the golden
    README's 1e-3 of the largest entry), the rule FlashAttention's tests hold their
    kernels to: a relative error per tensor says nothing where a gradient is a small
    difference of large terms (full attention's bias-MLP gradients, its last bias zero
    in theory, measured 4.6e3 relative in float16 with 1e-5 of norm to compare with).
    """
    torch.manual_seed(0)
    attn = (AggregatedAttention(64, 2, 3, 2, None, None, 16) if module == 'aggregated'
            else FullAttention(64, 2, None, 16)).cuda()
    x = torch.randn(2, 12 * 14, 64, device='cuda')
    names, params = zip(*attn.named_parameters())

    def run(path, autocast_dtype):
        if path == 'reference':
            monkeypatch.setenv(ops.DISABLE_ENV, '1')
        else:
            monkeypatch.delenv(ops.DISABLE_ENV, raising=False)
        if module == 'aggregated' and autocast_dtype is not None:
            dtypes, out = _core_operands(attn, x, (12, 14), autocast_dtype)
            assert set(dtypes) == {autocast_dtype}, 'the core did not run in the autocast dtype'
        else:
            with (torch.autocast('cuda', dtype=autocast_dtype) if autocast_dtype
                  else contextlib.nullcontext()):
                out = attn(x, 12, 14)
        return out, torch.autograd.grad(out.float().square().sum(), params)

    ref, ref_grads = run('reference', None)
    tol = FORWARD_TOL[dtype]
    worst = {}
    for path in ('reference', 'compiled'):
        out, grads = run(path, dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        diff = torch.cat([(g.float() - r).flatten() for g, r in zip(grads, ref_grads)])
        whole = torch.cat([r.flatten() for r in ref_grads])
        assert diff.norm() <= tol * whole.norm(), f'{path}: gradients {diff.norm() / whole.norm():.3g}'
        worst[path] = [(g.float() - r).abs().max().item() for g, r in zip(grads, ref_grads)]
    for name, ours, released, r in zip(names, worst['compiled'], worst['reference'], ref_grads):
        limit = 2 * released + 1e-3 * r.abs().max().item()
        assert ours <= limit, f'{name}: max error {ours:.3g}, released algorithm {released:.3g}'


# ----------------------------------------------------------------- golden on CUDA
@pytest.fixture
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _golden_model(golden, mode):
    model = TransNeXt(**golden_arch(golden), is_extrapolation=mode == 'extrapolation')
    model.load_state_dict(golden['state_dict'], strict=True)
    return model.cuda()


@cuda
def test_cuda_synchronizations_are_counted_by_site():
    """The benchmark's count of the host's waits: a value read back waits, a launch not."""
    from mmtransnext.tools.profiling import count_synchronizations
    x = torch.ones(4, device='cuda')

    def reads(times):
        x.add(1)
        for _ in range(times):
            x.sum().item()

    once = count_synchronizations(lambda: reads(1))['synchronizations']
    counted = count_synchronizations(lambda: reads(2))
    assert once >= 1 and counted['synchronizations'] == 2 * once
    assert len(counted['sync_sites']) == 1, counted
    assert counted['sync_sites'][0].startswith('test_ops_cuda.py:')
    assert count_synchronizations(lambda: x.add(1)) == dict(synchronizations=0, sync_sites=[])
    assert torch.cuda.get_sync_debug_mode() == 0    # the mode is restored


@cuda
@pytest.mark.parametrize('case', ['interpolation_at_img_size', 'interpolation_other_size',
                                  'extrapolation_other_size'])
def test_cuda_golden_outputs(dense_golden, attention_path, no_tf32, case):
    data = dense_golden['cases'][case]
    model = _golden_model(dense_golden, data['mode']).eval()
    with torch.no_grad():
        outs = model(data['input'].cuda())
    for i, (out, ref) in enumerate(zip(outs, data['outputs'])):
        torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f'stage {i}: {m}')


@cuda
def test_cuda_golden_gradients(dense_golden, attention_path, no_tf32):
    data = dense_golden['cases']['interpolation_grad']
    model = _golden_model(dense_golden, data['mode']).train()
    x = data['input'].cuda().requires_grad_()
    outs = model(x)
    loss = sum((out * w.cuda()).sum() for out, w in zip(outs, data['weights']))
    torch.testing.assert_close(loss.cpu(), data['loss'], atol=1e-4, rtol=1e-4)
    loss.backward()
    grads = dict(input=(x.grad, data['input_grad']))
    params = dict(model.named_parameters())
    grads.update({n: (params[n].grad, ref) for n, ref in data['param_grads'].items()})
    for name, (grad, ref) in grads.items():
        limit = 1e-3 * max(ref.abs().max().item(), 1e-3)
        err = (grad.cpu() - ref).abs().max().item()
        assert err <= limit, f'{name}: max |g - g_ref| = {err:.3g} > {limit:.3g}'


# ------------------------------------------------------ Mask R-CNN mixed precision
def _mmcv_cuda_ops():
    try:
        from mmcv.ops import RoIAlign  # noqa: F401  (absent from mmcv built without ops)
    except ImportError:
        return False
    return True


# (config, AmpOptimWrapper dtype): mmdet's ``--amp`` (float16, dynamic loss scale) on
# Mask R-CNN, and bfloat16 on UperNet. Mask R-CNN cannot run in bfloat16 with mmcv 2.1,
# whatever the backbone: its RoIAlign has no bfloat16 CUDA kernel ("roi_align_forward_
# cuda_kernel" not implemented for 'BFloat16', seen on an H100 on 2026-11-27).
AMP_CASES = [('detection/mask-rcnn_transnext-tiny_fpn_1x_coco.py', 'float16'),
             ('segmentation/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py', 'bfloat16'),
             ('segmentation/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py', 'float16')]
# float16's dynamic loss scale starts at 2**16 and halves at each step whose gradients
# overflow, skipping the update: 17 steps bring it down to 1, where any gradient that
# fits float16 unscaled gets through. From the release's initialisation this Mask R-CNN
# batch needs 8 or less (in float32 on a CPU its patch embedding's bias gradient is
# 6.5e3): the second image's zero padding makes constant tokens in stage 1, whose
# LayerNorm gradient is 1/sqrt(eps) = 1000 times the upstream one, at two norms.
AMP_STEPS = 17


@cuda
@pytest.mark.skipif(not _mmcv_cuda_ops(), reason='mmcv has no compiled ops (mmcv-lite)')
@pytest.mark.parametrize('config, amp', AMP_CASES, ids=lambda v: v.split('/')[-1].split('_')[0])
def test_cuda_amp_training_step(config, amp):
    """Training steps (TransNeXt-T widths, one block per stage) under mmengine's
    AmpOptimWrapper: float16 with dynamic loss scaling, bfloat16 without. Every step's
    losses are finite, and the optimizer updates the backbone within AMP_STEPS steps
    (float16 skips the steps whose scaled gradients overflow)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from test_configs import REPO, build, det_batch, registry, seg_batch, small_cfg

    cfg = small_cfg(REPO / 'configs' / config, 128)
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.dtype = amp
    cfg.optim_wrapper.loss_scale = 'dynamic' if amp == 'float16' else 1.0
    rng = np.random.default_rng(0)
    if config.startswith('detection'):
        data, losses = det_batch(128, True, rng), {'loss_rpn_cls', 'loss_cls', 'loss_mask'}
    else:
        cfg.model.data_preprocessor.size = (128, 128)
        data, losses = seg_batch(128, rng), {'decode.loss_ce', 'aux.loss_ce'}
    torch.manual_seed(0)
    model = build(cfg).cuda()
    model.init_weights()
    with DefaultScope.overwrite_default_scope(registry(cfg)[0]):
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    watched = model.backbone.patch_embed1.proj.weight
    before = watched.detach().clone()
    scales = []
    for step in range(AMP_STEPS):
        log_vars = model.train_step(data, wrapper)
        values = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in log_vars.items()}
        assert all(math.isfinite(v) for v in values.values()), f'step {step}: {values}'
        if amp == 'float16':
            scales.append(wrapper.loss_scaler.get_scale())
        if not torch.equal(before, watched.detach()):
            break
    else:
        pytest.fail(f'the optimizer never updated the backbone in {AMP_STEPS} steps '
                    f'(loss scale after each: {scales})')
    assert losses <= set(values), values
