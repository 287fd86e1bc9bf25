"""The fused Triton kernels of biased attention, run by Triton's CPU interpreter.

Collected only by ``test_fused_attention.py``, which runs this file in a child
process with ``TRITON_INTERPRET=1``: Triton reads that variable when it is
imported (its own library functions are defined then) and again when a kernel is
defined or calls another, so it must be set before ``import triton``. The same
kernels that serve CUDA tensors then run on CPU tensors, and every run of the
suite checks the GPU algorithm (tiles, online softmax, in-kernel bias, atomics of
the backward) against the whole-matrix reference in float64, forward and every
gradient, and inside the model against the golden outputs of the released model.

Tolerances, as a fraction of the reference's largest magnitude: float32 1e-5
(observed <= 2e-6: another summation order than float64); float16 operands
1e-2 (observed <= 3e-3; the logits' operands and the probabilities fed to the
second matmul are rounded to float16, as on tensor cores). bfloat16 is checked
only on CUDA (``test_fused_attention_cuda.py``): the interpreter's ``tl.dot``
does not multiply bfloat16 operands correctly (triton 3.9).
"""
import os

import pytest
import torch

from conftest import golden_arch
from fused_attention_cases import (CASES, TOL, assert_near, fused, gradients, make_inputs,
                                   merged_softmax_reference, offset_mlp_reference,
                                   record_calls, whole_matrix)
from mmtransnext.models import TransNeXt
from mmtransnext.models import attention as attention_module
from mmtransnext.models import position_bias
from mmtransnext.models import transnext as transnext_module
from mmtransnext.models.position_bias import OffsetMLP, RowFactoredBias, bias_layout
from mmtransnext.ops import DISABLE_ENV
from mmtransnext.ops.banded_attention import banded_bias_attention
from mmtransnext.ops.fused_attention import fused_bias_attention

if os.environ.get('TRITON_INTERPRET') != '1':
    raise RuntimeError('interpreted_fused_attention.py needs TRITON_INTERPRET=1 set before '
                       'triton is imported; tests/test_fused_attention.py runs it so')


def test_kernels_are_interpreted():
    from mmtransnext.ops import _fused_attention_kernels
    assert _fused_attention_kernels.INTERPRETED


def _with_reference(case, seed, grad_seed):
    """A case's float64 leaves and layout, random incoming gradients of both outputs,
    and what the whole-matrix reference gives: ``(out, lse)`` and the leaves' gradients."""
    spec, batch, heads, head_dim = CASES[case]
    leaves, layout = make_inputs(spec, batch, heads, head_dim, seed=seed)
    ref_out, ref_lse = whole_matrix(*leaves, layout)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(ref_lse.shape, generator=gen, dtype=torch.float64)
    _, ref_grads = gradients(whole_matrix, leaves, layout, grad_out, grad_lse, torch.float64)
    return leaves, layout, (grad_out, grad_lse), (ref_out, ref_lse), ref_grads


def _assert_gradients_near(grads, ref_grads, dtype):
    for name, got, ref in zip(('query', 'key', 'value', 'bias table'), grads, ref_grads):
        assert got.dtype == dtype
        assert_near(got, ref, TOL[dtype], name)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize('case', list(CASES))
def test_forward_and_gradients_equal_whole_matrix(case, dtype):
    leaves, layout, incoming, (ref_out, ref_lse), ref_grads = _with_reference(case, 0, 1)
    (out, lse), grads = gradients(fused, leaves, layout, *incoming, dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_near(out, ref_out, TOL[dtype], 'out')
    assert_near(lse, ref_lse, TOL[dtype], 'lse')
    _assert_gradients_near(grads, ref_grads, dtype)


@pytest.mark.parametrize('used', ['out', 'lse'])
def test_one_output_used(used):
    """The backward with one of the two incoming gradients absent (None)."""
    spec, batch, heads, head_dim = CASES['map5x7_pool2x3_d24']
    leaves, layout = make_inputs(spec, batch, heads, head_dim, seed=3)
    ref_out, ref_lse = whole_matrix(*leaves, layout)
    grad = torch.randn((ref_out if used == 'out' else ref_lse).shape, dtype=torch.float64)
    args = (grad, None) if used == 'out' else (None, grad)
    _, ref_grads = gradients(whole_matrix, leaves, layout, *args, torch.float64)
    _, grads = gradients(fused, leaves, layout, *args, torch.float32)
    for name, got, ref in zip(('query', 'key', 'value', 'bias table'), grads, ref_grads):
        assert_near(got, ref, 1e-5, name)


@pytest.fixture
def walks_twice(monkeypatch):
    """``ROW_RESIDUAL`` of each launch of the query-major backward kernel, in order."""
    from mmtransnext.ops import _fused_attention_kernels as kernels
    backward, seen = kernels.pooled_attention_backward, []

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append(meta['ROW_RESIDUAL'])
                return backward[grid](*args, **meta)
            return launch

    monkeypatch.setattr(kernels, 'pooled_attention_backward', Recorded())
    return seen


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
def test_first_walk_only_for_a_whole_float32_softmax(dtype, walks_twice):
    """The backward walks the keys a first time (``ROW_RESIDUAL``) only for a float32
    softmax that is the whole attention, which the log-sum-exp's missing gradient tells
    (the full attention drops it): the gradient of a bias shared by all keys then
    vanishes as the reference's does, which ``test_golden_gradients_through_fused_kernels``
    holds it to (the last stage's ``cpb_fc2.bias``; without the first walk it errs
    1.9e-6 against a limit of 1e-6). Where the log-sum-exp has a gradient (aggregated
    attention merges it with the window's logits) one walk serves, as in 16-bit."""
    spec, batch, heads, head_dim = CASES['interpolated_many_key_tiles']
    leaves, layout = make_inputs(spec, batch, heads, head_dim, seed=4)
    ref_out, ref_lse = whole_matrix(*leaves, layout)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(ref_lse.shape, generator=gen, dtype=torch.float64)
    for incoming in ((grad_out, None), (grad_out, grad_lse)):
        _, ref_grads = gradients(whole_matrix, leaves, layout, *incoming, torch.float64)
        _, grads = gradients(fused, leaves, layout, *incoming, dtype)
        _assert_gradients_near(grads, ref_grads, dtype)
    assert walks_twice == [dtype == torch.float32, False]


# Several key tiles, odd head dim, P = N, a map below the window; 20 queries per
@pytest.mark.parametrize('backward', ['atomic', 'two-pass'])
def test_backward_reads_strided_incoming_gradients(backward, monkeypatch):
    """The backward reads the output's and the log-sum-exp's gradients through their
    strides, as the model hands them (the gradient of a transposed view, of a slice):
    the same gradients, bit for bit, as from contiguous copies (the key-major pass of
    the two-pass backward reads the output's gradient contiguous)."""
    from mmtransnext.ops import fused_attention
    monkeypatch.setattr(fused_attention, 'BACKWARD_KV', backward)
    passed_contiguous = []
    strides = fused_attention._image_head_row_strides
    monkeypatch.setattr(fused_attention, '_image_head_row_strides', lambda tensor: (
        passed_contiguous.append(tensor.is_contiguous()) or strides(tensor)))
    spec, batch, heads, head_dim = CASES['interpolated_d13']
    leaves, layout = make_inputs(spec, batch, heads, head_dim)
    leaves = [t.float().requires_grad_() for t in leaves]
    out, lse = fused(*leaves, layout)
    gen = torch.Generator().manual_seed(1)
    _, _, tokens, dims = out.shape
    grad_out = torch.randn(batch, tokens, heads, dims, generator=gen).transpose(1, 2)
    grad_lse = torch.randn(batch, heads, tokens, 3, generator=gen)[..., 1]
    strided = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse), retain_graph=True)
    assert passed_contiguous == [backward == 'two-pass', False]
    contiguous = torch.autograd.grad((out, lse), leaves,
                                     (grad_out.contiguous(), grad_lse.contiguous()))
    assert all(torch.equal(a, b) for a, b in zip(strided, contiguous))


