"""The CUDA window kernels' arithmetic, checked on the CPU every run.

``csrc/cuda/sliding_window_elements.h`` holds everything the CUDA kernels compute: the
element functors, the 32-bit index division, the 16-byte vector accesses and the split
of a batch into launches. ``tests/csrc/cuda_elements_on_cpu.cpp`` builds it for the host
(its launches become plain loops), and these tests hold it against the float64
reference of the released op, forward and gradients, in every dtype:

* float64 within 1e-12, float32 within 1e-5, float16 within 2e-3 and bfloat16 within
  1.6e-2, relative to the largest reference value. The reference takes the inputs as
  rounded to the dtype, so the tolerance measures the kernels' float32 accumulation
  and one rounding of the output, not the inputs' rounding.
* Shapes with head dims the vector path takes (8, 16) and does not (5), maps below the
  window, window 1 and 7, an empty batch, no head, head dim 0.
* Inputs that float16 or bfloat16 accumulators would sum wrongly
  (:func:`accumulation_case`): the results must be the float64 reference rounded once.
  The CPU and CUDA kernels are held to the same case (``test_ops.py``, ``test_ops_cuda.py``).
* Misaligned inputs, all of them or one alone. A GPU faults on a misaligned vector
  access; the host build checks the address of every one and raises instead.

On a GPU, ``tests/test_ops_cuda.py`` runs the device build against the same reference.
"""
import hashlib
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmtransnext.ops.graph_capture import (outside_mask, sliding_window_aggregate_decomposed,
                                           sliding_window_logits_decomposed)
from mmtransnext.ops.sliding_window import (sliding_window_aggregate_reference,
                                            sliding_window_logits_reference)

REPO = Path(__file__).resolve().parents[1]
HEADER = REPO / 'csrc' / 'cuda' / 'sliding_window_elements.h'
HARNESS = REPO / 'tests' / 'csrc' / 'cuda_elements_on_cpu.cpp'

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (batch, heads, height, width, head dim, window)
SHAPES = [
    (2, 3, 5, 7, 8, 3),     # vector accesses in every dtype
    (1, 2, 3, 4, 5, 5),     # odd head dim: one value at a time
    (2, 1, 1, 1, 4, 3),     # a single token: every neighbour but the centre outside
    (1, 2, 2, 3, 16, 7),    # window larger than the map
    (3, 2, 4, 4, 8, 1),     # window 1: the token itself
    (0, 2, 3, 4, 8, 3),     # an empty batch: no launch, a zero bias gradient
    (1, 0, 3, 4, 8, 3),     # no head: empty results
    (2, 3, 3, 4, 0, 3),     # head dim 0: logits are the bias, zero weight gradients
]


@pytest.fixture(scope='module')
def host_kernels():
    """The header built for the host (named by its sources' hash, so never stale)."""
    from torch.utils.cpp_extension import load

    # torch builds with ninja; pip installs it beside the interpreter, maybe off PATH.
    here = os.path.dirname(sys.executable)
    if shutil.which('ninja') is None and os.path.exists(os.path.join(here, 'ninja')):
        os.environ['PATH'] = here + os.pathsep + os.environ.get('PATH', '')
    digest = hashlib.sha256(HEADER.read_bytes() + HARNESS.read_bytes()).hexdigest()[:12]
    return load(name=f'mmtransnext_cuda_elements_{digest}', sources=[str(HARNESS)],
                extra_include_paths=[str(REPO / 'csrc')], extra_cflags=['-O2'])


def random_inputs(shape, dtype, seed=0):
    """Rounded to ``dtype``: the kernels' inputs, and their float64 copies."""
    batch, heads, height, width, dim, ws = shape
    gen = torch.Generator().manual_seed(seed)
    tokens, window = height * width, ws * ws
    shapes = dict(query=(batch, heads, tokens, dim), key=(batch, heads, tokens, dim),
                  value=(batch, heads, tokens, dim), bias=(heads, window),
                  weights=(batch, heads, tokens, window),
                  grad_logits=(batch, heads, tokens, window),
                  grad_out=(batch, heads, tokens, dim))
    low = {name: torch.randn(size, generator=gen, dtype=torch.float64).to(dtype)
           for name, size in shapes.items()}
    return low, {name: t.double() for name, t in low.items()}


