"""The fused kernels compiled for a GPU, against the whole-matrix reference.

Skipped without CUDA; every run of the suite checks the same kernels under
Triton's interpreter (``test_fused_attention.py``). bfloat16 is checked here only,
to 5e-2 of the reference's largest magnitude (8 mantissa bits on the operands of
both matmuls and on the probabilities).
"""
import pytest
import torch

from mmtransnext.models.position_bias import bias_layout
from fused_attention_cases import (assert_near, fused, gradients, make_inputs,
                                   merged_softmax_reference, offset_mlp_reference,
                                   record_calls, whole_matrix)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.mark.parametrize('softmax', ['whole', 'merged'])
@pytest.mark.parametrize('bias_tile', ['taps', 'slots'])
@pytest.mark.parametrize('backward', ['atomic', 'two-pass'])
@pytest.mark.parametrize('dtype', [torch.float32, 'tf32x3', torch.float16, torch.bfloat16],
                         ids=str)
def test_compiled_kernels_on_cuda(dtype, backward, bias_tile, softmax, monkeypatch):
    """On a GPU: the compiled kernels against the whole-matrix reference, with both
    ways of forming the key and value gradients and of reading the bias (slots: 16-bit
    inputs only, float32 keeps taps); ``tf32x3``: float32 launched with
    :data:`~mmtransnext.ops.fused_attention.TF32X3` (three TF32 products per dot), held
    to float32's tolerance. ``whole``: the log-sum-exp gets no gradient, as in full
    attention (float32 walks the keys twice); ``merged``: it gets one, as in aggregated
    attention."""
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
    grad_lse = torch.randn_like(ref_lse) if softmax == 'merged' else None
    _, ref_grads = gradients(whole_matrix, leaves, layout, grad_out, grad_lse, torch.float64)
    (out, lse), grads = gradients(fused, leaves, layout, grad_out, grad_lse, dtype)
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


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=str)
def test_offset_mlp_kernels_on_cuda(dtype, tol, monkeypatch):
    """On a GPU the position-bias MLP takes the two kernels (the dispatch rule, not a
    patch): its table and every parameter's gradient against ``nn.Linear`` layers in
    float64, at stage 1's grid of TransNeXt-T at 800x1333 (392 x 392 offsets, 512
    hidden units, 2 heads), within ``tol`` of the largest magnitude."""
    from mmtransnext.models import position_bias
    from mmtransnext.models.position_bias import OffsetMLP
    launched = record_calls(monkeypatch, position_bias, ('offset_mlp_table', 'offset_mlp_grads'))
    gen = torch.Generator().manual_seed(0)
    offsets = [torch.randn(392, generator=gen, dtype=torch.float64) for _ in range(2)]
    params = [torch.randn(*shape, generator=gen, dtype=torch.float64)
              for shape in ((512, 2), (512, ), (2, 512), (2, ))]
    grad = torch.randn(2, 392, 392, generator=gen, dtype=torch.float64)
    ref, ref_grads = offset_mlp_reference(offsets, params, grad)
    leaves = [p.to('cuda', dtype).requires_grad_() for p in params]
    table = OffsetMLP.apply(*(o.to('cuda', dtype) for o in offsets), *leaves)
    grads = torch.autograd.grad(table, leaves, grad.to('cuda', dtype))
    assert launched == ['offset_mlp_table', 'offset_mlp_grads'] and table.dtype == dtype
    assert_near(table.cpu(), ref, tol, 'table')
    for name, got, want in zip(('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'), grads,
                               ref_grads):
        assert_near(got.cpu(), want, tol, name)


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -8)],
                         ids=str)