# key-major program (several ranges, not a multiple of the step, add into each key)
# and the default (one range).
@pytest.mark.parametrize('rows', [20, 1024])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize('case', ['interpolated_many_key_tiles', 'interpolated_d13',
                                  'full_attention_6x7', 'map2x2_below_window'])
def test_two_pass_backward_equals_whole_matrix(case, dtype, rows, monkeypatch):
    """Key and value gradients from the key-major pass, the rest unchanged."""
    from mmtransnext.ops import fused_attention
    monkeypatch.setattr(fused_attention, 'BACKWARD_KV', 'two-pass')
    monkeypatch.setattr(fused_attention, 'KEY_PASS_ROWS', rows)
    leaves, layout, incoming, _, ref_grads = _with_reference(case, 6, 2)
    _, grads = gradients(fused, leaves, layout, *incoming, dtype)
    _assert_gradients_near(grads, ref_grads, dtype)


@pytest.fixture
def slot_tiles(monkeypatch):
    """The bias read by slots (``BIAS_TILE = 'slots'``), float32 included: on a GPU only
    16-bit inputs take them, whose tolerance would hide what float32's shows."""
    from mmtransnext.ops import fused_attention
    monkeypatch.setattr(fused_attention, 'BIAS_TILE', 'slots')
    monkeypatch.setattr(fused_attention, 'SLOT_DTYPES', fused_attention._DTYPES)


