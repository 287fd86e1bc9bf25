"""Attention with a position bias in fused Triton kernels, for CUDA tensors.

:func:`fused_bias_attention` computes what
:func:`~mmtransnext.ops.banded_attention.banded_bias_attention` computes,
``softmax(query @ key^T + bias) @ value`` and each query's log-sum-exp, in the
way of flash attention: tiles of queries walk the keys with an online softmax,
and the bias is read inside the kernel from the row-factored table
(:class:`~mmtransnext.models.position_bias.RowFactoredBias`) instead of being
built. Nothing of size ``N x P`` ever reaches global memory, forward or backward
(which recomputes the probabilities from the log-sum-exp).

Precision: logits, softmax statistics and all accumulators are float32. The
matmul operands keep the input dtype: float16 and bfloat16 run on tensor cores;
float32 operands are multiplied in full float32 (``input_precision='ieee'``),
because TF32's 10-bit mantissa on logits of magnitude ~30 (scaled cosine
similarity) would err by about 0.03, far outside the float32 tolerances of the
golden tests; :data:`TF32X3`, a launch configuration to time against it, sums three
TF32 products per dot instead, near float32's accuracy. The log-sum-exp is returned in
float32 whatever the input dtype. The backward adds the key, value and bias-table
gradients with atomics (the key and value gradients either per query block or, with
:data:`BACKWARD_KV` ``'two-pass'``, once per key block and query range from a
key-major kernel; the bias table's either per logit and tap or, with :data:`BIAS_TILE`
``'slots'``, per pair of a query and a key offset a tile reaches), so those are not
bitwise deterministic from run to run. It walks the keys once, but twice for a
float32 softmax that is the whole attention (its log-sum-exp gets no gradient: the
last stage's full attention), the first time for each query row's rounding residual,
so that a gradient that is zero in theory there (of a bias shared by all keys, which
shifts no softmax) stays as small as the reference's and the golden tolerances hold.
Where the log-sum-exp joins another softmax (the window's, in aggregated attention)
such a shift changes the output and no gradient vanishes in theory; in float16 and
bfloat16 the operands' rounding dominates.

Dispatch follows one rule, :func:`use_fused_attention` (applied by
``mmtransnext.models.attention``): CUDA tensors in float32, float16 or bfloat16 take
these kernels. An H100 measured them against the released whole matrix at stage 1 of
TransNeXt-T at 2x800x1333 (``tools/benchmark_pooled_attention.py``, 2026-11-27, with the
default settings): forward and backward 56 ms in float32 (whole 89), 18 ms in bfloat16
(whole 83), with 43x (float32) and 23x (bfloat16) less memory than the whole matrix.
Float32 dots stay in IEEE mode there: :data:`TF32X3` was slower (115 against 112 ms, an
earlier build). The CPU keeps the banded path, whose bands are sized for its caches.
"""
import contextlib
import importlib.metadata
import importlib.util
import inspect
import math
import re
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .banded_attention import check_bias_attention_args
from .sliding_window import reference_requested

__all__ = ['fused_bias_attention', 'use_fused_attention']

# What the kernels take, and what use_fused_attention sends them on CUDA.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Queries per program, keys per step and warps per program, per input dtype, for a
# bias with a resized column axis (4 taps an entry) and for one without (1 tap): the
# largest tiles with which no kernel spills registers to local memory at head dim 24
# (every TransNeXt variant), read from the machine code of sm_80 and sm_90 builds
# (tests/test_fused_attention.py holds them to it), but for 32 bytes in the float32
# atomic backward on sm_80 with a resized bias (no A100 has timed a smaller tile). The
# first tiles, 64 x 64 on 4 warps, spilled 0.5 to 2.8 KB per thread, reloaded at every
# key step; 64 x 32 on 8 warps spills in the 4-tap sm_80 backward and in the float32
# backward.
#
# An entry may also set DOT_PRECISION, which float32 dots take ('ieee' by default,
# see the module's docstring). TF32X3 is the float32 alternative to time: three TF32
# tensor-core products per dot (the operands split into high and low TF32 parts),
# close to float32's accuracy; it spills at 32 x 32 and none at 32 x 16 on 8 warps.
_SMALL = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8)
_TALL = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8)
TF32X3 = dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, DOT_PRECISION='tf32x3')
LAUNCH = {torch.float16: (_SMALL, _TALL), torch.bfloat16: (_SMALL, _TALL),
          torch.float32: (_SMALL, _SMALL)}