def test_bias_rows_kernels_on_cuda(dtype, tol, monkeypatch):
    """On a GPU the kernels' bias table is built by the two kernels (the rule, not a
    patch) from a float32 MLP table at stage 1 of TransNeXt-T for a 1333x800 image (rows
    resized 200 -> 334 and 25 -> 41): the table against the operators in float64 on the
    CPU within ``tol`` of the largest magnitude (one rounding to ``dtype``), the MLP
    table's gradient within 1e-5."""
    from mmtransnext.models import position_bias
    from mmtransnext.models.position_bias import RowFactoredBias
    launched = record_calls(monkeypatch, position_bias, ('bias_rows', 'bias_rows_grad'))
    spec = ((200, 200), (25, 25), (56, 56), (334, 200), (41, 25))
    gen = torch.Generator().manual_seed(0)
    layout = bias_layout(*spec, torch.device('cpu'))
    table = torch.randn(3, *layout.coords.shape[:2], generator=gen)
    leaf = table.cuda().requires_grad_()
    got = RowFactoredBias(leaf, bias_layout(*spec, torch.device('cuda'))).kernel_table(dtype)
    grad = torch.randn(got.shape, generator=gen).to(dtype)
    got.backward(grad.cuda())
    assert launched == ['bias_rows', 'bias_rows_grad']
    ref_leaf = table.double().requires_grad_()
    ref = RowFactoredBias(ref_leaf, layout).kernel_table(torch.float64)
    ref.backward(grad.double())
    assert got.dtype == dtype and got.shape == ref.shape
    assert_near(got.cpu().double(), ref.detach(), tol, 'table')
    assert_near(leaf.grad.cpu().double(), ref_leaf.grad, 1e-5, 'gradient')


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=str)
def test_unit_vector_kernels_on_cuda(dtype, tol, monkeypatch):
    """On a GPU the model's unit vectors take the kernels (the rule, not a patch), from
    strided heads of a projection: output (float32 under autocast, as the CPU's) and
    gradient against the operators in float64 on the CPU; a zero vector gives zeros;
    keys (``into_core``) in the core's dtype, equal to the output cast to it."""
    from mmtransnext.models import attention
    launched = record_calls(monkeypatch, attention, ('unit_vectors', 'unit_vectors_grad'))
    gen = torch.Generator().manual_seed(0)
    projection = torch.randn(2, 999, 2, 4, 24, generator=gen, dtype=torch.float64)
    projection[0, 5, 0, 1] = 0
    grad = torch.randn(2, 4, 999, 24, generator=gen, dtype=torch.float64)
    ref_x = projection.permute(2, 0, 3, 1, 4)[0].requires_grad_()
    ref = attention._unit_vectors(ref_x)
    ref_grad, = torch.autograd.grad(ref, ref_x, grad)
    x = projection.to('cuda', dtype).requires_grad_()
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = attention._unit_vectors(x.permute(2, 0, 3, 1, 4)[0])
        keys = attention._unit_vectors(x.detach().permute(2, 0, 3, 1, 4)[0], into_core=True)
    got_grad, = torch.autograd.grad(out, x, grad.to('cuda', out.dtype))
    assert launched[-2:] == ['unit_vectors', 'unit_vectors_grad'] and out.dtype == torch.float32
    # keys straight into the core's dtype: the autocast dtype, as a cast would give
    assert keys.dtype == dtype and torch.equal(keys, out.detach().to(dtype))
    assert_near(out.cpu(), ref.detach(), tol, 'unit vectors')
    assert_near(got_grad.permute(2, 0, 3, 1, 4)[0].cpu(), ref_grad, tol, 'gradient')
    assert not out[0, 1, 5].any()


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=str)
def test_merged_softmax_kernels_on_cuda(dtype, tol, monkeypatch):
    """On a GPU the kernels that merge the window's and the pooled keys' softmaxes
    (aggregated attention takes them there; ``test_golden_gradients_on_cuda`` runs them
    in the model): the merged weights and every gradient against the operators in
    float64 on the CPU, within ``tol`` of the largest magnitude, for 2 x 3 heads x 999
    queries (several programs)."""
    from mmtransnext.models import attention
    launched = record_calls(monkeypatch, attention, ('merged_softmax', 'merged_softmax_grad'))
    gen = torch.Generator().manual_seed(0)
    local = torch.randn(2, 3, 999, 9, generator=gen, dtype=torch.float64)
    local[:, :, :37, :3] = float('-inf')    # neighbours outside the map
    lse = 2 * torch.randn(2, 3, 999, generator=gen, dtype=torch.float64)
    tokens = torch.randn(2, 3, 999, 9, generator=gen, dtype=torch.float64)
    incoming = [torch.randn(2, 3, 999, 9, generator=gen, dtype=torch.float64),
                torch.randn(2, 3, 999, 1, generator=gen, dtype=torch.float64)]
    ref_leaves = [t.clone().requires_grad_() for t in (local, lse, tokens)]
    ref_outs = merged_softmax_reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_outs, ref_leaves, incoming)
    leaves = [t.to('cuda', torch.float32 if t is lse else dtype).requires_grad_()
              for t in (local, lse, tokens)]
    outs = attention._MergedSoftmax.apply(*leaves)
    grads = torch.autograd.grad(outs, leaves, [g.to('cuda', dtype) for g in incoming])
    assert launched == ['merged_softmax', 'merged_softmax_grad']
    for name, got, ref in zip(('weights', 'pooled weight', 'window logits', 'log-sum-exp',
                               'token weights'), outs + grads, ref_outs + ref_grads):
        assert_near(got.cpu(), ref.detach(), tol, name)