# Bias resized on both column axes, on one (each way); tiles over several rows and key
# rows, an odd head dim, a map below the window; key-major ranges of 32 queries.
@pytest.mark.parametrize('backward', ['atomic', 'two-pass'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize('case', ['interpolated_d13', 'interpolated_many_key_tiles',
                                  'query_columns_resized', 'key_columns_resized',
                                  'map2x3_resized_below_window'])
def test_slot_bias_tiles_equal_whole_matrix(case, dtype, backward, slot_tiles, monkeypatch):
    """Every kernel reading the bias by slots (two matmuls a tile) and adding the
    table's gradient per pair of slots: outputs and every gradient against the
    reference."""
    from mmtransnext.ops import fused_attention
    monkeypatch.setattr(fused_attention, 'BACKWARD_KV', backward)
    monkeypatch.setattr(fused_attention, 'KEY_PASS_ROWS', 32)
    leaves, layout, incoming, (ref_out, ref_lse), ref_grads = _with_reference(case, 8, 5)
    layout.derived.clear()      # the layout is cached: see that these launches fill it
    (out, lse), grads = gradients(fused, leaves, layout, *incoming, dtype)
    assert any(key[0] == 'bias_slots' for key in layout.derived), 'not read by slots'
    assert_near(out, ref_out, TOL[dtype], 'out')
    assert_near(lse, ref_lse, TOL[dtype], 'lse')
    _assert_gradients_near(grads, ref_grads, dtype)


@pytest.mark.parametrize('backward', ['atomic', 'two-pass'])
@pytest.mark.parametrize('case', ['interpolated_many_key_tiles', 'full_attention_6x7'])
def test_tf32x3_launch_equals_whole_matrix(case, backward, monkeypatch):
    """float32 at TF32X3's 32 x 16 tiles (the interpreter multiplies in float32
    whatever the precision: this checks the tiling; the GPU test checks the TF32
    products)."""
    from mmtransnext.ops import fused_attention
    monkeypatch.setitem(fused_attention.LAUNCH, torch.float32,
                        (fused_attention.TF32X3, fused_attention.TF32X3))
    monkeypatch.setattr(fused_attention, 'BACKWARD_KV', backward)
    spec, batch, heads, head_dim = CASES[case]
    leaves, layout = make_inputs(spec, batch, heads, head_dim, seed=7)
    assert fused_attention.launch_meta(torch.float32, head_dim, head_dim)['BLOCK_N'] == 16
    ref_out, ref_lse = whole_matrix(*leaves, layout)
    grad_out = torch.randn(ref_out.shape, dtype=torch.float64)
    _, ref_grads = gradients(whole_matrix, leaves, layout, grad_out, None, torch.float64)
    (out, _), grads = gradients(fused, leaves, layout, grad_out, None, torch.float32)
    assert_near(out, ref_out, TOL[torch.float32], 'out')
    for name, got, ref in zip(('query', 'key', 'value', 'bias table'), grads, ref_grads):
        assert_near(got, ref, TOL[torch.float32], name)


@pytest.mark.parametrize('setting', ['BACKWARD_KV', 'BIAS_TILE'])
def test_unknown_backward_way_is_refused(setting, monkeypatch):
    from mmtransnext.ops import fused_attention
    monkeypatch.setattr(fused_attention, setting, 'key-major')
    spec, batch, heads, head_dim = CASES['pool1x1']
    leaves, layout = make_inputs(spec, batch, heads, head_dim)
    with pytest.raises(ValueError, match=f"{setting} is 'key-major', not one of"):
        out, _ = fused(*[t.float().requires_grad_() for t in leaves], layout)
        out.sum().backward()


def test_bias_table_without_gradient():
    """A table that needs no gradient (frozen stages) takes the backward without the
    table's atomics; the other gradients are unchanged."""
    spec, batch, heads, head_dim = CASES['interpolated_d13']
    leaves, layout = make_inputs(spec, batch, heads, head_dim, seed=4)
    grad_out = torch.randn(whole_matrix(*leaves, layout)[0].shape, dtype=torch.float64)
    _, ref_grads = gradients(whole_matrix, leaves, layout, grad_out, None, torch.float64)
    query, key, value = (t.float().requires_grad_() for t in leaves[:3])
    table = leaves[3].float()
    out, _ = fused(query, key, value, table, layout)
    grads = torch.autograd.grad((out.double() * grad_out).sum(), (query, key, value))
    for name, got, ref in zip(('query', 'key', 'value'), grads, ref_grads):
        assert_near(got, ref, 1e-5, name)


@pytest.fixture
def pooled_benchmark(monkeypatch):
    """tools/benchmark_pooled_attention.py, the fused kernels' settings it leaves as it
    last ran them restored afterwards."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools'))
    import benchmark_pooled_attention
    from mmtransnext.ops import fused_attention
    for name in ('BACKWARD_KV', 'BIAS_TILE', 'SLOT_DTYPES'):
        monkeypatch.setattr(fused_attention, name, getattr(fused_attention, name))
    monkeypatch.setattr(fused_attention, 'LAUNCH', dict(fused_attention.LAUNCH))
    return benchmark_pooled_attention


def test_pooled_benchmark_runs_fused_paths(capsys, pooled_benchmark):
    """tools/benchmark_pooled_attention.py's fused rows, with and without the bias
    table's gradient, both ways of forming the key/value gradients and of reading the
    bias, run end to end (interpreted: checked, not timed)."""
    pooled_benchmark.main(['--stage', '1', '--scale', '20', '--batch', '1', '--paths',
                           'fused', 'fused-fixed-bias', '--repeats', '1', '--warmup', '0',
                           '--backward', 'atomic', 'two-pass', '--bias-tile', 'taps',
                           'slots', '--dtypes', 'fp16'])
    printed = capsys.readouterr().out.splitlines()
    table = printed.index(next(line for line in printed if line.startswith('stage 1:')))
    rows = printed[table + 3:]
    assert [row[6:46].strip() for row in rows] == [
        'fused 32x32x8', 'fused 32x32x8 slots', 'fused 32x32x8 two-pass',
        'fused 32x32x8 two-pass slots', 'fused-fixed-bias 32x32x8',
        'fused-fixed-bias 32x32x8 slots', 'fused-fixed-bias 32x32x8 two-pass',
        'fused-fixed-bias 32x32x8 two-pass slots'], rows
    assert printed[:table] == rows     # each row was printed as it was measured
    assert not any('failed' in row for row in rows), rows


def test_pooled_benchmark_reads_float32_by_slots_when_asked(capsys, monkeypatch,
                                                            pooled_benchmark):
    """The dispatcher reads a float32 bias by taps; the tool's ``--bias-tile slots`` reads
    it by slots, to time what that costs (both rows run, labelled)."""
    from mmtransnext.ops import fused_attention
    tile_slots, by_slots = fused_attention._tile_slots, []

    def recorded(*args, **kwargs):
        found = tile_slots(*args, **kwargs)
        by_slots.append(found[1]['Q_SLOTS'] > 0)
        return found

    monkeypatch.setattr(fused_attention, '_tile_slots', recorded)
    pooled_benchmark.main(['--stage', '3', '--scale', '10', '--batch', '1', '--paths',
                           'fused', '--repeats', '1', '--warmup', '0', '--dtypes', 'fp32',
                           '--bias-tile', 'taps', 'slots'])
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert [row[6:46].strip() for row in rows] == ['fused 32x32x8', 'fused 32x32x8 slots']
    # per row: a first call (the outputs' shapes), a forward and a training step (its
    # forward and its backward)
    assert by_slots == [False] * 4 + [True] * 4


def test_pooled_benchmark_gives_the_log_sum_exp_a_gradient_as_the_model(walks_twice,
                                                                        pooled_benchmark):
    """As in the model, the tool's float32 backward gets the log-sum-exp's gradient at
    the aggregated stages (one walk over the keys) and none at stage 4, whose full
    attention drops it (two walks)."""
    for stage in ('3', '4'):
        pooled_benchmark.main(['--stage', stage, '--scale', '10', '--batch', '1', '--paths',
                               'fused', '--repeats', '1', '--warmup', '0', '--dtypes', 'fp32'])
    assert walks_twice == [False, True]    # one timed step a stage


def test_equals_banded_path():
    """The CPU default path and the fused kernels agree in float32."""
    spec, batch, heads, head_dim = CASES['interpolated_many_key_tiles']
    leaves, layout = make_inputs(spec, batch, heads, head_dim, seed=5)
    leaves = [t.float() for t in leaves]

    def banded(query, key, value, table, layout):
        return banded_bias_attention(query, key, value, RowFactoredBias(table, layout))

    grad_out = torch.randn(batch, heads, leaves[0].shape[2], head_dim, dtype=torch.float64)
    (b_out, b_lse), b_grads = gradients(banded, leaves, layout, grad_out, None, torch.float32)
    (f_out, f_lse), f_grads = gradients(fused, leaves, layout, grad_out, None, torch.float32)
    torch.testing.assert_close(f_out, b_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f_lse, b_lse, atol=1e-5, rtol=1e-5)
    for got, ref in zip(f_grads, b_grads):
        assert_near(got, ref.double(), 1e-5, 'gradient')


@pytest.fixture
def fused_in_the_model(monkeypatch):
    """The model as on CUDA: its biased attention, position-bias MLP, unit vectors,
    merged softmax and GLU gate through the fused kernels.

    On the CPU the rule says no; the attention, position-bias and backbone modules are
    told the fused kernels serve. Yields the queries' shapes that took the attention
    kernels.
    """
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    calls = []

    def take_fused(query, *args):
        calls.append(tuple(query.shape))
        return fused_bias_attention(query, *args)

    monkeypatch.setattr(attention_module, 'use_fused_attention', lambda tensor: True)
    monkeypatch.setattr(attention_module, 'fused_bias_attention', take_fused)
    monkeypatch.setattr(position_bias, 'use_fused_attention', lambda tensor: True)
    monkeypatch.setattr(transnext_module, 'use_fused_attention', lambda tensor: True)
    yield calls


def _assert_trains_like_the_release(dense_golden, wrap=lambda model: model):
    """The released model's loss and gradients on the golden ``interpolation_grad``
    case, run through ``wrap(model)``, within the tolerances of
    ``test_transnext.test_gradients_equal_reference``. Returns the model and its wrap."""
    from test_transnext import assert_grad_close
    data = dense_golden['cases']['interpolation_grad']
    model = TransNeXt(**golden_arch(dense_golden), is_extrapolation=False).train()
    model.load_state_dict(dense_golden['state_dict'], strict=True)
    run = wrap(model)
    x = data['input'].clone().requires_grad_()
    loss = sum((out * w).sum() for out, w in zip(run(x), data['weights']))
    torch.testing.assert_close(loss, data['loss'], atol=1e-4, rtol=1e-4)
    loss.backward()
    assert_grad_close(x.grad, data['input_grad'], 'input')
    for name, param in model.named_parameters():
        assert_grad_close(param.grad, data['param_grads'][name], name)
    return model, run


@pytest.mark.parametrize('bias_tile', ['taps', 'slots'])
def test_golden_gradients_through_fused_kernels(dense_golden, fused_in_the_model, bias_tile,
                                                request):
    """The released model's loss and gradients, with every biased attention fused, the
    bias read by taps or by slots.

    Same data and tolerances as ``test_transnext.test_gradients_equal_reference``
    (maps from 38x53 down to 5x7, 1 to 8 heads, interpolation mode).
    """
    if bias_tile == 'slots':
        request.getfixturevalue('slot_tiles')
    _assert_trains_like_the_release(dense_golden)
    # every block: 1 + 1 + 2 aggregated attentions and 1 full attention
    assert len(fused_in_the_model) == 5


def test_golden_extrapolation_through_fused_kernels(dense_golden, fused_in_the_model):
    data = dense_golden['cases']['extrapolation_other_size']
    model = TransNeXt(**golden_arch(dense_golden), is_extrapolation=True).eval()
    model.load_state_dict(dense_golden['state_dict'], strict=True)
    with torch.no_grad():
        outs = model(data['input'])
    for i, (out, ref) in enumerate(zip(outs, data['outputs'])):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f'stage {i}: {m}')
    assert len(fused_in_the_model) == 5


def test_golden_model_with_a_float16_core(dense_golden, fused_in_the_model, monkeypatch):
    """The attention core in float16, as CUDA autocast runs it in its dtype: each operand
    cast once (and laid out contiguous), the window kernels and the fused kernels in
    float16, the window's logits and the pooled log-sum-exp merged in one float32
    softmax; the released model's loss and gradients within float16's reach.

    Tolerances: the loss and the input's gradient 1e-2 of their magnitude (observed 7e-4
    and 5e-4); each parameter's gradient 0.1 of its largest reference magnitude or of 0.05,
    whichever is larger (observed at most 0.041 of it, in the stage-1 position-bias MLP,
    whose table gradient sums float16-rounded logit gradients over every query and key;
    and 2.3e-3 absolute in the last stage's ``cpb_fc2.bias``, zero in theory: a shift of
    every logit, which the float16 kernels do not correct for as the float32 ones do).
    """
    monkeypatch.setattr(attention_module, 'core_dtype', lambda *args: torch.float16)
    data = dense_golden['cases']['interpolation_grad']
    model = TransNeXt(**golden_arch(dense_golden), is_extrapolation=False).train()
    model.load_state_dict(dense_golden['state_dict'], strict=True)
    x = data['input'].clone().requires_grad_()
    outs = model(x)
    assert all(out.dtype == torch.float32 for out in outs)
    loss = sum((out * w).sum() for out, w in zip(outs, data['weights']))
    torch.testing.assert_close(loss, data['loss'], rtol=1e-2, atol=0)
    loss.backward()
    assert_near(x.grad, data['input_grad'], 1e-2, 'input')
    for name, param in model.named_parameters():
        ref = data['param_grads'][name]
        error = (param.grad - ref).abs().max()
        assert error <= 0.1 * max(ref.abs().max(), 0.05), (name, error, ref.abs().max())
    assert len(fused_in_the_model) == 5


def test_compiled_model_runs_the_fused_core_outside_its_graphs(dense_golden, monkeypatch):
    """torch.compile where the fused kernels serve the core (CUDA; here the interpreter):
    each attention core runs eagerly through the fused kernels between compiled graphs,
    not as the traced released structure with its whole bias, and the compiled model
    gives the released model's loss and gradients (tolerances of
    ``test_golden_gradients_through_fused_kernels``)."""
    from torch._dynamo.utils import counters
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.setattr(attention_module, 'use_fused_attention', lambda tensor: True)
    calls = []

    def counted(query, *args):
        calls.append(tuple(query.shape))
        return fused_bias_attention(query, *args)

    monkeypatch.setattr(attention_module, 'fused_bias_attention', counted)
    whole_bias = []
    full_bias = attention_module._PositionBiasAttention._full_bias

    def built_whole(*args):
        whole_bias.append(1)
        return full_bias(*args)

    monkeypatch.setattr(attention_module._PositionBiasAttention, '_full_bias', built_whole)
    torch._dynamo.reset()
    counters.clear()
    model, compiled = _assert_trains_like_the_release(
        dense_golden, lambda model: torch.compile(model, backend='aot_eager'))
    assert len(calls) == 5 and not whole_bias    # 1 + 1 + 2 aggregated, 1 full attention
    assert counters['graph_break'], 'the cores ran inside a compiled graph'
    # Another size, as detection inputs vary: Dynamo recompiles with symbolic sizes,
    # which reach the eager cores as ints.
    x = dense_golden['cases']['interpolation_grad']['input'][..., :-8, :-16]
    with torch.no_grad():
        for got, ref in zip(compiled(x), model(x)):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 15 and not whole_bias


# (grid rows, grid columns, hidden units, heads): sizes below every block, and several
# programs along every axis (forward 8 x 16 grid points, backward 32 columns, 32 hidden
# units and 32 rows a program) with heads padded to 16; one column.
_MLP_CASES = [(13, 11, 40, 3), (70, 45, 512, 2), (5, 1, 64, 16)]


def _offset_mlp(rows, cols, hidden, heads, dtype, seed=0):
    """Random offsets and MLP layers in ``dtype`` (fc1's bias spread, so that ReLU cuts
    inside the grid), and ``OffsetMLP``'s table and parameter gradients for a random
    incoming gradient (float64, drawn from the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (rows, cols)]
    params = [torch.randn(*shape, generator=gen, dtype=torch.float64)
              for shape in ((hidden, 2), (hidden, ), (heads, hidden), (heads, ))]
    grad = torch.randn(heads, rows, cols, generator=gen, dtype=torch.float64)
    leaves = [p.to(dtype).requires_grad_() for p in params]
    table = OffsetMLP.apply(*(o.to(dtype) for o in offsets), *leaves)
    return table, torch.autograd.grad(table, leaves, grad.to(dtype)), (offsets, params, grad)


