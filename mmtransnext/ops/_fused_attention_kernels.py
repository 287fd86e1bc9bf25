"""Triton kernels of :func:`mmtransnext.ops.fused_attention.fused_bias_attention`.

Imported only on first use, never by ``import mmtransnext``: ``triton.jit`` decides
at decoration time whether a kernel is compiled for the GPU or run by Triton's
interpreter (``TRITON_INTERPRET=1``, CPU tensors), so the tests choose the
interpreter simply by setting that variable before this module is first imported.

Layouts (all contiguous): ``Q (B*heads, N, D)``, ``K (B*heads, P, D)``,
``V (B*heads, P, Dv)``, ``OUT (B*heads, N, Dv)``, ``LSE (B*heads, N)`` float32;
the bias table ``TABLE (heads, H, Hp, Ue)``, :class:`~mmtransnext.models.position_bias.
RowFactoredBias`'s ``by_rows`` with its column offsets numbered evenly, and the two
factors of its column taps (``separable_col_taps``): ``Q_TERM``/``Q_WEIGHT (W, 2)``
and ``K_TERM``/``K_WEIGHT (Wp, 2)``. Query ``m = r * W + c``, key ``p = a * Wp + b``,
and

    bias(t, m, p) = sum_ij Q_WEIGHT[c, i] * K_WEIGHT[b, j]
                    * TABLE[t, r, a, Q_TERM[c, i] + K_TERM[b, j]],

so a tile reads four short vectors and, per entry and tap, one value of a table row
(a few KB per query row and key row), not an index, a weight and a value from tables
of ``W x Wp x 4`` entries; taps of weight zero (no resize) are not read. That is the
bias read by taps (``Q_SLOTS = 0``). Read by slots (``Q_SLOTS``, ``K_SLOTS`` > 0), a
tile gathers each table entry its queries and keys share once: ``Q_SLOT (N, Q_TAPS)``
numbers each query tap's offset ``r * s_row + Q_TERM[c, i]`` among the distinct ones
of its block of ``BLOCK_M`` queries, which ``Q_SLOT_ADDR (blocks, Q_SLOTS)`` lists
(-1 past their count), and likewise ``K_SLOT``/``K_SLOT_ADDR`` for blocks of
``BLOCK_N`` keys; the tile's bias is then two matmuls (:func:`_slot_bias`) and its
gradient their transpose (:func:`_add_slot_grad`).

Each program owns ``BLOCK_M`` queries of one (image, head) and walks the keys
``BLOCK_N`` at a time, so no ``N x P`` tensor exists outside registers; the
key-major backward kernel owns ``BLOCK_N`` keys and walks a range of queries
``BLOCK_M`` at a time. Head dims are padded to the ``D_PAD``/``DV_PAD`` powers of two
(at least 16, as ``tl.dot`` needs) with masked loads. Logits, probabilities and
statistics are float32; the matmul operands keep the input dtype (tensor cores for
float16/bfloat16; float32 operands use ``DOT_PRECISION``).
"""
import os

import triton
import triton.language as tl

#: Whether the kernels below were defined for Triton's CPU interpreter.
INTERPRETED = os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on', 'yes')

#: Size arguments that follow the input's height and width. Triton would by default
#: compile a kernel again for every new pattern of which of them equal 1 or divide by
#: 16, which detection's varied image sizes keep producing. The kernels gain nothing
#: from knowing it (the bias table is gathered; rows of queries, keys and values take
#: their alignment from the head dims, which stay specialised), so each kernel
#: compiles once per dtype, head dim and tap count.
SPATIAL_ARGS = ('tokens', 'keys', 'width', 'pool_w', 's_head', 's_row', 's_pool_row')
#: The strides of the backward's incoming gradients, which change with the input's size
#: and with the graph they come from: unspecialised likewise.
GRADIENT_STRIDES = ('s_go_image', 's_go_head', 's_go_row', 's_gl_image', 's_gl_head',
                    's_gl_row')