# How the backward forms the key and value gradients (``tools/benchmark_pooled_attention.py
# --backward`` times both; an H100 at stage 1, 2x800x1333, forward and backward, 2026-11-27:
# 'atomic' 17.9 ms against 23.0 in bfloat16 (bias by slots), 56.2 against 72.9 in float32.
# The key-major pass had won (68.9 against 82.5 ms) while the atomics were compiled with
# acq_rel ordering, a GPU-wide memory barrier around each; relaxed, they cost less than
# recomputing the probabilities):
# 'atomic': one query-major kernel adds every query block's share with atomics (1.5
#     atomic adds per logit at 32-query blocks);
# 'two-pass': the query-major kernel forms the query and bias gradients only, and a
#     key-major kernel (:func:`~._fused_attention_kernels.pooled_attention_backward_keys`)
#     keeps each key block's gradients in registers over KEY_PASS_ROWS queries, one
#     atomic add per element and query range; it recomputes the probabilities a
#     second time.
BACKWARD_KV = 'atomic'
BACKWARD_KV_CHOICES = ('atomic', 'two-pass')
# Queries a key-major program walks: enough programs to fill a GPU at stage 1
# (2x800x1333: 33 key blocks x 6 image-heads x 66 ranges), few atomics per key.
KEY_PASS_ROWS = 1024
# Queries per step of the key-major kernel where the launch's BLOCK_M would spill:
# in float32 (FMA dots) 32 spills 80-88 bytes on sm_80/sm_90, 16 none.
_KEY_PASS_BLOCK_M = {torch.float32: 16}


# How a tile reads the bias from the table, and adds the table's gradient
# (``tools/benchmark_pooled_attention.py --bias-tile`` times both; an H100 at stage 1,
# 2x800x1333, bfloat16, 2026-11-27: 'slots' 5.3 ms forward and 17.9 forward and backward
# against 6.5 and 24.7 with 'taps'; the whole bfloat16 training step of TransNeXt-T 341
# against 407 ms, both with the key-major backward):
# 'taps': per logit, each of its taps (4 where both column axes of the bias are resized)
#     gathers one table entry in the forward and every recomputation, and adds one term
#     in the backward. At stage 1 of TransNeXt-T (2x800x1333) a 32 x 32 tile gathers and
#     adds about 3,900 terms over about 200 distinct table entries; an H100 spent two
#     thirds of the bfloat16 backward on those adds (then acq_rel).
# 'slots': a block of 32 queries reaches few distinct table offsets (about 21 there), and
#     so does a block of keys (:func:`bias_slots` numbers them), so the tile's bias is
#     ``A_q E A_k^T``: E the table entries at each pair of a query and a key offset
#     (about 21 x 21 gathered), A_q and A_k each position's tap weights at its offsets'
#     slots; two small matmuls. The gradient is the transpose, ``A_q^T G A_k``, one add
#     per pair. The matmuls' operands take the input dtype, so in float16/bfloat16 the
#     tap weights round to it (2**-9 of a bfloat16 weight), as the probabilities and the
#     logits' gradients already do for the other matmuls.
#     Taps serve where no column axis is resized (one tap: each query and key column
#     reaches an offset of its own, so slots save nothing), where a block has more than
#     MAX_BIAS_SLOTS offsets (inputs smaller than the size the bias is built for), beyond
#     what the kernels are checked at without spilling (compile_for_gpu), and in float32
#     (not in SLOT_DTYPES), whose slot matmuls are two more loops of multiply-adds, not
#     yet timed on a GPU (the device check's fp32-tiles step times them): they spilled
#     48 to 112 bytes when first built; now under Triton 3.6 (torch 2.11's) none on
#     sm_80 and sm_90, under Triton 3.9 112 bytes in sm_80's atomic backward.
BIAS_TILE = 'slots'
BIAS_TILE_CHOICES = ('taps', 'slots')
MAX_BIAS_SLOTS = 32
SLOT_DTYPES = (torch.float16, torch.bfloat16)


