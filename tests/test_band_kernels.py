"""The compiled band kernels of banded bias attention against their PyTorch definitions.

``torch.ops.mmtransnext.bias_softmax_``, ``softmax_backward_`` and ``bias_rows_backward``
(``csrc/cpu/band_softmax_cpu.cpp``) replace the plain-PyTorch lines next to them in
``mmtransnext/ops/banded_attention.py``; those lines are the reference here.

Tolerances: float64 agrees to 1e-10 except where the bias is interpolated: the fused
path uses the column taps of ``RowFactoredBias.col_taps``, whose source positions and
weights are computed in float32 (as PyTorch's float32 resize does) and only then cast,
while the float64 reference resizes in float64; on a 23-cell axis that is ~3e-6
relative, so those comparisons use 1e-5, and the kernels are also checked to 1e-10
against a plain-PyTorch evaluation of the same taps (``taps_bias``). float32 uses 2e-5
(own exp polynomial and float32 taps against PyTorch's exp and resize).

Bad arguments to the band kernels: the catalogue of every op's, ``tests/bad_op_calls.py``
(run by ``test_ops_bad_input.py`` and ``tools/device_check.sh``).
"""
import pytest
import torch
import torch.nn.functional as F

import mmtransnext.ops  # noqa: F401  (loads torch.ops.mmtransnext)
from mmtransnext.models.position_bias import RowFactoredBias, bias_layout
from mmtransnext.ops import banded_attention
from mmtransnext.ops.banded_attention import _biased_exp_, banded_bias_attention
from mmtransnext.ops.fused_attention import fused_bias_attention

pytestmark = pytest.mark.skipif(
    not all(hasattr(torch.ops.mmtransnext, n) for n in banded_attention._KERNEL_NAMES),
    reason='mmtransnext._C built without the band kernels')

ops = torch.ops.mmtransnext

# (build_query, build_key, pretrain, query_size, key_size)
INTERP_SMALL = ((9, 9), (3, 3), (9, 9), (5, 13), (1, 4))
INTERP_LARGE = ((20, 20), (5, 5), (20, 20), (17, 23), (4, 5))
IDENTITY = ((6, 7), (2, 3), (6, 7), (6, 7), (2, 3))
LAYOUTS = [INTERP_SMALL, INTERP_LARGE, IDENTITY]


def make_bias(spec, heads, dtype, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layout = bias_layout(*spec, torch.device('cpu'))
    table = torch.randn(heads, *layout.coords.shape[:2], generator=gen, dtype=dtype)
    table.requires_grad_(requires_grad)
    return RowFactoredBias(table, layout), table


def tol(spec, dtype):
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=2e-5)
    identity = spec[0] == spec[3] and spec[1] == spec[4]
    return dict(rtol=1e-10, atol=1e-10) if identity else dict(rtol=1e-5, atol=1e-5)


EXACT = dict(rtol=1e-10, atol=1e-10)


def taps_bias(by_rows, index, weight, start, stop):
    """The band bias ``(h, R, W, Hp, Wp)`` from the column taps, in plain PyTorch."""
    band = by_rows[:, start:stop]                                 # (h, R, Hp, Uw)
    taps = band[..., index]                                       # (h, R, Hp, W, Wp, 4)
    return (taps * weight).sum(-1).permute(0, 1, 3, 2, 4)


def bands(height):
    """(start, stop) pairs: the whole map, and bands that do not start at row 0."""
    out = [(0, height)]
    if height > 2:
        out += [(1, height - 1), (height - 2, height)]
    return out


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('spec', LAYOUTS)
@pytest.mark.parametrize('with_shift', [False, True])
def test_bias_softmax_matches_pytorch(spec, dtype, with_shift):
    batch, heads = 2, 3
    bias, _ = make_bias(spec, heads, dtype)
    (height, width), (pool_h, pool_w) = spec[3], spec[4]
    index, weight = bias.col_taps(dtype)
    gen = torch.Generator().manual_seed(1)
    for start, stop in bands(height):
        rows = stop - start
        logits = torch.randn(batch, heads, rows * width, pool_h * pool_w, generator=gen,
                             dtype=dtype) * 3
        shift = None
        if with_shift:   # a strided slice of a whole-map tensor, as the backward pass has it
            full = torch.randn(batch, heads, height * width, generator=gen, dtype=dtype) + 4
            shift = full[:, :, start * width:stop * width]
        ref = logits.clone()
        ref_shift, ref_sum = _biased_exp_(ref, bias, bias.by_rows, start, stop, False, shift)
        got = logits.clone()
        got_shift, got_sum = ops.bias_softmax_(got, bias.by_rows, index, weight, start, shift)
        t = tol(spec, dtype)
        torch.testing.assert_close(got, ref, **t)
        torch.testing.assert_close(got_shift, ref_shift, **t)
        torch.testing.assert_close(got_sum, ref_sum, **t)
        if dtype == torch.float64:   # the same taps, evaluated in PyTorch
            exact = logits.clone().view(batch, heads, rows, width, pool_h, pool_w)
            exact = exact.add_(taps_bias(bias.by_rows, index, weight, start, stop))
            exact = exact.view_as(logits)
            exact_shift = exact.amax(-1) if shift is None else shift
            exact = (exact - exact_shift[..., None]).exp()
            torch.testing.assert_close(got, exact, **EXACT)
            torch.testing.assert_close(got_sum, exact.sum(-1), **EXACT)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('spec', LAYOUTS)
