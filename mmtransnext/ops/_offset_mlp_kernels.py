"""Triton kernels of the position-bias MLP on the offset grid, for
:mod:`mmtransnext.ops.fused_offset_mlp`.

Imported only on first use, like :mod:`._fused_attention_kernels` (``TRITON_INTERPRET``
is read when the kernels are defined). With ``OFFSETS_H (rows, )`` and
``OFFSETS_W (cols, )`` the grid's row and column offsets, ``W1 (hidden, 2)`` and
``B1 (hidden, )`` the first layer, ``W2 (heads, hidden)`` and ``B2 (heads, )`` the
second, all contiguous:

    TABLE[t, u, v] = B2[t] + sum_k W2[t, k] * relu(OFFSETS_H[u] * W1[k, 0] + B1[k]
                                                   + OFFSETS_W[v] * W1[k, 1]).

The offsets are rounded to the weights' dtype, as the operators would take them, and
the first layer runs in float32. The hidden layer lives in registers only, a
``BLOCK_K`` slice at a time; the products with ``W2`` are ``tl.dot`` with float32
accumulators (float32 operands in ``DOT_PRECISION``).
"""
import triton
import triton.language as tl

#: Grid sizes that change with the input's size: unspecialised, so that new image
#: sizes reuse the binaries (see ``_fused_attention_kernels.SPATIAL_ARGS``).
GRID_ARGS = ('rows', 'cols', 's_head', 's_row', 'partial_stride')