# The gradients' atomic adds are relaxed (``sem='relaxed'``, as torch's Inductor emits
# them): nothing reads a gradient before the kernel ends, so no add needs to order other
# memory accesses. They compile to plain reductions (sm_90: ``REDG``); Triton's default,
# 'acq_rel', wraps each add in a GPU-wide memory barrier and an invalidation of the L1
# cache, which the bias table and the keys are read through (``MEMBAR.ALL.GPU``,
# ``CCTL.IVALL``).


@triton.jit
def _tile_rows(rows_m, cols_n, head, width, pool_w, s_head, s_row, s_pool_row):
    """Query and key columns of a tile and its ``(BLOCK_M, BLOCK_N)`` offsets into TABLE."""
    row, col = rows_m // width, rows_m % width
    pool_row, pool_col = cols_n // pool_w, cols_n % pool_w
    table = head * s_head + row[:, None] * s_row + pool_row[None, :] * s_pool_row
    return col, pool_col, table


@triton.jit
def _tap(Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, col, pool_col, row_ok, col_ok,
         i: tl.constexpr, j: tl.constexpr, Q_TAPS: tl.constexpr, K_TAPS: tl.constexpr):
    """Tap ``(i, j)`` of a tile: offsets into a table row and weights, ``(BLOCK_M, BLOCK_N)``.

    An axis that is not resized has one tap of weight 1 (``Q_TAPS``/``K_TAPS`` = 1):
    its weights are not read.
    """
    query_term = tl.load(Q_TERM + col * 2 + i, mask=row_ok, other=0)
    key_term = tl.load(K_TERM + pool_col * 2 + j, mask=col_ok, other=0)
    offset = query_term[:, None] + key_term[None, :]
    weight = tl.full(offset.shape, 1.0, tl.float32)
    if Q_TAPS == 2:
        weight *= tl.load(Q_WEIGHT + col * 2 + i, mask=row_ok, other=0.0)[:, None]
    if K_TAPS == 2:
        weight *= tl.load(K_WEIGHT + pool_col * 2 + j, mask=col_ok, other=0.0)[None, :]
    return offset, weight


@triton.jit
def _bias_tile(TABLE, Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, col, pool_col, table, row_ok,
               col_ok, valid, Q_TAPS: tl.constexpr, K_TAPS: tl.constexpr):
    """The bias of a tile, float32."""
    bias = tl.zeros(table.shape, dtype=tl.float32)
    for i in tl.static_range(Q_TAPS):
        for j in tl.static_range(K_TAPS):
            offset, weight = _tap(Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, col, pool_col, row_ok,
                                  col_ok, i, j, Q_TAPS, K_TAPS)
            value = tl.load(TABLE + table + offset, mask=valid & (weight != 0.0), other=0.0)
            bias += weight * value.to(tl.float32)
    return bias


@triton.jit
def _slots_of(SLOT, SLOT_ADDR, WEIGHT, positions, cols, ok, block, BLOCK: tl.constexpr,
              SLOTS: tl.constexpr, TAPS: tl.constexpr):
    """A block's slot matrix and its slots' table offsets.

    Returns ``(BLOCK, SLOTS)`` float32, row ``k`` holding position ``k``'s tap weights
    at its taps' slots (``SLOT``, ``(length, TAPS)``; a slot of ``SLOTS`` matches
    none), and ``(SLOTS, )`` offsets from ``SLOT_ADDR`` (-1 for an unused slot).
    """
    slots = tl.arange(0, SLOTS)
    matrix = tl.zeros((BLOCK, SLOTS), dtype=tl.float32)
    for i in tl.static_range(TAPS):
        slot = tl.load(SLOT + positions * TAPS + i, mask=ok, other=SLOTS)
        weight = 1.0
        if TAPS == 2:
            weight = tl.load(WEIGHT + cols * 2 + i, mask=ok, other=0.0)[:, None]
        matrix += tl.where(slot[:, None] == slots[None, :], weight, 0.0)
    return matrix, tl.load(SLOT_ADDR + block * SLOTS + slots)


