"""The scaled queries and the learnable tokens' weights in one Triton kernel each way.

From the unit queries ``u`` of an attention layer (CUDA), with per head ``t`` the query
embedding ``e``, the temperature ``T``, the learnable tokens ``W (d, L)`` and their bias
``c``, and each query's scale ``s`` (``ln(valid + P)`` per query in aggregated
attention, ``ln(N)`` in full attention):

* the scaled query ``(u + e) * softplus(T) * s``, and
* the learnable tokens' weights ``u @ W + c`` (aggregated attention only).

As PyTorch operators under autocast these are eleven operators forward (with the
casts of the query, the tokens and both results to the core's dtype) and about as
many backward, for every attention layer of every step; on a GPU, where the training
step waits on the host issuing operators (``docs/benchmarks.md``), one launch each way
does the same, in float32, writing both results in the core's dtype. The model's rule
(``mmtransnext.models.attention``) uses them where
:func:`~mmtransnext.ops.fused_attention.use_fused_attention` picks the fused kernels.
"""
import math

import torch
from torch import Tensor

from .fused_attention import _on_device, _pad, _views, compile_kernel

__all__ = ['query_terms', 'query_terms_grads', 'compile_for_gpu']

# Queries a program takes, and its warps.
LAUNCH = dict(BLOCK_R=64, num_warps=4)


def _kernels():
    from . import _query_terms_kernels
    return _query_terms_kernels