def key_pass_meta(meta: dict, dtype: torch.dtype) -> dict:
    """The key-major kernel's meta-parameters from the query-major ones in ``meta``."""
    block_m = min(meta['BLOCK_M'], _KEY_PASS_BLOCK_M.get(dtype, meta['BLOCK_M']))
    return dict(meta, BLOCK_M=block_m)


def launch_tiles(dtype: torch.dtype, resized: bool) -> dict:
    """``BLOCK_M``, ``BLOCK_N``, ``num_warps`` (and any ``DOT_PRECISION``) from :data:`LAUNCH`.

    Args:
        dtype (torch.dtype): the input dtype.
        resized (bool): whether a column axis of the bias is resized.
    """
    return LAUNCH[dtype][0 if resized else 1]


# The kernels use Triton 3's language (``tl.dot(..., input_precision=...)``); torch
# 2.1-2.3 CUDA wheels ship Triton 2, which keeps the banded path.
MIN_TRITON = (3, 0)


def _triton_usable() -> bool:
    if importlib.util.find_spec('triton') is None:
        return False
    try:
        version = importlib.metadata.version('triton')
    except importlib.metadata.PackageNotFoundError:  # a source checkout on the path
        return True
    return tuple(int(part) for part in version.split('.')[:2]) >= MIN_TRITON


# Read once: a plain bool keeps the dispatch traceable.
_TRITON = _triton_usable()


def use_fused_attention(tensor: Tensor) -> bool:
    """The one rule that picks the fused kernels for biased attention.

    True when ``tensor`` is on a CUDA device, its dtype is float32, float16 or
    bfloat16, Triton 3 or newer is installed and
    ``MMTRANSNEXT_DISABLE_EXT`` is not ``1``. Otherwise (the CPU, float64, no or
    older Triton, reference requested) the banded path runs. The model's other Triton
    kernels (the position-bias MLP and table, unit vectors, query terms, the merged
    softmax, the GLU's gate) serve by the same rule, operators elsewhere.

    Args:
        tensor (Tensor): the queries; only device and dtype matter.

    Returns:
        bool: True for :func:`fused_bias_attention`.
    """
    return (tensor.device.type == 'cuda' and tensor.dtype in _DTYPES and _TRITON
            and not reference_requested())


def _kernels():
    # Deferred: triton.jit reads TRITON_INTERPRET when the kernels are defined.
    from . import _fused_attention_kernels
    return _fused_attention_kernels


def _pad(size: int) -> int:
    """A head dim padded to a power of two of at least 16 (tl.dot's smallest K)."""
    return max(16, 1 << (size - 1).bit_length())


def launch_meta(dtype: torch.dtype, head_dim: int, value_dim: int, query_resized: bool = True,
                key_resized: bool = True, tiles: dict = None) -> dict:
    """The kernels' meta-parameters and launch options.

    Args:
        dtype (torch.dtype): the input dtype.
        head_dim (int): the queries' and keys' head size; ``value_dim`` the values'.
        query_resized (bool): whether the bias's query columns are resized (2 taps a
            column, else 1); ``key_resized`` likewise for its key columns. Default: True.
        tiles (dict, optional): a launch configuration in place of :func:`launch_tiles`'.
            Default: None.
    """
    tiles = tiles or launch_tiles(dtype, query_resized or key_resized)
    # 16-bit operands multiply on tensor cores whatever the precision says.
    precision = tiles.get('DOT_PRECISION', 'ieee') if dtype == torch.float32 else 'tf32'
    return dict(tiles, D_PAD=_pad(head_dim), DV_PAD=_pad(value_dim), DOT_PRECISION=precision,
                Q_TAPS=2 if query_resized else 1, K_TAPS=2 if key_resized else 1)


