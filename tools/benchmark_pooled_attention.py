"""Biased attention alone: the whole-matrix, banded and fused kernels, side by side.

The pooled half of aggregated attention (and the last stage's full attention) at
the shapes of one TransNeXt-T stage at 800x1333 (``--stage``, the table ``STAGES``
below), with the position bias resized as in detection (built on the 800 px grid).
Per path and dtype: median time of the forward and of forward+backward (gradients
of queries, keys, values and the bias table), and on CUDA the peak
``torch.cuda.max_memory_allocated`` above the inputs. As in the model, the backward
gets the log-sum-exp's gradient at stages 1-3 and none at stage 4 (where the fused
kernels walk the keys twice in float32, see
:mod:`~mmtransnext.ops.fused_attention`).

* whole: the released way, the whole ``(heads, N, P)`` bias and one softmax;
* banded: :func:`~mmtransnext.ops.banded_attention.banded_bias_attention` (the CPU path);
* fused: :func:`~mmtransnext.ops.fused_attention.fused_bias_attention` (CUDA; on
  the CPU only under ``TRITON_INTERPRET=1``, for checking, not timing), once per
  ``--tiles`` launch configuration (default: the one the dispatcher uses), so that
  tile sizes are compared in one run;
* fused-fixed-bias: the same kernels with a bias table that needs no gradient (not in
  the default ``--paths``): its backward leaves out the bias table's atomic adds, so
  the difference to ``fused`` is what they cost.

Fused rows run once per ``--backward`` way of forming the key and value gradients
(:data:`~mmtransnext.ops.fused_attention.BACKWARD_KV`: ``atomic``, or ``two-pass``
with a key-major kernel; default: the dispatcher's) and once per ``--bias-tile`` way of
reading the bias and adding its gradient
(:data:`~mmtransnext.ops.fused_attention.BIAS_TILE`: ``taps`` per logit, or ``slots``
per tile; by default the dispatcher's, which reads float32 by taps, but ``--bias-tile
slots`` reads float32 by slots too); the label names ``two-pass`` and ``slots``.

Example::

    python tools/benchmark_pooled_attention.py --device cuda --stage 1 --batch 2 \\
        --dtypes fp32 bf16 --repeats 10 --tiles 32x32x8 64x64x4 \\
        --paths whole banded fused fused-fixed-bias --backward atomic two-pass \\
        --bias-tile taps slots
"""
import argparse
import statistics
import sys
import time