@pytest.fixture
def counted_mlp_kernels(monkeypatch):
    """The MLP's rule told the fused kernels serve; yields the names of those launched."""
    monkeypatch.setattr(position_bias, 'use_fused_attention', lambda tensor: True)
    yield record_calls(monkeypatch, position_bias, ('offset_mlp_table', 'offset_mlp_grads'))


@pytest.mark.parametrize('rows, cols, hidden, heads', _MLP_CASES)
def test_offset_mlp_kernels_equal_linear_layers(rows, cols, hidden, heads, counted_mlp_kernels):
    """The table and every parameter's gradient from the two kernels, float32, against
    ``nn.Linear`` layers on every grid point in float64: within 1e-5 of the largest
    magnitude (observed <= 3e-7)."""
    table, grads, (offsets, params, grad) = _offset_mlp(rows, cols, hidden, heads,
                                                         torch.float32)
    assert counted_mlp_kernels == ['offset_mlp_table', 'offset_mlp_grads']
    ref, ref_grads = offset_mlp_reference(offsets, params, grad)
    assert table.shape == (heads, rows, cols) and table.dtype == torch.float32
    assert_near(table, ref, 1e-5, 'table')
    for name, got, want in zip(('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'), grads,
                               ref_grads):
        assert got.dtype == torch.float32
        assert_near(got, want, 1e-5, name)


