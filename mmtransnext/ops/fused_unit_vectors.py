"""Vectors scaled to unit length in one Triton kernel, forward and backward, for CUDA.

The attention layers normalise their queries and keys (scaled cosine attention), three
tensors a layer in :class:`~mmtransnext.models.attention.AggregatedAttention`. As
PyTorch operators that is five operators forward (the norm, the zero-vector mask, the
division) and six backward; on a GPU, where a training step of the backbone waits on
the host issuing operators (``docs/benchmarks.md``), one launch each way does the same.
The kernels serve where :func:`~mmtransnext.ops.fused_attention.use_fused_attention`
picks the fused kernels for the tensor; the model's rule is in
``mmtransnext.models.attention._unit_vectors``, which defines the numbers: the norm
in float32 or wider, zero output and zero gradient for a vector of norm at most 1e-12.
"""
import torch
from torch import Tensor

from .fused_attention import _on_device, _pad, compile_kernel

__all__ = ['unit_vectors', 'unit_vectors_grad', 'compile_for_gpu']

# Rows a program normalises, and its warps: on 4 warps the backward, which places its
# output through strides, spilled 8-16 bytes on sm_80/sm_90 (Triton 3.9); on 8, none.
LAUNCH = dict(BLOCK_R=128, num_warps=8)


def _kernels():
    from . import _unit_vectors_kernels
    return _unit_vectors_kernels


def _shape_args(x: Tensor) -> tuple:
    if x.dim() != 4:
        raise ValueError(f'unit vectors: x must be 4-D (batch, heads, tokens, dims), got '
                         f'shape {tuple(x.shape)}')
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f'unit vectors: dtype {x.dtype} is not supported (float32, float16 '
                         'or bfloat16)')
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    grid = (-(-rows // LAUNCH['BLOCK_R']), )
    return grid, (rows, x.shape[1], x.shape[2], *x.stride(), x.shape[3])


def _meta(x: Tensor) -> dict:
    return dict(LAUNCH, D_PAD=_pad(x.shape[-1]))


def unit_vectors(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x / ||x||`` over the last dim, zero where ``||x|| <= 1e-12``.

    Args:
        x (Tensor): ``(B, heads, N, d)``, any strides.
        dtype (torch.dtype): the output's dtype.

    Returns:
        Tensor: contiguous, ``x``'s shape.
    """
    grid, sizes = _shape_args(x)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    with _on_device(x):
        _kernels().unit_vectors_forward[grid](x, out, *sizes, **_meta(x))
    return out


def unit_vectors_grad(x: Tensor, grad_out: Tensor) -> Tensor:
    """The gradient of :func:`unit_vectors` at ``x`` for the output's gradient ``grad_out``.

    Returns:
        Tensor: ``x``'s shape and dtype, its dims in ``x``'s order in memory, without
        gaps (``torch.empty_like``). The queries' heads are a transposed view of their
        projection: their gradient so laid out reaches it as a view, where a
        contiguous one would be copied.
    """
    grid, sizes = _shape_args(x)
    if grad_out.shape != x.shape:
        raise ValueError(f'unit vectors: grad_out of shape {tuple(grad_out.shape)}, expected '
                         f'{tuple(x.shape)}')
    grad_out = grad_out.contiguous()
    grad_x = torch.empty_like(x)
    with _on_device(x):
        _kernels().unit_vectors_backward[grid](x, grad_out, grad_x, *sizes, *grad_x.stride(),
                                               **_meta(x))
    return grad_x


def compile_for_gpu(arch: int, dtype: torch.dtype, head_dim: int = 24) -> dict:
    """Both kernels compiled ahead of time for a GPU architecture, without one.

    Args:
        arch (int): compute capability as an integer, e.g. 80 (A100) or 90 (H100).
        dtype (torch.dtype): the input's dtype (the output float32).
        head_dim (int): the normalised dim. Default: 24 (every TransNeXt variant).

    Returns:
        dict[str, bytes]: cubins, ``forward`` and ``backward``.
    """
    meta = _meta(torch.empty(1, 1, 1, head_dim))
    warps = meta.pop('num_warps')
    pointers = dict(X='io', OUT='fp32', GRAD_OUT='fp32', GRAD_X='io')
    kernels = _kernels()
    return {name: compile_kernel(kernel, meta, pointers, dtype, arch, warps)
            for name, kernel in (('forward', kernels.unit_vectors_forward),
                                 ('backward', kernels.unit_vectors_backward))}
