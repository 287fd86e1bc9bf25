"""TransNeXt's token mixers: aggregated attention and full attention.

Each module has two ways to compute the same numbers:

* the *reference* path, the released model's algorithm: the local window
  gathered with ``unfold``, the pooled bias built whole, local and pooled logits
  concatenated into one ``(B, heads, N, L + P)`` softmax;
* the *default* path, taken when the compiled sliding-window op serves the
  input's device (see :func:`mmtransnext.ops.use_compiled_op`): the local window
  through the compiled op, the pooled keys through biased attention that never
  builds the ``N x P`` bias, and the two softmaxes merged by their log-sum-exp.
  The biased attention is, by :func:`mmtransnext.ops.use_fused_attention`, the
  fused Triton kernels on CUDA and
  :func:`~mmtransnext.ops.banded_attention.banded_bias_attention` elsewhere.

While a graph is captured (torch.compile, torch.export, ONNX) both take the
reference's structure; the default path keeps the compiled window op in it
(see :mod:`mmtransnext.ops.graph_capture`).
"""
import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops import (reference_requested, sliding_window_aggregate, sliding_window_logits,
                   sliding_window_logits_reference, use_compiled_op)
from ..ops.banded_attention import banded_bias_attention
from ..ops.fused_attention import fused_bias_attention, use_fused_attention
from ..ops.fused_merged_softmax import merged_softmax, merged_softmax_grad
from ..ops.fused_query_terms import query_terms, query_terms_grads
from ..ops.fused_unit_vectors import unit_vectors, unit_vectors_grad
from ..ops.graph_capture import capturing_graph, exporting_graph, run_outside_graph
from .position_bias import (BiasLayout, OffsetMLP, RowFactoredBias, bias_layout,
                            expand_bias)

# Hidden width of the position-bias MLP, as released.
_CPB_HIDDEN = 512
# softplus(temperature) starts at 1 / 0.24.
_INITIAL_TEMPERATURE = math.log(math.exp(1 / 0.24) - 1)


def _local_scale(height: int, width: int, window_size: int, pooled: int,
                 device: torch.device) -> Tensor:
    """``ln(valid(n) + P)`` per token: ``(N, 1)``, valid(n) = window cells inside the map.

    Cached in eager mode; a captured graph computes it from its (symbolic) sizes.
    """
    if capturing_graph():
        return _window_scale(height, width, window_size, pooled, device)
    return _cached_window_scale(height, width, window_size, pooled, device)


def _window_scale(height, width, window_size, pooled, device) -> Tensor:
    half = window_size // 2

    def inside(length):
        pos = torch.arange(length)
        return (torch.clamp(pos + half, max=length - 1) - torch.clamp(pos - half, min=0) + 1)

    valid = inside(height)[:, None] * inside(width)[None, :]
    return torch.log(valid.reshape(-1, 1).double() + pooled).float().to(device)


def _uncast_core(core, device_type: str, *operands):
    """``core(*operands)`` with autocast off: the operands are in the core's dtype."""
    with torch.autocast(device_type, enabled=False):
        return core(*operands)


def _run_core(eager_core, released_core, x: Tensor, operands: tuple) -> Tensor:
    """The one rule for which form of an attention core runs, on ``operands`` already
    in the core's dtype (:func:`_one_dtype`) and with autocast off.

    ``eager_core`` (merged softmaxes, the bias in row-factored form) runs in eager mode
    where the compiled op serves ``x``; ``released_core`` (the released structure, the
    bias built whole) on the reference path and in captured graphs. Except that under
    torch.compile, where the fused kernels serve the queries
    (:func:`~mmtransnext.ops.use_fused_attention`), ``eager_core`` runs outside the
    graph (:func:`~mmtransnext.ops.graph_capture.run_outside_graph`): the released
    structure's ``N x P`` bias and logits would take most of the memory (its eager
    TransNeXt-T training step at 2x800x1333 peaks at 26 GB on an H100, the default
    path's at 3.8 GB). Exports need one whole graph and take the released structure.
    """
    device_type = x.device.type
    if capturing_graph() and not exporting_graph() and use_fused_attention(operands[0]):
        return run_outside_graph(_uncast_core, eager_core, device_type, *operands)
    core = eager_core if use_compiled_op(x) and not capturing_graph() else released_core
    return _uncast_core(core, device_type, *operands)


