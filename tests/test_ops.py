"""Tests of the compiled sliding-window attention op (``torch.ops.mmtransnext``).

The compiled kernels are compared with the pure-PyTorch references (forward and every
gradient), checked with ``gradcheck`` and traced with ``torch.compile(fullgraph=True)``
(invalid arguments: ``test_ops_bad_input.py``). The extension must be built (``pip install
--no-build-isolation -e .``): without it these tests fail, except on a machine with no
C++ compiler at all, where the module is skipped with that reason.

Tolerances: float64 ``atol=rtol=1e-10`` (same math, different summation order);
float32 ``atol=rtol=1e-5``; float16/bfloat16 (compared with a float64 reference of the
same rounded inputs) ``1e-2`` / ``5e-2`` relative, see ``LOW_PRECISION_TOL``.
"""
import importlib.util
import os
import shutil
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmtransnext.ops as ops
from mmtransnext.ops import sliding_window as sw
from mmtransnext.ops.graph_capture import (sliding_window_aggregate_decomposed,
                                           sliding_window_logits_decomposed)
from test_ops_cuda_elements import (accumulation_case, assert_close_to_reference,
                                    assert_rounded_once, compiled_ops, kernel_results,
                                    random_inputs, reference_results)

if not ops.extension_available('cpu') and not any(
        shutil.which(c) for c in ('c++', 'g++', 'clang++')):
    pytest.skip('mmtransnext._C is not built and no C++ compiler (c++/g++/clang++) is on '
                'PATH to build it, so the compiled op cannot be tested here',
                allow_module_level=True)

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
LOW_PRECISION_TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2),
                     torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
                     torch.float32: dict(atol=1e-4, rtol=1e-4)}

# (B, heads, height, width, d, ws): 1x1, 1xN, Nx1 maps, ws 1/3/5/7, maps smaller than
# the window, B and heads > 1.
SHAPES = [
    (1, 1, 1, 1, 4, 3),
    (1, 1, 1, 9, 4, 3),
    (1, 1, 9, 1, 4, 5),
    (2, 3, 5, 6, 8, 1),
    (2, 3, 5, 6, 8, 3),
    (1, 2, 4, 7, 16, 5),
    (2, 2, 3, 3, 6, 7),
    (1, 1, 2, 2, 3, 7),
    (2, 3, 8, 5, 24, 7),
]


def compiled_logits(q, k, b, H, W, ws):
    return torch.ops.mmtransnext.sliding_window_logits(q, k, b, H, W, ws)


def compiled_aggregate(w, v, H, W, ws):
    return torch.ops.mmtransnext.sliding_window_aggregate(w, v, H, W, ws)


def make_inputs(B, h, H, W, d, ws, dtype=torch.float64, device='cpu', seed=0):
    gen = torch.Generator().manual_seed(seed)
    N, L = H * W, ws * ws

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    return dict(q=rnd(B, h, N, d), k=rnd(B, h, N, d), bias=rnd(h, L), w=rnd(B, h, N, L),
                v=rnd(B, h, N, d), g_logits=rnd(B, h, N, L), g_out=rnd(B, h, N, d))


def run_both_ops(logits_fn, aggregate_fn, x, H, W, ws):
    """Forward of both ops and the gradients of every input for fixed output grads."""
    q, k, b, w, v = (x[n].detach().clone().requires_grad_() for n in ('q', 'k', 'bias', 'w', 'v'))
    logits = logits_fn(q, k, b, H, W, ws)
    agg = aggregate_fn(w, v, H, W, ws)
    # The output gradient is random everywhere, also at the -inf entries: those must
    # not contribute (the reference's masked_fill drops them, the kernel skips them).
    gq, gk, gb = torch.autograd.grad(logits, (q, k, b), x['g_logits'])
    gw, gv = torch.autograd.grad(agg, (w, v), x['g_out'])
    return dict(logits=logits.detach(), agg=agg.detach(), gq=gq, gk=gk, gb=gb, gw=gw, gv=gv)


def assert_all_close(got, want, **tol):
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f'{name}: {m}')


