"""The fused kernels compiled for a GPU, against the whole-matrix reference.

Skipped without CUDA; every run of the suite checks the same kernels under
Triton's interpreter (``test_fused_attention.py``). bfloat16 is checked here only,
to 5e-2 of the reference's largest magnitude (8 mantissa bits on the operands of
both matmuls and on the probabilities).
"""
import pytest
import torch

from mmtransnext.models.position_bias import bias_layout
from fused_attention_cases import assert_near, fused, gradients, make_inputs, whole_matrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.mark.parametrize('bias_tile', ['taps', 'slots'])
@pytest.mark.parametrize('backward', ['atomic', 'two-pass'])
@pytest.mark.parametrize('dtype', [torch.float32, 'tf32x3', torch.float16, torch.bfloat16],
                         ids=str)
def test_compiled_kernels_on_cuda(dtype, backward, bias_tile, monkeypatch):
    """On a GPU: the compiled kernels against the whole-matrix reference, with both
    ways of forming the key and value gradients and of reading the bias (slots: 16-bit
    inputs only, float32 keeps taps); ``tf32x3``: float32 launched with
    :data:`~mmtransnext.ops.fused_attention.TF32X3` (three TF32 products per dot), held
    to float32's tolerance."""
    from mmtransnext.ops import fused_attention
    monkeypatch.setattr(fused_attention, 'BACKWARD_KV', backward)
    monkeypatch.setattr(fused_attention, 'BIAS_TILE', bias_tile)
    if dtype == 'tf32x3':
        dtype = torch.float32
        monkeypatch.setitem(fused_attention.LAUNCH, dtype,
                            (fused_attention.TF32X3, fused_attention.TF32X3))
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    spec, batch, heads, head_dim = ((20, 20), (5, 5), (20, 20), (37, 45), (9, 11)), 2, 3, 24
    leaves, layout = make_inputs(spec, batch, heads, head_dim)
    leaves = [t.cuda() for t in leaves]
    layout = bias_layout(*spec, torch.device('cuda'))
    ref_out, ref_lse = whole_matrix(*leaves, layout)
    grad_out = torch.randn_like(ref_out)
    _, ref_grads = gradients(whole_matrix, leaves, layout, grad_out, None, torch.float64)
    (out, lse), grads = gradients(fused, leaves, layout, grad_out, None, dtype)
    assert_near(out, ref_out, tol, 'out')
    assert_near(lse, ref_lse, tol, 'lse')
    for name, got, ref in zip(('query', 'key', 'value', 'bias table'), grads, ref_grads):
        assert_near(got, ref, tol, name)


@pytest.mark.parametrize('backward', ['atomic', 'two-pass'])
@pytest.mark.parametrize('precision', ['ieee', 'tf32x3'])
def test_golden_gradients_on_cuda(dense_golden, monkeypatch, precision, backward):
    """Compiled window op + fused kernels on CUDA against the golden file, in float32
    (the dispatch rule's choice there, forced so that a missing Triton fails the test
    instead of taking the banded path), their dots in float32 or as three TF32 products
    (:data:`TF32X3`'s launch), the key and value gradients formed either way."""
    from conftest import golden_arch
    from mmtransnext.models import TransNeXt, attention
    from mmtransnext.ops import DISABLE_ENV, extension_available, fused_attention
    from test_transnext import assert_grad_close

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.setattr(fused_attention, 'BACKWARD_KV', backward)
    if precision == 'tf32x3':
        monkeypatch.setitem(fused_attention.LAUNCH, torch.float32,
                            (fused_attention.TF32X3, fused_attention.TF32X3))
    forced = []
    monkeypatch.setattr(attention, 'use_fused_attention', lambda q: forced.append(q) or True)
    # float32 all through: cuDNN's convolutions would otherwise use TF32
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    if not extension_available('cuda'):
        pytest.fail('mmtransnext._C has no CUDA kernels: rebuild with FORCE_CUDA=1 `make ext`')
    data = dense_golden['cases']['interpolation_grad']
    model = TransNeXt(**golden_arch(dense_golden), is_extrapolation=False).cuda().train()
    model.load_state_dict(dense_golden['state_dict'], strict=True)
    x = data['input'].cuda().requires_grad_()
    outs = model(x)
    assert forced, 'the model did not consult the dispatch rule'
    loss = sum((out * w.cuda()).sum() for out, w in zip(outs, data['weights']))
    torch.testing.assert_close(loss.cpu(), data['loss'], atol=1e-4, rtol=1e-4)
    loss.backward()
    assert_grad_close(x.grad.cpu(), data['input_grad'], 'input')
    for name, param in model.named_parameters():
        assert_grad_close(param.grad.cpu(), data['param_grads'][name], name)
