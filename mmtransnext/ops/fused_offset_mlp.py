"""The position-bias MLP on the offset grid in two Triton kernels, for CUDA tensors.

:class:`~mmtransnext.models.position_bias.OffsetMLP` evaluates ``fc2(relu(fc1(.)))``
at every point of the grid of row and column offsets. With PyTorch operators that is
a loop over chunks of grid rows, about ten operators a chunk forward and backward,
and 10 chunks at stage 1 of TransNeXt-T at 800x1333; a GPU's training step of the
backbone waits on the host issuing operators (``docs/benchmarks.md``), and every
attention layer evaluates its MLP once a step. Here the forward is one kernel and
the backward one kernel plus a few operators, whatever the grid's size, and the
hidden layer never reaches memory. The kernels serve where
:func:`~mmtransnext.ops.fused_attention.use_fused_attention` picks the fused attention
kernels for the MLP's weights; the CPU keeps the chunked operators, sized for its
caches.

Both functions take the first layer's two affine parts, ``row_part (Uh, hidden)``
(row offsets times fc1's first column, plus fc1's bias) and ``col_part (Uw, hidden)``
(column offsets times its second column), and fc2's weight ``w2 (heads, hidden)``.
"""
import torch
from torch import Tensor

from .fused_attention import _on_device, _pad, compile_kernel

__all__ = ['offset_mlp_table', 'offset_mlp_grads', 'compile_for_gpu']

# Grid points a forward program computes, a slice of the hidden layer at a time.
FORWARD = dict(BLOCK_U=8, BLOCK_V=16, BLOCK_K=32, num_warps=4)
# Columns and hidden units a backward program holds, and the grid rows it walks.
BACKWARD = dict(ROWS_PER_PROGRAM=32, BLOCK_V=32, BLOCK_K=32, num_warps=4)


def _kernels():
    from . import _offset_mlp_kernels
    return _offset_mlp_kernels


def _meta(launch: dict, w2: Tensor) -> dict:
    # 16-bit operands multiply on tensor cores; float32 in full precision, as the
    # attention kernels do (TF32 would err by 1e-3 of the bias).
    precision = 'ieee' if w2.dtype == torch.float32 else 'tf32'
    return dict(launch, HEADS_PAD=_pad(w2.shape[0]), DOT_PRECISION=precision)


def _check(row_part: Tensor, col_part: Tensor, w2: Tensor):
    hidden = w2.shape[1]
    if row_part.dim() != 2 or col_part.dim() != 2 or w2.dim() != 2:
        raise ValueError('offset MLP: row_part, col_part and w2 must be 2-D, got shapes '
                         f'{tuple(row_part.shape)}, {tuple(col_part.shape)}, {tuple(w2.shape)}')
    if row_part.shape[1] != hidden or col_part.shape[1] != hidden:
        raise ValueError(f'offset MLP: hidden sizes differ: row_part {row_part.shape[1]}, '
                         f'col_part {col_part.shape[1]}, w2 {hidden}')
    if not row_part.dtype == col_part.dtype == w2.dtype:
        raise ValueError(f'offset MLP: dtypes differ: {row_part.dtype}, {col_part.dtype}, '
                         f'{w2.dtype}')


def offset_mlp_table(row_part: Tensor, col_part: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``fc2(relu(row_part[u] + col_part[v]))`` at every grid point, in one kernel.

    Returns:
        Tensor: ``(heads, Uh, Uw)`` in ``w2``'s dtype, contiguous.
    """
    _check(row_part, col_part, w2)
    rows, cols, (heads, hidden) = row_part.shape[0], col_part.shape[0], w2.shape
    table = w2.new_empty(heads, rows, cols)
    meta = _meta(FORWARD, w2)
    grid = (-(-rows // meta['BLOCK_U']), -(-cols // meta['BLOCK_V']))
    with _on_device(w2):
        _kernels().offset_mlp_forward[grid](row_part.contiguous(), col_part.contiguous(),
                                            w2.contiguous(), b2.contiguous(), table, rows,
                                            cols, hidden, heads, **meta)
    return table


def offset_mlp_grads(row_part: Tensor, col_part: Tensor, w2: Tensor,
                     grad_table: Tensor) -> tuple:
    """Gradients of ``row_part``, ``col_part`` and ``w2`` from the table's, in one kernel.

    Args:
        grad_table (Tensor): ``(heads, Uh, Uw)``.

    Returns:
        tuple[Tensor, Tensor, Tensor]: float32, shaped as ``row_part``, ``col_part``
        and ``w2``.
    """
    _check(row_part, col_part, w2)
    rows, cols, (heads, hidden) = row_part.shape[0], col_part.shape[0], w2.shape
    if grad_table.shape != (heads, rows, cols):
        raise ValueError(f'offset MLP: grad_table of shape {tuple(grad_table.shape)}, '
                         f'expected {(heads, rows, cols)}')
    grad_table = grad_table.to(w2.dtype)
    if grad_table.stride(-1) != 1:
        grad_table = grad_table.contiguous()
    # One buffer, one operator: the three are sliced from it.
    grads = torch.zeros((rows + cols + heads) * hidden, dtype=torch.float32,
                        device=w2.device).view(-1, hidden)
    grad_row, grad_col, grad_w2 = grads.split([rows, cols, heads])
    meta = _meta(BACKWARD, w2)
    grid = (-(-cols // meta['BLOCK_V']), -(-hidden // meta['BLOCK_K']),
            -(-rows // meta['ROWS_PER_PROGRAM']))
    with _on_device(w2):
        _kernels().offset_mlp_backward[grid](row_part.contiguous(), col_part.contiguous(),
                                             w2.contiguous(), grad_table, grad_row, grad_col,
                                             grad_w2, rows, cols, hidden, heads,
                                             grad_table.stride(0), grad_table.stride(1), **meta)
    return grad_row, grad_col, grad_w2


# Element types of the kernels' pointer arguments: 'io' is the weights' dtype.
_POINTERS = dict(ROW='io', COL='io', W2='io', B2='io', TABLE='io', GRAD_TABLE='io',
                 GRAD_ROW='fp32', GRAD_COL='fp32', GRAD_W2='fp32')


def compile_for_gpu(arch: int, dtype: torch.dtype, heads: int = 16) -> dict:
    """Both kernels compiled ahead of time for a GPU architecture, without one.

    Args:
        arch (int): compute capability as an integer, e.g. 80 (A100) or 90 (H100).
        dtype (torch.dtype): the MLP weights' dtype.
        heads (int): heads of the bias. Default: 16 (padded as 1 to 16 heads are).

    Returns:
        dict[str, bytes]: cubins, ``forward`` and ``backward``.
    """
    kernels = _kernels()
    built = {}
    for name, kernel, launch in (('forward', kernels.offset_mlp_forward, FORWARD),
                                 ('backward', kernels.offset_mlp_backward, BACKWARD)):
        meta = _meta(launch, torch.empty(heads, 1, dtype=dtype))
        warps = meta.pop('num_warps')
        built[name] = compile_kernel(kernel, meta, _POINTERS, dtype, arch, warps)
    return built
