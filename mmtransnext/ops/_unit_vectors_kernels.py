"""Triton kernels of :mod:`mmtransnext.ops.fused_unit_vectors`.

Imported only on first use, like :mod:`._fused_attention_kernels` (``TRITON_INTERPRET``
is read when the kernels are defined). ``X`` is a 4-D tensor read through its strides
(the heads of a projection are a strided view of it), normalised over its last dim of
``dims`` values; rows are numbered in the order of a contiguous tensor of its shape,
which ``OUT`` and ``GRAD_OUT`` are. ``GRAD_X`` is written through its own strides.
Norms, sums and products are float32.
"""
import triton
import triton.language as tl

#: Sizes and strides that change with the input's size: unspecialised, so that new
#: image sizes reuse the binaries (see ``_fused_attention_kernels.SPATIAL_ARGS``).
SIZE_ARGS = ('rows', 'size1', 'size2', 's0', 's1', 's2')
GRAD_STRIDES = ('g0', 'g1', 'g2')

# At or below this norm a vector is treated as zero (F.normalize's eps).
EPS = tl.constexpr(1e-12)


@triton.jit
def _place(row, dim, size1, size2, s0, s1, s2, s3):
    """Where the entries ``dim`` of rows ``row`` lie in a tensor of strides ``s0..s3``."""
    i2 = row % size2
    i1 = (row // size2) % size1
    i0 = row // (size2 * size1)
    return (i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2)[:, None] \
        + dim[None, :] * s3


@triton.jit
def _rows(X, rows, size1, size2, s0, s1, s2, s3, dims, BLOCK_R: tl.constexpr,
          D_PAD: tl.constexpr):
    """A block's rows of ``X`` in float32, their norms, numbers and mask."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dim = tl.arange(0, D_PAD)
    ok = (row < rows)[:, None] & (dim < dims)[None, :]
    x = tl.load(X + _place(row, dim, size1, size2, s0, s1, s2, s3), mask=ok,
                other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return x, norm, row, dim, ok


@triton.jit(do_not_specialize=SIZE_ARGS)
def unit_vectors_forward(X, OUT, rows, size1, size2, s0, s1, s2, s3, dims,
                         BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
    """``OUT = X / ||X||``, zero where the norm is at most ``EPS``; grid ``cdiv(rows, BLOCK_R)``."""
    x, norm, row, dim, ok = _rows(X, rows, size1, size2, s0, s1, s2, s3, dims, BLOCK_R, D_PAD)
    divisor = tl.where(norm > EPS, norm, float('inf'))
    out = x / divisor[:, None]
    tl.store(OUT + row.to(tl.int64)[:, None] * dims + dim[None, :],
             out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=SIZE_ARGS + GRAD_STRIDES)
def unit_vectors_backward(X, GRAD_OUT, GRAD_X, rows, size1, size2, s0, s1, s2, s3, dims,
                          g0, g1, g2, g3, BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
    """``GRAD_X = (g - u (g . u)) / ||X||`` with ``u = X / ||X||``, zero where the norm is
    at most ``EPS``; ``GRAD_OUT`` contiguous, ``GRAD_X`` of strides ``g0..g3``."""
    x, norm, row, dim, ok = _rows(X, rows, size1, size2, s0, s1, s2, s3, dims, BLOCK_R, D_PAD)
    divisor = tl.where(norm > EPS, norm, float('inf'))[:, None]
    grad = tl.load(GRAD_OUT + row.to(tl.int64)[:, None] * dims + dim[None, :], mask=ok,
                   other=0.0).to(tl.float32)
    unit = x / divisor
    along = tl.sum(grad * unit, axis=1)[:, None]
    tl.store(GRAD_X + _place(row, dim, size1, size2, g0, g1, g2, g3),
             ((grad - unit * along) / divisor).to(GRAD_X.dtype.element_ty), mask=ok)
