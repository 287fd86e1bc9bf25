"""The fused attention kernels: checks under Triton's interpreter, GPU builds, dispatch, errors.

The kernels' numbers are checked in ``interpreted_fused_attention.py``, run here
in a child process with ``TRITON_INTERPRET=1`` (Triton must see the variable
before it is first imported, and only those tests may run interpreted). Whether
they compile for the GPU is checked here without one: Triton compiles them ahead
of time to sm_80 and sm_90 machine code with the ``ptxas`` it ships.
"""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtransnext.models.position_bias import RowFactoredBias, bias_layout
from mmtransnext.ops import DISABLE_ENV, use_fused_attention
from mmtransnext.ops import fused_attention
from mmtransnext.ops.fused_attention import fused_bias_attention
from mmtransnext.version import torch_release

TESTS = Path(__file__).resolve().parent

# torch 2.1-2.3 CUDA wheels bring Triton 2, whose language the kernels do not use; there
# the banded path serves CUDA too (tested in test_dispatch_needs_triton_3 below).
needs_triton_3 = pytest.mark.skipif(not fused_attention._TRITON,
                                    reason=f'needs triton >= {fused_attention.MIN_TRITON}')


def _version(package):
    try:
        return torch_release(importlib.metadata.version(package))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


# Triton's interpreter before 3.7 turns an integer argument into a one-element array and
# reads it back with int(), which numpy 2.4 refuses: every kernel loop over a size then
# fails inside Triton (seen with torch 2.11's Triton 3.6). The compiled kernels are not
# affected; test_fused_attention_cuda.py checks them on a GPU.
_TRITON_VERSION, _NUMPY_VERSION = _version('triton'), _version('numpy')
interpreter_reads_sizes = pytest.mark.skipif(
    _TRITON_VERSION is not None and _TRITON_VERSION < (3, 7) and _NUMPY_VERSION >= (2, 4),
    reason=f'the interpreter of Triton {_TRITON_VERSION} cannot read integer kernel arguments '
    f'under numpy {_NUMPY_VERSION} (needs Triton >= (3, 7) or numpy < (2, 4))')


