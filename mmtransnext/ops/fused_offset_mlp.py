"""The position-bias MLP on the offset grid in two Triton kernels, for CUDA tensors.

:class:`~mmtransnext.models.position_bias.OffsetMLP` evaluates ``fc2(relu(fc1(.)))``
at every point of the grid of row and column offsets. With PyTorch operators that is
a loop over chunks of grid rows, about ten operators a chunk forward and backward,
and 10 chunks at stage 1 of TransNeXt-T at 800x1333; a GPU's training step of the
backbone waits on the host issuing operators (``docs/benchmarks.md``), and every
attention layer evaluates its MLP once a step. Here the forward is one kernel and
the backward one kernel and one sum of its partial results, whatever the grid's
size; the first layer is computed in the kernels, and the hidden layer never reaches
memory. The kernels serve where
:func:`~mmtransnext.ops.fused_attention.use_fused_attention` picks the fused attention
kernels for the MLP's weights; the CPU keeps the chunked operators, sized for its
caches.

Both functions take the grid's row and column offsets ``offsets_h (Uh, )`` and
``offsets_w (Uw, )`` in any floating dtype (the kernels round them to the weights'
dtype, as casting them first would), fc1's weight ``w1 (hidden, 2)`` and bias
``b1 (hidden, )`` and fc2's weight ``w2 (heads, hidden)``, the weights in one dtype.
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


def _check(offsets_h: Tensor, offsets_w: Tensor, w1: Tensor, b1: Tensor, w2: Tensor):
    hidden = w2.shape[-1]
    if offsets_h.dim() != 1 or offsets_w.dim() != 1:
        raise ValueError('offset MLP: offsets_h and offsets_w must be 1-D, got shapes '
                         f'{tuple(offsets_h.shape)}, {tuple(offsets_w.shape)}')
    if w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(f'offset MLP: w1 and w2 must be 2-D, got shapes {tuple(w1.shape)}, '
                         f'{tuple(w2.shape)}')
    if w1.shape != (hidden, 2) or b1.shape != (hidden, ):
        raise ValueError(f'offset MLP: w1 {tuple(w1.shape)} and b1 {tuple(b1.shape)} do not '
                         f'fit w2 {tuple(w2.shape)}: expected ({hidden}, 2) and ({hidden},)')
    if not w1.dtype == b1.dtype == w2.dtype:
        raise ValueError(f'offset MLP: weight dtypes differ: {w1.dtype}, {b1.dtype}, {w2.dtype}')
    if not (offsets_h.is_floating_point() and offsets_w.is_floating_point()):
        raise ValueError(f'offset MLP: offsets must be floating point, got {offsets_h.dtype} '
                         f'and {offsets_w.dtype}')


def offset_mlp_table(offsets_h: Tensor, offsets_w: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                     b2: Tensor) -> Tensor:
    """``fc2(relu(fc1((offsets_h[u], offsets_w[v]))))`` at every grid point, in one kernel.

    Returns:
        Tensor: ``(heads, Uh, Uw)`` in ``w2``'s dtype, contiguous.
    """
    _check(offsets_h, offsets_w, w1, b1, w2)
    rows, cols, (heads, hidden) = offsets_h.shape[0], offsets_w.shape[0], w2.shape
    table = w2.new_empty(heads, rows, cols)
    meta = _meta(FORWARD, w2)
    grid = (-(-rows // meta['BLOCK_U']), -(-cols // meta['BLOCK_V']))
    with _on_device(w2):
        _kernels().offset_mlp_forward[grid](
            offsets_h.contiguous(), offsets_w.contiguous(), w1.contiguous(), b1.contiguous(),
            w2.contiguous(), b2.contiguous(), table, rows, cols, hidden, heads, **meta)
    return table


def offset_mlp_grads(offsets_h: Tensor, offsets_w: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                     grad_table: Tensor) -> tuple:
    """Every parameter's gradient from the table's: one kernel and one sum.

    Args:
        grad_table (Tensor): ``(heads, Uh, Uw)``.

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor]: float32 gradients of ``w1``, ``b1``,
        ``w2`` and ``b2`` (``(heads, )``), views of one tensor.
    """
    _check(offsets_h, offsets_w, w1, b1, w2)
    rows, cols, (heads, hidden) = offsets_h.shape[0], offsets_w.shape[0], w2.shape
    if grad_table.shape != (heads, rows, cols):
        raise ValueError(f'offset MLP: grad_table of shape {tuple(grad_table.shape)}, '
                         f'expected {(heads, rows, cols)}')
    grad_table = grad_table.to(w2.dtype)
    if grad_table.stride(-1) != 1:
        grad_table = grad_table.contiguous()
    meta = _meta(BACKWARD, w2)
    grid = (-(-cols // meta['BLOCK_V']), -(-hidden // meta['BLOCK_K']),
            -(-rows // meta['ROWS_PER_PROGRAM']))
    # Each program's sums in a row of its own (every entry written), summed once.
    sizes = [hidden * 2, hidden, heads * hidden, heads]
    partial = torch.empty(grid[0] * grid[2], sum(sizes), dtype=torch.float32, device=w2.device)
    with _on_device(w2):
        _kernels().offset_mlp_backward[grid](
            offsets_h.contiguous(), offsets_w.contiguous(), w1.contiguous(), b1.contiguous(),
            w2.contiguous(), grad_table, partial, rows, cols, hidden, heads,
            grad_table.stride(0), grad_table.stride(1), partial.stride(0), **meta)
    grad_w1, grad_b1, grad_w2, grad_b2 = partial.sum(0).split(sizes)
    return grad_w1.view(hidden, 2), grad_b1, grad_w2.view(heads, hidden), grad_b2


# Element types of the kernels' pointer arguments: 'io' is the weights' dtype.
# The offsets are float64, as the model's layouts hold them.
_POINTERS = dict(OFFSETS_H='fp64', OFFSETS_W='fp64', W1='io', B1='io', W2='io', B2='io',
                 TABLE='io', GRAD_TABLE='io', PARTIAL='fp32')


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
