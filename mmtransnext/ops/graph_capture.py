"""What the model computes while a graph is captured (torch.compile, torch.export, ONNX).

The default path's memory savers (the banded pooled attention, the chunked
position-bias MLP, the bias cache) are Python loops and hand-written backward
passes over tensors whose sizes depend on the input: a graph capture would unroll
or refuse them. While a graph is captured the model therefore takes the released
algorithm's structure (one softmax over the window and the pooled keys, the bias
built whole) and keeps the compiled window op, which has fake kernels and an
autograd formula, as one node ``torch.ops.mmtransnext.*`` of the graph.

One exception: where the fused GPU kernels serve the attention core, ``torch.compile``
leaves the core out of its graphs (:func:`run_outside_graph`, a graph break per
attention layer) and the core runs as in eager mode, fused, without the ``N x P`` bias
and logits that the released structure builds; the compiled graphs hold the rest
(projections, norms, the GLU). An export (``torch.export``, ONNX) needs one whole graph
and takes the released structure there too (:func:`exporting_graph`).

ONNX has no such node, so during an ONNX export the window op is written in standard
operators instead: the window as a zero padding and ``ws * ws`` shifted slices of the
map, with ``-inf`` logits where a neighbour lies outside it. Both exporters
(``torch.onnx.export`` with ``dynamo=True``, the default, or ``False``) take this
form without any setting.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['capturing_graph', 'exporting_graph', 'run_outside_graph',
           'sliding_window_logits_decomposed', 'sliding_window_aggregate_decomposed']


# torch.compiler.is_compiling arrived in torch 2.3; torch 2.1-2.2 have Dynamo's own.
_is_compiling = getattr(torch.compiler, 'is_compiling', None) or torch._dynamo.is_compiling


# torch.compiler.is_exporting arrived in torch 2.6 (torch.export before it traces
# without telling); Dynamo's own disable serves where torch.compiler lacks one.
_is_exporting = getattr(torch.compiler, 'is_exporting', lambda: False)
_disable = getattr(torch.compiler, 'disable', None) or torch._dynamo.disable


def capturing_graph() -> bool:
    """Whether torch.compile, torch.export or an ONNX export is tracing the model."""
    return _is_compiling() or torch.onnx.is_in_onnx_export()


def exporting_graph() -> bool:
    """Whether torch.export or an ONNX export is tracing the model, which needs one
    whole graph (torch >= 2.6 tells torch.export apart from torch.compile)."""
    return torch.onnx.is_in_onnx_export() or _is_exporting()


@_disable
def run_outside_graph(function, *args):
    """``function(*args)`` run eagerly where torch.compile traces its caller.

    The caller's graph breaks before the call and resumes after it; inside,
    :func:`capturing_graph` is False and the eager code runs (Python loops, caches,
    Triton launches). Outside a capture it is a plain call.
    """
    return function(*args)


def _neighbours(x: Tensor, height: int, width: int, window_size: int):
    """``x`` ``(B, h, N, d)`` as ``ws * ws`` maps of each token's neighbour ``j``.

    Neighbour ``j = ki * ws + kj`` of token ``(r, c)`` is ``(r + ki - ws // 2,
    c + kj - ws // 2)``; outside the map it reads the zero padding.
    """
    batch, heads, tokens, dim = x.shape
    half = window_size // 2
    grid = F.pad(x.reshape(batch, heads, height, width, dim), (0, 0, half, half, half, half))
    return [grid[:, :, ki:ki + height, kj:kj + width].reshape(batch, heads, tokens, dim)
            for ki in range(window_size) for kj in range(window_size)]


def outside_mask(like: Tensor, height: int, width: int, window_size: int) -> Tensor:
    """``(N, ws * ws)`` bool: True where neighbour ``j`` of token ``n`` is outside the map.

    The one definition of the window's border, for the decomposed op here and the
    reference (:mod:`~mmtransnext.ops.sliding_window`); in pads and slices, so that it
    exports to ONNX. Made on ``like``'s device.
    """
    ones = torch.ones(1, 1, height * width, 1, dtype=like.dtype, device=like.device)
    inside = torch.cat(_neighbours(ones, height, width, window_size), dim=-1)
    return inside[0, 0] == 0


def sliding_window_logits_decomposed(query: Tensor, key: Tensor, bias: Tensor, height: int,
                                     width: int, window_size: int) -> Tensor:
    """:func:`~mmtransnext.ops.sliding_window_logits` in pads, slices and reductions.

    Args:
        query (Tensor): ``(B, heads, N, d)``, ``N = height * width``.
        key (Tensor): ``(B, heads, N, d)``.
        bias (Tensor): ``(heads, window_size**2)``.
        height (int): Feature map height.
        width (int): Feature map width.
        window_size (int): Odd window side ``ws``.

    Returns:
        Tensor: ``(B, heads, N, ws*ws)`` logits, ``-inf`` outside the map.
    """
    logits = torch.stack([(query * neighbour).sum(-1)
                          for neighbour in _neighbours(key, height, width, window_size)], -1)
    logits = logits + bias.unsqueeze(1)
    return logits.masked_fill(outside_mask(query, height, width, window_size), float('-inf'))


def sliding_window_aggregate_decomposed(weights: Tensor, value: Tensor, height: int,
                                        width: int, window_size: int) -> Tensor:
    """:func:`~mmtransnext.ops.sliding_window_aggregate` in pads, slices and sums.

    Args:
        weights (Tensor): ``(B, heads, N, window_size**2)``.
        value (Tensor): ``(B, heads, N, d)``, ``N = height * width``.
        height (int): Feature map height.
        width (int): Feature map width.
        window_size (int): Odd window side ``ws``.

    Returns:
        Tensor: ``(B, heads, N, d)``; outside neighbours read zeros, so their weights
        do not count.
    """
    out = None
    for j, neighbour in enumerate(_neighbours(value, height, width, window_size)):
        term = weights[..., j:j + 1] * neighbour
        out = term if out is None else out + term
    return out