def assert_close_to_reference(actual, expected, dtype, what):
    actual = actual.double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f'{what}: -inf entries differ'
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    error = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert error <= TOL[dtype] * scale, f'{what} ({dtype}): max error {error:.3g}'


def _without_head_dim(x, shape):
    """What the ops give for head dim 0: logits are the bias (``-inf`` outside the map),
    the weights aggregate nothing, the bias gradient sums the logits' gradient over the
    batch and the tokens inside, every other gradient is zero."""
    _, _, height, width, _, ws = shape
    outside = outside_mask(x['bias'], height, width, ws)
    zeros = torch.zeros_like
    logits = (x['bias'][:, None] + zeros(x['grad_logits'])).masked_fill(outside, float('-inf'))
    return dict(logits=logits, grad_query=zeros(x['query']), grad_key=zeros(x['key']),
                grad_bias=x['grad_logits'].masked_fill(outside, 0).sum((0, 2)),
                out=zeros(x['value']), grad_weights=zeros(x['weights']),
                grad_value=zeros(x['value']))


def reference_results(x, shape):
    """Float64 outputs and gradients of the released op (unfold)."""
    _, heads, height, width, dim, ws = shape
    # F.unfold refuses zero channels. Pads and slices take no heads, but torch 2.1's
    # F.pad refuses a head dim of 0, whose results are written out instead.
    if dim == 0:
        return _without_head_dim(x, shape)
    logits_fn, aggregate_fn = sliding_window_logits_reference, sliding_window_aggregate_reference
    if heads == 0:
        logits_fn, aggregate_fn = (sliding_window_logits_decomposed,
                                   sliding_window_aggregate_decomposed)
    query, key, bias, weights, value = (x[n].clone().requires_grad_()
                                        for n in ('query', 'key', 'bias', 'weights', 'value'))
    logits = logits_fn(query, key, bias, height, width, ws)
    # The -inf entries get no gradient (the compiled backward ignores what arrives there).
    logits.masked_fill(torch.isinf(logits), 0).backward(x['grad_logits'])
    out = aggregate_fn(weights, value, height, width, ws)
    out.backward(x['grad_out'])
    return dict(logits=logits.detach(), grad_query=query.grad, grad_key=key.grad,
                grad_bias=bias.grad, out=out.detach(), grad_weights=weights.grad,
                grad_value=value.grad)


def kernel_results(kernels, x, shape, *limit):
    """The seven outputs and gradients from ``kernels``: the host build (with its index
    limit) or :func:`compiled_ops`."""
    _, _, height, width, _, ws = shape
    geometry = (height, width, ws, *limit)
    grad_query, grad_key, grad_bias = kernels.logits_backward(
        x['grad_logits'], x['query'], x['key'], *geometry)
    grad_weights, grad_value = kernels.aggregate_backward(
        x['grad_out'], x['weights'], x['value'], *geometry)
    return dict(logits=kernels.logits(x['query'], x['key'], x['bias'], *geometry),
                grad_query=grad_query, grad_key=grad_key, grad_bias=grad_bias,
                out=kernels.aggregate(x['weights'], x['value'], *geometry),
                grad_weights=grad_weights, grad_value=grad_value)


def compiled_ops():
    """``torch.ops.mmtransnext``'s four ops under the host build's names."""
    mm = torch.ops.mmtransnext
    return SimpleNamespace(logits=mm.sliding_window_logits,
                           logits_backward=mm.sliding_window_logits_backward,
                           aggregate=mm.sliding_window_aggregate,
                           aggregate_backward=mm.sliding_window_aggregate_backward)