def test_extension_built():
    assert ops.extension_available('cpu'), (
        f'mmtransnext._C has no CPU kernels ({sw._LOAD_ERROR}); build it with '
        '`pip install --no-build-isolation -e .`')
    assert ops.use_compiled_op(torch.zeros(1)) or os.environ.get(ops.DISABLE_ENV) == '1'


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'B{}h{}_{}x{}_d{}_ws{}'.format(*s))
def test_compiled_matches_reference(shape, dtype):
    B, h, H, W, d, ws = shape
    x = make_inputs(*shape, dtype=dtype)
    got = run_both_ops(compiled_logits, compiled_aggregate, x, H, W, ws)
    want = run_both_ops(ops.sliding_window_logits_reference,
                        ops.sliding_window_aggregate_reference, x, H, W, ws)
    # -inf exactly where the neighbour is outside the map.
    assert torch.equal(torch.isneginf(got['logits']), torch.isneginf(want['logits']))
    assert_all_close(got, want, **TOL[dtype])


@pytest.mark.parametrize('logits_fn', [compiled_logits, ops.sliding_window_logits_reference,
                                       sliding_window_logits_decomposed],
                         ids=['compiled', 'reference', 'decomposed'])
def test_logits_match_geometry(logits_fn):
    # Independent check of the shared semantics on one token of a 3x4 map, ws=3.
    H, W, ws = 3, 4, 3
    x = make_inputs(1, 1, H, W, 2, ws)
    logits = logits_fn(x['q'], x['k'], x['bias'], H, W, ws)
    r, c = 0, 3  # top-right corner: valid neighbours (0,2),(0,3),(1,2),(1,3)
    n = r * W + c
    for j in range(ws * ws):
        rr, cc = r + j // ws - 1, c + j % ws - 1
        if 0 <= rr < H and 0 <= cc < W:
            m = rr * W + cc
            want = (x['q'][0, 0, n] * x['k'][0, 0, m]).sum() + x['bias'][0, j]
            torch.testing.assert_close(logits[0, 0, n, j], want)
        else:
            assert logits[0, 0, n, j] == float('-inf')


def test_non_contiguous_inputs():
    B, h, H, W, d, ws = 2, 3, 4, 5, 6, 3
    N, L = H * W, ws * ws
    x = make_inputs(B, h, H, W, d, ws)
    # Same values, strided storage: (B, N, h, d) transposed, bias stored (L, h).
    nc = {k: x[k].transpose(1, 2).contiguous().transpose(1, 2)
          for k in ('q', 'k', 'v', 'w', 'g_logits', 'g_out')}
    nc['bias'] = x['bias'].t().contiguous().t()
    nc['q'] = torch.cat([x['q'], x['q']], dim=-1)[..., :d]  # sliced, not just transposed
    assert not any(nc[k].is_contiguous() for k in nc)
    assert nc['q'].shape == (B, h, N, d) and nc['w'].shape == (B, h, N, L)
    got = run_both_ops(compiled_logits, compiled_aggregate, nc, H, W, ws)
    want = run_both_ops(ops.sliding_window_logits_reference,
                        ops.sliding_window_aggregate_reference, x, H, W, ws)
    assert_all_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_cpu_reduced_precision(dtype):
    B, h, H, W, d, ws = 1, 2, 5, 4, 16, 3
    x = make_inputs(B, h, H, W, d, ws, dtype=dtype)
    got = run_both_ops(compiled_logits, compiled_aggregate, x, H, W, ws)
    x64 = {k: v.double() for k, v in x.items()}
    want = run_both_ops(ops.sliding_window_logits_reference,
                        ops.sliding_window_aggregate_reference, x64, H, W, ws)
    assert all(got[k].dtype == dtype for k in got)
    assert_all_close({k: v.double() for k, v in got.items()}, want, **LOW_PRECISION_TOL[dtype])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_cpu_low_precision_accumulates_in_float32(dtype):
    shape, x, expected = accumulation_case(dtype)
    assert_rounded_once(kernel_results(compiled_ops(), x, shape), expected)


# An empty batch, no head, head dim 0: empty results (or the bias, and zero and summed
# gradients), the same as the host build of the CUDA kernels is held to.
@pytest.mark.parametrize('shape', [(0, 2, 3, 4, 8, 3), (1, 0, 3, 4, 8, 3), (2, 3, 3, 4, 0, 3)],
                         ids=lambda s: 'B{}h{}_{}x{}_d{}_ws{}'.format(*s))
def test_zero_size_inputs(shape):
    x, exact = random_inputs(shape, torch.float64)
    expected = reference_results(exact, shape)
    for name, value in kernel_results(compiled_ops(), x, shape).items():
        assert value.shape == expected[name].shape, name
        assert_close_to_reference(value, expected[name], torch.float64, name)


