"""Triton kernels of :mod:`mmtransnext.ops.fused_query_terms`.

Imported only on first use, like :mod:`._fused_attention_kernels` (``TRITON_INTERPRET``
is read when the kernels are defined). ``UNIT (B*heads, N, d)`` are the unit queries,
contiguous; per head ``t``, ``EMBED (heads, d)`` the query embedding, ``TEMP (heads, )``
the temperature, ``TOKENS (heads, d, L)`` the learnable tokens and ``TOKEN_BIAS
(heads, L)`` their bias; ``SCALE (N, )`` each query's scale (``PER_TOKEN``) or
``scale_value`` for all. Then

    QUERY[t, n]   = (UNIT[t, n] + EMBED[t]) * softplus(TEMP[t]) * scale[n],
    WEIGHTS[t, n] = UNIT[t, n] @ TOKENS[t] + TOKEN_BIAS[t]          (HAS_TOKENS).

All arithmetic is float32 (the products with ``TOKENS`` too: ``d x L`` per query);
the backward adds the parameters' gradients, sums over every image and query, with
relaxed atomics.
"""
import triton
import triton.language as tl

#: Sizes that change with the input's size: unspecialised, so that new image sizes
#: reuse the binaries (see ``_fused_attention_kernels.SPATIAL_ARGS``).
SIZE_ARGS = ('tokens', )


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))``, ``x`` itself above 20 (as ``torch.nn.functional.softplus``)."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _block(UNIT, EMBED, TEMP, SCALE, scale_value, heads, tokens, dims,
           BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, PER_TOKEN: tl.constexpr):
    """A program's queries: rows, masks, unit queries, the head's embedding and
    temperature, and each query's scale, float32."""
    image_head = tl.program_id(1)
    head = image_head % heads
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dim = tl.arange(0, D_PAD)
    row_ok = row < tokens
    dim_ok = dim < dims
    flat = image_head.to(tl.int64) * tokens + row
    unit = tl.load(UNIT + flat[:, None] * dims + dim[None, :],
                   mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    embed = tl.load(EMBED + head * dims + dim, mask=dim_ok, other=0.0).to(tl.float32)
    temp = tl.load(TEMP + head).to(tl.float32)
    if PER_TOKEN:
        scale = tl.load(SCALE + row, mask=row_ok, other=0.0).to(tl.float32)
    else:
        scale = tl.where(row_ok, scale_value, 0.0)
    return head, row, dim, row_ok, dim_ok, flat, unit, embed, temp, scale


@triton.jit
def _token_matrix(TOKENS, head, dim, dim_ok, dims, taps, L_PAD: tl.constexpr):
    tap = tl.arange(0, L_PAD)
    tap_ok = tap < taps
    tokens = tl.load(TOKENS + head * dims * taps + dim[:, None] * taps + tap[None, :],
                     mask=dim_ok[:, None] & tap_ok[None, :], other=0.0).to(tl.float32)
    return tap, tap_ok, tokens


@triton.jit(do_not_specialize=SIZE_ARGS)
def query_terms_forward(UNIT, EMBED, TEMP, SCALE, TOKENS, TOKEN_BIAS, QUERY, WEIGHTS,
                        scale_value, heads, tokens, dims, taps,
                        BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, L_PAD: tl.constexpr,
                        PER_TOKEN: tl.constexpr, HAS_TOKENS: tl.constexpr):
    """``QUERY`` and (``HAS_TOKENS``) ``WEIGHTS``; grid ``(cdiv(N, BLOCK_R), B*heads)``."""
    head, row, dim, row_ok, dim_ok, flat, unit, embed, temp, scale = _block(
        UNIT, EMBED, TEMP, SCALE, scale_value, heads, tokens, dims, BLOCK_R, D_PAD, PER_TOKEN)
    # The operators' order: ((unit + embed) * softplus(temp)) * scale.
    query = (unit + embed[None, :]) * _softplus(temp) * scale[:, None]
    tl.store(QUERY + flat[:, None] * dims + dim[None, :], query.to(QUERY.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    if HAS_TOKENS:
        tap, tap_ok, matrix = _token_matrix(TOKENS, head, dim, dim_ok, dims, taps, L_PAD)
        bias = tl.load(TOKEN_BIAS + head * taps + tap, mask=tap_ok, other=0.0).to(tl.float32)
        weights = tl.dot(unit, matrix, input_precision='ieee') + bias[None, :]
        tl.store(WEIGHTS + flat[:, None] * taps + tap[None, :],
                 weights.to(WEIGHTS.dtype.element_ty), mask=row_ok[:, None] & tap_ok[None, :])


@triton.jit(do_not_specialize=SIZE_ARGS)
def query_terms_backward(UNIT, EMBED, TEMP, SCALE, TOKENS, GRAD_QUERY, GRAD_WEIGHTS,
                         GRAD_UNIT, GRAD_EMBED, GRAD_TEMP, GRAD_TOKENS, GRAD_TOKEN_BIAS,
                         scale_value, heads, tokens, dims, taps,
                         BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, L_PAD: tl.constexpr,
                         PER_TOKEN: tl.constexpr, HAS_TOKENS: tl.constexpr):
    """``GRAD_UNIT`` stored; the float32 ``GRAD_EMBED``, ``GRAD_TEMP``, ``GRAD_TOKENS``
    and ``GRAD_TOKEN_BIAS`` (zeroed) added to; ``GRAD_QUERY`` and ``GRAD_WEIGHTS``
    contiguous."""
    head, row, dim, row_ok, dim_ok, flat, unit, embed, temp, scale = _block(
        UNIT, EMBED, TEMP, SCALE, scale_value, heads, tokens, dims, BLOCK_R, D_PAD, PER_TOKEN)
    ok = row_ok[:, None] & dim_ok[None, :]
    grad = tl.load(GRAD_QUERY + flat[:, None] * dims + dim[None, :], mask=ok,
                   other=0.0).to(tl.float32)
    scaled = grad * scale[:, None]                       # d/d((unit + embed) * softplus)
    grad_unit = scaled * _softplus(temp)
    tl.atomic_add(GRAD_EMBED + head * dims + dim, tl.sum(grad_unit, axis=0), mask=dim_ok,
                  sem='relaxed')
    # d softplus(t) / dt = sigmoid(t)
    along = tl.sum(tl.sum(scaled * (unit + embed[None, :]), axis=1), axis=0)
    tl.atomic_add(GRAD_TEMP + head, along / (1.0 + tl.exp(-temp)), sem='relaxed')
    if HAS_TOKENS:
        tap, tap_ok, matrix = _token_matrix(TOKENS, head, dim, dim_ok, dims, taps, L_PAD)
        tap_mask = row_ok[:, None] & tap_ok[None, :]
        grad_weights = tl.load(GRAD_WEIGHTS + flat[:, None] * taps + tap[None, :],
                               mask=tap_mask, other=0.0).to(tl.float32)
        grad_unit += tl.dot(grad_weights, tl.trans(matrix), input_precision='ieee')
        tl.atomic_add(GRAD_TOKENS + head * dims * taps + dim[:, None] * taps + tap[None, :],
                      tl.dot(tl.trans(unit), grad_weights, input_precision='ieee'),
                      mask=dim_ok[:, None] & tap_ok[None, :], sem='relaxed')
        tl.atomic_add(GRAD_TOKEN_BIAS + head * taps + tap, tl.sum(grad_weights, axis=0),
                      mask=tap_ok, sem='relaxed')
    tl.store(GRAD_UNIT + flat[:, None] * dims + dim[None, :],
             grad_unit.to(GRAD_UNIT.dtype.element_ty), mask=ok)
