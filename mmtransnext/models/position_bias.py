"""The continuous relative position bias between queries and pooled keys.

TransNeXt evaluates a small MLP (``cpb_fc1 -> ReLU -> cpb_fc2``) at the log-spaced
relative offset between every query and every (pooled) key, giving one bias per
head. The offset of a query ``(i, j)`` and a key ``(a, b)`` is separable,
``(rel_h(i, a), rel_w(j, b))``, so all the MLP ever sees is a point of the product
grid ``unique(rel_h) x unique(rel_w)``. We evaluate it there once (a few thousand
points) and expand afterwards:

* :func:`expand_bias` builds the whole ``(heads, N, P)`` bias the way the released
  model does (gather, then bilinear resize of the key axes, then of the query
  axes). It is the reference path.
* :class:`OffsetMLP` evaluates the MLP on that grid a chunk at a time, without
  keeping its hidden layer for the backward pass.
* :class:`RowFactoredBias` exploits that both the gather and the bilinear resize
  act on the row axes and the column axes independently: it resizes the row
  axes once (a small tensor) and hands out the bias for any band of query rows
  on demand, so the full bias never has to exist.

Both give the same numbers up to float rounding.
"""
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops.fused_attention import use_fused_attention
from ..ops.fused_bias_rows import bias_rows, bias_rows_grad
from ..ops.fused_offset_mlp import offset_mlp_grads, offset_mlp_table
from ..ops.graph_capture import capturing_graph

Size2d = Tuple[int, int]

# Offsets are measured in units of the pretraining grid and scaled so that the
# grid's extent maps to 8, then log-spaced: f(t) = sign(t) log2(|t| + 1) / log2(8).
_OFFSET_RANGE = 8.0