@triton.jit
def _slot_bias(TABLE, head_offset, query_slots, query_addr, key_slots, key_addr,
               DOT_PRECISION: tl.constexpr):
    """The bias of a tile from its slots, float32: ``query_slots @ E @ key_slots^T``
    with ``E`` the table entries at each pair of a query and a key slot's offsets.
    The slot matrices take the table's dtype."""
    entries = tl.load(TABLE + head_offset + query_addr[:, None] + key_addr[None, :],
                      mask=(query_addr >= 0)[:, None] & (key_addr >= 0)[None, :], other=0.0)
    by_key = tl.dot(entries, tl.trans(key_slots), input_precision=DOT_PRECISION)
    return tl.dot(query_slots, by_key.to(entries.dtype), input_precision=DOT_PRECISION)


@triton.jit
def _add_slot_grad(GRAD_TABLE, head_offset, grad_logits, query_slots, query_addr, key_slots,
                   key_addr, DOT_PRECISION: tl.constexpr):
    """Adds a tile's logit gradients to the table: the transpose of :func:`_slot_bias`,
    ``query_slots^T @ grad_logits @ key_slots``, one relaxed atomic add per pair of
    slots in use."""
    by_key = tl.dot(grad_logits.to(key_slots.dtype), key_slots, input_precision=DOT_PRECISION)
    sums = tl.dot(tl.trans(query_slots), by_key.to(key_slots.dtype),
                  input_precision=DOT_PRECISION)
    tl.atomic_add(GRAD_TABLE + head_offset + query_addr[:, None] + key_addr[None, :], sums,
                  mask=(query_addr >= 0)[:, None] & (key_addr >= 0)[None, :], sem='relaxed')