@triton.jit
def _first_layer(OFFSETS, index, ok, W1, B1, k, k_ok, column: tl.constexpr,
                 WITH_BIAS: tl.constexpr):
    """``offsets[index] * W1[k, column] (+ B1[k])``, ``(len(index), BLOCK_K)`` float32."""
    offset = tl.load(OFFSETS + index, mask=ok, other=0.0).to(W1.dtype.element_ty)
    weight = tl.load(W1 + k * 2 + column, mask=k_ok, other=0.0)
    part = offset.to(tl.float32)[:, None] * weight.to(tl.float32)[None, :]
    if WITH_BIAS:
        part += tl.load(B1 + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return part


@triton.jit(do_not_specialize=GRID_ARGS)
def offset_mlp_forward(OFFSETS_H, OFFSETS_W, W1, B1, W2, B2, TABLE, rows, cols, hidden, heads,
                       BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       HEADS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``TABLE (heads, rows, cols)`` on ``BLOCK_U x BLOCK_V`` grid points a program;
    grid ``(cdiv(rows, BLOCK_U), cdiv(cols, BLOCK_V))``."""
    point = tl.arange(0, BLOCK_U * BLOCK_V)
    u = tl.program_id(0) * BLOCK_U + point // BLOCK_V
    v = tl.program_id(1) * BLOCK_V + point % BLOCK_V
    u_ok = u < rows
    v_ok = v < cols
    head = tl.arange(0, HEADS_PAD)
    head_ok = head < heads
    acc = tl.zeros((BLOCK_U * BLOCK_V, HEADS_PAD), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < hidden
        act = tl.maximum(_first_layer(OFFSETS_H, u, u_ok, W1, B1, k, k_ok, 0, True)
                         + _first_layer(OFFSETS_W, v, v_ok, W1, B1, k, k_ok, 1, False), 0.0)
        w2 = tl.load(W2 + head[None, :] * hidden + k[:, None],
                     mask=k_ok[:, None] & head_ok[None, :], other=0.0)    # (BLOCK_K, heads)
        acc += tl.dot(act.to(w2.dtype), w2, input_precision=DOT_PRECISION)
    acc += tl.load(B2 + head, mask=head_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(TABLE + head[None, :] * (rows * cols) + (u * cols + v)[:, None],
             acc.to(TABLE.dtype.element_ty), mask=(u_ok & v_ok)[:, None] & head_ok[None, :])


@triton.jit(do_not_specialize=GRID_ARGS)
def offset_mlp_backward(OFFSETS_H, OFFSETS_W, W1, B1, W2, GRAD_TABLE, PARTIAL, rows, cols,
                        hidden, heads, s_head, s_row, partial_stride,
                        ROWS_PER_PROGRAM: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr, HEADS_PAD: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Every parameter's gradient from ``GRAD_TABLE (heads, rows, cols)`` (strides
    ``s_head``, ``s_row``, 1), as partial sums; grid
    ``(cdiv(cols, BLOCK_V), cdiv(hidden, BLOCK_K), cdiv(rows, ROWS_PER_PROGRAM))``.

    A program holds ``BLOCK_V`` columns of one ``BLOCK_K`` slice of the hidden layer
    and walks ``ROWS_PER_PROGRAM`` grid rows, keeping its sums in registers. It writes
    them to its row of ``PARTIAL`` (float32, one row per column block and row range,
    ``partial_stride`` apart), whose columns are the gradients of ``W1 (hidden, 2)``,
    ``B1``, ``W2 (heads, hidden)`` and ``B2`` laid end to end, at its slice of the
    hidden units (the programs of the first slice write ``B2``'s); the caller sums the
    rows. No atomics: the sums are the same from run to run.
    """
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    first = tl.program_id(2) * ROWS_PER_PROGRAM
    v_ok = v < cols
    k_ok = k < hidden
    head = tl.arange(0, HEADS_PAD)
    head_ok = head < heads
    col = _first_layer(OFFSETS_W, v, v_ok, W1, B1, k, k_ok, 1, False)  # (BLOCK_V, BLOCK_K)
    w1_row = tl.load(W1 + k * 2, mask=k_ok, other=0.0).to(tl.float32)
    b1 = tl.load(B1 + k, mask=k_ok, other=0.0).to(tl.float32)
    w2 = tl.load(W2 + head[:, None] * hidden + k[None, :], mask=head_ok[:, None] & k_ok[None, :],
                 other=0.0)                                                # (heads, BLOCK_K)
    grad_col = tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32)
    grad_w1_row = tl.zeros((BLOCK_K, ), dtype=tl.float32)
    grad_b1 = tl.zeros((BLOCK_K, ), dtype=tl.float32)
    grad_w2 = tl.zeros((HEADS_PAD, BLOCK_K), dtype=tl.float32)
    grad_b2 = tl.zeros((HEADS_PAD, ), dtype=tl.float32)
    for step in range(0, ROWS_PER_PROGRAM):
        u = first + step
        v_live = v_ok & (u + tl.zeros_like(v) < rows)      # masks are vectors
        # Rows past the grid have no gradient (masked): any offset serves them.
        offset = tl.load(OFFSETS_H + tl.minimum(u, rows - 1))
        offset = offset.to(W1.dtype.element_ty).to(tl.float32)
        pre = (offset * w1_row + b1)[None, :] + col
        act = tl.maximum(pre, 0.0)
        grad = tl.load(GRAD_TABLE + head[None, :] * s_head + u * s_row + v[:, None],
                       mask=v_live[:, None] & head_ok[None, :], other=0.0)
        grad_b2 += tl.sum(grad.to(tl.float32), axis=0)
        grad = grad.to(w2.dtype)                                          # (BLOCK_V, heads)
        # As autograd's ReLU: no gradient where the pre-activation is 0.
        grad_pre = tl.where(pre > 0, tl.dot(grad, w2, input_precision=DOT_PRECISION), 0.0)
        grad_col += grad_pre
        grad_row = tl.sum(grad_pre, axis=0)
        grad_b1 += grad_row
        grad_w1_row += offset * grad_row
        grad_w2 += tl.dot(tl.trans(grad), act.to(w2.dtype), input_precision=DOT_PRECISION)
    column = tl.load(OFFSETS_W + v, mask=v_ok, other=0.0).to(W1.dtype.element_ty)
    grad_w1_col = tl.sum(column.to(tl.float32)[:, None] * grad_col, axis=0)
    out = PARTIAL + (tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)) * partial_stride
    tl.store(out + k * 2, grad_w1_row, mask=k_ok)
    tl.store(out + k * 2 + 1, grad_w1_col, mask=k_ok)
    tl.store(out + 2 * hidden + k, grad_b1, mask=k_ok)
    tl.store(out + 3 * hidden + head[:, None] * hidden + k[None, :], grad_w2,
             mask=head_ok[:, None] & k_ok[None, :])
    written = tl.where(tl.program_id(1) == 0, heads, 0)   # B2's by the first slice
    tl.store(out + (3 + heads) * hidden + head, grad_b2, mask=head < written)
