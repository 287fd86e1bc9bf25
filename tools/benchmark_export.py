#!/usr/bin/env python
"""Latency of a TransNeXt backbone: eager PyTorch against torch.compile or ONNX Runtime.

    python tools/benchmark_export.py --arch tiny --size 512,512 --runtime ort [--repeat 3]
    python tools/benchmark_export.py --arch micro --size 224,224 --runtime compile --train
    python tools/benchmark_export.py --arch tiny --size 800,1333 --runtime compile --train \
        --device cuda

Random weights (latency does not depend on them), batch 1, the default path (compiled
op); ``--device cuda`` only with ``compile`` (ONNX Runtime runs here on the CPU); the backbone is built with img_size equal to the input's larger side. For
``ort`` the backbone is exported at the fixed size first (position bias folded),
and the largest difference between the two outputs is printed beside the timings.
Each timing is the median of ``--repeat`` runs after one warm-up.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def median_seconds(fn, repeat, device='cpu'):
    def timed():
        start = time.perf_counter()
        fn()
        if device == 'cuda':  # kernels run asynchronously: wait for them
            torch.cuda.synchronize()
        return time.perf_counter() - start
    timed()
    return statistics.median(timed() for _ in range(repeat))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', default='512,512')
    parser.add_argument('--runtime', choices=['ort', 'compile'], required=True)
    parser.add_argument('--train', action='store_true',
                        help='compile: time forward + backward of a training step')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and args.runtime != 'compile':
        parser.error('--device cuda: only with --runtime compile')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device')
    from mmtransnext.deploy import example_input, export_onnx
    from mmtransnext.models import TransNeXt
    from mmtransnext.tools.common import parse_pair
    height, width = parse_pair(args.size, '--size')
    model = TransNeXt(arch=args.arch, img_size=max(height, width), pretrain_size=224)
    x = example_input(height, width)
    where = (torch.cuda.get_device_name() if args.device == 'cuda' else
             f'{torch.get_num_threads()} threads')
    print(f'TransNeXt-{args.arch} {height}x{width}, torch {torch.__version__}, {where}')
    if args.runtime == 'compile':
        model.to(args.device).train(args.train)
        x = x.to(args.device)
        compiled = torch.compile(model)

        def step(fn):
            def run():
                if args.train:
                    sum(o.float().mean() for o in fn(x)).backward()
                else:
                    with torch.no_grad():
                        fn(x)
            return run
        start = time.perf_counter()
        step(compiled)()
        print(f'compile (first call): {time.perf_counter() - start:.1f} s')
        eager = median_seconds(step(model), args.repeat, args.device)
        fast = median_seconds(step(compiled), args.repeat, args.device)
        print(f'eager {eager * 1e3:.0f} ms, compiled {fast * 1e3:.0f} ms, '
              f'speed-up {eager / fast:.2f}x ({"train step" if args.train else "inference"})')
        return 0
    import onnxruntime
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'backbone.onnx')
        start = time.perf_counter()
        export_onnx(model, x, path)
        print(f'export: {time.perf_counter() - start:.1f} s')
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        feed = {session.get_inputs()[0].name: x.numpy()}
        with torch.no_grad():
            expected = model(x)
        got = session.run(None, feed)
        diff = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))

        def eager_run():
            with torch.no_grad():
                model(x)
        eager = median_seconds(eager_run, args.repeat)
        ort = median_seconds(lambda: session.run(None, feed), args.repeat)
    print(f'eager {eager * 1e3:.0f} ms, onnxruntime {ort * 1e3:.0f} ms, '
          f'ratio {eager / ort:.2f}x, max |ORT - PyTorch| {diff:.2g}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