def _bias_attention(query: Tensor):
    """Fused kernels or bands for ``query``, by :func:`~mmtransnext.ops.use_fused_attention`.

    Both names are looked up at each call, so tools may swap them (get_flops does).
    """
    return fused_bias_attention if use_fused_attention(query) else banded_bias_attention


_cached_window_scale = lru_cache(maxsize=64)(_window_scale)


def _adaptive_avg_pool(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` of a ``(B, C, H, W)`` map.

    In a captured graph the sizes may be symbolic, which Inductor's pooling and ONNX's
    pooling operators do not take; the pool is then the same bin averages as two
    matmuls with averaging matrices (equal up to float rounding).
    """
    if not capturing_graph():
        return F.adaptive_avg_pool2d(x, size)
    rows = _bin_average_matrix(x.shape[-2], size[0], x)
    cols = _bin_average_matrix(x.shape[-1], size[1], x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def _bin_average_matrix(length, bins, like: Tensor) -> Tensor:
    """``(bins, length)``: row ``k`` averages cells ``floor(k*L/bins) .. ceil((k+1)*L/bins)-1``."""
    k = torch.arange(bins, device=like.device)
    start = torch.div(k * length, bins, rounding_mode='floor')
    stop = -torch.div(-(k + 1) * length, bins, rounding_mode='floor')
    cells = torch.arange(length, device=like.device)
    member = (cells[None, :] >= start[:, None]) & (cells[None, :] < stop[:, None])
    return member.to(like.dtype) / (stop - start).to(like.dtype)[:, None]


def core_dtype(device_type: str, autocast_dtype: Optional[torch.dtype],
               dtypes) -> torch.dtype:
    """The dtype the attention core runs in: the one dtype policy of the model.

    On CUDA under autocast, the autocast dtype (float16 or bfloat16): the window
    kernels take it with float32 accumulation and the softmax statistics are kept in
    float32. Anywhere else float32, or float64 for float64 models: the CPU band
    kernels take float32 and float64 only, and the CPU window kernels run bfloat16
    no faster than float32 (``tools/benchmark_op.py --dtype bfloat16``).

    Args:
        device_type (str): the input's device type, e.g. ``'cuda'`` or ``'cpu'``.
        autocast_dtype (torch.dtype, optional): the active autocast dtype of that
            device type, None when autocast is off.
        dtypes (Iterable[torch.dtype]): the floating dtypes of the core's operands.

    Returns:
        torch.dtype: the dtype every floating operand is cast to, once.
    """
    if device_type == 'cuda' and autocast_dtype is not None:
        return autocast_dtype
    common = torch.float32
    for dtype in dtypes:
        common = torch.promote_types(common, dtype)
    return common


# torch >= 2.4 asks autocast by device type. Chosen once here, not by catching the
# TypeError of older torch: under torch.compile on torch 2.1 that error surfaces as
# Dynamo's own.
_AUTOCAST_BY_DEVICE = hasattr(torch, 'get_autocast_dtype')


def _active_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if _AUTOCAST_BY_DEVICE:
        enabled = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if enabled else None
    if device_type == 'cuda':
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == 'cpu':
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def _one_dtype(items, device_type: str):
    """``items`` with every floating tensor cast to :func:`core_dtype`'s dtype.

    Under autocast the projections come out in the low-precision dtype while some
    normalisations and the parameters stay float32, and the window ops take one
    dtype for all operands. Each operand is cast once, straight to the core's dtype
    (a no-op where it already has it); the core then runs with autocast off. A cast
    also lays the operand out contiguous: every kernel of the core reads its operands
    so, and the heads of queries and keys are strided views of their projections,
    which each kernel would otherwise copy again. An operand already in the dtype is
    left as it is (a copy here would be kept for the backward beside the projection).
    """
    dtype = core_dtype(device_type, _active_autocast_dtype(device_type),
                       [t.dtype for t in items if torch.is_tensor(t) and t.is_floating_point()])
    return tuple(t.to(dtype, memory_format=torch.contiguous_format)
                 if torch.is_tensor(t) and t.is_floating_point() and t.dtype != dtype else t
                 for t in items)


def _cast_for_autocast(x: Tensor) -> Tensor:
    """``x`` in the autocast dtype where autocast is on for its device, else as it is.

    Autocast casts the input of each projection apart: ``q``, ``kv`` and ``sr`` would
    make three copies of the block's normed tokens and add three gradients back. Cast
    once, the three share one copy, and their gradients are summed in the autocast
    dtype (as for any tensor produced in it) before the one cast back. Autocast leaves
    float64 alone, and so does this.
    """
    dtype = _active_autocast_dtype(x.device.type)
    return x if dtype is None or x.dtype in (dtype, torch.float64) else x.to(dtype)


def autocast_weights(layers, like: Tensor) -> Optional[dict]:
    """The weights and biases of ``layers`` in the autocast dtype, cast in one operator.

    Autocast casts each linear or convolution layer's weight and bias apart, and
    autograd casts each gradient back: two operators a tensor, fourteen each way in a
    TransNeXt block, which a GPU's training step waits on the host to issue
    (``docs/benchmarks.md``). Here they are laid end to end, cast once and cut into
    views; their gradients come back through one cast too. Same numbers.

    Args:
        layers (Iterable[nn.Module]): ``nn.Linear`` and ``nn.Conv2d`` layers.
        like (Tensor): the block's input; its device type's autocast state decides.

    Returns:
        dict | None: each weight and bias (the Parameter as key) to its cast, for
        :func:`apply_layer`; None where autocast is off, in captured graphs and on the
        reference path, which leave the casts to autocast.
    """
    dtype = _active_autocast_dtype(like.device.type)
    if dtype is None or capturing_graph() or torch.jit.is_tracing() or reference_requested():
        return None
    params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    if any(p.dtype != torch.float32 for p in params):  # autocast casts float32 only
        return None
    flat = torch.cat([p.reshape(-1) for p in params]).to(dtype)
    parts = flat.split([p.numel() for p in params])
    return {p: part.view(p.shape) for p, part in zip(params, parts)}


def apply_layer(layer: nn.Module, x: Tensor, weights: Optional[dict]) -> Tensor:
    """``layer(x)`` for an ``nn.Linear`` or ``nn.Conv2d``, with its weight and bias
    from ``weights`` (:func:`autocast_weights`) where given."""
    if weights is None:
        return layer(x)
    bias = None if layer.bias is None else weights[layer.bias]
    if isinstance(layer, nn.Linear):
        return F.linear(x, weights[layer.weight], bias)
    return layer._conv_forward(x, weights[layer.weight], bias)


def _as_input(out: Tensor, x: Tensor) -> Tensor:
    """The core's output in the dtype of the block's input ``x`` outside autocast.

    Outside CUDA autocast the core runs in float32 or wider (:func:`core_dtype`), so a
    model cast to float16 or bfloat16 would hand float32 to its float16 ``proj``;
    under autocast ``proj`` casts by itself.
    """
    if _active_autocast_dtype(x.device.type) is None:
        return out.to(x.dtype)
    return out


def _stats_dtype(tensor: Tensor) -> torch.dtype:
    """Softmax statistics (maxima, sums, log-sum-exps) run in float32 or wider.

    Decided in Python: ``torch.promote_types`` is an operator the host dispatches.
    """
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _unit_divisor(x: Tensor) -> Tensor:
    """What :func:`_unit_vectors` divides ``x`` by: its norm over the last dim, or
    infinity where that is at most 1e-12 (a zero vector then divides to zero).

    Taken in float32 or wider: in float16 the squares of entries over 256 overflow and
    those under 2**-12 vanish.
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=_stats_dtype(x))
    return norm.masked_fill(norm <= 1e-12, math.inf)


class _UnitVectors(torch.autograd.Function):
    """``x / _unit_divisor(x)`` with its gradient in one formula.

    ``d(x / n) = (g - u (g . u)) / n`` with ``u = x / n``: a backward of five operators
    where autograd's, through the norm, the mask and the division, takes fourteen
    (torch 2.13). On a GPU the training step of TransNeXt-T waits on the host's
    launches, and the model normalises three tensors per attention layer; where the
    fused kernels serve ``x`` (:func:`~mmtransnext.ops.use_fused_attention`) one Triton
    kernel each way does it (:mod:`~mmtransnext.ops.fused_unit_vectors`). At a zero
    vector the divisor is infinite, so the gradient is zero. The output is contiguous
    whatever the layout of ``x`` (the heads of a projection are strided), as the kernels
    downstream read it.
    """

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.fused = use_fused_attention(x)
        if ctx.fused:   # one kernel each way
            ctx.save_for_backward(x)
            return unit_vectors(x, dtype)
        divisor = _unit_divisor(x)
        ctx.save_for_backward(x, divisor)
        return torch.div(x, divisor, out=x.new_empty(x.shape, dtype=dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.fused:
            return unit_vectors_grad(ctx.saved_tensors[0], grad), None
        x, divisor = ctx.saved_tensors
        grad = grad.to(divisor.dtype)
        unit = x / divisor
        along = torch.linalg.vecdot(grad, unit).unsqueeze(-1)
        return torch.addcmul(grad, unit, along, value=-1).div_(divisor).to(x.dtype), None


class _MergedSoftmax(torch.autograd.Function):
    """The softmax over the window's logits and the pooled keys' log-sum-exp, plus the
    learnable tokens' weights, in the fused kernels
    (:mod:`~mmtransnext.ops.fused_merged_softmax`).

    ``apply(local, lse, token_weights)`` returns the window's weights plus
    ``token_weights`` and the pooled keys' weight ``(B, heads, N, 1)``.
    """

    @staticmethod
    def forward(ctx, local, lse, token_weights):
        ctx.save_for_backward(local, lse)
        return merged_softmax(local, lse, token_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, grad_pooled):
        local, lse = ctx.saved_tensors
        grad_local, grad_lse = merged_softmax_grad(local, lse, grad_weights, grad_pooled)
        # The tokens' weights are added: their gradient is the weights'.
        return grad_local, grad_lse, grad_weights


class _QueryTerms(torch.autograd.Function):
    """:meth:`_PositionBiasAttention._query_terms` in the fused kernels, with gradients.

    ``apply(unit, embedding, temperature, scale, tokens, token_bias, dtype)``; ``tokens``
    may be None (then no weights), ``scale`` a tensor (no gradient) or a number.
    """

    @staticmethod
    def forward(ctx, unit, embedding, temperature, scale, tokens, token_bias, dtype):
        ctx.save_for_backward(unit, embedding, temperature, tokens)
        ctx.scale = scale
        return query_terms(unit, embedding, temperature, scale, tokens, token_bias, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_query, grad_weights):
        unit, embedding, temperature, tokens = ctx.saved_tensors
        grad_unit, grad_embedding, grad_temperature, grad_tokens, grad_bias = query_terms_grads(
            unit, embedding, temperature, ctx.scale, tokens, grad_query, grad_weights)
        if tokens is not None:
            grad_tokens, grad_bias = grad_tokens.to(tokens.dtype), grad_bias.to(tokens.dtype)
        return (grad_unit, grad_embedding.to(embedding.dtype),
                grad_temperature.to(temperature.dtype), None, grad_tokens, grad_bias, None)


def _unit_vectors(x: Tensor, into_core: bool = False) -> Tensor:
    """``x / ||x||`` over the last dim, zero where ``||x|| <= 1e-12``.

    ``F.normalize`` in every other respect: the same value wherever the norm exceeds
    its ``eps`` (1e-12), bit for bit in float32, and the same dtype as under CUDA
    autocast (float32) and without autocast (``x``'s). With ``into_core`` (the keys,
    which enter the attention core as they are) the output under autocast takes the
    core's dtype (:func:`core_dtype`) at once, the same numbers as a later cast to it
    without that cast and its gradient's. Two things differ from ``F.normalize``. The
    norm is taken in float32 or wider (see :func:`_unit_divisor`). And a zero vector,
    which ``F.normalize`` divides by ``eps``, has zero output and zero gradient: its
    gradient there, the upstream gradient times 1e12, overflowed float16 at any loss
    scale. Tokens are zero vectors wherever an image's padding meets zero biases (the
    release's initialisation, training from scratch), and a float16 Mask R-CNN had
    every step skipped by its loss scaler.

    Eager mode takes the gradient from :class:`_UnitVectors`; a captured or traced
    graph takes the same forward as plain operators, which autograd differentiates.
    """
    autocast_dtype = _active_autocast_dtype(x.device.type)
    if autocast_dtype is None:
        dtype = x.dtype
    elif into_core:
        dtype = core_dtype(x.device.type, autocast_dtype, [_stats_dtype(x)])
    else:
        dtype = _stats_dtype(x)
    if capturing_graph() or torch.jit.is_tracing():
        return (x / _unit_divisor(x)).to(dtype)
    return _UnitVectors.apply(x, dtype)


class _PositionBiasAttention(nn.Module):
    """What both attentions share: scaled cosine queries and the continuous bias.

    Args:
        dim (int): channels ``C``.
        num_heads (int): heads ``h``; ``C`` must divide by it.
        build_size (int, optional): the square query grid the bias is built on
            and then resized from (interpolation mode); ``None`` builds it on the
            run-time grid (extrapolation mode).
        build_pool_size (int, optional): the square key grid the bias is built on
            in interpolation mode.
        pretrain_size (int): the square grid of pretraining that normalises the
            relative offsets.
    """

    def __init__(self, dim: int, num_heads: int, build_size: Optional[int],
                 build_pool_size: Optional[int], pretrain_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'{dim} channels do not split into {num_heads} heads')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.build_size = build_size
        self.build_pool_size = build_pool_size
        self.pretrain_size = pretrain_size
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), _INITIAL_TEMPERATURE))
        self.query_embedding = nn.Parameter(torch.empty(num_heads, 1, self.head_dim))
        self.cpb_fc1 = nn.Linear(2, _CPB_HIDDEN)
        self.cpb_act = nn.ReLU(inplace=True)
        self.cpb_fc2 = nn.Linear(_CPB_HIDDEN, num_heads)
        self.proj = nn.Linear(dim, dim)
        self._bias_cache = None

    def _reset_attention_parameters(self):
        trunc_normal_(self.query_embedding, std=0.02)
        nn.init.constant_(self.temperature, _INITIAL_TEMPERATURE)

    def _query_terms(self, query: Tensor, scale, tokens: Tensor = None,
                     token_bias: Tensor = None) -> Tuple[Tensor, Optional[Tensor]]:
        """The scaled queries and, given ``tokens``, the learnable tokens' weights.

        Args:
            query (Tensor): ``(B, heads, N, d)`` unit queries.
            scale (Tensor | float): ``(N, 1)`` each query's scale, or one for all.
            tokens (Tensor, optional): ``(heads, d, L)``; ``token_bias`` ``(heads, 1, L)``.

        Returns:
            tuple[Tensor, Tensor | None]: ``(query + embedding) * softplus(temperature)
            * scale`` and ``query @ tokens + token_bias``. Where the fused kernels serve
            the queries, both from one kernel (:mod:`~mmtransnext.ops.fused_query_terms`)
            in float32, written in the core's dtype.
        """
        if use_fused_attention(query) and not (capturing_graph() or torch.jit.is_tracing()):
            dtype = core_dtype(query.device.type, _active_autocast_dtype(query.device.type),
                               [query.dtype, self.query_embedding.dtype])
            return _QueryTerms.apply(query, self.query_embedding, self.temperature, scale,
                                     tokens, token_bias, dtype)
        scaled = (query + self.query_embedding) * F.softplus(self.temperature) * scale
        return scaled, (query @ tokens + token_bias if tokens is not None else None)

    def _layout(self, query_size, key_size, device) -> BiasLayout:
        if self.build_size is None:    # extrapolation: evaluate on the run-time grids
            build_query, build_key = query_size, key_size
        else:
            build_query = (self.build_size, self.build_size)
            build_key = ((self.build_pool_size, ) * 2 if self.build_pool_size is not None
                         else build_query)
        # Cached in eager mode; a captured graph's sizes may be symbolic (unhashable).
        layout = bias_layout.__wrapped__ if capturing_graph() else bias_layout
        return layout(tuple(build_query), tuple(build_key),
                      (self.pretrain_size, self.pretrain_size),
                      tuple(query_size), tuple(key_size), device)

    def _bias_table(self, layout: BiasLayout, dtype) -> Tensor:
        """The MLP on the layout's offsets: ``(heads, Uh, Uw)``, the released way."""
        coords = (layout.offset_grid() if capturing_graph() else layout.coords)
        coords = coords.to(self.cpb_fc1.weight.dtype)
        table = self.cpb_fc2(self.cpb_act(self.cpb_fc1(coords))).permute(2, 0, 1)
        return table.to(dtype)

    def _chunked_bias_table(self, layout: BiasLayout) -> Tensor:
        """The same table through :class:`OffsetMLP`, which keeps no hidden layer, in
        the weights' dtype."""
        return OffsetMLP.apply(layout.offsets_h, layout.offsets_w, self.cpb_fc1.weight,
                               self.cpb_fc1.bias, self.cpb_fc2.weight, self.cpb_fc2.bias)

    def _full_bias(self, query_size, key_size, like: Tensor) -> Tensor:
        """The whole ``(heads, N, P)`` bias, as the released model builds it."""
        layout = self._layout(query_size, key_size, like.device)
        return expand_bias(self._bias_table(layout, like.dtype), layout)

    def _factored_bias(self, query_size, key_size, like: Tensor) -> RowFactoredBias:
        """The bias in row-factored form; reused across calls while inference weights stay."""
        cacheable = not torch.is_grad_enabled()
        if cacheable:
            params = (self.cpb_fc1.weight, self.cpb_fc1.bias, self.cpb_fc2.weight,
                      self.cpb_fc2.bias)
            # A weight update bumps _version; loading new weights changes the storage.
            key = (tuple(query_size), tuple(key_size), like.device, like.dtype,
                   tuple((p.data_ptr(), p._version) for p in params))
            if self._bias_cache is not None and self._bias_cache[0] == key:
                return self._bias_cache[1]
        layout = self._layout(query_size, key_size, like.device)
        table = self._chunked_bias_table(layout)
        if not use_fused_attention(like):  # the fused kernels cast it as they expand it
            table = table.to(like.dtype)
        bias = RowFactoredBias(table, layout)
        self._bias_cache = (key, bias) if cacheable else None
        return bias


class AggregatedAttention(_PositionBiasAttention):
    """Pixel-focused attention: a ws x ws window plus pooled keys, one softmax.

    Args:
        dim (int): channels ``C``.
        num_heads (int): heads ``h``.
        window_size (int): odd side ``ws`` of the local window.
        sr_ratio (int): pooling ratio of the periphery, ``Hp = H // sr``.
        build_size (int, optional): see :class:`_PositionBiasAttention`.
        build_pool_size (int, optional): see :class:`_PositionBiasAttention`.
        pretrain_size (int): see :class:`_PositionBiasAttention`.
        fixed_pool_size (int, optional): pool to ``S x S`` whatever the input
            (linear inference mode). Default: None.
        qkv_bias (bool): biases in ``q`` and ``kv``. Default: True.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, sr_ratio: int,
                 build_size: Optional[int], build_pool_size: Optional[int],
                 pretrain_size: int, fixed_pool_size: Optional[int] = None,
                 qkv_bias: bool = True):
        super().__init__(dim, num_heads, build_size, build_pool_size, pretrain_size)
        self.window_size = window_size
        self.local_len = window_size * window_size
        self.sr_ratio = sr_ratio
        self.fixed_pool_size = fixed_pool_size
        self.relative_pos_bias_local = nn.Parameter(torch.empty(num_heads, self.local_len))
        self.learnable_tokens = nn.Parameter(torch.empty(num_heads, self.head_dim, self.local_len))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, self.local_len))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        # A module built on its own never holds uninitialised memory (NaN, at random).
        self.reset_attention_parameters()

    def reset_attention_parameters(self):
        """Training-from-scratch values of the attention's own parameters."""
        self._reset_attention_parameters()
        trunc_normal_(self.relative_pos_bias_local, std=0.0004)
        trunc_normal_(self.learnable_tokens, std=0.02)
        nn.init.zeros_(self.learnable_bias)

    def pool_size(self, height: int, width: int) -> Tuple[int, int]:
        """The pooled grid ``(Hp, Wp)`` for a map; never smaller than 1x1."""
        if self.fixed_pool_size is not None:
            return self.fixed_pool_size, self.fixed_pool_size
        if capturing_graph():
            if torch.is_tensor(height):
                # The TorchScript-based ONNX exporter (dynamo=False) traces sizes as tensors.
                return (torch.clamp(height // self.sr_ratio, min=1),
                        torch.clamp(width // self.sr_ratio, min=1))
            # sym_max keeps symbolic sizes symbolic (max() would guard on them); it takes
            # no tensors, which is what torch.jit.trace (the FLOP counter) passes.
            return (torch.sym_max(height // self.sr_ratio, 1),
                    torch.sym_max(width // self.sr_ratio, 1))
        return max(height // self.sr_ratio, 1), max(width // self.sr_ratio, 1)

    def autocast_layers(self) -> tuple:
        """The layers whose weights :func:`autocast_weights` casts."""
        return self.q, self.kv, self.sr, self.proj

    def _project(self, x: Tensor, height: int, width: int, weights: Optional[dict] = None
                 ) -> tuple:
        """Queries, keys and values of the window and of the periphery; ``weights`` as
        :meth:`forward`'s."""
        batch, tokens, channels = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        pool_h, pool_w = self.pool_size(height, width)
        pooled = pool_h * pool_w

        scale = _local_scale(height, width, self.window_size, pooled, x.device).to(x.dtype)
        x = _cast_for_autocast(x)
        query = _unit_vectors(apply_layer(self.q, x, weights).view(
            batch, tokens, heads, head_dim).transpose(1, 2))
        key, value = apply_layer(self.kv, x, weights).view(
            batch, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        key = _unit_vectors(key, into_core=True)
        # Learnable tokens: extra, query-dependent weights on the local values
        # (from the unscaled query), added after the softmax.
        query_scaled, token_weights = self._query_terms(query, scale, self.learnable_tokens,
                                                        self.learnable_bias)

        # The periphery: keys and values of the pooled map, through the same kv.
        periphery = self.act(apply_layer(
            self.sr, x.transpose(1, 2).reshape(batch, channels, height, width), weights))
        periphery = _adaptive_avg_pool(periphery, (pool_h, pool_w))
        periphery = self.norm(periphery.reshape(batch, channels, pooled).transpose(1, 2))
        pool_key, pool_value = apply_layer(self.kv, periphery, weights).view(
            batch, pooled, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        pool_key = _unit_vectors(pool_key, into_core=True)
        return (query_scaled, key, value, pool_key, pool_value, token_weights, height, width,
                (pool_h, pool_w))

    def forward(self, x: Tensor, height: int, width: int,
                weights: Optional[dict] = None) -> Tensor:
        """Args: x ``(B, N, C)`` tokens of an ``height x width`` map; ``weights`` the
        projections' weights cast by :func:`autocast_weights`, or None. Returns
        ``(B, N, C)``."""
        batch, tokens, channels = x.shape
        operands = _one_dtype(self._project(x, height, width, weights), x.device.type)
        out = _run_core(self._merged_softmax, self._joint_softmax, x, operands)
        return apply_layer(self.proj, _as_input(out, x).transpose(1, 2).reshape(
            batch, tokens, channels), weights)

    @torch.no_grad()
    def attention_maps(self, x: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor]:
        """The softmax weights every token gives its window and the pooled map.

        For inspection (the fovea and periphery of each pixel); materialises
        ``(B, heads, N, L + P)`` weights.

        Args:
            x (Tensor): ``(B, N, C)`` the block's normed input tokens.
            height (int): map height ``H``.
            width (int): map width ``W``.

        Returns:
            tuple[Tensor, Tensor]: window weights ``(B, heads, N, ws*ws)`` (zero
            outside the map) and pooled weights ``(B, heads, N, Hp*Wp)``.
        """
        query, key, _, pool_key, _, _, height, width, pool_size = self._project(x, height, width)
        local = sliding_window_logits_reference(query, key, self.relative_pos_bias_local,
                                                height, width, self.window_size)
        pooled = query @ pool_key.transpose(-2, -1) + self._full_bias((height, width),
                                                                       pool_size, query)
        attn = torch.cat([local, pooled], dim=-1).softmax(dim=-1)
        return tuple(attn.split([self.local_len, pooled.shape[-1]], dim=-1))

    def _joint_softmax(self, query, key, value, pool_key, pool_value, token_weights,
                       height, width, pool_size):
        """The released algorithm: one softmax over concatenated logits.

        The window ops dispatch as everywhere: in a captured graph of the default path
        they are the compiled op, on the reference path the released ``unfold``.
        """
        ws = self.window_size
        local = sliding_window_logits(query, key, self.relative_pos_bias_local.to(query.dtype),
                                      height, width, ws)
        bias = self._full_bias((height, width), pool_size, query)
        pooled = query @ pool_key.transpose(-2, -1) + bias
        attn = torch.cat([local, pooled], dim=-1).softmax(dim=-1, dtype=_stats_dtype(query))
        attn = attn.to(query.dtype)
        attn_local, attn_pooled = attn.split([self.local_len, pooled.shape[-1]], dim=-1)
        out = sliding_window_aggregate(attn_local + token_weights, value, height, width, ws)
        return out + attn_pooled @ pool_value

    def _merged_softmax(self, query, key, value, pool_key, pool_value, token_weights,
                        height, width, pool_size):
        """The same softmax with the pooled keys' part done apart.

        The biased attention over the pooled keys returns its output and the log-sum-exp
        of its logits. A softmax over the window's logits and that log-sum-exp gives each
        window cell's weight and the pooled part's total weight, as the one softmax over
        all logits would; the pooled part's output is scaled by its total weight.
        """
        ws = self.window_size
        local = sliding_window_logits(query, key, self.relative_pos_bias_local.to(query.dtype),
                                      height, width, ws)
        bias = self._factored_bias((height, width), pool_size, query)
        out_pooled, lse_pooled = _bias_attention(query)(query, pool_key, pool_value, bias)
        if use_fused_attention(query):    # one kernel each way
            weights, attn_pooled = _MergedSoftmax.apply(local, lse_pooled, token_weights)
        else:
            # The log-sum-exp is float32 or wider: cat promotes the window's logits to
            # its dtype in the one copy it makes.
            logits = torch.cat([local, lse_pooled.unsqueeze(-1)], dim=-1)
            attn_local, attn_pooled = logits.softmax(dim=-1, dtype=_stats_dtype(query)).to(
                query.dtype).split([self.local_len, 1], dim=-1)
            weights = attn_local + token_weights
        out = sliding_window_aggregate(weights, value, height, width, ws)
        return out + attn_pooled * out_pooled


class FullAttention(_PositionBiasAttention):
    """Multi-head self-attention over all tokens with the continuous bias (last stage).

    Args:
        dim (int): channels ``C``.
        num_heads (int): heads ``h``.
        build_size (int, optional): see :class:`_PositionBiasAttention`.
        pretrain_size (int): see :class:`_PositionBiasAttention`.
        qkv_bias (bool): bias in ``qkv``. Default: True.
    """

    def __init__(self, dim: int, num_heads: int, build_size: Optional[int], pretrain_size: int,
                 qkv_bias: bool = True):
        super().__init__(dim, num_heads, build_size, None, pretrain_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.reset_attention_parameters()  # never uninitialised memory

    def reset_attention_parameters(self):
        """Training-from-scratch values of the attention's own parameters."""
        self._reset_attention_parameters()

    def autocast_layers(self) -> tuple:
        """The layers whose weights :func:`autocast_weights` casts."""
        return self.qkv, self.proj

    def forward(self, x: Tensor, height: int, width: int,
                weights: Optional[dict] = None) -> Tensor:
        """Args: x ``(B, N, C)`` tokens of an ``height x width`` map; ``weights`` as
        :meth:`AggregatedAttention.forward`'s. Returns ``(B, N, C)``."""
        batch, tokens, channels = x.shape
        query, key, value = apply_layer(self.qkv, x, weights).view(
            batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if capturing_graph():     # keep a symbolic token count symbolic: log in the graph
            scale = torch.full((), tokens, dtype=torch.float64, device=x.device).log()
        else:
            scale = math.log(tokens)
        query, _ = self._query_terms(_unit_vectors(query), scale)
        key = _unit_vectors(key, into_core=True)
        operands = _one_dtype((query, key, value), x.device.type) + ((height, width), )
        out = _run_core(self._factored_core, self._whole_core, x, operands)
        return apply_layer(self.proj, _as_input(out, x).transpose(1, 2).reshape(
            batch, tokens, channels), weights)

    def _factored_core(self, query, key, value, size):
        """Attention with the bias in row-factored form, never built whole."""
        out, _ = _bias_attention(query)(query, key, value, self._factored_bias(size, size, query))
        return out

    def _whole_core(self, query, key, value, size):
        """The released algorithm: the whole ``(heads, N, N)`` bias and softmax."""
        attn = (query @ key.transpose(-2, -1) +
                self._full_bias(size, size, query)).softmax(-1, dtype=_stats_dtype(query))
        return attn.to(value.dtype) @ value
