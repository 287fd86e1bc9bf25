"""The default path's training memory savings: same numbers, fewer kept activations.

* ``OffsetMLP`` evaluates the position-bias MLP a chunk at a time and recomputes its
  hidden layer in the backward pass;
* the convolutional GLU keeps only its input and recomputes its hidden part;
* the depthwise convolution runs channels-last.

The reference path (``MMTRANSNEXT_DISABLE_EXT=1``) keeps the released behaviour, so the
saved-activation counts of the two paths are compared here (bytes, not timings).
"""
import pytest
import torch

from mmtransnext.models import TransNeXt
from mmtransnext.models import position_bias
from mmtransnext.models.position_bias import OffsetMLP, bias_layout
from mmtransnext.models.transnext import _ConvolutionalGLU
from mmtransnext.ops import DISABLE_ENV

SMALL_ARCH = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1],
                  mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1], window_size=[3, 3, 3, None])


def _linear_table(coords, fc1, fc2):
    """The MLP as ``nn.Linear`` layers compute it (the released way)."""
    return fc2(torch.relu(fc1(coords))).permute(2, 0, 1)


def _mlp(dtype, hidden=32, heads=3, seed=0):
    torch.manual_seed(seed)
    fc1 = torch.nn.Linear(2, hidden).to(dtype)
    fc2 = torch.nn.Linear(hidden, heads).to(dtype)
    torch.nn.init.normal_(fc1.bias)          # so that ReLU cuts inside the grid
    return fc1, fc2


def _offset_mlp(layout, fc1, fc2, dtype):
    return OffsetMLP.apply(layout.offsets_h.to(dtype), layout.offsets_w.to(dtype), fc1.weight,
                           fc1.bias, fc2.weight, fc2.bias)


@pytest.mark.parametrize('chunk_elements', [1, 100, 1 << 20])
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_offset_mlp_equals_linear_layers(monkeypatch, chunk_elements, dtype, tol):
    # 1 element per chunk: one grid row per step; 100: several rows and a remainder.
    monkeypatch.setitem(position_bias._MLP_CHUNK_ELEMENTS, 'cpu', chunk_elements)
    layout = bias_layout((13, 11), (3, 2), (14, 14), (13, 11), (3, 2), torch.device('cpu'))
    fc1, fc2 = _mlp(dtype)
    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    expected = _linear_table(layout.coords.to(dtype), fc1, fc2)
    table = _offset_mlp(layout, fc1, fc2, dtype)
    assert table.shape == expected.shape == (3, len(layout.offsets_h), len(layout.offsets_w))
    torch.testing.assert_close(table, expected, atol=tol, rtol=tol)
    grad = torch.randn_like(table)
    for got, want in zip(torch.autograd.grad(table, params, grad),
                         torch.autograd.grad(expected, params, grad)):
        # Relative to the largest entry, as the golden tolerance is.
        assert (got - want).abs().max() <= tol * max(want.abs().max(), 1)


def test_offset_mlp_chunks_by_device():
    """Stage 1 of TransNeXt-T at 800x1333 (392 x 392 offsets, 512 hidden): chunks sized
    for a CPU's cache there, for launches on a GPU; every grid row in one chunk."""
    for device, count in (('cpu', 79), ('cuda', 10), ('meta', 79)):
        chunks = OffsetMLP._chunks(392, 392, 512, torch.device(device))
        assert len(chunks) == count and chunks[0][0] == 0 and chunks[-1][1] == 392
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


