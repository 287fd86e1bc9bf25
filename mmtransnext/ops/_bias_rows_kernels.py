"""Triton kernels of :mod:`mmtransnext.ops.fused_bias_rows`.

Imported only on first use, like :mod:`._fused_attention_kernels` (``TRITON_INTERPRET``
is read when the kernels are defined). With ``TABLE (heads, Uh, Uw)`` the MLP's table
(contiguous), ``INDEX_H (Qh, Kh)`` the row offset of each built query row and key row,
the taps of the bilinear resize of those rows to the run-time grid, ``Q_SRC``/``Q_WEIGHT
(H, 2)`` and ``K_SRC``/``K_WEIGHT (Hp, 2)``, and ``SPREAD (Ue, )`` the column offset
of each evenly numbered column:

    OUT[t, r, a, e] = sum_ij Q_WEIGHT[r, i] * K_WEIGHT[a, j]
                      * TABLE[t, INDEX_H[Q_SRC[r, i], K_SRC[a, j]], SPREAD[e]],

in float32, stored in ``OUT``'s dtype: ``(heads, H, Hp, Ue)``, the table the fused
attention kernels read. A tap of weight zero (an axis that is not resized has taps
``(1, 0)``) is not read. Each program owns ``BLOCK_R`` rows ``(t, r, a)`` and
``BLOCK_E`` columns.
"""
import triton
import triton.language as tl

#: Sizes that change with the input's size: unspecialised, so that new image sizes
#: reuse the binaries (see ``_fused_attention_kernels.SPATIAL_ARGS``).
GRID_ARGS = ('rows', 'height', 'pool_h', 'key_rows', 'table_rows', 'cols', 'spread')


@triton.jit
def _tap_addresses(INDEX_H, Q_SRC, Q_WEIGHT, K_SRC, K_WEIGHT, rows, row_ok, height, pool_h,
                   key_rows, table_rows, i: tl.constexpr, j: tl.constexpr):
    """Tap ``(i, j)`` of ``rows``: each row's offset into TABLE (of its first column)
    and its weight, 0 for rows out of range."""
    head = rows // (height * pool_h)
    row = (rows // pool_h) % height
    pool_row = rows % pool_h
    weight = (tl.load(Q_WEIGHT + row * 2 + i, mask=row_ok, other=0.0)
              * tl.load(K_WEIGHT + pool_row * 2 + j, mask=row_ok, other=0.0))
    source = (tl.load(Q_SRC + row * 2 + i, mask=row_ok, other=0) * key_rows
              + tl.load(K_SRC + pool_row * 2 + j, mask=row_ok, other=0))
    offset = tl.load(INDEX_H + source, mask=weight != 0.0, other=0)
    return (head * table_rows + offset).to(tl.int64), weight


@triton.jit(do_not_specialize=GRID_ARGS)
def bias_rows_forward(TABLE, INDEX_H, Q_SRC, Q_WEIGHT, K_SRC, K_WEIGHT, SPREAD, OUT, rows,
                      height, pool_h, key_rows, table_rows, cols, spread,
                      BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """``OUT (heads, H, Hp, Ue)``; grid ``(cdiv(heads * H * Hp, BLOCK_R), cdiv(Ue, BLOCK_E))``."""
    row_index = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    even = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = row_index < rows
    even_ok = even < spread
    column = tl.load(SPREAD + even, mask=even_ok, other=0)
    acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    for i in tl.static_range(2):
        for j in tl.static_range(2):
            table_row, weight = _tap_addresses(INDEX_H, Q_SRC, Q_WEIGHT, K_SRC, K_WEIGHT,
                                               row_index, row_ok, height, pool_h, key_rows,
                                               table_rows, i, j)
            value = tl.load(TABLE + table_row[:, None] * cols + column[None, :],
                            mask=(weight != 0.0)[:, None] & even_ok[None, :], other=0.0)
            acc += weight[:, None] * value.to(tl.float32)
    tl.store(OUT + row_index.to(tl.int64)[:, None] * spread + even[None, :],
             acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & even_ok[None, :])


@triton.jit(do_not_specialize=GRID_ARGS)
def bias_rows_backward(GRAD_OUT, INDEX_H, Q_SRC, Q_WEIGHT, K_SRC, K_WEIGHT, SPREAD, GRAD_TABLE,
                       rows, height, pool_h, key_rows, table_rows, cols, spread,
                       BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """Adds to ``GRAD_TABLE`` (float32, zeroed, TABLE's shape) the gradient from
    ``GRAD_OUT (heads, H, Hp, Ue)``, the transpose of the forward: relaxed atomics, one
    per entry and tap of nonzero weight and gradient (an evenly numbered column that no
    offset takes has none); same grid as the forward."""
    row_index = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    even = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = row_index < rows
    even_ok = even < spread
    column = tl.load(SPREAD + even, mask=even_ok, other=0)
    grad = tl.load(GRAD_OUT + row_index.to(tl.int64)[:, None] * spread + even[None, :],
                   mask=row_ok[:, None] & even_ok[None, :], other=0.0).to(tl.float32)
    for i in tl.static_range(2):
        for j in tl.static_range(2):
            table_row, weight = _tap_addresses(INDEX_H, Q_SRC, Q_WEIGHT, K_SRC, K_WEIGHT,
                                               row_index, row_ok, height, pool_h, key_rows,
                                               table_rows, i, j)
            tl.atomic_add(GRAD_TABLE + table_row[:, None] * cols + column[None, :],
                          weight[:, None] * grad,
                          mask=(weight != 0.0)[:, None] & (grad != 0.0), sem='relaxed')