# Element types of the kernels' pointer arguments: 'io' is the input dtype's.
_POINTERS = dict(Q='io', K='io', V='io', TABLE='io', OUT='io', GRAD_OUT='io', GRAD_Q='io',
                 Q_TERM='i32', K_TERM='i32', Q_WEIGHT='fp32', K_WEIGHT='fp32', LSE='fp32',
                 SHIFT='fp32', GRAD_LSE='fp32', GRAD_K='fp32', GRAD_V='fp32', GRAD_TABLE='fp32',
                 Q_SLOT='i32', Q_SLOT_ADDR='i32', K_SLOT='i32', K_SLOT_ADDR='i32')
_TRITON_TYPES = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}


def compile_for_gpu(arch: int, dtype: torch.dtype, head_dim: int = 24, launch: dict = None,
                    resized: bool = True) -> dict:
    """Both kernels compiled ahead of time for a GPU architecture, without one.

    Args:
        arch (int): compute capability as an integer, e.g. 80 (A100) or 90 (H100).
        dtype (torch.dtype): the input dtype.
        head_dim (int): queries' and values' head size. Default: 24.
        launch (dict, optional): ``BLOCK_M``, ``BLOCK_N`` and ``num_warps`` in place
            of :func:`launch_tiles`'. Default: None.
        resized (bool): a bias resized on both column axes (4 taps, the most work),
            else on neither (1 tap). Default: True.

    Returns:
        dict[str, bytes]: cubins of every kernel the settings can launch, the bias
        read by taps: ``forward``; ``backward``, the query-major pass of
        :data:`BACKWARD_KV` ``'two-pass'`` (query and bias gradients) and
        ``backward_keys``, its key-major pass; ``backward_atomic``, the one pass of
        ``'atomic'`` (with the key and value gradients). In float32 also
        ``backward_residual`` and ``backward_atomic_residual``, the two query-major
        passes of a softmax that is the whole attention (``ROW_RESIDUAL``: a first walk
        over the keys). Where the launch may read the bias by slots
        (:data:`BIAS_TILE`), the first four again with ``_slots`` appended, at
        :data:`MAX_BIAS_SLOTS` slots a block, as at every stage of TransNeXt-T at
        detection sizes.
    """
    meta = launch_meta(dtype, head_dim, head_dim, resized, resized, tiles=launch)
    options = dict(num_warps=meta.pop('num_warps'))
    kernels = _kernels()
    built = {}
    query_pass = dict(BIAS_GRAD=True, ROW_RESIDUAL=False, KV_GRAD=False)
    reads = [('', dict(Q_SLOTS=0, K_SLOTS=0))]
    if _may_use_slots(meta, dtype):
        reads.append(('_slots', dict(Q_SLOTS=MAX_BIAS_SLOTS, K_SLOTS=MAX_BIAS_SLOTS)))
    variants = []
    for suffix, read in reads:
        variants += [
            ('forward' + suffix, kernels.pooled_attention_forward, read),
            ('backward' + suffix, kernels.pooled_attention_backward, dict(read, **query_pass)),
            ('backward_keys' + suffix, kernels.pooled_attention_backward_keys, read),
            ('backward_atomic' + suffix, kernels.pooled_attention_backward,
             {**read, **query_pass, 'KV_GRAD': True})]
    if dtype == torch.float32:
        whole = {**reads[0][1], **query_pass, 'ROW_RESIDUAL': True}
        variants += [('backward_residual', kernels.pooled_attention_backward, whole),
                     ('backward_atomic_residual', kernels.pooled_attention_backward,
                      dict(whole, KV_GRAD=True))]
    for name, kernel, extra in variants:
        constants = dict(key_pass_meta(meta, dtype) if name.startswith('backward_keys')
                         else meta, **extra)
        built[name] = compile_kernel(kernel, constants, _POINTERS, dtype, arch,
                                     options['num_warps'])
    return built