def accumulation_case(dtype):
    """Inputs that every float16/bfloat16 accumulator of the kernels would sum wrongly.

    A float32 accumulator sums them exactly, so each result is the float64 reference
    rounded once to ``dtype`` (the ``expected`` returned). A low-precision running sum
    stops growing once a term is half a unit in its last place, at ``2 / eps`` terms of
    one: 256 in bfloat16, 2048 in float16.

    * Each logit and each weight gradient sums 2**16 products 2**-4, exactly 4096. In
      float16 the sum stops at 128, in bfloat16 at 16; split over up to 16 SIMD lanes,
      each lane's 4096 terms (256) stop there too.
    * The window's gathers (the aggregate and the query, key and value gradients) sum
      at most 9 terms, too few to stall on terms of one. Tap 0 of the weights and of
      the logits' gradient is ``2 / eps``, which both gathers, plain and transposed, add
      first wherever it lies inside the map; the taps of one after it are then lost.

    Returns:
        tuple: ``(shape, inputs, expected)``, inputs in ``dtype`` named as
        :func:`kernel_results` takes them, expected as it returns them.
    """
    shape = (1, 1, 3, 3, 2 ** 16, 3)
    batch, heads, height, width, dim, ws = shape
    tokens, window = height * width, ws * ws
    first = 2 / torch.finfo(dtype).eps
    taps = torch.ones(batch, heads, tokens, window, dtype=torch.float64)
    taps[..., 0] = first
    exact = dict(query=torch.full((batch, heads, tokens, dim), 2.0 ** -4, dtype=torch.float64),
                 key=torch.ones(batch, heads, tokens, dim, dtype=torch.float64),
                 value=torch.ones(batch, heads, tokens, dim, dtype=torch.float64),
                 bias=torch.ones(heads, window, dtype=torch.float64),
                 weights=taps, grad_logits=taps.clone(),
                 grad_out=torch.full((batch, heads, tokens, dim), 2.0 ** -4,
                                     dtype=torch.float64))
    expected = {name: t.to(dtype) for name, t in reference_results(exact, shape).items()}
    return shape, {name: t.to(dtype) for name, t in exact.items()}, expected


def assert_rounded_once(results, expected):
    """Every result equal to its ``expected`` (:func:`accumulation_case`)."""
    for name, value in results.items():
        value, want = value.cpu(), expected[name]
        assert value.shape == want.shape, f'{name}: shape {value.shape}, not {want.shape}'
        wrong = (value != want).nonzero()
        assert len(wrong) == 0, (
            f'{name}: {len(wrong)} entries are not the exact sum rounded once to '
            f'{value.dtype} (accumulated in it?), first at {tuple(wrong[0].tolist())}: '
            f'{value[tuple(wrong[0])].item()} instead of {want[tuple(wrong[0])].item()}')


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_cuda_elements_match_the_reference(host_kernels, shape, dtype):
    low, exact = random_inputs(shape, dtype)
    expected = reference_results(exact, shape)
    results = kernel_results(host_kernels, low, shape, host_kernels.INDEX_LIMIT)
    for name, value in results.items():
        assert value.dtype == dtype and value.shape == expected[name].shape, name
        assert_close_to_reference(value, expected[name], dtype, name)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_cuda_elements_accumulate_in_float32(host_kernels, dtype):
    shape, x, expected = accumulation_case(dtype)
    assert_rounded_once(kernel_results(host_kernels, x, shape, host_kernels.INDEX_LIMIT),
                        expected)


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_vector_width_follows_head_dim_and_alignment(host_kernels, dtype):
    wide = 128 // torch.finfo(dtype).bits   # values per 16 bytes
    aligned = torch.zeros(2, 3, 4, 16, dtype=dtype)
    assert host_kernels.vector_width(aligned) == wide
    assert host_kernels.vector_width(torch.zeros(2, 3, 4, 5, dtype=dtype)) == 1
    # Contiguous, but starting one value into its storage: no 16-byte accesses.
    misaligned = torch.zeros(2 * 3 * 4 * 16 + 1, dtype=dtype)[1:].view(2, 3, 4, 16)
    assert misaligned.is_contiguous()
    assert host_kernels.vector_width(misaligned) == 1