def _finite(fn):
    # gradcheck perturbs inputs: -inf - -inf is nan, so compare the finite entries.
    def wrapped(*args):
        out = fn(*args)
        return out.masked_fill(torch.isinf(out), 0.0)
    return wrapped


@pytest.mark.parametrize('geometry', [(3, 2, 3), (2, 3, 5), (1, 3, 3)], ids=str)
def test_gradcheck(geometry):
    H, W, ws = geometry
    x = make_inputs(1, 2, H, W, 3, ws, seed=1)
    q, k, b, w, v = (x[n].clone().requires_grad_() for n in ('q', 'k', 'bias', 'w', 'v'))
    assert torch.autograd.gradcheck(
        _finite(lambda q_, k_, b_: compiled_logits(q_, k_, b_, H, W, ws)), (q, k, b))
    assert torch.autograd.gradcheck(lambda w_, v_: compiled_aggregate(w_, v_, H, W, ws),
                                    (w, v))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), h=st.integers(1, 3), H=st.integers(1, 6), W=st.integers(1, 6),
       d=st.integers(1, 9), ws=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2**16))
def test_property_matches_reference(B, h, H, W, d, ws, seed):
    x = make_inputs(B, h, H, W, d, ws, seed=seed)
    got = run_both_ops(compiled_logits, compiled_aggregate, x, H, W, ws)
    want = run_both_ops(ops.sliding_window_logits_reference,
                        ops.sliding_window_aggregate_reference, x, H, W, ws)
    assert_all_close(got, want, **TOL[torch.float64])
    # Every row keeps its centre: at least one finite logit per token.
    assert torch.isfinite(got['logits']).any(-1).all()


class _TinyLocalAttention(torch.nn.Module):
    def __init__(self, heads=2, d=4, height=3, width=5, ws=3):
        super().__init__()
        self.heads, self.d, self.hw, self.ws = heads, d, (height, width), ws
        self.qkv = torch.nn.Linear(heads * d, 3 * heads * d)
        self.bias = torch.nn.Parameter(torch.randn(heads, ws * ws) * 0.1)

    def forward(self, x):  # x: (B, N, heads * d)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # non-contiguous (B, heads, N, d)
        attn = ops.sliding_window_logits(q, k, self.bias, *self.hw, self.ws).softmax(-1)
        out = ops.sliding_window_aggregate(attn, v, *self.hw, self.ws)
        return out.transpose(1, 2).reshape(B, N, -1)


