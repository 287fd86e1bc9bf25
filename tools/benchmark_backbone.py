"""Whole-backbone speed and memory: reference path, default path and Swin-T, side by side.

Each path runs in its own process; on the CPU so does each (dtype, mode) of it, so
that one's peak memory does not hide in another's (the resident high-water mark only
grows), while on CUDA one process makes a path's runs one after the other, its peak
counter reset before each. One table with ratios is printed at the end (these
machines are noisy; compare numbers from the same run only).

* reference: ``MMTRANSNEXT_DISABLE_EXT=1``, the released algorithm (unfold, whole
  bias, one concatenated softmax);
* default: the compiled sliding-window op and biased attention that never builds
  the ``N x P`` bias (the fused Triton kernels on CUDA, the banded path on the CPU),
  softmaxes merged by their log-sum-exp;
* default-two-pass: the default path with the fused kernels' key and value gradients
  formed by a second, key-major pass (``fused_attention.BACKWARD_KV = 'two-pass'``)
  instead of atomics from every query block; the same as default where the fused
  kernels do not run (the CPU);
* default-taps: the default path with the fused kernels reading the bias table by taps,
  per logit (``fused_attention.BIAS_TILE = 'taps'``) instead of by slots; likewise the
  same as default on the CPU, and in float32, which reads by taps anyway;
* default-graphed (CUDA only): the default path's step captured once in a CUDA graph
  and replayed, which takes the host's launches out of the step: how fast the default
  path's kernels alone run it (autocast without its weight-cast cache, as capture asks);
* default-compiled: the default path under ``torch.compile`` (Inductor): the attention
  cores run eagerly between the compiled graphs where the fused kernels serve them
  (CUDA), else the released structure is compiled; the warm-up runs compile, so give
  ``--warmup 2`` (training compiles its backward at the first step);
* swin: Swin-T (mmdet's ``SwinTransformer`` when mmdet is importable, else timm's
  ``swin_tiny_patch4_window7_224`` as a feature extractor), the detection yardstick.
  timm's Swin takes sides divisible by 32, so it gets the input zero-padded to
  the next multiple of 32, as mmdet's data preprocessor pads every detector input.

Modes: ``forward`` (no grad, eval) and ``train`` (forward, a mean of every stage's
output, backward). dtypes: ``fp32``, or ``bf16`` autocast. Time: median over
``--repeats`` after ``--warmup`` (CUDA: synchronised, CUDA events). Memory: on CUDA
``torch.cuda.max_memory_allocated`` and, above the model, the same less what the
model and input held before the first step; on the CPU the peak RSS. On CUDA each row
also gives the host's time to issue a step (median, until ``step()`` returns, before
the synchronisation): near the step's time, the host sets the pace. ``--count-ops``
counts, in one more step, the ATen operators it dispatches (views apart): on a GPU
nearly each launches a kernel, and each costs the host its dispatch; on CUDA also the
operations that made the host wait for the GPU, and where they come from.

Examples (the figures in docs/benchmarks.md)::

    python tools/benchmark_backbone.py --arch tiny --size 800 1333 --batch 1
    python tools/benchmark_backbone.py --device cuda --size 800 1333 --batch 2 \\
        --dtypes fp32 bf16 --paths reference default swin --repeats 5 --warmup 2
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# The value of MMTRANSNEXT_DISABLE_EXT each path runs with.
PATHS = {'reference': '1', 'default': '0', 'default-two-pass': '0', 'default-taps': '0',
         'default-graphed': '0', 'default-compiled': '0', 'swin': '0'}
MODES = ('forward', 'train')
DTYPES = ('fp32', 'bf16')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', type=int, nargs=2, default=[800, 1333], metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--img-size', type=int, default=800,
                        help='the backbone\'s img_size (800 for detection, 512 for segmentation)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--dtypes', nargs='+', default=['fp32'], choices=DTYPES,
                        help='fp32, and/or bf16 autocast')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    parser.add_argument('--paths', nargs='+', default=['reference', 'default'],
                        choices=list(PATHS))
    parser.add_argument('--with-cp', action='store_true', help='activation checkpointing')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads')
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--json', help='also write the results to this file')
    parser.add_argument('--profile', type=int, default=0, metavar='K',
                        help='after the timed training steps of each TransNeXt path, profile '
                             'one more (torch.profiler) and print its K most expensive '
                             'operators and kernels (by device time on CUDA, CPU time on '
                             'the CPU)')
    parser.add_argument('--count-ops', action='store_true',
                        help='after the timed runs, count the ATen operators (views apart) '
                             'one more step dispatches: on a GPU nearly each launches '
                             'a kernel, and the host pays for each')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--path', default='default', choices=list(PATHS), help=argparse.SUPPRESS)
    parser.add_argument('--runs', nargs='+', default=['fp32:forward'], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile < 0:
        parser.error('--profile must not be negative')
    for name in ('batch', 'repeats', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.warmup < 0:
        parser.error('--warmup must not be negative')
    if 'default-graphed' in args.paths + [args.path] and args.device != 'cuda':
        parser.error('--paths default-graphed captures CUDA graphs: it needs --device cuda')
    if min(args.size) < 1:
        parser.error(f'--size must be positive, got {args.size}')
    return args


def _rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def swin_tiny(size):
    """Swin-T and the input size it runs at: mmdet's if importable, else timm's.

    Returns:
        tuple[nn.Module, tuple[int, int], str]: the backbone, its input ``(H, W)``
        and where it comes from.
    """
    try:
        from mmdet.models.backbones import SwinTransformer
    except ImportError:
        pass
    else:   # its defaults are Swin-T; it pads any input to its patches and windows
        return SwinTransformer(), tuple(size), 'mmdet SwinTransformer'
    try:
        import timm
    except ImportError:
        raise RuntimeError('Swin-T needs mmdet or timm installed') from None
    padded = tuple(-(-side // 32) * 32 for side in size)
    model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False,
                              features_only=True, img_size=padded, strict_img_size=False)
    return model, padded, f'timm {timm.__version__}'


def _worker(args) -> list:
    """Time the ``--runs`` (``dtype:mode``) of one path in this process, in order."""
    import torch
    from mmtransnext.models import TransNeXt
    from mmtransnext.ops import fused_attention, use_compiled_op, use_fused_attention

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    size = tuple(args.size)
    if args.path == 'default-two-pass':
        fused_attention.BACKWARD_KV = 'two-pass'
    if args.path == 'default-taps':
        fused_attention.BIAS_TILE = 'taps'
    if args.path == 'swin':
        model, size, source = swin_tiny(size)
    else:
        model = TransNeXt(arch=args.arch, img_size=args.img_size, pretrain_size=224,
                          with_cp=args.with_cp)
        source = f'TransNeXt-{args.arch}'
    model = model.to(device)
    if args.path == 'default-compiled':
        model = torch.compile(model)
    x = torch.randn(args.batch, 3, *size, device=device)
    probe = x.new_zeros(1)
    info = dict(model=source, input=list(size), compiled=use_compiled_op(probe),
                fused_backward=fused_attention.BACKWARD_KV,
                fused_bias_tile=fused_attention.BIAS_TILE)
    cuda = device.type == 'cuda'
    if cuda:
        info['device_name'] = torch.cuda.get_device_name()
    results = []
    for run in args.runs:
        dtype, mode = run.split(':')
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            baseline = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            baseline = _rss_mb()
        # Whether the pooled attention takes the fused kernels in this run's dtype.
        fused = use_fused_attention(probe.to(torch.bfloat16 if dtype == 'bf16' else torch.float32))
        results.append(dict(info, dtype=dtype, mode=mode, baseline_mb=baseline, fused=fused,
                            **_time(args, model, x, dtype, mode)))
    return results


def _time(args, model, x, dtype: str, mode: str) -> dict:
    """Median time and peak memory of one mode and dtype of ``model`` on ``x``."""
    import torch

    from mmtransnext.tools.profiling import (count_operators, count_synchronizations,
                                             profile_table)
    cuda = x.device.type == 'cuda'
    graphed = args.path == 'default-graphed'
    # One step of a replayed graph or of compiled code is not the operators it stands for
    # (and a dispatch mode would recompile the code).
    opaque = args.path in ('default-graphed', 'default-compiled')
    # A captured graph must not reuse casts cached before its capture.
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == 'bf16',
                              cache_enabled=not graphed)

    if mode == 'forward':
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            with autocast:
                loss = sum(out.float().mean() for out in model(x))
            loss.backward()

    if graphed:
        step = _cuda_graphed(step)
    times, host_times = [], []
    for _ in range(args.warmup + args.repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            issued = time.perf_counter()
            start.record()
            step()
            host_times.append((time.perf_counter() - issued) * 1e3)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = dict(time_ms=statistics.median(times[args.warmup:]), peak_mb=peak)
    if cuda:
        result['host_ms'] = statistics.median(host_times[args.warmup:])
    if args.profile and mode == 'train' and args.path != 'swin' and not opaque:
        result['profile'] = profile_table(step, cuda, args.profile)
    if args.count_ops and not opaque:
        result.update(count_operators(step))
        if cuda:
            result.update(count_synchronizations(step))
    return result


def _cuda_graphed(step):
    """``step`` captured in a CUDA graph after warm-up runs on a side stream (kernels
    compiled, caches filled, as capture needs); returns the graph's replay."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _worker_command(args, path, runs):
    return [sys.executable, os.path.abspath(__file__), '--worker', '--path', path, '--runs',
            *runs, '--device', args.device, '--arch', args.arch, '--size',
            *map(str, args.size), '--batch', str(args.batch), '--img-size', str(args.img_size),
            '--threads', str(args.threads), '--repeats', str(args.repeats), '--warmup',
            str(args.warmup), '--profile', str(args.profile)] + (
                ['--with-cp'] if args.with_cp else []) + (['--count-ops'] if args.count_ops else [])