def _launch(unit: Tensor, embedding: Tensor, scale, tokens) -> tuple:
    """Grid, the scale's two arguments, the size arguments and the meta-parameters."""
    if unit.dim() != 4 or not unit.is_contiguous():
        raise ValueError(f'query terms: unit queries must be 4-D (batch, heads, tokens, dims) '
                         f'and contiguous, got shape {tuple(unit.shape)}')
    batch, heads, count, dims = unit.shape
    if embedding.shape != (heads, 1, dims):
        raise ValueError(f'query terms: embedding of shape {tuple(embedding.shape)}, expected '
                         f'{(heads, 1, dims)}')
    if tokens is not None and (tokens.dim() != 3 or tokens.shape[:2] != (heads, dims)):
        raise ValueError(f'query terms: tokens of shape {tuple(tokens.shape)}, expected '
                         f'({heads}, {dims}, L)')
    per_token = torch.is_tensor(scale)
    if per_token and scale.numel() != count:
        raise ValueError(f'query terms: {scale.numel()} scales for {count} queries')
    taps = tokens.shape[2] if tokens is not None else 1
    grid = (-(-count // LAUNCH['BLOCK_R']), batch * heads)
    scale_args = ((scale.reshape(-1).contiguous(), 0.0) if per_token else
                  (unit, float(scale)))   # the pointer is then not read
    meta = dict(LAUNCH, D_PAD=_pad(dims), L_PAD=_pad(taps), PER_TOKEN=per_token,
                HAS_TOKENS=tokens is not None)
    return grid, scale_args, (heads, count, dims, taps), meta


def query_terms(unit: Tensor, embedding: Tensor, temperature: Tensor, scale, tokens: Tensor,
                token_bias: Tensor, dtype: torch.dtype) -> tuple:
    """The scaled queries and the tokens' weights.

    Args:
        unit (Tensor): ``(B, heads, N, d)`` unit queries, contiguous.
        embedding (Tensor): ``(heads, 1, d)``.
        temperature (Tensor): ``(heads, 1, 1)``.
        scale (Tensor | float): ``(N, 1)`` per query, or one number for all.
        tokens (Tensor, optional): ``(heads, d, L)``; None for no weights.
        token_bias (Tensor, optional): ``(heads, 1, L)``.
        dtype (torch.dtype): both results' dtype.

    Returns:
        tuple[Tensor, Tensor | None]: ``(B, heads, N, d)`` and ``(B, heads, N, L)``.
    """
    grid, scale_args, sizes, meta = _launch(unit, embedding, scale, tokens)
    query = torch.empty(unit.shape, dtype=dtype, device=unit.device)
    weights = (torch.empty(unit.shape[:3] + tokens.shape[2:], dtype=dtype, device=unit.device)
               if tokens is not None else None)
    # Without tokens their pointers are placeholders the kernel does not read.
    with _on_device(unit):
        _kernels().query_terms_forward[grid](
            unit, embedding, temperature, scale_args[0],
            tokens if tokens is not None else unit, token_bias if tokens is not None else unit,
            query, weights if tokens is not None else query, scale_args[1], *sizes, **meta)
    return query, weights


def query_terms_grads(unit: Tensor, embedding: Tensor, temperature: Tensor, scale,
                      tokens: Tensor, grad_query: Tensor, grad_weights: Tensor) -> tuple:
    """The gradients of :func:`query_terms`' inputs from its results' (None: zero).

    Returns:
        tuple: ``unit``'s gradient in its dtype; float32 gradients of ``embedding``,
        ``temperature`` and, with ``tokens``, of ``tokens`` and the token bias (else
        None for both).
    """
    grid, scale_args, (heads, count, dims, taps), meta = _launch(unit, embedding, scale, tokens)
    grad_query = (torch.zeros_like(unit) if grad_query is None else grad_query.contiguous())
    if tokens is not None:
        grad_weights = (unit.new_zeros(unit.shape[:3] + (taps, )) if grad_weights is None
                        else grad_weights.contiguous())
    shapes = [embedding.shape, temperature.shape]
    if tokens is not None:
        shapes += [tokens.shape, (heads, 1, taps)]
    # The parameters' float32 sums, zeroed as one buffer.
    sums = torch.zeros(sum(math.prod(shape) for shape in shapes), dtype=torch.float32,
                       device=unit.device)
    parts = _views(sums, shapes) + [None] * (4 - len(shapes))
    grad_unit = torch.empty_like(unit)
    # Without tokens their pointers are placeholders the kernel does not read.
    with _on_device(unit):
        _kernels().query_terms_backward[grid](
            unit, embedding, temperature, scale_args[0],
            tokens if tokens is not None else unit, grad_query,
            grad_weights if tokens is not None else grad_query, grad_unit,
            *(sums if part is None else part for part in parts), scale_args[1], heads, count,
            dims, taps, **meta)
    return (grad_unit, *parts)


def compile_for_gpu(arch: int, dtype: torch.dtype, head_dim: int = 24, taps: int = 9) -> dict:
    """Both kernels compiled ahead of time for a GPU architecture, without one.

    Args:
        arch (int): compute capability as an integer, e.g. 80 (A100) or 90 (H100).
        dtype (torch.dtype): the results' dtype (the core's; the unit queries and
            parameters float32).
        head_dim (int): Default: 24 (every TransNeXt variant).
        taps (int): learnable tokens. Default: 9 (a 3x3 window).

    Returns:
        dict[str, bytes]: cubins, ``forward`` and ``backward``.
    """
    meta = dict(LAUNCH, D_PAD=_pad(head_dim), L_PAD=_pad(taps), PER_TOKEN=True,
                HAS_TOKENS=True)
    warps = meta.pop('num_warps')
    pointers = dict(UNIT='fp32', EMBED='fp32', TEMP='fp32', SCALE='fp32', TOKENS='fp32',
                    TOKEN_BIAS='fp32', QUERY='io', WEIGHTS='io', GRAD_QUERY='io',
                    GRAD_WEIGHTS='io', GRAD_UNIT='fp32', GRAD_EMBED='fp32', GRAD_TEMP='fp32',
                    GRAD_TOKENS='fp32', GRAD_TOKEN_BIAS='fp32')
    kernels = _kernels()
    return {name: compile_kernel(kernel, meta, pointers, dtype, arch, warps,
                                 scalars=dict(scale_value='fp32'))
            for name, kernel in (('forward', kernels.query_terms_forward),
                                 ('backward', kernels.query_terms_backward))}