def test_bias_rows_backward_is_the_adjoint(spec, dtype):
    heads = 3
    bias, _ = make_bias(spec, heads, dtype)
    (height, width), (pool_h, pool_w) = spec[3], spec[4]
    index, weight = bias.col_taps(dtype)
    uw = bias.by_rows.shape[-1]
    gen = torch.Generator().manual_seed(2)
    for start, stop in bands(height):
        rows = stop - start
        leaf = bias.by_rows.detach().clone().requires_grad_(True)
        band = bias.rows(start, stop, leaf)
        g = torch.randn(heads, rows * width, pool_h * pool_w, generator=gen, dtype=dtype)
        torch.autograd.backward(band, g.view(heads, rows, width, pool_h, pool_w))
        got = ops.bias_rows_backward(g, index, weight, uw)
        assert got.shape == (heads, rows, pool_h, uw)
        torch.testing.assert_close(got, leaf.grad[:, start:stop], **tol(spec, dtype))
        assert not leaf.grad[:, :start].any() and not leaf.grad[:, stop:].any()
        if dtype == torch.float64:   # the adjoint of the same taps, through autograd
            leaf2 = bias.by_rows.detach().clone().requires_grad_(True)
            torch.autograd.backward(taps_bias(leaf2, index, weight, start, stop),
                                    g.view(heads, rows, width, pool_h, pool_w))
            torch.testing.assert_close(got, leaf2.grad[:, start:stop], **EXACT)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_softmax_backward_matches_pytorch(dtype):
    batch, heads, rows, keys, total = 2, 3, 10, 37, 25
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(batch, heads, rows, keys, generator=gen, dtype=dtype)
    probs = torch.randn(batch, heads, rows, keys, generator=gen, dtype=dtype).softmax(-1)
    shift = torch.randn(batch, heads, total, generator=gen, dtype=dtype)[:, :, 5:5 + rows]
    grad_lse = torch.randn(batch, heads, total, generator=gen, dtype=dtype)[:, :, 7:7 + rows]
    ref = grad.clone()
    ref.sub_(shift[..., None])
    residual = (ref * probs).sum(-1, keepdim=True)
    ref.sub_(residual.sub_(grad_lse[..., None])).mul_(probs)
    got = grad.clone()
    assert ops.softmax_backward_(got, probs, shift, grad_lse) is None
    t = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, **t)


def run_attention(spec, dtype, batch, heads, dim, seed=4, cast=None):
    """Outputs and gradients of inputs drawn in ``dtype``, computed in ``cast`` if given."""
    gen = torch.Generator().manual_seed(seed)
    _, table = make_bias(spec, heads, dtype)
    (height, width), (pool_h, pool_w) = spec[3], spec[4]
    q = torch.randn(batch, heads, height * width, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads, pool_h * pool_w, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads, pool_h * pool_w, dim, generator=gen, dtype=dtype)
    go = torch.randn(batch, heads, height * width, dim, generator=gen, dtype=dtype)
    gl = torch.randn(batch, heads, height * width, generator=gen, dtype=dtype)
    q, k, v, go, gl, table = (x.to(cast or dtype) for x in (q, k, v, go, gl, table))
    for x in (q, k, v, table):
        x.requires_grad_(True)
    bias = RowFactoredBias(table, bias_layout(*spec, torch.device('cpu')))
    out, lse = banded_bias_attention(q, k, v, bias)
    ((out * go).sum() + (lse * gl).sum()).backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad, table.grad]


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('spec', LAYOUTS)
def test_end_to_end_fused_matches_plain(spec, dtype, monkeypatch):
    batch, heads, dim = 2, 2, 8
    (height, width), (pool_h, pool_w) = spec[3], spec[4]
    # Bands of two rows, so that most bands do not start at row 0.
    monkeypatch.setattr(banded_attention, '_BAND_ELEMENTS', 2 * batch * heads * width * pool_h * pool_w)
    assert banded_attention._fused_kernels(torch.zeros(1))
    fused = run_attention(spec, dtype, batch, heads, dim)
    monkeypatch.setattr(banded_attention, '_fused_kernels', lambda t: False)
    plain = run_attention(spec, dtype, batch, heads, dim)
    t = tol(spec, dtype)
    if dtype == torch.float32:
        t = dict(rtol=1e-4, atol=1e-4)
    for name, a, b in zip(['out', 'lse', 'q', 'k', 'v', 'table'], fused, plain):
        torch.testing.assert_close(a, b, **t, msg=lambda m: f'{name}: {m}')