def run_path(args, path: str, runs) -> list:
    """The ``runs`` (``(dtype, mode)`` pairs) of a path in a child process; failures
    come back as rows with ``error``."""
    # Freed host memory goes back to the OS at once, so the CPU's high-water mark
    # follows live tensors rather than heap fragmentation.
    env = dict(os.environ, MMTRANSNEXT_DISABLE_EXT=PATHS[path], MALLOC_MMAP_THRESHOLD_='131072')
    done = subprocess.run(_worker_command(args, path, [f'{d}:{m}' for d, m in runs]), env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ['(no output)']
        return [dict(path=path, mode=m, dtype=d, error=lines[-1][:200]) for d, m in runs]
    rows = [dict(row, path=path) for row in json.loads(done.stdout.strip().splitlines()[-1])]
    if path != 'swin' and rows[0]['compiled'] != path.startswith('default'):
        return [dict(row, error=f'{path} path did not run as asked (compiled op used: '
                                f'{row["compiled"]}); build the extension with `make ext`')
                for row in rows]
    return rows


def _ratio(numerator, denominator) -> str:
    return f'{numerator / denominator:.2f}x' if denominator > 0 else '-'


def format_table(rows) -> str:
    """The results as a table, with each path's ratios to the reference and to Swin-T.

    Args:
        rows (list[dict]): one per run, with ``path``, ``mode``, ``dtype`` and either
            ``time_ms``, ``peak_mb``, ``baseline_mb`` or ``error``.

    Returns:
        str: one line per row; ``speed-up`` and ``memory`` are the reference's time
        and peak over this row's (higher is better), ``vs Swin-T`` this row's time
        over Swin-T's (lower is better).
    """
    header = (f'{"dtype":5} {"mode":8} {"path":16} {"time ms":>9} {"peak MB":>9} '
              f'{"above model MB":>14} {"speed-up":>9} {"memory":>8} {"vs Swin-T":>9}')
    lines = [header, '-' * len(header)]
    groups = {}
    for row in rows:
        groups.setdefault((row['dtype'], row['mode']), {})[row['path']] = row
    for (dtype, mode), by_path in groups.items():
        ref, swin = by_path.get('reference'), by_path.get('swin')
        for path, row in by_path.items():
            lead = f'{dtype:5} {mode:8} {path:16}'
            if 'error' in row:
                lines.append(f'{lead} failed: {row["error"]}')
                continue
            ok_ref = ref is not None and 'error' not in ref
            ok_swin = swin is not None and 'error' not in swin
            lines.append(
                f'{lead} {row["time_ms"]:9.1f} {row["peak_mb"]:9.0f} '
                f'{row["peak_mb"] - row["baseline_mb"]:14.0f} '
                f'{_ratio(ref["time_ms"], row["time_ms"]) if ok_ref else "-":>9} '
                f'{_ratio(ref["peak_mb"], row["peak_mb"]) if ok_ref else "-":>8} '
                f'{_ratio(row["time_ms"], swin["time_ms"]) if ok_swin else "-":>9}')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    runs = [(dtype, mode) for dtype in args.dtypes for mode in args.modes]
    # The CPU's peak (ru_maxrss) cannot be reset: a process per run there.
    batches = [runs] if args.device == 'cuda' else [[run] for run in runs]
    by_run = {}
    for path in args.paths:
        for batch in batches:
            for row in run_path(args, path, batch):
                by_run[(row['dtype'], row['mode'], path)] = row
                # Each row (and profile) as it comes, so that a run stopped at a time
                # limit keeps what it measured.
                print(f'{path} {row["dtype"]} {row["mode"]}: ' + (
                    f'failed: {row["error"]}' if 'error' in row else
                    f'{row["time_ms"]:.1f} ms, peak {row["peak_mb"]:.0f} MB'
                    + (f', host {row["host_ms"]:.1f} ms' if 'host_ms' in row else '')
                    + (f', {row["operators"]} operators and {row["views"]} views a step'
                       if 'operators' in row else '')
                    + (f', {row["synchronizations"]} synchronizations '
                       f'({", ".join(row["sync_sites"]) or "none"})'
                       if 'synchronizations' in row else ''))
                    + (f' ({row["model"]})' if path == 'swin' and 'model' in row else ''),
                    flush=True)
                if 'profile' in row:
                    print(f'\nprofile of one training step: {path}, {row["dtype"]}\n'
                          f'{row["profile"]}\n', flush=True)
    rows = [by_run[(dtype, mode, path)] for dtype, mode in runs for path in args.paths]
    done = next((r for r in rows if 'error' not in r), {})
    where = done.get('device_name', args.device)
    print(f'{args.batch}x3x{args.size[0]}x{args.size[1]} on {where}, TransNeXt-{args.arch} '
          f'img_size {args.img_size}, with_cp={args.with_cp}, median of {args.repeats} after '
          f'{args.warmup} warm-up' + (f', {args.threads} threads' if args.device == 'cpu' else ''))
    for dtype in args.dtypes:
        fused = {r['fused'] for r in rows if r['path'] == 'default' and r['dtype'] == dtype
                 and 'fused' in r}
        if fused:
            print(f'default path pooled attention, {dtype}: ' +
                  ('fused Triton kernels' if fused == {True} else 'banded'))
    swin = next((r for r in rows if r['path'] == 'swin' and 'model' in r), None)
    if swin is not None:
        print(f'Swin-T: {swin["model"]}, input {swin["input"][0]}x{swin["input"][1]}')
    print(format_table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    if any('error' in r for r in rows):
        sys.exit(1)


if __name__ == '__main__':
    main()