def _pooled_axis(length: int, bins: int) -> list:
    """Coordinates ``0..length-1`` averaged over each bin of a 1-D adaptive pool.

    Returns:
        list[float]: ``bins`` centres, bin ``k`` covering
        ``floor(k*length/bins) .. ceil((k+1)*length/bins)-1``.
    """
    starts = [(k * length) // bins for k in range(bins)]
    ends = [-((-(k + 1) * length) // bins) for k in range(bins)]
    return [(s + e - 1) / 2.0 for s, e in zip(starts, ends)]


def _axis_offsets(query_len: int, key_len: int,
                  pretrain_len: int) -> Tuple[Tensor, Tensor]:
    """Log-spaced offsets along one axis and where each query/key pair finds its own.

    The offsets are found in Python floats (float64, the same operations in the
    same order as on float64 tensors), so that a captured graph gets them as
    constants rather than as a data-dependent ``unique``.

    Returns:
        tuple[Tensor, Tensor]: the distinct transformed offsets ``(U,)`` (float64)
        and the index ``(query_len, key_len)`` of each pair into them.
    """
    keys = _pooled_axis(query_len, key_len)
    # A one-cell pretraining grid would divide by zero; the offsets are then 0-based.
    step = max(pretrain_len - 1, 1)
    rel = [(query - key) / step * _OFFSET_RANGE for query in range(query_len) for key in keys]
    distinct = sorted(set(rel))
    position = {value: i for i, value in enumerate(distinct)}
    index = torch.tensor([position[value] for value in rel]).reshape(query_len, key_len)
    values = torch.tensor(distinct, dtype=torch.float64)
    values = torch.sign(values) * torch.log2(values.abs() + 1.0) / math.log2(_OFFSET_RANGE)
    return values, index


def _even_offset_terms(query_len: int, key_len: int) -> Tuple[Tensor, Tensor]:
    """Integer terms whose sum numbers every query/key offset of an axis evenly.

    Query ``x`` and a pooled key centred at ``c`` (a multiple of one half) are
    ``x - c`` apart. Counting the halves from the smallest offset, ``2x - 2c + max(2c)``
    (halved when every centre has the same parity, as only every other half then
    occurs), numbers the offsets on an evenly spaced grid, and the number is a query
    term plus a key term: a kernel adds two small vectors instead of reading an index
    from a ``query_len x key_len`` table.

    Returns:
        tuple[Tensor, Tensor]: ``(query_len,)`` and ``(key_len,)`` long terms; their
        sums run from 0 to ``Ue - 1``.
    """
    twice_centres = [round(2 * centre) for centre in _pooled_axis(query_len, key_len)]
    step = 2 if len({value % 2 for value in twice_centres}) == 1 else 1
    top = max(twice_centres)
    return (torch.tensor([2 * x // step for x in range(query_len)]),
            torch.tensor([(top - value) // step for value in twice_centres]))


@dataclass(frozen=True)
class BiasLayout:
    """Where the position-bias MLP is evaluated and how the result is expanded.

    Attributes:
        offsets_h (Tensor): ``(Uh,)`` the distinct (log-spaced) row offsets.
        offsets_w (Tensor): ``(Uw,)`` the distinct column offsets.
        index_h (Tensor): ``(Qh, Kh)`` long, row offset of each query row / key row
            pair on the grid the bias is built on.
        index_w (Tensor): ``(Qw, Kw)`` long, likewise for columns.
        query_size (tuple[int, int]): ``(H, W)`` the bias is resized to.
        key_size (tuple[int, int]): ``(Hp, Wp)`` the bias is resized to.
        derived (dict): what is derived from the layout alone, kept with it: the
            column taps of :class:`RowFactoredBias`, the slots of
            :func:`~mmtransnext.ops.fused_attention.bias_slots`.
    """
    offsets_h: Tensor
    offsets_w: Tensor
    index_h: Tensor
    index_w: Tensor
    query_size: Size2d
    key_size: Size2d
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def coords(self) -> Tensor:
        """``(Uh, Uw, 2)`` MLP inputs, the product of the row and column offsets."""
        return self.offset_grid()

    def offset_grid(self) -> Tensor:
        """:attr:`coords` built anew (a captured graph cannot enter the cache's lock)."""
        return torch.stack(torch.meshgrid(self.offsets_h, self.offsets_w, indexing='ij'),
                           dim=-1)

    @cached_property
    def even_columns(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The column offsets numbered evenly (see :func:`_even_offset_terms`).

        Returns:
            tuple[Tensor, Tensor, Tensor]: the query term ``(Qw,)`` and key term
            ``(Kw,)`` (long), and ``(Ue,)`` the position in ``offsets_w`` of each
            evenly numbered offset (0 where none occurs), so that
            ``spread[query_term[x] + key_term[y]] == index_w[x, y]``.

        Raises:
            RuntimeError: if the numbering does not reproduce ``index_w``.
        """
        index_w = self.index_w.cpu()
        query_term, key_term = _even_offset_terms(*index_w.shape)
        even = query_term[:, None] + key_term[None, :]
        spread = torch.zeros(int(even.max()) + 1, dtype=torch.long)
        spread[even.flatten()] = index_w.flatten()
        if not torch.equal(spread[even], index_w):
            raise RuntimeError(f'the even numbering of column offsets ({tuple(index_w.shape)} '
                               'grid) does not reproduce their index')
        device = self.index_w.device
        return query_term.to(device), key_term.to(device), spread.to(device)


@lru_cache(maxsize=64)
def bias_layout(build_query: Size2d, build_key: Size2d, pretrain: Size2d,
                query_size: Size2d, key_size: Size2d,
                device: torch.device) -> BiasLayout:
    """The layout of a bias built on one grid and resized to another (cached).

    Args:
        build_query (tuple[int, int]): query grid the MLP is evaluated on.
        build_key (tuple[int, int]): key grid the MLP is evaluated on (pooled
            from ``build_query``).
        pretrain (tuple[int, int]): the pretraining grid that normalises offsets.
        query_size (tuple[int, int]): query grid at run time, ``(H, W)``.
        key_size (tuple[int, int]): key grid at run time, ``(Hp, Wp)``.
        device (torch.device): where the tensors live.
    """
    values_h, index_h = _axis_offsets(build_query[0], build_key[0], pretrain[0])
    values_w, index_w = _axis_offsets(build_query[1], build_key[1], pretrain[1])
    # float64, cast to the model's dtype where used, so float64 runs stay exact.
    return BiasLayout(offsets_h=values_h.to(device), offsets_w=values_w.to(device),
                      index_h=index_h.to(device), index_w=index_w.to(device),
                      query_size=tuple(query_size), key_size=tuple(key_size))


# Hidden values per step of OffsetMLP, by device type. On the CPU about 1 Mi (4 MB in
# float32), so that a chunk's hidden layer stays in the cache between its uses. On a GPU
# such a chunk is a few microseconds of work, less than launching its kernels: stage 1
# of TransNeXt-T at 800x1333 (392 x 392 offsets, 512 hidden) took 79 chunks of about ten
# launches each, forward and backward, in each of its layers; 8 Mi (32 MB, a few
# transient copies in the backward) take 10.
_MLP_CHUNK_ELEMENTS = {'cpu': 1 << 20, 'cuda': 1 << 23}


class OffsetMLP(torch.autograd.Function):
    """``fc2(relu(fc1(coords)))`` on the product grid of row and column offsets.

    ``fc1`` is affine in the two offsets, so its output at grid point ``(u, v)`` is
    ``a[u] + b[v]`` with ``a = offsets_h * w1[:, 0] + b1`` and
    ``b = offsets_w * w1[:, 1]``. The MLP is evaluated a chunk of grid rows at a time
    and the backward pass recomputes each chunk's hidden layer, so the
    ``(Uh, Uw, hidden)`` activation (about 300 MB per stage-1 block of a detector at
    800 x 1333) is never whole and never kept. Where the fused attention kernels serve
    the weights (:func:`~mmtransnext.ops.use_fused_attention`: CUDA, Triton 3) two
    Triton kernels do the same without chunks
    (:mod:`~mmtransnext.ops.fused_offset_mlp`): the loop's operators would be issued
    again in every attention layer of every step. The sums run in another order than
    ``nn.Linear``'s, so results agree with it up to float rounding.

    ``OffsetMLP.apply(offsets_h, offsets_w, w1, b1, w2, b2)``:

    Args:
        offsets_h (Tensor): ``(Uh,)`` row offsets (no gradient), in any floating dtype:
            the first layer takes them rounded to ``w1``'s.
        offsets_w (Tensor): ``(Uw,)`` column offsets, likewise.
        w1 (Tensor): ``(hidden, 2)`` weight of ``fc1``; ``b1`` ``(hidden,)`` its bias.
        w2 (Tensor): ``(heads, hidden)`` weight of ``fc2``; ``b2`` ``(heads,)`` its bias.

    Returns:
        Tensor: ``(heads, Uh, Uw)``, the table :class:`RowFactoredBias` expands.
    """

    @staticmethod
    def _chunks(rows: int, cols: int, hidden: int, device: torch.device):
        elements = _MLP_CHUNK_ELEMENTS.get(device.type, _MLP_CHUNK_ELEMENTS['cpu'])
        step = max(1, elements // (cols * hidden))
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]

    @staticmethod
    def _hidden_parts(offsets_h, offsets_w, w1, b1):
        return (torch.outer(offsets_h.to(w1.dtype), w1[:, 0]) + b1,
                torch.outer(offsets_w.to(w1.dtype), w1[:, 1]))

    @staticmethod
    def forward(ctx, offsets_h, offsets_w, w1, b1, w2, b2):
        ctx.fused = use_fused_attention(w1)
        if ctx.fused:   # the first layer too is computed in the kernels
            ctx.save_for_backward(offsets_h, offsets_w, w1, b1, w2)
            return offset_mlp_table(offsets_h, offsets_w, w1, b1, w2, b2)
        row_part, col_part = OffsetMLP._hidden_parts(offsets_h, offsets_w, w1, b1)
        # Saved, not recomputed: (Uh + Uw) x hidden values, under 2 MB a layer.
        ctx.save_for_backward(offsets_h, offsets_w, w1, w2, row_part, col_part)
        rows, cols, heads = offsets_h.numel(), offsets_w.numel(), w2.shape[0]
        table = w2.new_empty(rows, cols, heads)
        for start, stop in OffsetMLP._chunks(rows, cols, w1.shape[0], w1.device):
            hidden = (row_part[start:stop, None] + col_part[None]).relu_()
            torch.matmul(hidden, w2.t(), out=table[start:stop])
        table += b2
        return table.permute(2, 0, 1)

    @staticmethod
    def backward(ctx, grad_table):
        # The saved tensors' dtype rules, whatever autocast region backward() runs in.
        with torch.autocast(grad_table.device.type, enabled=False):
            if ctx.fused:
                offsets_h, offsets_w, w1, b1, w2 = ctx.saved_tensors
                grads = offset_mlp_grads(offsets_h, offsets_w, w1, b1, w2, grad_table)
                return (None, None) + tuple(grad.to(w1.dtype) for grad in grads)
            offsets_h, offsets_w, w1, w2, row_part, col_part = ctx.saved_tensors
            grad_rows, grad_cols, grad_w2 = OffsetMLP._chunked_gradients(
                row_part, col_part, w2, grad_table)
            grad_w1 = torch.stack([offsets_h.to(grad_rows.dtype) @ grad_rows,
                                   offsets_w.to(grad_cols.dtype) @ grad_cols], dim=1)
            return (None, None, grad_w1.to(w1.dtype), grad_rows.sum(0).to(w1.dtype),
                    grad_w2.to(w2.dtype), grad_table.sum((1, 2)).to(w2.dtype))

    @staticmethod
    def _chunked_gradients(row_part, col_part, w2, grad_table):
        """Gradients of both hidden parts and of ``w2``, a chunk of grid rows at a time."""
        grad = grad_table.permute(1, 2, 0).contiguous()              # (Uh, Uw, heads)
        rows, cols, heads = grad.shape
        grad_rows = torch.empty_like(row_part)                        # d/d row_part
        # d/d col_part sums one term per chunk: in float64, or the float32 rounding
        # of hundreds of additions shows in fc1's gradient.
        grad_cols = torch.zeros_like(col_part, dtype=torch.float64)
        grad_w2 = torch.zeros_like(w2)
        for start, stop in OffsetMLP._chunks(rows, cols, row_part.shape[1], row_part.device):
            hidden = (row_part[start:stop, None] + col_part[None]).relu_()
            chunk = grad[start:stop]
            grad_w2.addmm_(chunk.reshape(-1, heads).t(), hidden.reshape(-1, hidden.shape[-1]))
            grad_hidden = (chunk @ w2).mul_(hidden > 0)
            torch.sum(grad_hidden, dim=1, out=grad_rows[start:stop])
            grad_cols += grad_hidden.sum(dim=0)
        return grad_rows, grad_cols.to(col_part.dtype), grad_w2


def _resize(x: Tensor, size: Size2d) -> Tensor:
    """Bilinear resize of a 4-D tensor's last two dims (``align_corners=False``).

    Equal sizes return the input unchanged, which is what the resize computes then;
    a captured graph resizes anyway, so that it does not depend on whether a symbolic
    size happens to equal the built one.
    """
    if not capturing_graph() and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


def expand_bias(table: Tensor, layout: BiasLayout) -> Tensor:
    """The whole bias, as the released model builds it.

    Args:
        table (Tensor): ``(heads, Uh, Uw)`` the MLP's output on ``layout.coords``.
        layout (BiasLayout): where to expand it to.

    Returns:
        Tensor: ``(heads, H*W, Hp*Wp)``.
    """
    heads = table.shape[0]
    qh, kh = layout.index_h.shape
    qw, kw = layout.index_w.shape
    (height, width), (pool_h, pool_w) = layout.query_size, layout.key_size
    bias = table[:, layout.index_h][..., layout.index_w]        # (h, Qh, Kh, Qw, Kw)
    bias = bias.permute(0, 1, 3, 2, 4).reshape(heads, qh * qw, kh, kw)
    bias = _resize(bias, (pool_h, pool_w))                       # key axes first
    bias = bias.reshape(heads, qh * qw, pool_h * pool_w).transpose(1, 2)
    bias = _resize(bias.reshape(heads, pool_h * pool_w, qh, qw), (height, width))
    return bias.reshape(heads, pool_h * pool_w, height * width).transpose(1, 2)


def _interp_taps(in_len: int, out_len: int, dtype=torch.float32):
    """The two source cells and weights of each output cell of a 1-D bilinear resize.

    The same arithmetic as PyTorch's ``align_corners=False`` resize, in the dtype
    it computes in (float32 for float32 and reduced-precision inputs, float64 for
    float64), so that applying the taps gives its numbers; in float32 the rounding
    of the source position would otherwise show at 1e-5 on a 200-cell axis.

    Returns:
        tuple[Tensor, Tensor]: ``(out_len, 2)`` long indices and weights in ``dtype``.
    """
    scale = torch.tensor(in_len, dtype=dtype) / out_len
    src = ((torch.arange(out_len, dtype=dtype) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.long().clamp(max=in_len - 1)
    high = (low + 1).clamp(max=in_len - 1)
    frac = src - low
    return torch.stack([low, high], -1), torch.stack([1 - frac, frac], -1)


class _KernelTable(torch.autograd.Function):
    """:meth:`RowFactoredBias.kernel_table` in the fused kernels
    (:mod:`~mmtransnext.ops.fused_bias_rows`): ``apply(table, bias, dtype)``."""

    @staticmethod
    def forward(ctx, table, bias, dtype):
        ctx.bias, ctx.table_shape, ctx.table_dtype = bias, table.shape, table.dtype
        return bias_rows(table, bias.layout.index_h, bias.row_taps(),
                         bias.separable_col_taps()[4], dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        bias = ctx.bias
        grad_table = bias_rows_grad(grad, bias.layout.index_h, bias.row_taps(),
                                    bias.separable_col_taps()[4], ctx.table_shape)
        return grad_table.to(ctx.table_dtype), None, None


class RowFactoredBias:
    """The bias of a band of query rows, without building the whole bias.

    Bilinear resizing is separable, so the row axes (query rows with key rows)
    are gathered and resized once, on first use, into ``by_rows`` of shape
    ``(heads, H, Hp, Uw)``, a few megabytes. The column axes are resized per
    band: a bias entry is then a 4-tap weighted sum over one ``Uw`` vector of
    ``by_rows``, whose taps (``col_index``, ``col_weight``, each ``(W, Wp, 4)``)
    are the product of the query-column and key-column resizes. The fused GPU
    kernels read the same rows with their columns numbered evenly
    (:meth:`kernel_table`).

    Args:
        table (Tensor): ``(heads, Uh, Uw)`` the MLP's output on ``layout.coords``.
        layout (BiasLayout): where to expand it to.

    Attributes:
        shape (tuple[int, int, int, int]): ``(heads, H, Hp, Uw)``, :attr:`by_rows`'.
        device (torch.device): where the bias lives.
    """

    def __init__(self, table: Tensor, layout: BiasLayout):
        self.layout = layout
        # The MLP's table until by_rows is built from it (then None: a cached bias of the
        # CPU's path keeps only by_rows, as the banded kernels read only that).
        self.table = table
        self.shape = (table.shape[0], layout.query_size[0], layout.key_size[0],
                      table.shape[2])
        self.device = table.device
        self._by_rows = None
        # The taps below depend on the layout alone: kept in layout.derived, they are
        # built and copied to its device once, not in every forward (building them on
        # CUDA reads the offsets' numbering back from the GPU, which waits for it).

    @property
    def by_rows(self) -> Tensor:
        """``(heads, H, Hp, Uw)``: the table at every query row and key row."""
        if self._by_rows is None:
            (height, _), (pool_h, _) = self.layout.query_size, self.layout.key_size
            by_rows = self.table[:, self.layout.index_h].permute(0, 3, 1, 2)  # (h, Uw, Qh, Kh)
            by_rows = _resize(by_rows, (height, pool_h))                      # (h, Uw, H, Hp)
            self._by_rows = by_rows.permute(0, 2, 3, 1).contiguous()          # (h, H, Hp, Uw)
            self.table = None
        return self._by_rows

    def kernel_table(self, dtype: torch.dtype) -> Tensor:
        """:attr:`by_rows` with its columns numbered evenly, the fused kernels' table.

        Where the fused kernels serve the table
        (:func:`~mmtransnext.ops.use_fused_attention`) one kernel each way builds it
        from :attr:`table` (:mod:`~mmtransnext.ops.fused_bias_rows`), resized in float32;
        elsewhere, or once :attr:`by_rows` is built, it is :attr:`by_rows` spread and
        cast. Gradients reach the MLP's table.

        Args:
            dtype (torch.dtype): the queries' dtype, which the kernels read it in.

        Returns:
            Tensor: ``(heads, H, Hp, Ue)`` in ``dtype``, contiguous; column ``e`` holds
            offset ``spread[e]`` (:attr:`BiasLayout.even_columns`).
        """
        if self.table is not None and use_fused_attention(self.table):
            return _KernelTable.apply(self.table, self, dtype)
        # Autograd sums the gradient of each offset's copies back (copies of an offset
        # that never occurs get none).
        spread = self.separable_col_taps()[4]
        return self.by_rows.index_select(-1, spread).to(dtype).contiguous()

    def row_taps(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The resize of the built rows to ``(H, Hp)``: ``(H, 2)`` source query rows
        (int32) and weights (float32), then ``(Hp, 2)`` source key rows and weights, on
        the layout's device. An axis that is not resized has taps ``(1, 0)``."""
        if 'row_taps' not in self.layout.derived:
            (height, _), (pool_h, _) = self.layout.query_size, self.layout.key_size
            qh, kh = self.layout.index_h.shape
            device = self.layout.index_h.device
            taps = _interp_taps(qh, height) + _interp_taps(kh, pool_h)
            self.layout.derived['row_taps'] = tuple(
                t.to(device, torch.int32 if i % 2 == 0 else torch.float32).contiguous()
                for i, t in enumerate(taps))
        return self.layout.derived['row_taps']

    def _column_resizes(self, dtype):
        """Source columns and weights of the query-column and key-column resizes."""
        (_, width), (_, pool_w) = self.layout.query_size, self.layout.key_size
        qw, kw = self.layout.index_w.shape
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return _interp_taps(qw, width, math_dtype) + _interp_taps(kw, pool_w, math_dtype)

    def col_taps(self, dtype) -> Tuple[Tensor, Tensor]:
        """``(W, Wp, 4)`` indices into ``Uw`` and their weights, for the CPU band kernels."""
        key = ('col_taps', dtype)
        if key not in self.layout.derived:
            (_, width), (_, pool_w) = self.layout.query_size, self.layout.key_size
            cols, col_w, keys, key_w = self._column_resizes(dtype)   # (W, 2), (Wp, 2)
            index_w = self.layout.index_w.cpu()
            index = index_w[cols[:, None, :, None], keys[None, :, None, :]]   # (W, Wp, 2, 2)
            weight = col_w[:, None, :, None] * key_w[None, :, None, :]
            device = self.layout.index_w.device
            self.layout.derived[key] = (index.reshape(width, pool_w, 4).to(device),
                                   weight.reshape(width, pool_w, 4).to(device, dtype))
        return self.layout.derived[key]

    def separable_col_taps(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The column taps as two factors, for the fused GPU kernels.

        The 4 taps of entry ``(c, b)`` are the products of 2 query-column taps and 2
        key-column taps: weight ``query_weight[c, i] * key_weight[b, j]`` on
        ``by_rows[..., spread][..., query_term[c, i] + key_term[b, j]]`` (see
        :attr:`BiasLayout.even_columns`). A kernel reads 4 short vectors per tile
        instead of two ``(W, Wp, 4)`` tables per entry.

        Returns:
            tuple[Tensor, ...]: ``query_term (W, 2)`` int32, ``query_weight (W, 2)``
            float32, ``key_term (Wp, 2)`` int32, ``key_weight (Wp, 2)`` float32 and
            ``spread (Ue,)`` long, all on the bias's device.
        """
        if 'separable_col_taps' not in self.layout.derived:
            cols, col_w, keys, key_w = self._column_resizes(torch.float32)
            query_term, key_term, spread = (t.cpu() for t in self.layout.even_columns)
            device = self.layout.index_w.device
            taps = (query_term[cols].to(device, torch.int32).contiguous(),
                    col_w.to(device).contiguous(),
                    key_term[keys].to(device, torch.int32).contiguous(),
                    key_w.to(device).contiguous(), spread.to(device))
            self.layout.derived['separable_col_taps'] = taps
        return self.layout.derived['separable_col_taps']

    def rows(self, start: int, stop: int, by_rows: Tensor = None) -> Tensor:
        """The bias of query rows ``start:stop``, in plain PyTorch.

        Args:
            start (int): first query row.
            stop (int): one past the last query row.
            by_rows (Tensor, optional): a stand-in for ``self.by_rows`` (used to
                take its gradient). Default: ``self.by_rows``.

        Returns:
            Tensor: ``(heads, rows, W, Hp, Wp)``, a strided view.
        """
        by_rows = self.by_rows if by_rows is None else by_rows
        heads, _, pool_h, _ = by_rows.shape
        width, pool_w = self.layout.query_size[1], self.layout.key_size[1]
        qw, kw = self.layout.index_w.shape
        band = by_rows[:, start:stop]                              # (h, R, Hp, Uw)
        rows = band.shape[1]
        band = band[..., self.layout.index_w]                      # (h, R, Hp, Qw, Kw)
        band = _resize(band.reshape(heads, rows * pool_h, qw, kw), (width, pool_w))
        return band.view(heads, rows, pool_h, width, pool_w).permute(0, 1, 3, 2, 4)