def test_misaligned_vector_access_is_refused_on_the_host(host_kernels):
    """What would fault on a GPU fails the host build with a message."""
    values = torch.arange(16, dtype=torch.float32)
    assert host_kernels.vector_load_sum(values, 0) == 6
    assert host_kernels.vector_load_sum(values, 4) == 22
    with pytest.raises(RuntimeError, match='16-byte vector access at a misaligned address'):
        host_kernels.vector_load_sum(values, 1)


@pytest.mark.parametrize('which', ['every input', 'query', 'key', 'value', 'grad_out',
                                   'weights', 'grad_logits', 'bias'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_inputs_take_the_scalar_path(host_kernels, dtype, which):
    """Inputs one value into their storage, all of them or one alone (the others
    aligned): every launcher must see it and read one value at a time, which the host
    build's alignment check holds it to."""
    shape = (2, 2, 3, 5, 8, 3)
    low, exact = random_inputs(shape, dtype, seed=1)

    def shifted(t):
        storage = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        return view

    low = {name: shifted(t) if which in ('every input', name) else t
           for name, t in low.items()}
    if which in ('every input', 'query'):
        assert host_kernels.vector_width(low['query']) == 1
    expected = reference_results(exact, shape)
    for name, value in kernel_results(host_kernels, low, shape,
                                     host_kernels.INDEX_LIMIT).items():
        assert_close_to_reference(value, expected[name], dtype, name)


def test_batch_split_into_launches_changes_nothing(host_kernels):
    # Index limits that fit one and two images of (3 heads x 12 tokens x 9 taps): the
    # launches then start at image offsets, as on the GPU with maps of 2^31 elements.
    shape = (5, 3, 3, 4, 8, 3)
    low, exact = random_inputs(shape, torch.float32, seed=2)
    expected = reference_results(exact, shape)
    whole = kernel_results(host_kernels, low, shape, host_kernels.INDEX_LIMIT)
    per_image = 3 * 12 * 9
    for limit in (per_image, 2 * per_image + 5):
        split = kernel_results(host_kernels, low, shape, limit)
        for name, value in split.items():
            assert_close_to_reference(value, expected[name], torch.float32, f'{name} (limit {limit})')
            if name != 'grad_bias':     # the bias sums in another order
                assert torch.equal(value, whole[name]), name


def test_an_image_beyond_the_index_range_is_refused(host_kernels):
    shape = (1, 3, 3, 4, 8, 3)
    low, _ = random_inputs(shape, torch.float32)
    with pytest.raises(RuntimeError, match='one image needs 324 indexable elements'):
        host_kernels.logits(low['query'], low['key'], low['bias'], 3, 4, 3, 300)


@pytest.mark.parametrize('divisor', [1, 2, 3, 7, 9, 24, 41, 334, 66800, 2**16 + 1,
                                     2**30 - 1, 2**30 + 3, 2**31 - 1])
def test_divisor_equals_integer_division(host_kernels, divisor):
    limit = host_kernels.INDEX_LIMIT
    gen = torch.Generator().manual_seed(divisor)
    edges = [0, 1, divisor - 1, divisor, divisor + 1, 2 * divisor - 1, 2 * divisor,
             limit - 1, limit, limit - divisor, (limit // divisor) * divisor,
             (limit // divisor) * divisor - 1]
    numerators = torch.cat([torch.tensor([e for e in edges if 0 <= e <= limit]),
                            torch.randint(0, limit + 1, (20000,), generator=gen),
                            torch.randint(0, min(limit, 64 * divisor), (5000,), generator=gen)])
    assert torch.equal(host_kernels.quotients(numerators, divisor), numerators // divisor)


def test_divisor_out_of_range_is_refused(host_kernels):
    with pytest.raises(RuntimeError, match='divisor 0 out of the 32-bit index range'):
        host_kernels.quotients(torch.tensor([1]), 0)