@needs_triton_3
@interpreter_reads_sizes
def test_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1')
    done = subprocess.run(
        [sys.executable, '-m', 'pytest', str(TESTS / 'interpreted_fused_attention.py'), '-q',
         '-p', 'no:cacheprovider', '-W', 'ignore::DeprecationWarning'],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert ' passed' in done.stdout.splitlines()[-1], done.stdout[-2000:]


# Bytes that kernels spill, as compiled here (every other kernel spills nothing), all
# in float32 with a resized bias: on sm_80 the query-major passes of the default
# BACKWARD_KV='atomic' for a whole softmax (ROW_RESIDUAL) and of 'two-pass' otherwise;
# on sm_90 the 'two-pass' query-major pass for a whole softmax (since the kernel forms
# each row's shift from the output itself, ptxas gives it 128 registers, against 179
# before), also under TF32X3.
_SPILLS_ON_RECORD = {(80, torch.float32, True, None, 'backward_atomic_residual'): 32,
                     (80, torch.float32, True, None, 'backward'): 16,
                     (90, torch.float32, True, None, 'backward_residual'): 56,
                     (90, torch.float32, True, 'tf32x3', 'backward_residual'): 24}


# Each arch and each kind of matmul (float32 FMA, 16-bit tensor cores, float32 as three
# TF32 products) at the launch configuration the dispatcher uses (or TF32X3);
# uncached, a float32 backward takes tens of seconds.
@needs_triton_3
@pytest.mark.parametrize('arch, dtype, resized, launch', [
    (90, torch.float32, True, None), (80, torch.float32, True, None),
    (90, torch.bfloat16, True, None),
    (80, torch.float16, True, None), (90, torch.float16, True, None),
    (90, torch.bfloat16, False, None),
    (80, torch.float16, False, None), (90, torch.float32, True, 'tf32x3'),
    (80, torch.float32, False, 'tf32x3')], ids=str)
def test_kernels_compile_for_gpus_without_spilling(arch, dtype, resized, launch):
    """The kernels as launched for head dim 24 (every variant), built to cubins.

    A kernel that keeps more live values than registers spills them to local memory
    and reloads them at every step of its key loop; the first tile sizes did (0.5 to
    2.8 KB per thread), so each launch configuration is held to none, but for the
    few bytes on record above. Its dots run on tensor cores unless
    they are float32 in IEEE precision, and the gradients' atomic adds are relaxed: no
    GPU-wide memory barrier around each of them.
    """
    tiles = fused_attention.TF32X3 if launch else None
    on_tensor_cores = dtype != torch.float32 or tiles is not None
    built = fused_attention.compile_for_gpu(arch, dtype, resized=resized, launch=tiles)
    # the bias read by slots where 16-bit inputs have a column axis resized
    slots = resized and dtype != torch.float32
    kernels = {'forward', 'backward', 'backward_keys', 'backward_atomic'}
    # float32 alone walks the keys twice for a whole softmax (ROW_RESIDUAL)
    whole = {'backward_residual', 'backward_atomic_residual'} if dtype == torch.float32 else set()
    assert built.keys() == (kernels | whole
                            | ({name + '_slots' for name in kernels} if slots else set()))
    for name, cubin in built.items():
        resources = fused_attention.machine_code_resources(cubin)
        assert resources['instructions'] > 100, name
        allowed = _SPILLS_ON_RECORD.get((arch, dtype, resized, launch, name), 0)
        assert resources['stack_bytes'] <= allowed, (name, resources)
        assert (resources['tensor_core'] > 0) == on_tensor_cores, (name, resources)
        assert resources['memory_barriers'] == 0, (name, resources)


@needs_triton_3
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_offset_mlp_kernels_compile_for_gpus_without_spilling(arch, dtype):
    """The position-bias MLP's two kernels, built to cubins for up to 16 heads (every
    TransNeXt-T layer; Base's last stage has 32, whose float32 backward spills about
    100 bytes on a table of a few thousand points): no spills, tensor cores for 16-bit
    weights, no memory barriers."""
    from mmtransnext.ops import fused_offset_mlp
    built = fused_offset_mlp.compile_for_gpu(arch, dtype, heads=16)
    assert built.keys() == {'forward', 'backward'}
    for name, cubin in built.items():
        resources = fused_attention.machine_code_resources(cubin)
        assert resources['instructions'] > 100, name
        assert resources['stack_bytes'] == 0, (name, resources)
        assert (resources['tensor_core'] > 0) == (dtype != torch.float32), (name, resources)
        assert resources['memory_barriers'] == 0, (name, resources)


@needs_triton_3
@pytest.mark.parametrize('arch', [80, 90])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('op', ['fused_unit_vectors', 'fused_query_terms', 'fused_bias_rows',
                                'fused_merged_softmax', 'fused_gated_gelu'])
def test_layer_kernels_compile_for_gpus_without_spilling(op, arch, dtype):
    """The kernels of the unit vectors, the query terms, the bias table (built from
    the MLP's), the merged softmax and the GLU's gate, built to cubins: no spills, no
    memory barriers (the bias table's backward atomics relaxed)."""
    import importlib
    built = importlib.import_module(f'mmtransnext.ops.{op}').compile_for_gpu(arch, dtype)
    assert built.keys() == {'forward', 'backward'}
    for name, cubin in built.items():
        resources = fused_attention.machine_code_resources(cubin)
        assert resources['instructions'] > 50, name
        assert resources['stack_bytes'] == 0, (name, resources)
        assert resources['memory_barriers'] == 0, (name, resources)


@needs_triton_3
def test_spilling_is_seen():
    """The check above can fail: 64 x 64 tiles on 4 warps spill (sm_90, bfloat16)."""
    cubin = fused_attention.compile_for_gpu(
        90, torch.bfloat16, launch=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4))['backward']
    assert fused_attention.machine_code_resources(cubin)['stack_bytes'] > 0