def compile_kernel(kernel, constants: dict, pointers: dict, dtype: torch.dtype, arch: int,
                   num_warps: int, scalars: dict = None) -> bytes:
    """One Triton kernel compiled ahead of time for a GPU architecture, without one.

    Args:
        kernel: the ``triton.jit`` function.
        constants (dict): its ``tl.constexpr`` arguments' values.
        pointers (dict): each pointer argument's element type: ``'io'`` for ``dtype``,
            else a Triton type name (``'fp32'``, ``'i32'``).
        dtype (torch.dtype): the input dtype.
        arch (int): compute capability as an integer, e.g. 80 or 90.
        num_warps (int): warps per program.
        scalars (dict, optional): the Triton types of arguments that are neither
            pointers nor ``i32`` (e.g. ``'fp32'``). Default: None, all ``i32``.

    Returns:
        bytes: the cubin.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature = {}
    for arg in inspect.signature(kernel.fn).parameters:
        if arg in constants:
            signature[arg] = 'constexpr'
        elif arg in pointers:
            element = pointers[arg]
            signature[arg] = '*' + (_TRITON_TYPES[dtype] if element == 'io' else element)
        else:
            signature[arg] = (scalars or {}).get(arg, 'i32')
    compiled = compile(ASTSource(kernel, signature, constants),
                       target=GPUTarget('cuda', arch, 32), options=dict(num_warps=num_warps))
    return compiled.asm['cubin']


def machine_code_resources(cubin: bytes) -> dict:
    """Registers and local-memory stack per thread of a cubin (Triton's ``cuobjdump``).

    Returns:
        dict[str, int]: ``registers``, ``stack_bytes`` (spilled registers live there),
        ``instructions`` (SASS instructions of the kernel), ``tensor_core``
        (its matrix-multiply-accumulate instructions, HMMA and HGMMA) and
        ``memory_barriers`` (``MEMBAR`` of GPU scope, which ordered atomics bring; the
        block-scope ones of Hopper's asynchronous matmuls are not counted).
    """
    import triton.backends.nvidia
    tool = str(Path(triton.backends.nvidia.__file__).parent / 'bin' / 'cuobjdump')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([tool, '-res-usage', handle.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool, '-sass', handle.name], capture_output=True, text=True,
                              check=True).stdout
    return dict(registers=int(re.search(r'REG:(\d+)', usage).group(1)),
                stack_bytes=int(re.search(r'STACK:(\d+)', usage).group(1)),
                instructions=len(re.findall(r'/\*[0-9a-f]{4,}\*/ ', sass)),
                tensor_core=len(re.findall(r'\bH(?:G)?MMA\b', sass)),
                memory_barriers=len(re.findall(r'\bMEMBAR\.\S*GPU\b', sass)))


def _resized_columns(layout) -> tuple:
    """Whether the bias's query columns and its key columns are resized (2 taps each)."""
    built_w, built_pool_w = layout.index_w.shape
    return built_w != layout.query_size[1], built_pool_w != layout.key_size[1]


def _launch_args(query, key, value, table, bias):
    """The shape arguments and meta-parameters shared by both kernels."""
    batch, heads, tokens, head_dim = query.shape
    keys, value_dim = key.shape[2], value.shape[3]
    width, pool_w = bias.layout.query_size[1], bias.layout.key_size[1]
    meta = launch_meta(query.dtype, head_dim, value_dim, *_resized_columns(bias.layout))
    grid = (-(-tokens // meta['BLOCK_M']), batch * heads)
    shapes = (heads, tokens, keys, head_dim, value_dim, width, pool_w, *table.stride()[:3])
    return grid, shapes, meta


def _may_use_slots(meta: dict, dtype: torch.dtype) -> bool:
    """Whether a launch may read the bias by slots: 16-bit inputs and a column axis
    resized (see :data:`BIAS_TILE`)."""
    return dtype in SLOT_DTYPES and (meta['Q_TAPS'] > 1 or meta['K_TAPS'] > 1)


def _backward_way(name: str, choices: tuple) -> str:
    """The module setting ``name`` (:data:`BACKWARD_KV`, :data:`BIAS_TILE`), checked."""
    way = globals()[name]
    if way not in choices:
        raise ValueError(f'fused_attention.{name} is {way!r}, not one of {choices}')
    return way


def _slots(address: Tensor, live: Tensor, block: int):
    """Number each block's distinct live addresses (see :func:`bias_slots`)."""
    length, taps = address.shape
    blocks = -(-length // block)
    dead = torch.iinfo(torch.int64).max
    address = torch.where(live, address, dead)
    address = torch.cat([address, address.new_full((blocks * block - length, taps), dead)])
    ordered, order = address.reshape(blocks, block * taps).sort(dim=1)
    first = ordered != dead
    first[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    rank = first.cumsum(1) - 1
    count = max(16, 1 << (int(first.sum(1).max()) - 1).bit_length())
    slot = torch.where(ordered != dead, rank, count)
    slot = torch.empty_like(slot).scatter_(1, order, slot).reshape(-1, taps)[:length]
    table = torch.full((blocks, count), -1, dtype=torch.int64)
    block_index, position = first.nonzero(as_tuple=True)
    table[block_index, rank[block_index, position]] = ordered[block_index, position]
    return slot.to(torch.int32).contiguous(), table.to(torch.int32), count


def bias_slots(bias, block_m: int, block_n: int, row_stride: int,
               pool_row_stride: int) -> tuple:
    """Each block's distinct table offsets, for the kernels' ``'slots'`` bias tiles.

    The table entry of tap ``(i, j)`` of query ``m = r * W + c`` and key ``p = a * Wp + b``
    lies at ``r * row_stride + query_term[c, i]`` plus ``a * pool_row_stride +
    key_term[b, j]`` (plus the head's offset): a query offset plus a key offset. A block
    of ``block_m`` queries reaches few distinct query offsets (about 21 for 32 queries at
    stage 1 of TransNeXt-T at 800x1333, against 64 taps), and likewise a block of keys
    (:data:`BIAS_TILE`). Taps of weight zero take no slot. Computed once per layout and
    block size on the CPU, kept in ``bias.layout.derived``.

    Args:
        bias (RowFactoredBias): the bias; its layout and column taps matter.
        block_m (int): queries per block; ``block_n`` keys per block.
        row_stride (int): the table's stride between query rows; ``pool_row_stride``
            between key rows.

    Returns:
        tuple: ``query_slot (N, Q_TAPS)`` int32, each tap's number among its block's
        distinct query offsets (``query_slots`` for a tap of weight zero);
        ``query_addr (cdiv(N, block_m), query_slots)`` int32, those offsets (-1 past
        the block's count); ``query_slots``, a power of two of at least 16; then the
        same three for the keys.
    """
    cache = bias.layout.derived
    key = ('bias_slots', block_m, block_n, row_stride, pool_row_stride)
    if key not in cache:
        (height, width), (pool_h, pool_w) = bias.layout.query_size, bias.layout.key_size
        query_resized, key_resized = _resized_columns(bias.layout)
        query_term, query_weight, key_term, key_weight, _ = (
            t.cpu() for t in bias.separable_col_taps())
        found = []
        for length, size, stride, term, weight, taps, block in (
                (height * width, width, row_stride, query_term, query_weight,
                 1 + query_resized, block_m),
                (pool_h * pool_w, pool_w, pool_row_stride, key_term, key_weight,
                 1 + key_resized, block_n)):
            position = torch.arange(length)
            address = ((position // size)[:, None] * stride
                       + term[position % size, :taps].long())
            live = weight[position % size, :taps] != 0
            slot, table, count = _slots(address, live, block)
            found += [slot.to(bias.device), table.to(bias.device), count]
        cache[key] = tuple(found)
    return cache[key]


def _on_device(tensor: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _tile_slots(bias, table: Tensor, meta: dict, allowed: bool = True) -> tuple:
    """The slot arguments of a launch with ``meta``: four tensors and ``Q_SLOTS``/
    ``K_SLOTS`` meta-parameters, these 0 (with placeholder tensors, not read) where the
    bias is read by taps (:data:`BIAS_TILE`, or not ``allowed``)."""
    if (_backward_way('BIAS_TILE', BIAS_TILE_CHOICES) == 'slots' and allowed
            and _may_use_slots(meta, table.dtype)):
        query_slot, query_addr, query_slots, key_slot, key_addr, key_slots = bias_slots(
            bias, meta['BLOCK_M'], meta['BLOCK_N'], *table.stride()[1:3])
        if max(query_slots, key_slots) <= MAX_BIAS_SLOTS:
            return ((query_slot, query_addr, key_slot, key_addr),
                    dict(Q_SLOTS=query_slots, K_SLOTS=key_slots))
    return (table, ) * 4, dict(Q_SLOTS=0, K_SLOTS=0)


class _FusedBiasAttention(torch.autograd.Function):
    """``apply(query, key, value, table, bias)``, ``table`` the bias's
    :meth:`~mmtransnext.models.position_bias.RowFactoredBias.kernel_table` (its column
    offsets numbered evenly: the kernels compute each entry's position)."""

    @staticmethod
    def forward(ctx, query, key, value, table, bias):
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        table = table.contiguous()
        taps = bias.separable_col_taps()[:4]
        out = query.new_empty(query.shape[:3] + value.shape[3:])
        lse = query.new_empty(query.shape[:3], dtype=torch.float32)
        grid, shapes, meta = _launch_args(query, key, value, table, bias)
        slots, slot_meta = _tile_slots(bias, table, meta)
        with _on_device(query):
            _kernels().pooled_attention_forward[grid](query, key, value, table, *taps, *slots,
                                                      out, lse, *shapes, **meta, **slot_meta)
        ctx.save_for_backward(query, key, value, table, out, lse)
        ctx.bias = bias
        # An output the caller drops gets None, not zeros: the backward tells from
        # grad_lse whether this softmax is all of the attention.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        query, key, value, table, out, lse = ctx.saved_tensors
        bias = ctx.bias
        two_pass = _backward_way('BACKWARD_KV', BACKWARD_KV_CHOICES) == 'two-pass'
        # The query-major kernel reads both incoming gradients through their strides
        # (the gradient of a transposed view, of a slice) and forms each row's shift
        # itself; the key-major kernel reads the output's gradient contiguous.
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.to(out.dtype)
        if grad_out.stride(-1) != 1 or two_pass:
            grad_out = grad_out.contiguous()
        # Where the log-sum-exp gets no gradient, this softmax is the whole attention
        # (the last stage's): a bias shared by all keys then shifts nothing, and in
        # float32 a first walk makes its gradient vanish as the reference's does (see
        # the kernel). Where the log-sum-exp joins another softmax (the window's), no
        # gradient vanishes in theory, and one walk does.
        row_residual = grad_lse is None and query.dtype == torch.float32
        if grad_lse is None:
            grad_lse = torch.zeros_like(lse)
        # d lse / d logits = probs: the final shift takes grad_lse.
        shift = torch.empty_like(lse) if two_pass else lse   # lse: a placeholder, not used
        taps = bias.separable_col_taps()[:4]
        want_bias = ctx.needs_input_grad[3]
        grad_query = torch.empty_like(query)
        # The atomics' float32 sums, zeroed and at the end cast to the inputs' dtype as
        # one buffer: one operator each instead of three.
        grad_shapes = (key.shape, value.shape, table.shape if want_bias else (1, ))
        sums = torch.zeros(sum(math.prod(shape) for shape in grad_shapes), dtype=torch.float32,
                           device=key.device)
        grad_key, grad_value, grad_table = _views(sums, grad_shapes)
        grid, shapes, meta = _launch_args(query, key, value, table, bias)
        slots, slot_meta = _tile_slots(bias, table, meta)
        with _on_device(query):
            _kernels().pooled_attention_backward[grid](
                query, key, value, out, grad_out, lse, shift, grad_lse, table, *taps, *slots,
                grad_query, grad_key, grad_value, grad_table, *shapes,
                *_image_head_row_strides(grad_out), *_image_head_row_strides(grad_lse),
                BIAS_GRAD=want_bias, ROW_RESIDUAL=row_residual,
                KV_GRAD=not two_pass, **meta, **slot_meta)
            if two_pass:  # shift now holds each row's final shift
                keys_meta = key_pass_meta(meta, query.dtype)
                keys_grid = (-(-key.shape[2] // meta['BLOCK_N']), grid[1],
                             -(-query.shape[2] // KEY_PASS_ROWS))
                # Query slots are numbered per block: ranges must start on one.
                slots, slot_meta = _tile_slots(
                    bias, table, keys_meta, allowed=KEY_PASS_ROWS % keys_meta['BLOCK_M'] == 0)
                _kernels().pooled_attention_backward_keys[keys_grid](
                    query, key, value, grad_out, lse, shift, table, *taps, *slots, grad_key,
                    grad_value, *shapes, KEY_PASS_ROWS, **keys_meta, **slot_meta)
        # Key, value and table have the queries' dtype (_check_args; the table is cast).
        grad_key, grad_value, grad_table = _views(sums.to(query.dtype), grad_shapes)
        return grad_query, grad_key, grad_value, grad_table if want_bias else None, None


def _image_head_row_strides(tensor: Tensor) -> tuple:
    """Strides between images, heads and rows of a ``(B, heads, N[, d])`` tensor."""
    return tuple(tensor.stride()[:3])


def _views(flat: Tensor, shapes) -> list:
    """``flat`` cut into consecutive views of ``shapes``."""
    sizes = [math.prod(shape) for shape in shapes]
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]


def fused_bias_attention(query: Tensor, key: Tensor, value: Tensor, bias) -> tuple:
    """``softmax(query @ key^T + bias) @ value`` and its log-sum-exp, in fused kernels.

    Runs on CUDA tensors; on CPU tensors only under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before the kernels are first used), which the
    tests use.

    Args:
        query (Tensor): ``(B, heads, N, d)``, already scaled; ``N = H * W``.
        key (Tensor): ``(B, heads, P, d)`` with ``P = Hp * Wp``.
        value (Tensor): ``(B, heads, P, dv)``.
        bias (RowFactoredBias): the ``(heads, N, P)`` bias, shared by the batch;
            its layout gives ``(H, W)`` and ``(Hp, Wp)``. Gradients reach the
            tensors it was built from.

    Returns:
        tuple[Tensor, Tensor]: the output ``(B, heads, N, dv)`` in the input dtype
        and the log-sum-exp of each query's logits ``(B, heads, N)`` in float32.
    """
    _check_args(query, key, value, bias)
    # Built outside the Function, whose backward returns the gradient of this table.
    return _FusedBiasAttention.apply(query, key, value, bias.kernel_table(query.dtype), bias)


def _check_args(query, key, value, bias):
    check_bias_attention_args('fused_bias_attention', query, key, value, bias)
    if query.dtype not in _DTYPES:
        raise ValueError(f'fused_bias_attention: dtype {query.dtype} is not supported '
                         '(float32, float16 or bfloat16; float64 takes the banded path)')
    if not _TRITON:
        where = ('' if query.device.type == 'cuda' else
                 f'; tensors on {query.device}: the kernels run on CUDA, or on the CPU '
                 'under TRITON_INTERPRET=1')
        raise ValueError(f'fused_bias_attention: needs Triton >= '
                         f'{".".join(map(str, MIN_TRITON))}, which is not installed{where}')
    if query.device.type != 'cuda' and not _kernels().INTERPRETED:
        raise ValueError(f'fused_bias_attention: tensors on {query.device}; the kernels '
                         'run on CUDA, or on the CPU under TRITON_INTERPRET=1')
