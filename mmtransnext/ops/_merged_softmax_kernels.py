"""Triton kernels of :mod:`mmtransnext.ops.fused_merged_softmax`.

Imported only on first use, like :mod:`._fused_attention_kernels` (``TRITON_INTERPRET``
is read when the kernels are defined). A row is one query of one head of one image,
``rows`` of them: its ``cells`` window logits in ``LOCAL`` (contiguous, the core's
dtype; ``-inf`` where the neighbour is outside the map) and the log-sum-exp of its
pooled keys' logits in ``LSE`` (float32). One softmax over the ``cells + 1`` values
gives each window cell's weight and the pooled keys' total weight, in float32.
"""
import triton
import triton.language as tl


@triton.jit
def _probabilities(LOCAL, LSE, rows, cells, BLOCK_R: tl.constexpr, CELLS_PAD: tl.constexpr):
    """A block's window weights ``(BLOCK_R, CELLS_PAD)`` and pooled weights ``(BLOCK_R, )``
    in float32, with the rows, their mask, the window entries' offsets and mask."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cell = tl.arange(0, CELLS_PAD)
    row_ok = row < rows
    ok = row_ok[:, None] & (cell < cells)[None, :]
    offsets = row.to(tl.int64)[:, None] * cells + cell[None, :]
    local = tl.load(LOCAL + offsets, mask=ok, other=float('-inf')).to(tl.float32)
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    # The log-sum-exp is finite, so is the maximum: no row is all -inf.
    top = tl.maximum(tl.max(local, axis=1), lse)
    exp_local = tl.exp(local - top[:, None])
    exp_pooled = tl.exp(lse - top)
    total = tl.sum(exp_local, axis=1) + exp_pooled
    return exp_local / total[:, None], exp_pooled / total, row, row_ok, offsets, ok


@triton.jit(do_not_specialize=('rows', ))
def merged_softmax_forward(LOCAL, LSE, TOKEN_WEIGHTS, WEIGHTS, POOLED, rows, cells,
                           BLOCK_R: tl.constexpr, CELLS_PAD: tl.constexpr):
    """``WEIGHTS`` = the window cells' weights plus ``TOKEN_WEIGHTS`` (both like
    ``LOCAL``), ``POOLED`` = the pooled keys' weight (one a row), in their dtypes;
    grid ``cdiv(rows, BLOCK_R)``."""
    local, pooled, row, row_ok, offsets, ok = _probabilities(LOCAL, LSE, rows, cells, BLOCK_R,
                                                             CELLS_PAD)
    tokens = tl.load(TOKEN_WEIGHTS + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(WEIGHTS + offsets, (local + tokens).to(WEIGHTS.dtype.element_ty), mask=ok)
    tl.store(POOLED + row, pooled.to(POOLED.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=('rows', ))
def merged_softmax_backward(LOCAL, LSE, GRAD_WEIGHTS, GRAD_POOLED, GRAD_LOCAL, GRAD_LSE, rows,
                            cells, BLOCK_R: tl.constexpr, CELLS_PAD: tl.constexpr):
    """The softmax's gradient, ``p * (g - sum(p * g))`` over the row's ``cells + 1``
    values, from ``GRAD_WEIGHTS`` (like ``LOCAL``) and ``GRAD_POOLED`` (one a row), the
    probabilities recomputed: ``GRAD_LOCAL`` in its dtype, ``GRAD_LSE`` float32."""
    local, pooled, row, row_ok, offsets, ok = _probabilities(LOCAL, LSE, rows, cells, BLOCK_R,
                                                             CELLS_PAD)
    grad_local = tl.load(GRAD_WEIGHTS + offsets, mask=ok, other=0.0).to(tl.float32)
    grad_pooled = tl.load(GRAD_POOLED + row, mask=row_ok, other=0.0).to(tl.float32)
    along = tl.sum(local * grad_local, axis=1) + pooled * grad_pooled
    tl.store(GRAD_LOCAL + offsets,
             (local * (grad_local - along[:, None])).to(GRAD_LOCAL.dtype.element_ty), mask=ok)
    tl.store(GRAD_LSE + row, pooled * (grad_pooled - along), mask=row_ok)