@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16-autocast'])
def test_glu_gate_kernels_on_cuda(autocast, monkeypatch):
    """On a GPU the GLU takes the gate's kernels (the rule, not a patch), forward and
    where its hidden part is recomputed: its output and every gradient against the same
    GLU's in float64 on the CPU, within 1e-5 of the largest magnitude in float32 and
    5e-2 under bfloat16 autocast."""
    import copy

    from mmtransnext.models import transnext
    launched = record_calls(monkeypatch, transnext, ('gated_gelu', 'gated_gelu_grad'))
    torch.manual_seed(0)
    glu = transnext._ConvolutionalGLU(48, 4.0)
    x = torch.randn(2, 19 * 23, 48, dtype=torch.float64)
    reference = copy.deepcopy(glu).double()
    x_ref = x.clone().requires_grad_()
    ref = reference(x_ref, 19, 23, recompute_hidden=True)
    ref.square().sum().backward()
    glu = glu.cuda()
    x_cuda = x.float().cuda().requires_grad_()
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        out = glu(x_cuda, 19, 23, recompute_hidden=True)
    out.float().square().sum().backward()
    assert launched == ['gated_gelu', 'gated_gelu', 'gated_gelu_grad']
    tol = 5e-2 if autocast else 1e-5
    assert_near(out.float().cpu(), ref.detach(), tol, 'output')
    assert_near(x_cuda.grad.cpu(), x_ref.grad, tol, 'input gradient')
    for (name, param), ref_param in zip(glu.named_parameters(), reference.parameters()):
        assert_near(param.grad.cpu(), ref_param.grad, tol, name)


@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16-autocast'])
def test_query_term_kernels_on_cuda(autocast):
    """On a GPU the scaled queries and token weights take the kernel (the rule, not a
    patch): results (in bfloat16 under autocast, the core's dtype) and every input's
    gradient against the same layer's operators in float64 on the CPU, within 1e-5 of
    the largest magnitude in float32 and 1e-2 with bfloat16 results."""
    from mmtransnext.models import attention
    torch.manual_seed(0)
    layer = attention.AggregatedAttention(96, 4, 3, 2, None, None, 8).double()
    unit = torch.nn.functional.normalize(torch.randn(2, 4, 999, 24, dtype=torch.float64), dim=-1)
    scale = torch.rand(999, 1, dtype=torch.float64) + 2
    grads = [torch.randn(2, 4, 999, 24, dtype=torch.float64),
             torch.randn(2, 4, 999, 9, dtype=torch.float64)]

    def run(layer, unit, scale):
        layer.zero_grad(set_to_none=True)
        unit = unit.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast and unit.is_cuda):
            outs = layer._query_terms(unit, scale, layer.learnable_tokens, layer.learnable_bias)
        torch.autograd.backward(outs, [g.to(o) for g, o in zip(grads, outs)])
        return outs, [unit.grad] + [p.grad for p in (layer.query_embedding, layer.temperature,
                                                    layer.learnable_tokens, layer.learnable_bias)]

    ref_outs, ref_grads = run(layer, unit, scale)
    outs, got = run(layer.float().cuda(), unit.float().cuda(), scale.float().cuda())
    tol = 1e-2 if autocast else 1e-5
    assert all(o.dtype == (torch.bfloat16 if autocast else torch.float32) for o in outs)
    for got_out, ref_out in zip(outs, ref_outs):
        assert_near(got_out.cpu(), ref_out.detach(), tol, 'result')
    for got_grad, ref_grad in zip(got, ref_grads):
        assert_near(got_grad.cpu(), ref_grad, tol, 'gradient')