# aot_eager checks tracing, fake kernels and autograd quickly; inductor (~20 s on two
# cores) is what a user's torch.compile runs.
@pytest.mark.parametrize('backend', ['aot_eager', 'inductor'])
def test_torch_compile_fullgraph(monkeypatch, backend):
    monkeypatch.delenv(ops.DISABLE_ENV, raising=False)
    torch.manual_seed(0)
    model = _TinyLocalAttention()
    x = torch.randn(2, 15, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------- invalid arguments
# Every op with each kind of bad argument: tests/test_ops_bad_input.py.
def _valid(dtype=torch.float32):
    x = make_inputs(2, 3, 4, 5, 6, 3, dtype=dtype)
    return x['q'], x['k'], x['bias'], x['w'], x['v']


# ------------------------------------------------------------------------ dispatching
def test_disable_env_routes_to_reference(monkeypatch):
    q, k, b, w, v = _valid(torch.float64)
    monkeypatch.setenv(ops.DISABLE_ENV, '1')
    assert not ops.use_compiled_op(q)
    calls = []
    monkeypatch.setattr(sw, 'sliding_window_logits_reference',
                        lambda *a: calls.append('logits') or compiled_logits(*a))
    monkeypatch.setattr(sw, 'sliding_window_aggregate_reference',
                        lambda *a: calls.append('aggregate') or compiled_aggregate(*a))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # disabled on purpose: no warning
        ops.sliding_window_logits(q, k, b, 4, 5, 3)
        ops.sliding_window_aggregate(w, v, 4, 5, 3)
    assert calls == ['logits', 'aggregate']
    monkeypatch.setenv(ops.DISABLE_ENV, '0')
    assert ops.use_compiled_op(q)


def test_missing_extension_warns_once_per_device(monkeypatch):
    monkeypatch.delenv(ops.DISABLE_ENV, raising=False)
    monkeypatch.setattr(sw, '_LOADED', False)
    monkeypatch.setattr(sw, '_LOAD_ERROR', 'ImportError: test stand-in')
    monkeypatch.setattr(sw, '_WARNED_DEVICES', set())
    x = torch.zeros(1)
    with pytest.warns(UserWarning, match="unavailable for device type 'cpu'.*test stand-in"):
        assert not ops.use_compiled_op(x)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not ops.use_compiled_op(x)  # once per device type
    q, k, b, w, v = _valid(torch.float64)
    torch.testing.assert_close(ops.sliding_window_logits(q, k, b, 4, 5, 3),
                               ops.sliding_window_logits_reference(q, k, b, 4, 5, 3))


def test_module_imports_without_extension(monkeypatch):
    # A fresh copy of the module with `mmtransnext._C` unimportable (as when the .so is
    # deleted): importing works, nothing is registered, the reference is used.
    monkeypatch.setitem(sys.modules, 'mmtransnext._C', None)
    monkeypatch.delattr(sys.modules['mmtransnext'], '_C', raising=False)
    # Named inside the package, so its relative imports resolve.
    spec = importlib.util.spec_from_file_location('mmtransnext.ops._sw_without_ext', sw.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.extension_available('cpu')
    assert 'mmtransnext._C' in module._LOAD_ERROR
    q, k, b, w, v = _valid(torch.float64)
    with pytest.warns(UserWarning, match='could not be loaded'):
        out = module.sliding_window_logits(q, k, b, 4, 5, 3)
    torch.testing.assert_close(out, ops.sliding_window_logits_reference(q, k, b, 4, 5, 3))


def test_extension_available_per_device():
    for device in ('cpu', 'cpu:0', torch.device('cpu'), 'meta', torch.device('meta')):
        assert ops.extension_available(device), device
    if torch.version.cuda is None:  # a CPU-only torch cannot have loaded CUDA kernels
        assert not ops.extension_available('cuda')
    # Device types without kernels answer so, whatever their dispatch key is called.
    for device in ('mps', 'xla', 'hpu', 'xpu', 'lazy', 'privateuseone', 'ipu'):
        assert not ops.extension_available(device), device


def test_meta_tensors_propagate_shapes(monkeypatch):
    """Meta tensors take the compiled op's fake kernels: shapes, forward and backward,
    without a warning that the op is missing."""
    monkeypatch.delenv(ops.DISABLE_ENV, raising=False)
    B, h, H, W, d, ws = 2, 3, 4, 5, 6, 3
    x = {k: v.to('meta') for k, v in make_inputs(B, h, H, W, d, ws).items()}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert ops.use_compiled_op(x['q'])
        got = run_both_ops(ops.sliding_window_logits, ops.sliding_window_aggregate, x, H, W, ws)
    N, L = H * W, ws * ws
    want = dict(logits=(B, h, N, L), agg=(B, h, N, d), gq=(B, h, N, d), gk=(B, h, N, d),
                gb=(h, L), gw=(B, h, N, L), gv=(B, h, N, d))
    assert {k: tuple(v.shape) for k, v in got.items()} == want
    assert all(v.is_meta and v.dtype == torch.float64 for v in got.values())


# ------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason='CUDA kernels need a GPU: torch.cuda.is_available() is False')


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('shape', [(2, 3, 5, 6, 8, 3), (1, 2, 9, 1, 24, 7),
                                   (2, 3, 40, 67, 24, 3), (1, 1, 1, 1, 4, 5)], ids=str)
def test_cuda_matches_float64_reference(shape, dtype):
    assert ops.extension_available('cuda'), (
        'mmtransnext._C was built without CUDA kernels; rebuild on this GPU machine '
        '(or with FORCE_CUDA=1)')
    B, h, H, W, d, ws = shape
    x = make_inputs(*shape, dtype=dtype, device='cuda')
    got = run_both_ops(compiled_logits, compiled_aggregate, x, H, W, ws)
    x64 = {k: v.double().cpu() for k, v in x.items()}
    want = run_both_ops(ops.sliding_window_logits_reference,
                        ops.sliding_window_aggregate_reference, x64, H, W, ws)
    assert all(got[k].dtype == dtype and got[k].is_cuda for k in got)
    assert_all_close({k: v.double().cpu() for k, v in got.items()}, want,
                     **LOW_PRECISION_TOL[dtype])
