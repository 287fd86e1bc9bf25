"""Whole-backbone speed and memory: the default path against the reference path.

Each (path, mode) pair runs in its own process, so that one's peak memory does not
hide in another's, and the table is printed side by side with ratios in one run
(these machines are noisy; compare numbers from the same run only).

* reference: ``MMTRANSNEXT_DISABLE_EXT=1``, the released algorithm (unfold, whole
  bias, one concatenated softmax);
* default: the compiled sliding-window op, banded pooled attention, merged softmax.

Example (the figures in docs/benchmarks.md)::

    python tools/benchmark_backbone.py --arch tiny --size 800 1333 --batch 1

On a GPU, ``--device cuda`` (peak memory is then ``torch.cuda.max_memory_allocated``
in the RSS columns) and ``--amp bfloat16`` or ``--amp float16`` for autocast.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

PATHS = {'reference': '1', 'default': '0'}


def _rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def _worker(args) -> dict:
    """Time one mode of one path in this process; peak RSS from the kernel's high-water mark."""
    import torch
    from mmtransnext.models import TransNeXt
    from mmtransnext.ops import use_compiled_op

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TransNeXt(arch=args.arch, img_size=args.img_size, pretrain_size=224,
                      with_cp=args.with_cp).to(args.device)
    x = torch.randn(args.batch, 3, *args.size, device=args.device)
    compiled = use_compiled_op(x)
    cuda = x.device.type == 'cuda'
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    amp = torch.autocast(x.device.type, dtype=getattr(torch, args.amp or 'float32'),
                         enabled=args.amp is not None)

    if args.mode == 'forward':
        model.eval()

        def step():
            with torch.no_grad(), amp:
                model(x)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            with amp:
                loss = sum(out.float().mean() for out in model(x))
            loss.backward()

    times = []
    for _ in range(args.warmup + args.repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[args.warmup:])
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(time_s=times[len(times) // 2], peak_mb=peak, baseline_mb=baseline,
                compiled=compiled)


def _run(args, path: str, mode: str) -> dict:
    # Freed tensors go back to the OS at once, so the high-water mark follows live
    # tensors rather than heap fragmentation (as tools/benchmark_op.py does).
    env = dict(os.environ, MMTRANSNEXT_DISABLE_EXT=PATHS[path], MALLOC_MMAP_THRESHOLD_='131072')
    cmd = [sys.executable, __file__, '--worker', '--mode', mode, '--arch', args.arch,
           '--size', *map(str, args.size), '--batch', str(args.batch), '--img-size',
           str(args.img_size), '--threads', str(args.threads), '--repeats', str(args.repeats),
           '--warmup', str(args.warmup), '--device', args.device] + (
               ['--with-cp'] if args.with_cp else []) + (['--amp', args.amp] if args.amp else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f'{path}/{mode} failed:\n{done.stderr[-3000:]}')
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result['compiled'] != (path == 'default'):
        raise SystemExit(f'{path} path did not run as asked (compiled op used: '
                         f'{result["compiled"]}); build the extension with `make ext`')
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', type=int, nargs=2, default=[800, 1333], metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--img-size', type=int, default=800,
                        help='the backbone\'s img_size (800 for detection, 512 for segmentation)')
    parser.add_argument('--modes', nargs='+', default=['forward', 'train'],
                        choices=['forward', 'train'])
    parser.add_argument('--paths', nargs='+', default=['reference', 'default'],
                        choices=list(PATHS))
    parser.add_argument('--with-cp', action='store_true', help='activation checkpointing')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', choices=['bfloat16', 'float16'], default=None,
                        help='run under autocast in this dtype')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--mode', default='forward', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    print(f'TransNeXt-{args.arch}, input {args.batch}x3x{args.size[0]}x{args.size[1]}, '
          f'img_size {args.img_size}, {args.device}, amp={args.amp}, {args.threads} threads, '
          f'with_cp={args.with_cp}, '
          f'median of {args.repeats} after {args.warmup} warm-up')
    header = f'{"mode":8} {"path":10} {"time s":>8} {"peak RSS MB":>12} {"above model MB":>15}'
    print(header)
    print('-' * len(header))
    for mode in args.modes:
        rows = {path: _run(args, path, mode) for path in args.paths}
        for path, r in rows.items():
            print(f'{mode:8} {path:10} {r["time_s"]:8.2f} {r["peak_mb"]:12.0f} '
                  f'{r["peak_mb"] - r["baseline_mb"]:15.0f}')
        if {'reference', 'default'} <= set(rows):
            ref, new = rows['reference'], rows['default']
            print(f'{mode:8} {"ratio":10} {ref["time_s"] / new["time_s"]:7.2f}x '
                  f'{ref["peak_mb"] / new["peak_mb"]:11.2f}x '
                  f'{(ref["peak_mb"] - ref["baseline_mb"]) / (new["peak_mb"] - new["baseline_mb"]):14.2f}x'
                  '   (reference / default: higher is better)')


if __name__ == '__main__':
    main()