@needs_triton_3
@pytest.mark.parametrize('sem, barriers', [('acq_rel', True), ('relaxed', False)])
def test_atomic_ordering_in_machine_code(sem, barriers):
    """The barrier check above can fail: Triton's default ordering of an atomic add
    ('acq_rel') puts a GPU-wide memory barrier around it, 'relaxed' (what the kernels
    use) none."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    @triton.jit
    def add(X, Y, SEM: tl.constexpr):
        offsets = tl.arange(0, 32)
        tl.atomic_add(X + offsets, tl.load(Y + offsets), sem=SEM)

    compiled = compile(ASTSource(add, {'X': '*fp32', 'Y': '*fp32', 'SEM': 'constexpr'},
                                 {'SEM': sem}), target=GPUTarget('cuda', 90, 32))
    found = fused_attention.machine_code_resources(compiled.asm['cubin'])['memory_barriers']
    assert (found > 0) == barriers, found


@needs_triton_3
def test_new_image_sizes_compile_nothing_new():
    """Detection's varied image sizes do not recompile the kernels.

    The backbone's fused launches at padded Mask R-CNN inputs, keyed as Triton's JIT
    keys its binaries. 800x1088 (bias resized) and 800x800 (not resized: the size
    it is built for) need their own binaries; a third size, 768x1344, needs none
    more with the kernels' declared specialisation, and would with Triton's default.
    """
    try:
        from triton.runtime.jit import native_specialize_impl  # noqa: F401
    except ImportError:
        pytest.skip('Triton < 3.5 keys its binaries another way (the kernels still '
                    'declare the same arguments unspecialised)')
    sys.path.insert(0, str(TESTS.parent / 'tools'))
    import kernel_resources as kr
    inputs = [kr.detection_input(size) for size in ('640x480', '612x612', '640x360')]
    assert inputs == [(800, 1088), (800, 800), (768, 1344)]
    launches = [kr.recorded_launches([size], arch='micro') for size in inputs]
    assert all(launches), 'no fused launches recorded: is the compiled op built (make ext)?'
    kernels = fused_attention._kernels()
    for kernel in (kernels.pooled_attention_forward, kernels.pooled_attention_backward,
                   kernels.pooled_attention_backward_keys):
        def variants(runs, default):
            return kr.compiled_variants(kernel, sum(runs, []), default)
        assert variants(launches, False) == variants(launches[:2], False)
        assert variants(launches, True) > variants(launches[:2], True)


# (build query, build key, query, key) column lengths: no resize, resized up and down,
# irregular pooling bins (334 -> 41, centres of both parities), one key, full attention.
_COLUMN_CASES = [(7, 3, 7, 3), (200, 25, 334, 41), (334, 41, 334, 41), (9, 3, 13, 4),
                 (9, 3, 5, 2), (5, 1, 5, 1), (6, 6, 6, 6)]


@pytest.mark.parametrize('build_q, build_k, width, pool_w', _COLUMN_CASES)
def test_separable_col_taps_give_the_product_taps(build_q, build_k, width, pool_w):
    """The fused kernels' factored column taps address what the CPU's (W, Wp, 4) taps do.

    Both forms are applied to a random ``by_rows`` table here in PyTorch, so the
    numbering of the offsets (sums of a query and a key term) is checked against the
    offsets' own index for every query column, key column and tap.
    """
    layout = bias_layout((2, build_q), (2, build_k), (14, 14), (3, width), (2, pool_w),
                         torch.device('cpu'))
    table = torch.randn(2, *layout.coords.shape[:2], dtype=torch.float64)
    bias = RowFactoredBias(table, layout)
    index, weight = bias.col_taps(torch.float32)                   # (W, Wp, 4)
    product = (bias.by_rows[..., index] * weight).sum(-1)          # (h, H, Hp, W, Wp)
    q_term, q_weight, k_term, k_weight, spread = bias.separable_col_taps()
    assert q_term.dtype == k_term.dtype == torch.int32
    spread_rows = bias.by_rows[..., spread]
    factored = 0
    for i in range(2):
        for j in range(2):
            at = (q_term[:, i, None] + k_term[None, :, j]).long()    # (W, Wp)
            factored = factored + (spread_rows[..., at]
                                   * q_weight[:, i, None] * k_weight[None, :, j])
    torch.testing.assert_close(factored, product, atol=1e-6, rtol=1e-6)
    assert 0 <= int(q_term.min() + k_term.min())
    assert int(q_term.max() + k_term.max()) < spread.numel()


def test_column_taps_are_built_once_per_layout():
    """Every forward builds a new RowFactoredBias; its column taps come from the layout
    (on CUDA building them waits for the GPU, once per attention layer otherwise)."""
    layout = bias_layout((9, 9), (3, 3), (9, 9), (5, 13), (1, 4), torch.device('cpu'))
    first, second = (RowFactoredBias(torch.randn(2, *layout.coords.shape[:2]), layout)
                     for _ in range(2))
    assert all(a is b for a, b in zip(first.separable_col_taps(), second.separable_col_taps()))
    assert all(a is b for a, b in zip(first.col_taps(torch.float32),
                                      second.col_taps(torch.float32)))
    assert first.col_taps(torch.float64)[1].dtype == torch.float64


def test_even_numbering_that_misses_an_offset_is_refused(monkeypatch):
    from mmtransnext.models import position_bias

    def off_by_one(query_len, key_len):
        query_term, key_term = real(query_len, key_len)
        return query_term, key_term // 2        # merges offsets that differ

    real = position_bias._even_offset_terms
    monkeypatch.setattr(position_bias, '_even_offset_terms', off_by_one)
    layout = position_bias.bias_layout.__wrapped__((1, 9), (1, 3), (9, 9), (1, 9), (1, 3),
                                                   torch.device('cpu'))
    with pytest.raises(RuntimeError, match=r'even numbering of column offsets \(\(9, 3\) grid'):
        layout.even_columns


@pytest.mark.parametrize('case, taps', [
    ('map5x7_pool2x3_d24', (1, 1)), ('interpolated_d13', (2, 2)),
    ('query_columns_resized', (2, 1)), ('key_columns_resized', (1, 2))])
def test_taps_per_column_axis(case, taps):
    """An axis whose columns are not resized takes the one-tap kernels (no weights read)."""
    from fused_attention_cases import CASES, make_inputs
    spec, batch, heads, head_dim = CASES[case]
    (query, key, value, table), layout = make_inputs(spec, batch, heads, head_dim)
    bias = RowFactoredBias(table.float(), layout)
    _, _, meta = fused_attention._launch_args(query.float(), key.float(), value.float(),
                                              bias.by_rows, bias)
    assert (meta['Q_TAPS'], meta['K_TAPS']) == taps
    # 16-bit inputs take taller query blocks where no axis is resized (registers allow)
    half = fused_attention.launch_meta(torch.float16, head_dim, head_dim, taps[0] == 2,
                                       taps[1] == 2)
    assert half['BLOCK_M'] == (64 if taps == (1, 1) else 32)


# Stages 1 and 3 of TransNeXt-T at 800x1333 (built on the 800 px grids), a 512 px input
# on the same build (resized down: more offsets a block), no resize, odd small maps.
_SLOT_CASES = [((200, 200), (25, 25), (200, 334), (25, 41)),
               ((50, 50), (25, 25), (50, 84), (25, 42)),
               ((200, 200), (25, 25), (128, 128), (16, 16)),
               ((5, 7), (2, 3), (5, 7), (2, 3)), ((9, 9), (3, 3), (5, 13), (1, 4))]


@pytest.mark.parametrize('build_q, build_k, query, key', _SLOT_CASES)
def test_bias_slots_number_each_blocks_offsets(build_q, build_k, query, key):
    """The slots of the bias tiles: each live tap's slot holds its table offset, a
    block's slots hold distinct offsets, each reached by some tap, and taps of weight
    zero take none."""
    layout = bias_layout(build_q, build_k, build_q, query, key, torch.device('cpu'))
    bias = RowFactoredBias(torch.zeros(1, *layout.coords.shape[:2]), layout)
    table = bias.kernel_table(torch.float32)
    row_stride, pool_row_stride = table.stride()[1:3]
    found = fused_attention.bias_slots(bias, 32, 16, row_stride, pool_row_stride)
    assert fused_attention.bias_slots(bias, 32, 16, row_stride, pool_row_stride) is found
    q_term, q_weight, k_term, k_weight, _ = bias.separable_col_taps()
    for (slot, addr, count), (length, size, stride, term, weight, block) in zip(
            (found[:3], found[3:]),
            ((query[0] * query[1], query[1], row_stride, q_term, q_weight, 32),
             (key[0] * key[1], key[1], pool_row_stride, k_term, k_weight, 16))):
        taps = slot.shape[1]
        assert taps == (2 if weight[:, 1].any() else 1)
        assert slot.dtype == addr.dtype == torch.int32 and count >= 16
        assert count & (count - 1) == 0 and addr.shape == (-(-length // block), count)
        position = torch.arange(length)
        offset = (position // size)[:, None] * stride + term[position % size, :taps].long()
        live = weight[position % size, :taps] != 0
        assert (slot[~live] == count).all()
        blocks = (position // block)[:, None].expand(-1, taps)
        assert torch.equal(addr[blocks[live], slot[live].long()].long(), offset[live])
        for b in range(addr.shape[0]):
            used = addr[b][addr[b] >= 0]
            assert used.unique().numel() == used.numel()
            assert used.numel() == slot[b * block:(b + 1) * block][
                live[b * block:(b + 1) * block]].unique().numel()
    if query == (200, 334):     # the launch tiles' slot counts, as compile_for_gpu builds
        at_launch = fused_attention.bias_slots(bias, 32, 32, row_stride, pool_row_stride)
        assert (at_launch[2], at_launch[5]) == (32, 32)


@pytest.mark.parametrize('case, query, key, dtype, by_slots', [
    ('resized', (17, 23), (9, 10), torch.bfloat16, True),
    ('one tap', (20, 20), (5, 5), torch.float16, False),    # the size the bias is built for
    ('downsized', (9, 11), (3, 3), torch.float16, False),   # 36-59 offsets a block
    ('float32', (17, 23), (9, 10), torch.float32, False)])
def test_which_launches_read_the_bias_by_slots(case, query, key, dtype, by_slots, monkeypatch):
    """With BIAS_TILE 'slots', 16-bit launches with a column axis resized read the bias
    by slots where a block's offsets fit MAX_BIAS_SLOTS; the rest, and every launch with
    'taps', read it by taps (no slot arguments)."""
    layout = bias_layout((20, 20), (5, 5), (20, 20), query, key, torch.device('cpu'))
    # the table in float32 (torch 2.1's CPU resizes no float16), cast as the op casts it
    bias = RowFactoredBias(torch.zeros(1, *layout.coords.shape[:2]), layout)
    table = bias.kernel_table(dtype)
    tokens, keys = query[0] * query[1], key[0] * key[1]
    inputs = [torch.zeros(1, 1, n, 24, dtype=dtype) for n in (tokens, keys, keys)]
    _, _, meta = fused_attention._launch_args(*inputs, table, bias)
    monkeypatch.setattr(fused_attention, 'BIAS_TILE', 'taps')
    assert fused_attention._tile_slots(bias, table, meta)[1] == dict(Q_SLOTS=0, K_SLOTS=0)
    monkeypatch.setattr(fused_attention, 'BIAS_TILE', 'slots')
    tensors, slot_meta = fused_attention._tile_slots(bias, table, meta)
    assert (slot_meta['Q_SLOTS'] > 0) == (slot_meta['K_SLOTS'] > 0) == by_slots
    assert all(t.dtype == torch.int32 for t in tensors) == by_slots
    if case == 'downsized':
        found = fused_attention.bias_slots(bias, meta['BLOCK_M'], meta['BLOCK_N'],
                                           *table.stride()[1:3])
        assert found[2] > fused_attention.MAX_BIAS_SLOTS


def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    cpu = torch.zeros(1)
    assert not use_fused_attention(cpu)           # the CPU keeps the banded path
    assert not use_fused_attention(cpu.to('meta'))
    if torch.cuda.is_available():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert use_fused_attention(cpu.cuda().to(dtype)) is fused_attention._TRITON
        assert not use_fused_attention(cpu.cuda().double())   # the kernels take no float64
        monkeypatch.setenv(DISABLE_ENV, '1')
        assert not use_fused_attention(cpu.cuda().half())


@pytest.mark.parametrize('bad, message', [
    (dict(query=torch.zeros(1, 3, 36, 24)), 'laid out for 5x7 queries'),
    (dict(key=torch.zeros(1, 3, 6, 16)), 'shapes do not match'),
    (dict(value=torch.zeros(1, 2, 6, 24)), 'shapes do not match'),
    (dict(query=torch.zeros(1, 3, 35, 24, dtype=torch.float64)), 'float64 takes the banded'),
    (dict(query=torch.zeros(3, 35, 24)), 'must be a 4-D tensor'),
    ({}, 'run on CUDA, or on the CPU under TRITON_INTERPRET=1'),
])
def test_bad_input_raises_named_error(bad, message):
    layout = bias_layout((5, 7), (2, 3), (5, 7), (5, 7), (2, 3), torch.device('cpu'))
    bias = RowFactoredBias(torch.zeros(3, *layout.coords.shape[:2]), layout)
    args = dict(query=torch.zeros(1, 3, 35, 24), key=torch.zeros(1, 3, 6, 24),
                value=torch.zeros(1, 3, 6, 24))
    args.update(bad)
    if args['query'].dtype == torch.float64:
        args = {k: v.double() for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        fused_bias_attention(**args, bias=bias)



def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(fused_attention, '_TRITON', False)
    layout = bias_layout((5, 7), (2, 3), (5, 7), (5, 7), (2, 3), torch.device('cpu'))
    bias = RowFactoredBias(torch.zeros(3, *layout.coords.shape[:2]), layout)
    with pytest.raises(ValueError, match=r'needs Triton >= 3\.0, which is not installed; '
                       r'.*run on CUDA, or on the CPU under TRITON_INTERPRET=1'):
        fused_bias_attention(torch.zeros(1, 3, 35, 24), torch.zeros(1, 3, 6, 24),
                             torch.zeros(1, 3, 6, 24), bias=bias)


def test_dispatch_needs_triton_3(monkeypatch):
    """Triton 2 (torch < 2.4 wheels) or none keeps CUDA tensors on the banded path."""
    for version, usable in (('2.1.0', False), ('3.0.0', True), ('3.9.0', True)):
        monkeypatch.setattr(fused_attention.importlib.metadata, 'version', lambda name: version)
        monkeypatch.setattr(fused_attention.importlib.util, 'find_spec', lambda name: object())
        assert fused_attention._triton_usable() is usable, version
    monkeypatch.setattr(fused_attention.importlib.util, 'find_spec', lambda name: None)
    assert fused_attention._triton_usable() is False
