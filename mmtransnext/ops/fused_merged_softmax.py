"""The softmax that merges a query's window with its pooled keys, in one Triton kernel
each way, for CUDA.

Aggregated attention gives each query one softmax over its window's logits and its
pooled keys' logits. The pooled keys' part comes out of the fused attention as its
log-sum-exp, so the merge is a softmax over the window's logits and that one value: each
window cell's weight, to which the learnable tokens' weights are added, and the pooled
part's total weight. As PyTorch operators that is five operators forward (a
concatenation that also casts, the softmax, the cast back, the addition) and four
backward, in every aggregated attention layer; on a GPU, where a training step waits on
the host issuing operators (``docs/benchmarks.md``), one launch each way does the same,
in float32. The model's rule (``mmtransnext.models.attention``) uses them where
:func:`~mmtransnext.ops.fused_attention.use_fused_attention` picks the fused kernels.
"""
import torch
from torch import Tensor

from .fused_attention import _DTYPES, _on_device, _pad, compile_kernel

__all__ = ['merged_softmax', 'merged_softmax_grad', 'compile_for_gpu']

# Rows (queries of a head of an image) a program takes, and its warps.
LAUNCH = dict(BLOCK_R=128, num_warps=4)


def _kernels():
    from . import _merged_softmax_kernels
    return _merged_softmax_kernels


def _launch(local: Tensor, lse: Tensor, *like_local: Tensor) -> tuple:
    """Grid, the size arguments and the meta-parameters; every argument checked."""
    if local.dim() != 4 or not local.is_contiguous():
        raise ValueError(f'merged softmax: window logits must be 4-D (batch, heads, tokens, '
                         f'cells) and contiguous, got shape {tuple(local.shape)}')
    if local.dtype not in _DTYPES:
        raise ValueError(f'merged softmax: dtype {local.dtype} is not supported (float32, '
                         'float16 or bfloat16)')
    if lse.shape != local.shape[:3] or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f'merged softmax: log-sum-exp of shape {tuple(lse.shape)} and dtype '
                         f'{lse.dtype}, expected {tuple(local.shape[:3])}, contiguous float32')
    for tensor in like_local:
        if tensor.shape != local.shape or tensor.dtype != local.dtype:
            raise ValueError(f'merged softmax: a tensor of shape {tuple(tensor.shape)} and '
                             f'dtype {tensor.dtype} where the window logits have '
                             f'{tuple(local.shape)}, {local.dtype}')
    rows, cells = local.numel() // local.shape[3], local.shape[3]
    grid = (-(-rows // LAUNCH['BLOCK_R']), )
    return grid, (rows, cells), dict(LAUNCH, CELLS_PAD=_pad(cells))


def merged_softmax(local: Tensor, lse: Tensor, token_weights: Tensor) -> tuple:
    """Each window cell's weight plus the learnable tokens', and the pooled keys' weight.

    Args:
        local (Tensor): ``(B, heads, N, L)`` the window's logits, contiguous, ``-inf``
            where the neighbour is outside the map.
        lse (Tensor): ``(B, heads, N)`` float32, the pooled keys' log-sum-exp.
        token_weights (Tensor): ``(B, heads, N, L)``, like ``local``.

    Returns:
        tuple[Tensor, Tensor]: ``(B, heads, N, L)`` the window's weights plus
        ``token_weights`` and ``(B, heads, N, 1)`` the pooled keys' weight, in
        ``local``'s dtype, from one float32 softmax over ``L + 1`` values a query.
    """
    token_weights = token_weights.contiguous()
    grid, sizes, meta = _launch(local, lse, token_weights)
    weights = torch.empty_like(local)
    pooled = local.new_empty(local.shape[:3] + (1, ))
    with _on_device(local):
        _kernels().merged_softmax_forward[grid](local, lse, token_weights, weights, pooled,
                                                *sizes, **meta)
    return weights, pooled


def merged_softmax_grad(local: Tensor, lse: Tensor, grad_weights: Tensor,
                        grad_pooled: Tensor) -> tuple:
    """The gradients of :func:`merged_softmax`'s window logits and log-sum-exp (that of
    the token weights is ``grad_weights`` itself).

    Args:
        local, lse (Tensor): as :func:`merged_softmax` took them.
        grad_weights (Tensor): ``(B, heads, N, L)``, like ``local``.
        grad_pooled (Tensor): ``(B, heads, N, 1)``, like ``local``.

    Returns:
        tuple[Tensor, Tensor]: ``(B, heads, N, L)`` like ``local`` and ``(B, heads, N)``
        float32.
    """
    grad_weights = grad_weights.contiguous()
    grad_pooled = grad_pooled.contiguous()
    if grad_pooled.shape != local.shape[:3] + (1, ):
        raise ValueError(f'merged softmax: pooled weight gradient of shape '
                         f'{tuple(grad_pooled.shape)}, expected {tuple(local.shape[:3]) + (1, )}')
    grid, sizes, meta = _launch(local, lse, grad_weights)
    grad_local = torch.empty_like(local)
    grad_lse = torch.empty_like(lse)
    with _on_device(local):
        _kernels().merged_softmax_backward[grid](local, lse, grad_weights, grad_pooled,
                                                 grad_local, grad_lse, *sizes, **meta)
    return grad_local, grad_lse


def compile_for_gpu(arch: int, dtype: torch.dtype, cells: int = 9) -> dict:
    """Both kernels compiled ahead of time for a GPU architecture, without one.

    Args:
        arch (int): compute capability as an integer, e.g. 80 (A100) or 90 (H100).
        dtype (torch.dtype): the window logits' dtype (the core's).
        cells (int): window cells a query. Default: 9 (a 3x3 window).

    Returns:
        dict[str, bytes]: cubins, ``forward`` and ``backward``.
    """
    meta = dict(LAUNCH, CELLS_PAD=_pad(cells))
    warps = meta.pop('num_warps')
    pointers = dict(LOCAL='io', LSE='fp32', TOKEN_WEIGHTS='io', WEIGHTS='io', POOLED='io',
                    GRAD_WEIGHTS='io', GRAD_POOLED='io', GRAD_LOCAL='io', GRAD_LSE='fp32')
    kernels = _kernels()
    return {name: compile_kernel(kernel, meta, pointers, dtype, arch, warps)
            for name, kernel in (('forward', kernels.merged_softmax_forward),
                                 ('backward', kernels.merged_softmax_backward))}
