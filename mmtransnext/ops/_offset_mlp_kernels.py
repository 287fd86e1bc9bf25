"""Triton kernels of the position-bias MLP on the offset grid, for
:mod:`mmtransnext.ops.fused_offset_mlp`.

Imported only on first use, like :mod:`._fused_attention_kernels` (``TRITON_INTERPRET``
is read when the kernels are defined). With ``ROW (rows, hidden)`` and
``COL (cols, hidden)`` the first layer's two affine parts (row offsets with its bias,
column offsets), ``W2 (heads, hidden)`` and ``B2 (heads, )`` the second layer, all
contiguous:

    TABLE[t, u, v] = B2[t] + sum_k W2[t, k] * relu(ROW[u, k] + COL[v, k]).

The hidden layer lives in registers only, a ``BLOCK_K`` slice at a time; the products
with ``W2`` are ``tl.dot`` with float32 accumulators (float32 operands in
``DOT_PRECISION``). The backward adds its partial sums with relaxed atomics, so its
float32 results are not bitwise the same from run to run.
"""
import triton
import triton.language as tl

#: Grid sizes that change with the input's size: unspecialised, so that new image
#: sizes reuse the binaries (see ``_fused_attention_kernels.SPATIAL_ARGS``).
GRID_ARGS = ('rows', 'cols', 's_head', 's_row')


@triton.jit(do_not_specialize=GRID_ARGS)
def offset_mlp_forward(ROW, COL, W2, B2, TABLE, rows, cols, hidden, heads,
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
        row = tl.load(ROW + u[:, None] * hidden + k[None, :],
                      mask=u_ok[:, None] & k_ok[None, :], other=0.0)
        col = tl.load(COL + v[:, None] * hidden + k[None, :],
                      mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        act = tl.maximum(row + col, 0.0)
        w2 = tl.load(W2 + head[None, :] * hidden + k[:, None],
                     mask=k_ok[:, None] & head_ok[None, :], other=0.0)    # (BLOCK_K, heads)
        acc += tl.dot(act.to(w2.dtype), w2, input_precision=DOT_PRECISION)
    acc += tl.load(B2 + head, mask=head_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(TABLE + head[None, :] * (rows * cols) + (u * cols + v)[:, None],
             acc.to(TABLE.dtype.element_ty), mask=(u_ok & v_ok)[:, None] & head_ok[None, :])


@triton.jit(do_not_specialize=GRID_ARGS)
def offset_mlp_backward(ROW, COL, W2, GRAD_TABLE, GRAD_ROW, GRAD_COL, GRAD_W2, rows, cols,
                        hidden, heads, s_head, s_row,
                        ROWS_PER_PROGRAM: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr, HEADS_PAD: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Adds to the float32 ``GRAD_ROW``, ``GRAD_COL`` and ``GRAD_W2`` (zeroed) the
    gradients of ``ROW``, ``COL`` and ``W2`` from ``GRAD_TABLE (heads, rows, cols)``
    (strides ``s_head``, ``s_row``, 1); grid
    ``(cdiv(cols, BLOCK_V), cdiv(hidden, BLOCK_K), cdiv(rows, ROWS_PER_PROGRAM))``.

    A program holds ``BLOCK_V`` columns of one ``BLOCK_K`` slice of the hidden layer
    and walks ``ROWS_PER_PROGRAM`` rows: the column and ``W2`` gradients stay in
    registers until its end, each row's gradient (a sum over the columns) is added
    at once.
    """
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    first = tl.program_id(2) * ROWS_PER_PROGRAM
    v_ok = v < cols
    k_ok = k < hidden
    head = tl.arange(0, HEADS_PAD)
    head_ok = head < heads
    col = tl.load(COL + v[:, None] * hidden + k[None, :], mask=v_ok[:, None] & k_ok[None, :],
                  other=0.0)
    w2 = tl.load(W2 + head[:, None] * hidden + k[None, :], mask=head_ok[:, None] & k_ok[None, :],
                 other=0.0)                                                # (heads, BLOCK_K)
    grad_col = tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32)
    grad_w2 = tl.zeros((HEADS_PAD, BLOCK_K), dtype=tl.float32)
    for step in range(0, ROWS_PER_PROGRAM):
        u = first + step
        k_live = k_ok & (u + tl.zeros_like(k) < rows)      # masks are vectors
        v_live = v_ok & (u + tl.zeros_like(v) < rows)
        row = tl.load(ROW + u * hidden + k, mask=k_live, other=0.0)
        pre = row[None, :] + col
        act = tl.maximum(pre, 0.0)
        grad = tl.load(GRAD_TABLE + head[None, :] * s_head + u * s_row + v[:, None],
                       mask=v_live[:, None] & head_ok[None, :], other=0.0)
        grad = grad.to(w2.dtype)                                          # (BLOCK_V, heads)
        # As autograd's ReLU: no gradient where the pre-activation is 0.
        grad_pre = tl.where(pre > 0, tl.dot(grad, w2, input_precision=DOT_PRECISION), 0.0)
        grad_col += grad_pre
        tl.atomic_add(GRAD_ROW + u * hidden + k, tl.sum(grad_pre, axis=0), mask=k_live,
                      sem='relaxed')
        grad_w2 += tl.dot(tl.trans(grad), act.to(w2.dtype), input_precision=DOT_PRECISION)
    tl.atomic_add(GRAD_COL + v[:, None] * hidden + k[None, :], grad_col,
                  mask=v_ok[:, None] & k_ok[None, :], sem='relaxed')
    tl.atomic_add(GRAD_W2 + head[:, None] * hidden + k[None, :], grad_w2,
                  mask=head_ok[:, None] & k_ok[None, :], sem='relaxed')