# TransNeXt-T at 800x1333: query map, pooled map, heads; the bias is built on the
# square grids of img_size 800 and resized to these.
# merged: aggregated attention merges the log-sum-exp with the window's logits, so
# the backward gets its gradient; the last stage's full attention drops it.
STAGES = {
    1: dict(query=(200, 334), key=(25, 41), heads=3, build=(200, 25), merged=True),
    2: dict(query=(100, 167), key=(25, 41), heads=6, build=(100, 25), merged=True),
    3: dict(query=(50, 84), key=(25, 42), heads=12, build=(50, 25), merged=True),
    4: dict(query=(25, 42), key=(25, 42), heads=24, build=(25, 25), merged=False),
}
PATHS = ('whole', 'banded', 'fused', 'fused-fixed-bias')
DEFAULT_PATHS = PATHS[:3]
FUSED = ('fused', 'fused-fixed-bias')
DTYPES = {'fp32': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--stage', type=int, default=1, choices=sorted(STAGES))
    parser.add_argument('--scale', type=int, default=1,
                        help='divide both maps by this (small runs, e.g. on the CPU)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--head-dim', type=int, default=24)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--dtypes', nargs='+', default=['fp32'], choices=list(DTYPES))
    parser.add_argument('--paths', nargs='+', default=list(DEFAULT_PATHS), choices=PATHS)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--tiles', type=_tiles, nargs='+', default=[None],
                        help='fused path: BLOCK_MxBLOCK_NxWARPS launch configurations '
                             '(default: the dispatcher\'s)')
    parser.add_argument('--backward', nargs='+', default=None,
                        choices=['atomic', 'two-pass'],
                        help='fused path: how the key/value gradients are formed '
                             '(default: the dispatcher\'s)')
    parser.add_argument('--bias-tile', nargs='+', default=None, choices=['taps', 'slots'],
                        help='fused path: how a tile reads the bias and adds its gradient '
                             '(default: the dispatcher\'s)')
    args = parser.parse_args(argv)
    for name in ('scale', 'batch', 'head_dim', 'repeats'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.warmup < 0:
        parser.error('--warmup must not be negative')
    return args


def _tiles(text):
    from mmtransnext.tools.common import parse_tiles
    return parse_tiles(text)


def shapes(args) -> dict:
    """The stage's grids divided by ``--scale`` (at least one cell each)."""
    stage = STAGES[args.stage]
    query, key, build = ([max(1, side // args.scale) for side in stage[name]]
                         for name in ('query', 'key', 'build'))
    return dict(query=tuple(query), key=tuple(key), heads=stage['heads'],
                build_query=(build[0], ) * 2, build_key=(build[1], ) * 2)


def make_inputs(args, dtype, device):
    """Leaves ``query, key, value, table`` (model-sized logits) and the bias layout."""
    import torch
    import torch.nn.functional as F
    from mmtransnext.models.position_bias import bias_layout

    shape = shapes(args)
    layout = bias_layout(shape['build_query'], shape['build_key'], (56, 56), shape['query'],
                         shape['key'], device)
    gen = torch.Generator().manual_seed(0)
    tokens = shape['query'][0] * shape['query'][1]
    keys = shape['key'][0] * shape['key'][1]
    heads, dim = shape['heads'], args.head_dim

    def randn(*size):
        return torch.randn(*size, generator=gen)

    query = F.normalize(randn(args.batch, heads, tokens, dim), dim=-1) * 12.0
    key = F.normalize(randn(args.batch, heads, keys, dim), dim=-1)
    value = randn(args.batch, heads, keys, dim)
    table = randn(heads, *layout.coords.shape[:2])
    leaves = [t.to(device, dtype).requires_grad_() for t in (query, key, value, table)]
    return leaves, layout


def attention(path):
    """``f(query, key, value, table, layout) -> (out, lse)`` of one path."""
    from mmtransnext.models.position_bias import RowFactoredBias, expand_bias
    from mmtransnext.ops.banded_attention import banded_bias_attention
    from mmtransnext.ops.fused_attention import fused_bias_attention

    def whole(query, key, value, table, layout):
        logits = query @ key.transpose(-2, -1) + expand_bias(table, layout)
        return logits.softmax(-1) @ value, logits.logsumexp(-1)

    def factored(kernel):
        return lambda query, key, value, table, layout: kernel(
            query, key, value, RowFactoredBias(table, layout))

    return {'whole': whole, 'banded': factored(banded_bias_attention),
            'fused': factored(fused_bias_attention),
            'fused-fixed-bias': factored(fused_bias_attention)}[path]


def measure(fn, device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (synchronised on CUDA)."""
    import torch
    times = []
    for _ in range(warmup + repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[warmup:])


def fused_runs(args, dtype_name: str) -> list:
    """The launch configurations the fused path runs with: ``--tiles`` or the default."""
    import torch

    from mmtransnext.ops import fused_attention
    shape = shapes(args)
    resized = (shape['build_query'][1] != shape['query'][1]
               or shape['build_key'][1] != shape['key'][1])
    default = fused_attention.launch_tiles(getattr(torch, DTYPES[dtype_name]), resized)
    return [tiles or default for tiles in args.tiles]


def backward_ways(args) -> list:
    """The fused path's ways of forming key/value gradients: ``--backward`` or the default."""
    from mmtransnext.ops import fused_attention
    return args.backward or [fused_attention.BACKWARD_KV]


def bias_tiles(args, dtype_name: str) -> list:
    """How the fused path reads the bias: ``--bias-tile``, else the dispatcher's way for
    the dtype (taps for float32, which is not in ``SLOT_DTYPES``)."""
    import torch

    from mmtransnext.ops import fused_attention
    if args.bias_tile:
        return args.bias_tile
    if getattr(torch, DTYPES[dtype_name]) not in fused_attention.SLOT_DTYPES:
        return ['taps']
    return [fused_attention.BIAS_TILE]


def path_label(path: str, tiles: dict = None, backward: str = 'atomic',
               bias: str = 'taps') -> str:
    from mmtransnext.tools.common import tiles_label
    label = path if tiles is None else f'{path} {tiles_label(tiles)}'
    for way in (backward, bias):
        label = label if way in ('atomic', 'taps') else f'{label} {way}'
    return label


def run(args, path: str, dtype_name: str, tiles: dict = None, backward: str = 'atomic',
        bias: str = 'taps') -> dict:
    """Forward and forward+backward of one path and dtype (fused: launched with ``tiles``,
    key/value gradients formed the ``backward`` way, the bias read the ``bias`` way)."""
    import torch

    from mmtransnext.ops import fused_attention
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[dtype_name])
    if tiles is not None:
        # The fused path reads its launch configuration from LAUNCH, BACKWARD_KV and
        # BIAS_TILE at every call.
        fused_attention.LAUNCH[dtype] = (tiles, tiles)
        fused_attention.BACKWARD_KV = backward
        fused_attention.BIAS_TILE = bias
        if bias == 'slots' and dtype not in fused_attention.SLOT_DTYPES:
            # asked for: float32 by slots too (its slot matmuls spill, so the
            # dispatcher keeps taps; this times what that costs)
            fused_attention.SLOT_DTYPES += (dtype, )
    leaves, layout = make_inputs(args, dtype, device)
    if path == 'fused-fixed-bias':
        leaves[3].requires_grad_(False)
    fn = attention(path)
    out, lse = fn(*leaves, layout)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)

    def forward():
        with torch.no_grad():
            fn(*leaves, layout)

    merged = STAGES[args.stage]['merged']

    def train():
        out, lse = fn(*leaves, layout)
        loss = (out * grad_out).sum() + ((lse * grad_lse).sum() if merged else 0)
        torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])

    row = dict(path=path_label(path, tiles, backward, bias), dtype=dtype_name)
    for mode, step in (('forward', forward), ('train', train)):
        if device.type == 'cuda':
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        row[f'{mode}_ms'] = measure(step, device, args.warmup, args.repeats)
        if device.type == 'cuda':
            row[f'{mode}_mb'] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def format_table(rows) -> str:
    """Times (and CUDA memory) per path; ``x whole`` is the whole-matrix time over this one."""
    header = (f'{"dtype":5} {"path":40} {"forward ms":>10} {"x whole":>8} {"fwd+bwd ms":>10} '
              f'{"x whole":>8} {"fwd MB":>8} {"fwd+bwd MB":>10}')
    lines = [header, '-' * len(header)]
    whole = {r['dtype']: r for r in rows if r['path'] == 'whole' and 'error' not in r}
    for row in rows:
        lead = f'{row["dtype"]:5} {row["path"]:40}'
        if 'error' in row:
            lines.append(f'{lead} failed: {row["error"]}')
            continue
        ref = whole.get(row['dtype'])
        cells = []
        for mode in ('forward', 'train'):
            cells.append(f'{row[f"{mode}_ms"]:10.2f}')
            cells.append(f'{ref[f"{mode}_ms"] / row[f"{mode}_ms"]:7.2f}x' if ref else f'{"-":>8}')
        memory = [f'{row[k]:8.0f}' if k in row else f'{"-":>8}' for k in ('forward_mb',)]
        memory += [f'{row[k]:10.0f}' if k in row else f'{"-":>10}' for k in ('train_mb',)]
        lines.append(' '.join([lead] + cells + memory))
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    shape = shapes(args)
    rows = []
    for dtype_name in args.dtypes:
        for path in args.paths:
            fused = path in FUSED
            for tiles in (fused_runs(args, dtype_name) if fused else [None]):
                for backward, bias in ([(kv, way) for kv in backward_ways(args)
                                        for way in bias_tiles(args, dtype_name)]
                                       if fused else [('atomic', 'taps')]):
                    try:
                        rows.append(run(args, path, dtype_name, tiles, backward, bias))
                    except (RuntimeError, ValueError) as exc:   # out of memory, bad dtype
                        rows.append(dict(path=path_label(path, tiles, backward, bias),
                                         dtype=dtype_name, error=(
                                             f'{type(exc).__name__}: '
                                             f'{str(exc).splitlines()[0][:160]}')))
                    # Each row as it comes, so that a run stopped at a time limit keeps them.
                    print(format_table(rows).splitlines()[-1], flush=True)
    print(f'stage {args.stage}: {args.batch} x {shape["heads"]} heads, queries '
          f'{shape["query"][0]}x{shape["query"][1]}, keys {shape["key"][0]}x{shape["key"][1]}, '
          f'head dim {args.head_dim}, {args.device}, median of {args.repeats} after '
          f'{args.warmup} warm-up')
    print(format_table(rows))
    if any('error' in r for r in rows):
        sys.exit(1)


if __name__ == '__main__':
    main()
