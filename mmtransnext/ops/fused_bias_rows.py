"""The fused attention kernels' bias table from the MLP's, in one Triton kernel each way.

:class:`~mmtransnext.models.position_bias.RowFactoredBias` gathers the MLP's table at
each pair of a query row and a key row, resizes those row axes to the run-time grid and
hands the fused attention kernels its columns numbered evenly, in the queries' dtype.
With PyTorch operators that is a gather, a resize, a copy, a second gather and a cast,
and their backward five more, in every attention layer of every step; a GPU's training
step of the backbone waits on the host issuing operators (``docs/benchmarks.md``).
Here it is one kernel forward and one backward (relaxed atomics into a float32 sum).
The table is read in its own dtype and resized in float32, so under autocast it is
rounded once, to the queries' dtype, not before and after the resize. The kernels serve
where :func:`~mmtransnext.ops.fused_attention.use_fused_attention` picks the fused
attention kernels for the table.

Arguments shared by both functions: ``index_h (Qh, Kh)`` integer, the row offset of
each built query row and key row (:class:`~mmtransnext.models.position_bias.
BiasLayout`); ``row_taps``, the bilinear resize of those rows to ``(H, Hp)`` as source
rows and weights, ``(H, 2)`` int32 and float32 for the query rows then ``(Hp, 2)`` for the
key rows; ``spread (Ue, )`` integer, the column offset of each evenly numbered column.
"""
import torch
from torch import Tensor

from .fused_attention import _on_device, compile_kernel

__all__ = ['bias_rows', 'bias_rows_grad', 'compile_for_gpu']

# Rows (head, query row, key row) and evenly numbered columns a program owns.
LAUNCH = dict(BLOCK_R=16, BLOCK_E=64, num_warps=4)


def _kernels():
    from . import _bias_rows_kernels
    return _bias_rows_kernels


def _check(index_h: Tensor, row_taps, spread: Tensor):
    query_src, query_weight, key_src, key_weight = row_taps
    if index_h.dim() != 2 or index_h.is_floating_point():
        raise ValueError(f'bias rows: index_h must be a 2-D integer tensor, got '
                         f'{index_h.dtype} of shape {tuple(index_h.shape)}')
    for name, src, weight in (('query', query_src, query_weight), ('key', key_src, key_weight)):
        if src.dim() != 2 or src.shape[1] != 2 or weight.shape != src.shape:
            raise ValueError(f'bias rows: {name} row taps must be two (rows, 2) tensors, got '
                             f'{tuple(src.shape)} and {tuple(weight.shape)}')
        if src.dtype != torch.int32 or weight.dtype != torch.float32:
            raise ValueError(f'bias rows: {name} row taps must be int32 and float32, got '
                             f'{src.dtype} and {weight.dtype}')
    if spread.dim() != 1 or spread.is_floating_point():
        raise ValueError(f'bias rows: spread must be a 1-D integer tensor, got {spread.dtype} '
                         f'of shape {tuple(spread.shape)}')


def _launch(kernel, first: Tensor, second: Tensor, index_h, row_taps, spread, table_shape):
    heads, table_rows, cols = table_shape
    height, pool_h = row_taps[0].shape[0], row_taps[2].shape[0]
    rows = heads * height * pool_h
    meta = dict(LAUNCH)
    grid = (-(-rows // meta['BLOCK_R']), -(-spread.shape[0] // meta['BLOCK_E']))
    with _on_device(first):
        kernel[grid](first, index_h.contiguous(), *(t.contiguous() for t in row_taps),
                     spread.contiguous(), second, rows, height, pool_h, index_h.shape[1],
                     table_rows, cols, spread.shape[0], **meta)


def bias_rows(table: Tensor, index_h: Tensor, row_taps, spread: Tensor,
              dtype: torch.dtype) -> Tensor:
    """The kernels' bias table: the MLP's, gathered, resized and spread, in ``dtype``.

    Args:
        table (Tensor): ``(heads, Uh, Uw)``, the MLP's output.
        dtype (torch.dtype): the output's dtype.

    Returns:
        Tensor: ``(heads, H, Hp, Ue)``, contiguous.
    """
    if table.dim() != 3:
        raise ValueError(f'bias rows: table must be (heads, Uh, Uw), got {tuple(table.shape)}')
    _check(index_h, row_taps, spread)
    out = table.new_empty(table.shape[0], row_taps[0].shape[0], row_taps[2].shape[0],
                          spread.shape[0], dtype=dtype)
    _launch(_kernels().bias_rows_forward, table.contiguous(), out, index_h, row_taps, spread,
            table.shape)
    return out


def bias_rows_grad(grad: Tensor, index_h: Tensor, row_taps, spread: Tensor,
                   table_shape) -> Tensor:
    """The MLP table's gradient from the kernels' table's, float32.

    Args:
        grad (Tensor): ``(heads, H, Hp, Ue)``.
        table_shape (tuple): ``(heads, Uh, Uw)``.
    """
    _check(index_h, row_taps, spread)
    expected = (table_shape[0], row_taps[0].shape[0], row_taps[2].shape[0], spread.shape[0])
    if tuple(grad.shape) != expected:
        raise ValueError(f'bias rows: gradient of shape {tuple(grad.shape)}, expected '
                         f'{expected}')
    grad_table = torch.zeros(table_shape, dtype=torch.float32, device=grad.device)
    _launch(_kernels().bias_rows_backward, grad.contiguous(), grad_table, index_h, row_taps,
            spread, table_shape)
    return grad_table


# Element types of the kernels' pointer arguments: 'io' is the kernel table's dtype
# (the forward's output, the backward's incoming gradient).
_POINTERS = dict(TABLE='fp32', INDEX_H='i64', Q_SRC='i32', Q_WEIGHT='fp32', K_SRC='i32',
                 K_WEIGHT='fp32', SPREAD='i64', OUT='io', GRAD_OUT='io', GRAD_TABLE='fp32')


def compile_for_gpu(arch: int, dtype: torch.dtype) -> dict:
    """Both kernels compiled ahead of time for a GPU architecture, without one, for a
    float32 MLP table (the model's) and a kernel table in ``dtype``.

    Returns:
        dict[str, bytes]: cubins, ``forward`` and ``backward``.
    """
    kernels = _kernels()
    meta = dict(LAUNCH)
    warps = meta.pop('num_warps')
    return {name: compile_kernel(kernel, meta, _POINTERS, dtype, arch, warps)
            for name, kernel in (('forward', kernels.bias_rows_forward),
                                 ('backward', kernels.bias_rows_backward))}
