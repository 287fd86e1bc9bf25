"""Attention with a position bias, computed a band of query rows at a time.

The pooled half of aggregated attention (and the full attention of the last
stage) is ``softmax(q k^T + bias) v`` with a per-head bias of shape
``(heads, N, P)``. Built whole, the logits, the bias and the probabilities are
each as large as ``B * heads * N * P`` floats (about 0.8 GB each at stage 1 of an
800x1333 image). Here the query rows are processed in bands: a band's bias comes
from :class:`~mmtransnext.models.position_bias.RowFactoredBias`, its logits and
probabilities live only while the band is computed, and the backward pass
recomputes them band by band (as flash attention does), so nothing of size
``N * P`` is ever kept.

The function also returns the log-sum-exp of every query's logits, so that the
caller can merge this softmax with another one over a disjoint set of keys (the
local window) into one joint softmax.
"""
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .sliding_window import use_compiled_op

# Elements of one band's logits; 2**22 floats (16 MB) keeps the band in cache-friendly
# matmuls while bounding the temporaries of the backward pass (four of them).
_BAND_ELEMENTS = 1 << 22


def _rows_per_band(batch: int, heads: int, width: int, keys: int, height: int) -> int:
    per_row = max(batch * heads * width * keys, 1)
    return max(1, min(height, _BAND_ELEMENTS // per_row))


_KERNEL_NAMES = ('bias_softmax_', 'softmax_backward_', 'bias_rows_backward')
# What the compiled band kernels take (csrc/sliding_window.cpp, check_float); the plain
# branch serves float16 and bfloat16.
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _fused_kernels(tensor: Tensor) -> bool:
    """Whether the compiled band kernels serve this tensor (CPU builds have them)."""
    return (tensor.device.type == 'cpu' and tensor.dtype in _KERNEL_DTYPES
            and use_compiled_op(tensor)
            and all(hasattr(torch.ops.mmtransnext, name) for name in _KERNEL_NAMES))


def check_bias_attention_args(op: str, query, key, value, bias) -> None:
    """What every path of biased attention requires of its arguments.

    One check for :func:`banded_bias_attention` and
    :func:`~mmtransnext.ops.fused_attention.fused_bias_attention` (which adds its own
    dtype and device limits), so that both refuse the same calls with the same words.

    Args:
        op (str): the function's name, which every message starts with.
        query, key, value, bias: the function's arguments.

    Raises:
        ValueError: naming the problem: a tensor not 4-D, mixed dtypes or devices, a
            dtype that is not floating-point, shapes that do not match, or a bias laid
            out for other token counts or heads.
    """
    for name, tensor in dict(query=query, key=key, value=value).items():
        if not isinstance(tensor, Tensor) or tensor.dim() != 4:
            raise ValueError(f'{op}: {name} must be a 4-D tensor (B, heads, tokens, dim), '
                             f'got {getattr(tensor, "shape", tensor)}')
        if tensor.dtype != query.dtype or tensor.device != query.device:
            raise ValueError(f'{op}: {name} is {tensor.dtype} on {tensor.device}, query is '
                             f'{query.dtype} on {query.device}')
    if not query.is_floating_point():
        raise ValueError(f'{op}: dtype {query.dtype} is not a floating-point dtype')
    (height, width), (pool_h, pool_w) = bias.layout.query_size, bias.layout.key_size
    batch, heads = query.shape[:2]
    if (key.shape[:2] != (batch, heads) or value.shape[:3] != key.shape[:3]
            or key.shape[3] != query.shape[3]):
        raise ValueError(f'{op}: shapes do not match: query {tuple(query.shape)}, key '
                         f'{tuple(key.shape)}, value {tuple(value.shape)}')
    if query.shape[2] != height * width or key.shape[2] != pool_h * pool_w:
        raise ValueError(
            f'{op}: query has {query.shape[2]} tokens and key {key.shape[2]}, but the bias '
            f'is laid out for {height}x{width} queries and {pool_h}x{pool_w} keys')
    # A bias of fewer heads would broadcast over the logits in the forward pass and fail
    # only in the backward.
    if tuple(bias.shape[:3]) != (heads, height, pool_h):
        raise ValueError(f'{op}: bias table {tuple(bias.shape)} is not '
                         f'(heads={heads}, H={height}, Hp={pool_h}, Uw)')
    if bias.device != query.device:
        raise ValueError(f'{op}: bias on {bias.device}, query on {query.device}')


def _biased_exp_(logits: Tensor, bias, by_rows: Tensor, start: int, stop: int,
                 fused: bool, shift: Tensor = None):
    """``logits <- exp(logits + bias - shift)`` in place, for query rows ``start:stop``.

    ``shift`` defaults to each row's maximum. Returns the shift and the row sums.
    """
    if fused:
        index, weight = bias.col_taps(logits.dtype)
        return torch.ops.mmtransnext.bias_softmax_(logits, by_rows, index, weight, start, shift)
    batch, heads = logits.shape[:2]
    (_, width), (pool_h, pool_w) = bias.layout.query_size, bias.layout.key_size
    logits.view(batch, heads, stop - start, width, pool_h, pool_w).add_(
        bias.rows(start, stop, by_rows))
    if shift is None:
        shift = logits.amax(dim=-1)
    logits.sub_(shift.unsqueeze(-1)).exp_()
    return shift, logits.sum(-1)


class _BandedBiasAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, query, key, value, by_rows, bias):
        # The projections arrive as head-split views; bands of them are matmul
        # operands many times over, so lay them out once.
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        batch, heads, tokens, _ = query.shape
        height, width = bias.layout.query_size
        band = _rows_per_band(batch, heads, width, key.shape[2], height)
        fused = _fused_kernels(query)
        out = query.new_empty(query.shape[:-1] + value.shape[-1:])
        lse = query.new_empty(batch, heads, tokens)
        # Contiguous transposes: the band matmuls run ~1.5x faster than on strided views.
        key_t = key.transpose(-2, -1).contiguous()
        for start in range(0, height, band):
            stop = min(height, start + band)
            lo, hi = start * width, stop * width
            logits = torch.matmul(query[:, :, lo:hi], key_t)
            row_max, row_sum = _biased_exp_(logits, bias, by_rows, start, stop, fused)
            out[:, :, lo:hi] = torch.matmul(logits, value).div_(row_sum.unsqueeze(-1))
            lse[:, :, lo:hi] = row_max + row_sum.log()
        ctx.save_for_backward(query, key, value, by_rows, out, lse)
        ctx.bias, ctx.band, ctx.fused = bias, band, fused
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        # The saved tensors' dtype rules, whatever autocast region backward() runs in.
        device = (grad_out if grad_out is not None else grad_lse).device.type
        with torch.autocast(device, enabled=False):
            return _BandedBiasAttention._gradients(ctx, grad_out, grad_lse)

    @staticmethod
    def _gradients(ctx, grad_out, grad_lse):
        query, key, value, by_rows, out, lse = ctx.saved_tensors
        bias, band, fused = ctx.bias, ctx.band, ctx.fused
        height, width = bias.layout.query_size
        pool_h, pool_w = bias.layout.key_size
        heads = query.shape[1]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
        # d lse / d logits = probs, and d out / d logits contracts to
        # probs * (g - sum(probs * g)) with g = grad_out . value. That shift is about
        # grad_out . out, known before the loop; subtracting it first leaves a
        # small residual to sum per row. Done in this order, the rows of
        # grad_logits sum to zero up to rounding of small numbers, which keeps a
        # gradient that is zero in theory (a bias shared by all keys shifts no
        # softmax) as close to zero as the released model has it.
        shift = (grad_out * out).sum(-1)
        grad_query = torch.empty_like(query)
        grad_key = torch.zeros_like(key)
        grad_value = torch.zeros_like(value)
        want_bias = ctx.needs_input_grad[3]
        if fused:
            grad_by_rows = torch.zeros_like(by_rows) if want_bias else None
            index, weight = bias.col_taps(query.dtype)
        else:
            by_rows_leaf = by_rows.detach().requires_grad_(want_bias)
        key_t = key.transpose(-2, -1).contiguous()
        value_t = value.transpose(-2, -1).contiguous()
        for start in range(0, height, band):
            stop = min(height, start + band)
            lo, hi = start * width, stop * width
            q_band, g_band = query[:, :, lo:hi], grad_out[:, :, lo:hi]
            probs = torch.matmul(q_band, key_t)
            if fused:
                _biased_exp_(probs, bias, by_rows, start, stop, True, lse[:, :, lo:hi])
            else:
                with torch.enable_grad():
                    band_bias = bias.rows(start, stop, by_rows_leaf)
                probs.view(probs.shape[:2] + (stop - start, width, pool_h, pool_w)).add_(
                    band_bias.detach())
                probs.sub_(lse[:, :, lo:hi, None]).exp_()
            grad_logits = torch.matmul(g_band, value_t)
            if fused:
                torch.ops.mmtransnext.softmax_backward_(grad_logits, probs, shift[:, :, lo:hi],
                                                        grad_lse[:, :, lo:hi])
            else:
                grad_logits.sub_(shift[:, :, lo:hi, None])
                residual = (grad_logits * probs).sum(-1, keepdim=True)
                grad_logits.sub_(residual.sub_(grad_lse[:, :, lo:hi, None])).mul_(probs)
            grad_query[:, :, lo:hi] = torch.matmul(grad_logits, key)
            grad_key += torch.matmul(grad_logits.transpose(-2, -1), q_band)
            grad_value += torch.matmul(probs.transpose(-2, -1), g_band)
            if want_bias:
                band_grad = grad_logits.sum(0)                       # the batch shares the bias
                if fused:
                    grad_by_rows[:, start:stop] += torch.ops.mmtransnext.bias_rows_backward(
                        band_grad, index, weight, by_rows.shape[-1])
                else:
                    torch.autograd.backward(
                        band_bias, band_grad.view(heads, stop - start, width, pool_h, pool_w))
        if want_bias and not fused:
            grad_by_rows = by_rows_leaf.grad
        return grad_query, grad_key, grad_value, grad_by_rows if want_bias else None, None


def banded_bias_attention(query: Tensor, key: Tensor, value: Tensor, bias) -> tuple:
    """``softmax(query @ key^T + bias) @ value`` and its log-sum-exp, in bands of rows.

    Args:
        query (Tensor): ``(B, heads, N, d)``, already scaled; ``N = H * W``.
        key (Tensor): ``(B, heads, P, d)`` with ``P = Hp * Wp``.
        value (Tensor): ``(B, heads, P, dv)``.
        bias (RowFactoredBias): the ``(heads, N, P)`` bias, shared by the batch;
            its layout gives ``(H, W)`` and ``(Hp, Wp)``. Gradients reach the
            tensors it was built from.

    Returns:
        tuple[Tensor, Tensor]: the output ``(B, heads, N, dv)`` and the log-sum-exp
        of each query's logits ``(B, heads, N)``.
    """
    check_bias_attention_args('banded_bias_attention', query, key, value, bias)
    return _BandedBiasAttention.apply(query, key, value, bias.by_rows, bias)