@triton.jit
def _key_tile(q, K, V, TABLE, Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, K_SLOT, K_SLOT_ADDR,
              query_slots, query_addr, key_base, value_base, start, rows_m, row_ok, dims, vdims,
              head, keys, head_dim, value_dim, width, pool_w, s_head, s_row, s_pool_row,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, Q_TAPS: tl.constexpr,
              K_TAPS: tl.constexpr, Q_SLOTS: tl.constexpr, K_SLOTS: tl.constexpr):
    """Keys ``start .. start + BLOCK_N``: their key and value rows, the biased logits
    of the query block against them (float32), and the masks and bias geometry of the
    tile (its taps' offsets, or with ``Q_SLOTS`` its key slots)."""
    cols_n = start + tl.arange(0, BLOCK_N)
    col_ok = cols_n < keys
    k_offsets = key_base + cols_n[:, None] * head_dim + dims[None, :]
    v_offsets = value_base + cols_n[:, None] * value_dim + vdims[None, :]
    k_mask = col_ok[:, None] & (dims[None, :] < head_dim)
    v_mask = col_ok[:, None] & (vdims[None, :] < value_dim)
    k = tl.load(K + k_offsets, mask=k_mask, other=0.0)
    v = tl.load(V + v_offsets, mask=v_mask, other=0.0)
    valid = row_ok[:, None] & col_ok[None, :]
    col, pool_col, table = _tile_rows(rows_m, cols_n, head, width, pool_w, s_head, s_row,
                                      s_pool_row)
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if Q_SLOTS > 0:
        key_slots, key_addr = _slots_of(K_SLOT, K_SLOT_ADDR, K_WEIGHT, cols_n, pool_col, col_ok,
                                        start // BLOCK_N, BLOCK_N, K_SLOTS, K_TAPS)
        key_slots = key_slots.to(q.dtype)
        logits += _slot_bias(TABLE, head * s_head, query_slots, query_addr, key_slots, key_addr,
                             DOT_PRECISION)
    else:   # read by taps; the key slots are placeholders, not used
        key_slots = 0
        key_addr = 0
        logits += _bias_tile(TABLE, Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, col, pool_col, table,
                             row_ok, col_ok, valid, Q_TAPS, K_TAPS)
    return (k, v, logits, col_ok, valid, col, pool_col, table, k_offsets, v_offsets, k_mask,
            v_mask, key_slots, key_addr)


@triton.jit
def _query_block_slots(Q_SLOT, Q_SLOT_ADDR, Q_WEIGHT, rows_m, row_ok, width, block,
                       BLOCK_M: tl.constexpr, Q_SLOTS: tl.constexpr, Q_TAPS: tl.constexpr,
                       dtype_like):
    """A query block's slot matrix in ``dtype_like``'s dtype and its slots' offsets, or
    placeholders without slots (``Q_SLOTS = 0``)."""
    if Q_SLOTS > 0:
        query_slots, query_addr = _slots_of(Q_SLOT, Q_SLOT_ADDR, Q_WEIGHT, rows_m, rows_m % width,
                                            row_ok, block, BLOCK_M, Q_SLOTS, Q_TAPS)
        query_slots = query_slots.to(dtype_like.dtype)
    else:
        query_slots = 0
        query_addr = 0
    return query_slots, query_addr


@triton.jit(do_not_specialize=SPATIAL_ARGS)
def pooled_attention_forward(Q, K, V, TABLE, Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, Q_SLOT,
                             Q_SLOT_ADDR, K_SLOT, K_SLOT_ADDR, OUT, LSE,
                             heads, tokens, keys, head_dim, value_dim, width, pool_w,
                             s_head, s_row, s_pool_row,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, Q_TAPS: tl.constexpr,
                             K_TAPS: tl.constexpr, Q_SLOTS: tl.constexpr, K_SLOTS: tl.constexpr):
    """Output and log-sum-exp of ``BLOCK_M`` queries; grid ``(cdiv(N, BLOCK_M), B*heads)``."""
    block = tl.program_id(0)
    image_head = tl.program_id(1).to(tl.int64)
    head = tl.program_id(1) % heads     # int32: the bias table is small
    rows_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows_m < tokens
    dims = tl.arange(0, D_PAD)
    vdims = tl.arange(0, DV_PAD)
    q = tl.load(Q + image_head * tokens * head_dim + rows_m[:, None] * head_dim + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < head_dim), other=0.0)
    key_base = image_head * keys * head_dim
    value_base = image_head * keys * value_dim
    query_slots, query_addr = _query_block_slots(Q_SLOT, Q_SLOT_ADDR, Q_WEIGHT, rows_m, row_ok,
                                                 width, block, BLOCK_M, Q_SLOTS, Q_TAPS, q)

    row_max = tl.full((BLOCK_M, ), float('-inf'), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M, ), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
    for start in range(0, keys, BLOCK_N):
        k, v, logits, col_ok, _, _, _, _, _, _, _, _, _, _ = _key_tile(
            q, K, V, TABLE, Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, K_SLOT, K_SLOT_ADDR,
            query_slots, query_addr, key_base, value_base, start, rows_m, row_ok, dims, vdims,
            head, keys, head_dim, value_dim, width, pool_w, s_head, s_row, s_pool_row, BLOCK_N,
            DOT_PRECISION, Q_TAPS, K_TAPS, Q_SLOTS, K_SLOTS)
        logits = tl.where(col_ok[None, :], logits, float('-inf'))
        # Every tile holds at least one key, so the new maximum is finite.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        probs = tl.exp(logits - new_max[:, None])
        rescale = tl.exp(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v,
                                              input_precision=DOT_PRECISION)
        row_max = new_max

    out = acc / row_sum[:, None]
    tl.store(OUT + image_head * tokens * value_dim + rows_m[:, None] * value_dim + vdims[None, :],
             out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (vdims[None, :] < value_dim))
    tl.store(LSE + image_head * tokens + rows_m, row_max + tl.log(row_sum), mask=row_ok)