def test_gradcheck_through_fused_path(monkeypatch):
    spec = INTERP_SMALL
    layout = bias_layout(*spec, torch.device('cpu'))
    (height, width), (pool_h, pool_w) = spec[3], spec[4]
    monkeypatch.setattr(banded_attention, '_BAND_ELEMENTS', 2 * width * pool_h * pool_w * 2)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, height * width, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, pool_h * pool_w, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, pool_h * pool_w, 2, generator=gen, dtype=torch.float64)
    table = torch.randn(2, *layout.coords.shape[:2], generator=gen, dtype=torch.float64)
    inputs = [x.requires_grad_(True) for x in (q, k, v, table)]

    def fn(q, k, v, table):
        return banded_bias_attention(q, k, v, RowFactoredBias(table, layout))

    assert banded_attention._fused_kernels(q)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def _cpu_resizes_half() -> bool:
    """Whether this torch resizes float16 bilinearly on the CPU (2.1 does not)."""
    try:
        F.interpolate(torch.zeros(1, 1, 2, 2, dtype=torch.float16), size=(3, 3),
                      mode='bilinear', align_corners=False)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize('dtype', [torch.bfloat16, pytest.param(
    torch.float16, marks=pytest.mark.skipif(
        not _cpu_resizes_half(), reason='this torch has no float16 bilinear resize on the '
        'CPU, which building the bias table takes'))], ids=str)
def test_low_precision_takes_the_plain_branch(dtype):
    """The band kernels take float32 and float64; the plain branch serves the rest."""
    assert banded_attention._fused_kernels(torch.zeros(1))
    assert not banded_attention._fused_kernels(torch.zeros(1, dtype=dtype))
    low = run_attention(INTERP_SMALL, dtype, 2, 2, 8)
    ref = run_attention(INTERP_SMALL, dtype, 2, 2, 8, cast=torch.float32)
    for name, a, b in zip(['out', 'lse', 'q', 'k', 'v', 'table'], low, ref):
        assert a.dtype == dtype, name
        err = ((a.float() - b).norm() / b.norm()).item()
        assert err < 2e-2, f'{name}: relative error {err:.3g} in {dtype}'


def _attention_args(**bad):
    """Valid arguments of the biased attention (3 heads, 5x7 queries, 2x3 keys), with
    ``bad`` replacing some; ``table_heads`` gives the bias that many heads."""
    layout = bias_layout((5, 7), (2, 3), (5, 7), (5, 7), (2, 3), torch.device('cpu'))
    table = torch.zeros(bad.pop('table_heads', 3), *layout.coords.shape[:2])
    args = dict(query=torch.zeros(1, 3, 35, 24), key=torch.zeros(1, 3, 6, 24),
                value=torch.zeros(1, 3, 6, 24), bias=RowFactoredBias(table, layout))
    args.update(bad)
    return args


@pytest.mark.parametrize('fn', [banded_bias_attention, fused_bias_attention],
                         ids=lambda fn: fn.__name__)
@pytest.mark.parametrize('bad, message', [
    # Broadcast over the heads in the forward pass, it would fail in the backward.
    (dict(table_heads=1), r'bias table \(1, 5, 2, \d+\) is not \(heads=3, H=5, Hp=2'),
    (dict(query=torch.zeros(1, 3, 36, 24)), 'laid out for 5x7 queries and 2x3 keys'),
    (dict(value=torch.zeros(1, 2, 6, 24)), 'shapes do not match'),
    (dict(query=torch.zeros(3, 35, 24)), 'query must be a 4-D tensor'),
    (dict(key=torch.zeros(1, 3, 6, 24, dtype=torch.float64)), 'key is torch.float64'),
    (dict(query=torch.zeros(1, 3, 35, 24, dtype=torch.int32),
          key=torch.zeros(1, 3, 6, 24, dtype=torch.int32),
          value=torch.zeros(1, 3, 6, 24, dtype=torch.int32)), 'not a floating-point dtype'),
], ids=['bias_heads', 'tokens', 'shapes', 'not_4d', 'mixed_dtype', 'int_dtype'])
def test_both_paths_refuse_bad_arguments_alike(fn, bad, message):
    with pytest.raises(ValueError, match=f'^{fn.__name__}: .*{message}'):
        fn(**_attention_args(**bad))