def test_offset_mlp_kernels_in_float16(counted_mlp_kernels):
    """A float16 MLP (a model cast to half): the kernels against ``nn.Linear`` layers in
    float64 on the same float16 numbers, within 2e-3 of the largest magnitude (observed
    <= 7e-4: the operands of the second layer's products are float16, the sums float32).
    The chunked operators' sums are float16: their fc1 gradients err by 4% there."""
    case = _MLP_CASES[1]
    table, grads, (offsets, params, grad) = _offset_mlp(*case, torch.float16)
    assert counted_mlp_kernels == ['offset_mlp_table', 'offset_mlp_grads']
    half = [t.half().double() for t in offsets + params + [grad]]
    ref, ref_grads = offset_mlp_reference(half[:2], half[2:6], half[6])
    assert table.dtype == torch.float16
    assert_near(table.double(), ref, 2e-3, 'table')
    for name, got, want in zip(('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'), grads,
                               ref_grads):
        assert got.dtype == torch.float16
        assert_near(got.double(), want, 2e-3, name)


def test_offset_mlp_kernels_refuse_mismatched_operands():
    from mmtransnext.ops.fused_offset_mlp import offset_mlp_grads, offset_mlp_table
    rows, cols = torch.ones(4, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    w1, b1, w2, b2 = torch.ones(8, 2), torch.ones(8), torch.ones(2, 8), torch.ones(2)
    with pytest.raises(ValueError, match='must be 1-D'):
        offset_mlp_table(rows[None], cols, w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r'w1 \(6, 2\) and b1 \(8,\) do not fit'):
        offset_mlp_table(rows, cols, torch.ones(6, 2), b1, w2, b2)
    with pytest.raises(ValueError, match='weight dtypes differ'):
        offset_mlp_table(rows, cols, w1, b1.double(), w2, b2)
    with pytest.raises(ValueError, match='w1 and w2 must be 2-D'):
        offset_mlp_table(rows, cols, w1, b1, w2[None], b2)
    with pytest.raises(ValueError, match='offsets must be floating point'):
        offset_mlp_table(rows.long(), cols, w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r'grad_table of shape \(2, 3, 4\)'):
        offset_mlp_grads(rows, cols, w1, b1, w2, torch.ones(2, 3, 4))


# (build query grid, build key grid, run-time query grid, run-time key grid): the rows
# resized on both axes (query rows up, key rows down), on neither, and on the key
# axis only; several programs along both axes (16 rows, 64 columns a program).
_BIAS_ROWS_CASES = [((12, 12), (3, 3), (17, 9), (2, 4)), ((9, 14), (4, 5), (9, 14), (4, 5)),
                    ((40, 40), (5, 5), (40, 30), (7, 3))]


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -7),
                                        (torch.float16, 2 ** -10)], ids=str)