@triton.jit(do_not_specialize=SPATIAL_ARGS + GRADIENT_STRIDES)
def pooled_attention_backward(Q, K, V, OUT, GRAD_OUT, LSE, SHIFT, GRAD_LSE, TABLE, Q_TERM,
                              Q_WEIGHT, K_TERM, K_WEIGHT, Q_SLOT, Q_SLOT_ADDR, K_SLOT,
                              K_SLOT_ADDR, GRAD_Q, GRAD_K, GRAD_V, GRAD_TABLE,
                              heads, tokens, keys, head_dim, value_dim, width, pool_w,
                              s_head, s_row, s_pool_row, s_go_image, s_go_head, s_go_row,
                              s_gl_image, s_gl_head, s_gl_row,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, Q_TAPS: tl.constexpr,
                              K_TAPS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                              Q_SLOTS: tl.constexpr, K_SLOTS: tl.constexpr,
                              ROW_RESIDUAL: tl.constexpr, KV_GRAD: tl.constexpr):
    """Gradients from ``BLOCK_M`` queries; same grid as the forward.

    The probabilities are recomputed from the log-sum-exp. With ``dP = dO V^T``,
    the logits' gradient is ``P * (dP - shift - residual + GRAD_LSE)``, where
    ``shift = rowsum(dO * O)`` (float32, from ``OUT``) and ``residual`` is zero in
    exact arithmetic. ``GRAD_OUT`` and ``GRAD_LSE`` may be strided (the gradients of a
    transposed view and of a slice): their strides between images, heads and rows
    are ``s_go_*`` and ``s_gl_*``; the rest is contiguous. With ``ROW_RESIDUAL``
    (set for a float32 softmax that is the whole attention, ``GRAD_LSE`` zero) a
    first walk over the keys computes ``residual = rowsum(P * (dP - shift))``, term
    by term (as ``rowsum(P * dP) - shift * rowsum(P)``, a difference of two near
    sums, it loses the digits it is for), so that each row of the gradient sums to
    zero up to the rounding of small numbers: a bias shared by all keys shifts no
    softmax, and its gradient then stays as near zero as the reference has it
    (otherwise the rounding of ``O`` against the recomputed ``P`` adds up over the
    rows and shows in the position-bias MLP's last bias). ``GRAD_Q`` is written once; ``GRAD_TABLE`` (float32, zeroed) collects
    every query block's share by ``tl.atomic_add`` (relaxed), per logit and tap where
    the bias is read by taps, per pair of slots where it is read by slots
    (``Q_SLOTS``: the transpose of how the forward reads it), and so do ``GRAD_K``
    and ``GRAD_V``, per logit, with ``KV_GRAD``. Without it this kernel leaves them
    to :func:`pooled_attention_backward_keys` and stores each row's final shift
    (residual and ``GRAD_LSE`` included) in ``SHIFT`` for it.
    """
    block = tl.program_id(0)
    image_head = tl.program_id(1).to(tl.int64)
    head = tl.program_id(1) % heads     # int32: the bias table is small
    rows_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows_m < tokens
    dims = tl.arange(0, D_PAD)
    vdims = tl.arange(0, DV_PAD)
    q_mask = row_ok[:, None] & (dims[None, :] < head_dim)
    q_offsets = image_head * tokens * head_dim + rows_m[:, None] * head_dim + dims[None, :]
    q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
    image, head_of_image = image_head // heads, image_head % heads
    out_mask = row_ok[:, None] & (vdims[None, :] < value_dim)
    grad_out = tl.load(GRAD_OUT + image * s_go_image + head_of_image * s_go_head
                       + rows_m[:, None] * s_go_row + vdims[None, :], mask=out_mask, other=0.0)
    lse = tl.load(LSE + image_head * tokens + rows_m, mask=row_ok, other=0.0)
    grad_lse = tl.load(GRAD_LSE + image * s_gl_image + head_of_image * s_gl_head
                       + rows_m * s_gl_row, mask=row_ok, other=0.0).to(tl.float32)
    out_offsets = image_head * tokens * value_dim + rows_m[:, None] * value_dim + vdims[None, :]
    key_offset = image_head * keys * head_dim
    value_offset = image_head * keys * value_dim

    query_slots, query_addr = _query_block_slots(Q_SLOT, Q_SLOT_ADDR, Q_WEIGHT, rows_m, row_ok,
                                                 width, block, BLOCK_M, Q_SLOTS, Q_TAPS, q)

    # d out / d logits contracts to probs * (dP - rowsum(dO * O)).
    out = tl.load(OUT + out_offsets, mask=out_mask, other=0.0)
    shift = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), axis=1)
    if ROW_RESIDUAL:
        residual = tl.zeros((BLOCK_M, ), dtype=tl.float32)
        for start in range(0, keys, BLOCK_N):
            k, v, logits, _, valid, _, _, _, _, _, _, _, _, _ = _key_tile(
                q, K, V, TABLE, Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, K_SLOT, K_SLOT_ADDR,
                query_slots, query_addr, key_offset, value_offset, start, rows_m, row_ok, dims,
                vdims, head, keys, head_dim, value_dim, width, pool_w, s_head, s_row,
                s_pool_row, BLOCK_N, DOT_PRECISION, Q_TAPS, K_TAPS, Q_SLOTS, K_SLOTS)
            probs = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0)
            grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
            residual += tl.sum(probs * (grad_probs - shift[:, None]), axis=1)
        shift += residual
    shift -= grad_lse
    if not KV_GRAD:
        tl.store(SHIFT + image_head * tokens + rows_m, shift, mask=row_ok)

    grad_q = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for start in range(0, keys, BLOCK_N):
        (k, v, logits, col_ok, valid, col, pool_col, table, k_offsets, v_offsets, k_mask,
         v_mask, key_slots, key_addr) = _key_tile(
            q, K, V, TABLE, Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, K_SLOT, K_SLOT_ADDR, query_slots,
            query_addr, key_offset, value_offset, start, rows_m, row_ok, dims, vdims, head, keys,
            head_dim, value_dim, width, pool_w, s_head, s_row, s_pool_row, BLOCK_N,
            DOT_PRECISION, Q_TAPS, K_TAPS, Q_SLOTS, K_SLOTS)
        probs = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0)
        grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        grad_logits = probs * (grad_probs - shift[:, None])
        grad_q += tl.dot(grad_logits.to(k.dtype), k, input_precision=DOT_PRECISION)
        if KV_GRAD:
            tl.atomic_add(GRAD_K + k_offsets,
                          tl.dot(tl.trans(grad_logits.to(q.dtype)), q,
                                 input_precision=DOT_PRECISION), mask=k_mask, sem='relaxed')
            tl.atomic_add(GRAD_V + v_offsets,
                          tl.dot(tl.trans(probs.to(grad_out.dtype)), grad_out,
                                 input_precision=DOT_PRECISION), mask=v_mask, sem='relaxed')
        if BIAS_GRAD and Q_SLOTS > 0:
            _add_slot_grad(GRAD_TABLE, head * s_head, grad_logits, query_slots, query_addr,
                           key_slots, key_addr, DOT_PRECISION)
        elif BIAS_GRAD:
            for i in tl.static_range(Q_TAPS):
                for j in tl.static_range(K_TAPS):
                    offset, weight = _tap(Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, col, pool_col,
                                          row_ok, col_ok, i, j, Q_TAPS, K_TAPS)
                    tl.atomic_add(GRAD_TABLE + table + offset, weight * grad_logits,
                                  mask=valid & (weight != 0.0), sem='relaxed')

    tl.store(GRAD_Q + q_offsets, grad_q.to(GRAD_Q.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=SPATIAL_ARGS)
def pooled_attention_backward_keys(Q, K, V, GRAD_OUT, LSE, SHIFT, TABLE, Q_TERM, Q_WEIGHT,
                                   K_TERM, K_WEIGHT, Q_SLOT, Q_SLOT_ADDR, K_SLOT, K_SLOT_ADDR,
                                   GRAD_K, GRAD_V,
                                   heads, tokens, keys, head_dim, value_dim, width, pool_w,
                                   s_head, s_row, s_pool_row, split_rows,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr, Q_TAPS: tl.constexpr,
                                   K_TAPS: tl.constexpr, Q_SLOTS: tl.constexpr,
                                   K_SLOTS: tl.constexpr):
    """Key and value gradients of ``BLOCK_N`` keys from ``split_rows`` queries;
    grid ``(cdiv(P, BLOCK_N), B*heads, cdiv(N, split_rows))``.

    The key-major half of the two-pass backward, after
    :func:`pooled_attention_backward` without ``KV_GRAD`` (which left each row's
    final shift in ``SHIFT``): the program keeps its keys' gradients in registers
    while it walks its share of the queries ``BLOCK_M`` at a time, recomputing the
    probabilities, and adds them to ``GRAD_K``/``GRAD_V`` (float32, zeroed) once,
    so there is one atomic add per key element and split instead of one per query
    block. With slots, ``split_rows`` is a multiple of ``BLOCK_M`` and the query slots
    are numbered per ``BLOCK_M`` queries.
    """
    key_block = tl.program_id(0)
    image_head = tl.program_id(1).to(tl.int64)
    head = tl.program_id(1) % heads     # int32: the bias table is small
    first = tl.program_id(2) * split_rows
    end = tl.minimum(first + split_rows, tokens)
    cols_n = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols_n < keys
    dims = tl.arange(0, D_PAD)
    vdims = tl.arange(0, DV_PAD)
    k_offsets = image_head * keys * head_dim + cols_n[:, None] * head_dim + dims[None, :]
    v_offsets = image_head * keys * value_dim + cols_n[:, None] * value_dim + vdims[None, :]
    k_mask = col_ok[:, None] & (dims[None, :] < head_dim)
    v_mask = col_ok[:, None] & (vdims[None, :] < value_dim)
    k = tl.load(K + k_offsets, mask=k_mask, other=0.0)
    v = tl.load(V + v_offsets, mask=v_mask, other=0.0)
    if Q_SLOTS > 0:
        key_slots, key_addr = _slots_of(K_SLOT, K_SLOT_ADDR, K_WEIGHT, cols_n, cols_n % pool_w,
                                        col_ok, key_block, BLOCK_N, K_SLOTS, K_TAPS)
        key_slots = key_slots.to(k.dtype)
    grad_k = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    grad_v = tl.zeros((BLOCK_N, DV_PAD), dtype=tl.float32)
    for start in range(first, end, BLOCK_M):
        rows_m = start + tl.arange(0, BLOCK_M)
        row_ok = rows_m < end
        q = tl.load(Q + image_head * tokens * head_dim + rows_m[:, None] * head_dim
                    + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < head_dim),
                    other=0.0)
        grad_out = tl.load(GRAD_OUT + image_head * tokens * value_dim
                           + rows_m[:, None] * value_dim + vdims[None, :],
                           mask=row_ok[:, None] & (vdims[None, :] < value_dim), other=0.0)
        lse = tl.load(LSE + image_head * tokens + rows_m, mask=row_ok, other=0.0)
        shift = tl.load(SHIFT + image_head * tokens + rows_m, mask=row_ok, other=0.0)
        valid = row_ok[:, None] & col_ok[None, :]
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if Q_SLOTS > 0:
            query_slots, query_addr = _query_block_slots(
                Q_SLOT, Q_SLOT_ADDR, Q_WEIGHT, rows_m, row_ok, width, start // BLOCK_M,
                BLOCK_M, Q_SLOTS, Q_TAPS, k)
            logits += _slot_bias(TABLE, head * s_head, query_slots, query_addr, key_slots,
                                 key_addr, DOT_PRECISION)
        else:
            col, pool_col, table = _tile_rows(rows_m, cols_n, head, width, pool_w, s_head,
                                              s_row, s_pool_row)
            logits += _bias_tile(TABLE, Q_TERM, Q_WEIGHT, K_TERM, K_WEIGHT, col, pool_col,
                                 table, row_ok, col_ok, valid, Q_TAPS, K_TAPS)
        probs = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0)
        grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        grad_logits = probs * (grad_probs - shift[:, None])
        grad_k += tl.dot(tl.trans(grad_logits.to(q.dtype)), q, input_precision=DOT_PRECISION)
        grad_v += tl.dot(tl.trans(probs.to(grad_out.dtype)), grad_out,
                         input_precision=DOT_PRECISION)
    tl.atomic_add(GRAD_K + k_offsets, grad_k, mask=k_mask, sem='relaxed')
    tl.atomic_add(GRAD_V + v_offsets, grad_v, mask=v_mask, sem='relaxed')