def test_offset_mlp_gradcheck(monkeypatch):
    monkeypatch.setitem(position_bias._MLP_CHUNK_ELEMENTS, 'cpu', 8)
    torch.manual_seed(0)
    offsets_h = torch.randn(5, dtype=torch.float64)
    offsets_w = torch.randn(3, dtype=torch.float64)
    params = [torch.randn(4, 2, dtype=torch.float64, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(
        lambda *p: OffsetMLP.apply(offsets_h, offsets_w, *p), params)


def test_offset_mlp_layout_offsets_span_the_grid():
    layout = bias_layout((8, 12), (2, 3), (8, 8), (16, 20), (2, 3), torch.device('cpu'))
    torch.testing.assert_close(layout.coords[:, 0, 0], layout.offsets_h)
    torch.testing.assert_close(layout.coords[0, :, 1], layout.offsets_w)


def _saved_bytes(fn):
    """Bytes of the distinct non-parameter tensors autograd keeps while ``fn`` runs."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.fixture(params=['default', 'reference'])
def path(request, monkeypatch):
    if request.param == 'default':
        monkeypatch.delenv(DISABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(DISABLE_ENV, '1')
    return request.param


def test_glu_keeps_only_its_input_on_the_default_path(path):
    torch.manual_seed(0)
    glu = _ConvolutionalGLU(16, 8)                     # hidden 85: 5.3 x the input
    x = torch.randn(2, 9 * 7, 16, requires_grad=True)
    saved, out = _saved_bytes(lambda: glu(x, 9, 7, recompute_hidden=True))
    hidden_bytes = x.numel() // 16 * 85 * 4
    if path == 'default':
        assert saved <= x.nbytes
    else:                                              # fc1 output, conv output, GELU...
        assert saved >= 4 * hidden_bytes
    out.sum().backward()
    assert x.grad is not None and glu.dwconv.dwconv.weight.grad is not None


def test_recomputed_glu_gives_the_same_gradients(path):
    torch.manual_seed(0)
    glu = _ConvolutionalGLU(16, 8)
    x = torch.randn(2, 9 * 7, 16, requires_grad=True)
    weight = torch.randn(2, 9 * 7, 16)
    grads = []
    for recompute in (False, True):
        out = glu(x, 9, 7, recompute_hidden=recompute)
        grads.append(torch.autograd.grad((out * weight).sum(), [x, *glu.parameters()]))
    for kept, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, kept, atol=1e-6, rtol=1e-5)


def test_channels_last_depthwise_conv_equals_released_layout(monkeypatch):
    torch.manual_seed(0)
    glu = _ConvolutionalGLU(12, 4)                     # hidden 32
    x = torch.randn(3, 5 * 11, 64)                     # the gate is a strided half
    monkeypatch.setenv(DISABLE_ENV, '1')
    released = glu.dwconv(x[..., :32], 5, 11)
    monkeypatch.setenv(DISABLE_ENV, '0')
    channels_last = glu.dwconv(x[..., :32], 5, 11)
    torch.testing.assert_close(channels_last, released, atol=1e-6, rtol=1e-5)


def test_default_path_keeps_far_fewer_activations(monkeypatch):
    """A whole training forward: the default path keeps under a third of the reference's."""
    torch.manual_seed(0)
    model = TransNeXt(arch=SMALL_ARCH, img_size=128, pretrain_size=64).train()
    x = torch.randn(1, 3, 128, 160)
    kept = {}
    for path, env in (('default', '0'), ('reference', '1')):
        monkeypatch.setenv(DISABLE_ENV, env)
        kept[path], outs = _saved_bytes(lambda: model(x))
        sum(out.sum() for out in outs).backward()     # and the graph still runs
    assert kept['default'] * 3 < kept['reference'], kept


def test_offset_mlp_takes_chunks_where_the_fused_kernels_do_not_serve(monkeypatch):
    """On the CPU (and wherever :func:`~mmtransnext.ops.use_fused_attention` says no) the
    MLP runs as chunked operators; the Triton kernels are not launched."""
    def refuse(*args):
        raise AssertionError('the fused MLP kernels were launched on the CPU')

    monkeypatch.setattr(position_bias, 'offset_mlp_table', refuse)
    monkeypatch.setattr(position_bias, 'offset_mlp_grads', refuse)
    layout = bias_layout((5, 4), (2, 2), (14, 14), (5, 4), (2, 2), torch.device('cpu'))
    fc1, fc2 = _mlp(torch.float32)
    _offset_mlp(layout, fc1, fc2, torch.float32).sum().backward()
    assert fc1.weight.grad is not None