@pytest.mark.parametrize('build_q, build_k, query, key', _BIAS_ROWS_CASES)
def test_bias_rows_kernels_equal_the_operators(build_q, build_k, query, key, dtype, tol,
                                               monkeypatch):
    """The kernels' bias table built by the two kernels (the rule told they serve), from
    a float32 MLP table, against the operators (gather, resize, spread) in float64: the
    table within ``tol`` of the largest magnitude (one rounding to ``dtype``, which
    Triton's interpreter does to bfloat16 by truncation, a GPU to nearest; float32
    observed <= 8e-7, the float64 resize placing its sources in float64), the MLP
    table's gradient for a random incoming one within 1e-5 (float32 sums; observed
    <= 4e-7)."""
    layout = bias_layout(build_q, build_k, build_q, query, key, torch.device('cpu'))
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3, *layout.coords.shape[:2], generator=gen)
    monkeypatch.setattr(position_bias, 'use_fused_attention', lambda tensor: True)
    launched = record_calls(monkeypatch, position_bias, ('bias_rows', 'bias_rows_grad'))
    leaf = table.clone().requires_grad_()
    got = RowFactoredBias(leaf, layout).kernel_table(dtype)
    grad = torch.randn(got.shape, generator=gen).to(dtype)
    got.backward(grad)
    assert launched == ['bias_rows', 'bias_rows_grad']
    monkeypatch.setattr(position_bias, 'use_fused_attention', lambda tensor: False)
    ref_leaf = table.double().requires_grad_()
    ref = RowFactoredBias(ref_leaf, layout).kernel_table(torch.float64)
    ref.backward(grad.double())
    assert len(launched) == 2
    assert got.dtype == dtype and got.shape == ref.shape and got.is_contiguous()
    assert_near(got.double(), ref.detach(), tol, 'table')
    assert leaf.grad.dtype == torch.float32
    assert_near(leaf.grad.double(), ref_leaf.grad, 1e-5, 'gradient')


def test_bias_rows_kernels_refuse_bad_input():
    from mmtransnext.ops.fused_bias_rows import bias_rows, bias_rows_grad
    layout = bias_layout((12, 12), (3, 3), (12, 12), (17, 9), (2, 4), torch.device('cpu'))
    bias = RowFactoredBias(torch.zeros(2, *layout.coords.shape[:2]), layout)
    index_h, (q_src, q_weight, k_src, k_weight) = layout.index_h, bias.row_taps()
    spread, table = bias.separable_col_taps()[4], bias.table
    with pytest.raises(ValueError, match=r'table must be \(heads, Uh, Uw\)'):
        bias_rows(table[0], index_h, bias.row_taps(), spread, torch.float32)
    with pytest.raises(ValueError, match='index_h must be a 2-D integer tensor'):
        bias_rows(table, index_h.float(), bias.row_taps(), spread, torch.float32)
    with pytest.raises(ValueError, match='query row taps must be int32 and float32'):
        bias_rows(table, index_h, (q_src.long(), q_weight, k_src, k_weight), spread,
                  torch.float32)
    with pytest.raises(ValueError, match=r'key row taps must be two \(rows, 2\) tensors'):
        bias_rows(table, index_h, (q_src, q_weight, k_src[:, :1], k_weight), spread,
                  torch.float32)
    with pytest.raises(ValueError, match='spread must be a 1-D integer tensor'):
        bias_rows(table, index_h, bias.row_taps(), spread.double(), torch.float32)
    with pytest.raises(ValueError, match=r'gradient of shape \(2, 17, 2, 3\), expected'):
        bias_rows_grad(torch.zeros(2, 17, 2, 3), index_h, bias.row_taps(), spread,
                       table.shape)


def _heads_of_projection(dtype, projection='kv', zero_token=5, seed=0):
    """The keys of a ``kv`` projection, or the queries of a ``q`` one, as the model views
    them: ``(B, heads, N, d)`` strided (with gaps, the values', or without), odd sizes
    (13 dims), one vector zero."""
    gen = torch.Generator().manual_seed(seed)
    parts = 2 if projection == 'kv' else 1
    heads = torch.randn(2, 37, parts, 3, 13, generator=gen, dtype=torch.float64)
    heads[0, zero_token, 0, 1] = 0
    return heads.to(dtype).permute(2, 0, 3, 1, 4)[0]


@pytest.mark.parametrize('projection', ['kv', 'q'])
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float16, 1e-3)], ids=str)
def test_unit_vector_kernels_equal_the_operators(dtype, tol, projection, monkeypatch):
    """The model's unit vectors through the kernels (the rule told they serve) against
    the same through PyTorch operators in float64: output and gradient, from strided
    heads of a projection, within ``tol`` of the largest magnitude (observed 1e-7 in
    float32, 5e-4 from float16 inputs); a zero vector has zero output and gradient. The
    gradient comes in the projection's order of dims, so that the queries' (a transposed
    view without gaps) reaches the projection as a view."""
    launched = record_calls(monkeypatch, attention_module, ('unit_vectors', 'unit_vectors_grad'))
    x = _heads_of_projection(dtype, projection).requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_x = _heads_of_projection(torch.float64, projection).requires_grad_()
    ref = attention_module._unit_vectors(ref_x)
    ref_grad, = torch.autograd.grad(ref, ref_x, grad)
    assert not launched
    monkeypatch.setattr(attention_module, 'use_fused_attention', lambda tensor: True)
    out = attention_module._unit_vectors(x)
    got_grad, = torch.autograd.grad(out, x, grad.to(out.dtype))
    assert launched == ['unit_vectors', 'unit_vectors_grad']
    assert out.dtype == dtype and got_grad.dtype == dtype and out.is_contiguous()
    assert got_grad.transpose(1, 2).is_contiguous()
    assert (got_grad.stride() == x.stride()) == (projection == 'q')
    assert_near(out, ref, tol, 'unit vectors')
    assert_near(got_grad, ref_grad, tol, 'gradient')
    assert not out[0, 1, 5].any() and not got_grad[0, 1, 5].any()


def test_unit_vector_kernels_refuse_bad_input():
    from mmtransnext.ops.fused_unit_vectors import unit_vectors, unit_vectors_grad
    with pytest.raises(ValueError, match=r'must be 4-D .* got shape \(3, 4\)'):
        unit_vectors(torch.ones(3, 4), torch.float32)
    with pytest.raises(ValueError, match='dtype torch.float64 is not supported'):
        unit_vectors(torch.ones(1, 1, 3, 4, dtype=torch.float64), torch.float32)
    with pytest.raises(ValueError, match=r'grad_out of shape \(1, 1, 3, 5\)'):
        unit_vectors_grad(torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 5))


