#!/usr/bin/env python
"""Benchmark the compiled sliding-window op against the pure-PyTorch reference.

The workload is the local half of TransNeXt's aggregated attention as the model runs it:
``sliding_window_logits(q, k, bias)`` -> softmax -> ``sliding_window_aggregate(., v)``.
The default shape is stage 1 of TransNeXt-T on an 800x1333 image: B=2, heads=3, a
200x334 map, head dim 24, window 3.

On the CPU every (path, mode, dtype) runs in its own subprocess so peak memory does not
mix: the peak is ``ru_maxrss`` (the process's resident high-water mark) after the timed
runs, minus the resident size measured (``/proc/self/statm``) right after the inputs
were allocated; i.e. the extra memory the computation needed on top of its inputs (and,
for forward+backward, of the dense output gradient, allocated with them). Workers run
with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed tensors leave the resident set at once.
On CUDA the allocator counts for itself: every run is made in this process, and the
peak is ``torch.cuda.max_memory_allocated`` minus what was allocated once the inputs
were, the same "above the inputs" as on the CPU.
Times are the median of ``--repeats`` runs after one warm-up run.

Inputs are float32 unless ``--dtype`` names float16 or bfloat16 (both paths then run
in that dtype; on CUDA that is the dtype the model's attention runs in under autocast);
several dtypes give a table each, in one run.

Usage:
    python tools/benchmark_op.py [--repeats 5] [--threads 2]
        [--shape B HEADS HEIGHT WIDTH DIM WS] [--device cpu] [--dtype float32 ...]
        [--profile K]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHAPE = (2, 3, 200, 334, 24, 3)
PATHS = ('compiled', 'reference')
MODES = ('forward', 'forward+backward')


def current_rss_bytes():
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE')


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(path, mode, shape, repeats, threads, device, dtype_name, profile=0):
    """Median time and peak extra memory of one (path, mode) in one dtype, as a dict.

    With ``profile`` > 0, the compiled path's forward+backward also returns a
    ``torch.profiler`` table of one more run (its ``profile`` costliest entries).
    """
    try:     # the installed package (with its compiled op), else this checkout
        import mmtransnext  # noqa: F401
    except ImportError:
        sys.path.insert(0, ROOT)
    import torch

    from mmtransnext.ops import sliding_window as sw

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    if path == 'compiled':
        if not sw.extension_available(device):
            raise SystemExit(f'compiled op not built for {device}: {sw._LOAD_ERROR}')
        logits_fn, aggregate_fn = sw.sliding_window_logits, sw.sliding_window_aggregate
        os.environ.pop(sw.DISABLE_ENV, None)
    else:
        logits_fn = sw.sliding_window_logits_reference
        aggregate_fn = sw.sliding_window_aggregate_reference

    B, h, H, W, d, ws = shape
    N = H * W
    gen = torch.Generator().manual_seed(0)
    backward = mode == 'forward+backward'
    q, k, v = (torch.randn(B, h, N, d, generator=gen).to(device, dtype).requires_grad_(backward)
               for _ in range(3))
    bias = (0.1 * torch.randn(h, ws * ws, generator=gen)).to(device, dtype)
    bias.requires_grad_(backward)
    # In the model the gradient reaching the attention output is a dense tensor produced
    # upstream (by the output projection's backward): allocate it with the inputs.
    grad_out = torch.randn(B, h, N, d, generator=gen).to(device, dtype) if backward else None

    def step():
        with torch.set_grad_enabled(backward):
            attn = logits_fn(q, k, bias, H, W, ws).softmax(-1)
            out = aggregate_fn(attn, v, H, W, ws)
            if backward:
                out.backward(grad_out)
                for t in (q, k, v, bias):
                    t.grad = None
        if device != 'cpu':
            torch.cuda.synchronize()

    on_cuda = device != 'cpu'
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = current_rss_bytes()
    step()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if on_cuda else peak_rss_bytes()
    result = dict(path=path, mode=mode, dtype=dtype_name, median_s=statistics.median(times),
                  times_s=times, peak_extra_mib=(peak - baseline) / 2**20)
    if profile and path == 'compiled' and backward:
        from mmtransnext.tools.profiling import profile_table
        result['profile'] = profile_table(step, on_cuda, profile)
    return result


def run_worker(path, mode, args, dtype_name):
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', path, mode,
           '--repeats', str(args.repeats), '--threads', str(args.threads),
           '--device', args.device, '--dtype', dtype_name, '--shape', *map(str, args.shape),
           '--profile', str(args.profile)]
    # A fixed mmap threshold makes glibc return every large freed block to the OS at
    # once, so the resident high-water mark follows live tensor memory instead of heap
    # fragmentation (the default threshold adapts to freed sizes up to 32 MiB).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f'{path} {mode} failed:\n{proc.stdout}\n{proc.stderr}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results):
    """One markdown row per (dtype, mode): both paths, their speed and memory ratios."""
    header = (f'| {"dtype":<8} | {"mode":<16} | {"reference ms":>12} | {"compiled ms":>11} '
              f'| {"speed-up":>8} | {"reference MiB":>13} | {"compiled MiB":>12} '
              f'| {"memory ratio":>12} |')
    lines = [header, '|' + '|'.join('-' * len(c) for c in header.split('|')[1:-1]) + '|']
    for dtype_name in dict.fromkeys(r['dtype'] for r in results):
        for m in MODES:
            ref, comp = (next(r for r in results
                              if (r['dtype'], r['mode'], r['path']) == (dtype_name, m, p))
                         for p in ('reference', 'compiled'))
            lines.append(
                f'| {dtype_name:<8} | {m:<16} | {ref["median_s"] * 1e3:>12.1f} '
                f'| {comp["median_s"] * 1e3:>11.1f} '
                f'| {ref["median_s"] / comp["median_s"]:>7.1f}x '
                f'| {ref["peak_extra_mib"]:>13.1f} | {comp["peak_extra_mib"]:>12.1f} '
                f'| {ref["peak_extra_mib"] / max(comp["peak_extra_mib"], 1e-3):>11.1f}x |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shape', nargs=6, type=int, default=list(DEFAULT_SHAPE),
                        metavar=('B', 'HEADS', 'HEIGHT', 'WIDTH', 'DIM', 'WS'))
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--dtype', nargs='+', default=['float32'],
                        choices=('float32', 'float16', 'bfloat16'))
    parser.add_argument('--profile', type=int, default=0, metavar='K',
                        help='after the compiled path\'s timed forward+backward runs, profile '
                             'one more (torch.profiler) and print its K costliest operators '
                             'and kernels (default: 0, no profile)')
    parser.add_argument('--worker', nargs=2, metavar=('PATH', 'MODE'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be at least 1')
    if args.profile < 0:
        parser.error('--profile must not be negative')
    if args.worker:
        print(json.dumps(measure(*args.worker, tuple(args.shape), args.repeats, args.threads,
                                 args.device, args.dtype[0], args.profile)))
        return 0

    B, h, H, W, d, ws = args.shape
    print(f'sliding-window attention (logits -> softmax -> aggregate), device={args.device}, '
          f'threads={args.threads}, B={B} heads={h} map={H}x{W} d={d} ws={ws}, '
          f'median of {args.repeats}; MiB above the inputs')
    results = []
    for dtype_name in args.dtype:
        for m in MODES:
            for p in PATHS:
                if args.device == 'cpu':
                    results.append(run_worker(p, m, args, dtype_name))
                else:
                    results.append(measure(p, m, tuple(args.shape), args.repeats, args.threads,
                                           args.device, dtype_name, args.profile))
    print(format_table(results))
    for result in results:
        if 'profile' in result:
            print(f'\nprofile of one compiled forward+backward, {result["dtype"]}\n'
                  f'{result["profile"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