def _merge_inputs(seed=0):
    """float64 window logits ``(2, 3, 20, 9)`` of a 4x5 map (``-inf`` where a neighbour
    is outside it), pooled log-sum-exps (one row above every window logit, one far
    below), the learnable tokens' weights, and incoming gradients of both results."""
    from mmtransnext.ops import sliding_window_logits_reference
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    local = sliding_window_logits_reference(randn(2, 3, 20, 8), randn(2, 3, 20, 8),
                                            randn(3, 9), 4, 5, 3)
    lse = 2 * randn(2, 3, 20)
    lse[0, 0, 0], lse[1, 2, 7] = 40.0, -40.0
    return [local, lse, randn(2, 3, 20, 9)], [randn(2, 3, 20, 9), randn(2, 3, 20, 1)]


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=str)
def test_merged_softmax_kernels_equal_the_operators(dtype, tol):
    """The merged softmax through the kernels against the model's operators in float64:
    the window's weights plus the tokens' and the pooled keys' weight, and the gradients
    of the window logits, the log-sum-exp and the tokens' weights, within ``tol`` of the
    largest magnitude (observed 1e-7 in float32; float16 rounds both results); no
    weight and no gradient where a neighbour is outside the map."""
    leaves, incoming = _merge_inputs()
    ref_leaves = [t.clone().requires_grad_() for t in leaves]
    ref_outs = merged_softmax_reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_outs, ref_leaves, incoming)
    got_leaves = [t.to(torch.float32 if i == 1 else dtype).requires_grad_()
                  for i, t in enumerate(leaves)]
    outs = attention_module._MergedSoftmax.apply(*got_leaves)
    grads = torch.autograd.grad(outs, got_leaves, [g.to(dtype) for g in incoming])
    assert [o.dtype for o in outs] == [dtype] * 2 and outs[1].shape == (2, 3, 20, 1)
    assert [g.dtype for g in grads] == [dtype, torch.float32, dtype]
    for name, got, ref in zip(('weights', 'pooled weight'), outs, ref_outs):
        assert_near(got, ref, tol, name)
    for name, got, ref in zip(('window logits', 'log-sum-exp', 'token weights'), grads,
                              ref_grads):
        assert_near(got, ref, tol, name)
    outside = torch.isinf(leaves[0])
    assert outside.any() and not grads[0][outside].any()
    assert torch.equal(outs[0][outside], got_leaves[2].detach()[outside])


def test_model_merges_its_softmaxes_in_the_kernels(monkeypatch):
    """Aggregated attention takes the merged softmax's kernels where the fused kernels
    serve the queries, and the operators elsewhere; same output and gradients."""
    launched = record_calls(monkeypatch, attention_module,
                            ('merged_softmax', 'merged_softmax_grad'))
    torch.manual_seed(0)
    layer = attention_module.AggregatedAttention(24, 2, 3, 2, None, None, 8)
    x = torch.randn(2, 6 * 7, 24)
    grads = []
    for fused in (False, True):
        monkeypatch.setattr(attention_module, 'use_fused_attention', lambda tensor: fused)
        layer.zero_grad()
        out = layer(x, 6, 7)
        out.square().sum().backward()
        grads.append([out.detach()] + [p.grad for p in layer.parameters()])
    assert launched == ['merged_softmax', 'merged_softmax_grad']
    for got, ref in zip(grads[1], grads[0]):
        assert_near(got, ref.double(), 1e-5, 'output or gradient')


def test_merged_softmax_kernels_refuse_bad_input():
    from mmtransnext.ops.fused_merged_softmax import merged_softmax, merged_softmax_grad
    local, lse = torch.zeros(1, 2, 5, 9), torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r'must be 4-D .* got shape \(2, 5, 9\)'):
        merged_softmax(local[0], lse, local)
    with pytest.raises(ValueError, match='dtype torch.float64 is not supported'):
        merged_softmax(local.double(), lse, local.double())
    with pytest.raises(ValueError, match=r'log-sum-exp of shape \(1, 2, 5\) and dtype '
                                         'torch.float16'):
        merged_softmax(local, lse.half(), local)
    with pytest.raises(ValueError, match=r'shape \(1, 2, 5, 8\) and dtype torch.float32 where'):
        merged_softmax(local, lse, local[..., :8])
    with pytest.raises(ValueError, match=r'pooled weight gradient of shape \(1, 2, 5\)'):
        merged_softmax_grad(local, lse, local, lse)


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=str)
def test_gated_gelu_kernels_equal_the_operators(dtype, tol):
    """The GLU's ``gelu(gate) * value`` through the kernels, the value the strided half of
    a projection as the model has it, against the operators in float64: output and both
    gradients within ``tol`` of the largest magnitude (observed 1e-7 in float32; float16
    rounds the results), across two programs' rows and channels."""
    from mmtransnext.ops.fused_gated_gelu import gated_gelu, gated_gelu_grad
    gen = torch.Generator().manual_seed(0)
    projection = 3 * torch.randn(2, 37, 2 * 70, generator=gen, dtype=torch.float64)
    gate = torch.randn(2, 37, 70, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 37, 70, generator=gen, dtype=torch.float64)
    ref_gate, ref_projection = gate.clone().requires_grad_(), projection.clone().requires_grad_()
    ref = torch.nn.functional.gelu(ref_gate) * ref_projection.chunk(2, dim=-1)[1]
    ref_grads = torch.autograd.grad(ref, (ref_gate, ref_projection), grad)
    value = projection.to(dtype).chunk(2, dim=-1)[1]
    assert not value.is_contiguous()
    out = gated_gelu(gate.to(dtype), value)
    grad_gate, grad_value = gated_gelu_grad(gate.to(dtype), value, grad.to(dtype))
    assert out.dtype == grad_gate.dtype == grad_value.dtype == dtype
    assert_near(out, ref, tol, 'output')
    assert_near(grad_gate, ref_grads[0], tol, 'gate gradient')
    assert_near(grad_value, ref_grads[1].chunk(2, dim=-1)[1], tol, 'value gradient')


def test_model_gates_its_glu_in_the_kernels(monkeypatch):
    """The GLU takes the gate's kernels where the fused kernels serve its input (in the
    forward and again where its hidden part is recomputed), the operators elsewhere; the
    same output and gradients."""
    from mmtransnext.models.transnext import _ConvolutionalGLU
    launched = record_calls(monkeypatch, transnext_module, ('gated_gelu', 'gated_gelu_grad'))
    torch.manual_seed(0)
    glu = _ConvolutionalGLU(12, 4.0)
    x = torch.randn(2, 5 * 7, 12)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(transnext_module, 'use_fused_attention', lambda tensor: fused)
        glu.zero_grad()
        x_grad = x.clone().requires_grad_()
        out = glu(x_grad, 5, 7, recompute_hidden=True)
        out.square().sum().backward()
        results.append([out.detach(), x_grad.grad] + [p.grad for p in glu.parameters()])
    assert launched == ['gated_gelu', 'gated_gelu', 'gated_gelu_grad']
    for got, ref in zip(results[1], results[0]):
        assert_near(got, ref.double(), 1e-5, 'output or gradient')


def test_gated_gelu_kernels_refuse_bad_input():
    from mmtransnext.ops.fused_gated_gelu import gated_gelu, gated_gelu_grad
    gate = torch.ones(2, 5, 4)
    with pytest.raises(ValueError, match='one dtype with at least 2 dims'):
        gated_gelu(gate, gate.half())
    with pytest.raises(ValueError, match=r'value of shape \(2, 5, 3\)'):
        gated_gelu(gate, gate[..., :3])
    with pytest.raises(ValueError, match='value of strides .* contiguous channels'):
        gated_gelu(gate, torch.ones(2, 4, 5).transpose(1, 2))
    with pytest.raises(ValueError, match='gate of strides .* rows of one stride'):
        gated_gelu(torch.ones(5, 2, 4).transpose(0, 1), gate)
    with pytest.raises(ValueError, match=r'grad of shape \(2, 5\)'):
        gated_gelu_grad(gate, gate, gate[..., 0])


def _query_term_inputs(tokens: bool, per_token: bool, dtype=torch.float64, seed=0):
    """Unit queries ``(2, 3, 37, 13)`` (odd sizes, several programs), the layer's
    parameters (temperature over softplus's threshold in one head) and scales."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(
        torch.randn(2, 3, 37, 13, generator=gen, dtype=torch.float64), dim=-1)
    params = [torch.randn(3, 1, 13, generator=gen, dtype=torch.float64),
              torch.tensor([0.5, 4.0, 25.0], dtype=torch.float64).view(3, 1, 1)]
    if tokens:
        params += [torch.randn(3, 13, 9, generator=gen, dtype=torch.float64),
                   torch.randn(3, 1, 9, generator=gen, dtype=torch.float64)]
    scale = (torch.rand(37, 1, generator=gen, dtype=torch.float64) + 2 if per_token
             else 3.7)
    return [unit] + [p.to(dtype) for p in params], scale


@pytest.mark.parametrize('tokens, per_token', [(True, True), (False, False)],
                         ids=['aggregated', 'full'])
def test_query_term_kernels_equal_the_operators(tokens, per_token, monkeypatch):
    """The scaled queries and token weights from the kernels (float32, results in
    float16 as a core under autocast would take them, and in float32) against the
    model's operators in float64: both results and every input's gradient within 1e-5
    of the largest magnitude in float32 (observed 1e-7) and 2e-3 for the float16
    results' rounding."""
    layer = attention_module.AggregatedAttention(39, 3, 3, 2, None, None, 8).double()
    leaves, scale = _query_term_inputs(tokens, per_token)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(2, 3, 37, size, generator=gen, dtype=torch.float64)
             for size in ((13, 9) if tokens else (13, ))]

    def run(inputs, fused, core):
        with torch.no_grad():
            layer.query_embedding.copy_(inputs[1])
            layer.temperature.copy_(inputs[2])
        monkeypatch.setattr(attention_module, 'use_fused_attention', lambda tensor: fused)
        monkeypatch.setattr(attention_module, 'core_dtype', lambda *args: core)
        unit = inputs[0].clone().requires_grad_()
        layer.zero_grad()
        extra = [t.clone().requires_grad_() for t in inputs[3:]]
        outs = [o for o in layer._query_terms(unit, scale, *extra) if o is not None]
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
        return outs, [unit.grad, layer.query_embedding.grad, layer.temperature.grad] + [
            t.grad for t in extra]

    ref_outs, ref_grads = run(leaves, False, torch.float64)
    layer.float()
    for core, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        outs, got = run([t.float() for t in leaves], True, core)
        assert [o.dtype for o in outs] == [core] * len(ref_outs)
        for got_out, ref_out in zip(outs, ref_outs):
            assert_near(got_out, ref_out, tol, 'result')
        for name, got_grad, ref_grad in zip(('unit', 'embedding', 'temperature', 'tokens',
                                             'token bias'), got, ref_grads):
            assert got_grad.dtype == torch.float32
            assert_near(got_grad, ref_grad, tol, name)


def test_query_term_kernels_refuse_bad_input():
    from mmtransnext.ops.fused_query_terms import query_terms
    unit, embedding, temperature = torch.ones(1, 2, 5, 4), torch.ones(2, 1, 4), torch.ones(2, 1, 1)
    with pytest.raises(ValueError, match='must be 4-D .* and contiguous'):
        query_terms(unit.transpose(1, 2), embedding, temperature, 1.0, None, None, torch.float32)
    with pytest.raises(ValueError, match=r'embedding of shape \(2, 1, 3\)'):
        query_terms(unit, torch.ones(2, 1, 3), temperature, 1.0, None, None, torch.float32)
    with pytest.raises(ValueError, match=r'tokens of shape \(2, 3, 9\)'):
        query_terms(unit, embedding, temperature, 1.0, torch.ones(2, 3, 9), torch.ones(2, 1, 9),
                    torch.float32)
    with pytest.raises(ValueError, match='4 scales for 5 queries'):
        query_terms(unit, embedding, temperature, torch.ones(4, 1), None, None, torch.float32)
