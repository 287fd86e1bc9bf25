#!/usr/bin/env python
"""Latency of a TransNeXt backbone: eager PyTorch against torch.compile or ONNX Runtime.

    python tools/benchmark_export.py --arch tiny --size 512,512 --runtime ort [--repeat 3]
    python tools/benchmark_export.py --arch tiny --size 800,1333 --img-size 800 --runtime ort \
        --dynamic
    python tools/benchmark_export.py --arch micro --size 224,224 --runtime compile --train
    python tools/benchmark_export.py --arch tiny --size 800,1333 --runtime compile --train \
        --device cuda

Random weights (latency does not depend on them), batch 1, the default path (compiled
op); ``--device cuda`` only with ``compile`` (ONNX Runtime runs here on the CPU). The
backbone is built with ``img_size`` equal to the input's larger side unless
``--img-size`` says otherwise (800 in the detection configs). For ``ort`` the backbone
is exported first, at the fixed size (position bias folded to constants) or, with
``--dynamic``, with symbolic height and width (the bias is computed in every run, and
nothing of the input's size is folded while ONNX Runtime optimises the graph), and the
largest difference between the two outputs is printed beside the timings.
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
    parser.add_argument('--img-size', type=int, default=None,
                        help="the backbone's img_size (default: the input's larger side)")
    parser.add_argument('--dynamic', action='store_true',
                        help='ort: export with symbolic height and width')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and args.runtime != 'compile':
        parser.error('--device cuda: only with --runtime compile')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device')
    if args.dynamic and args.runtime != 'ort':
        parser.error('--dynamic: only with --runtime ort')
    if args.img_size is not None and args.img_size < 32:
        parser.error(f'--img-size {args.img_size}: at least 32 (one pooled cell in stage 4)')
    from mmtransnext.deploy import example_input, export_onnx
    from mmtransnext.models import TransNeXt
    from mmtransnext.tools.common import parse_pair
    height, width = parse_pair(args.size, '--size')
    img_size = max(height, width) if args.img_size is None else args.img_size
    model = TransNeXt(arch=args.arch, img_size=img_size, pretrain_size=224)
    x = example_input(height, width)
    where = (torch.cuda.get_device_name() if args.device == 'cuda' else
             f'{torch.get_num_threads()} threads')
    print(f'TransNeXt-{args.arch} {height}x{width} (img_size {img_size}), '
          f'torch {torch.__version__}, {where}')
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
        export_onnx(model, x, path, dynamic=args.dynamic)
        print(f'export ({"dynamic" if args.dynamic else "fixed"} size): '
              f'{time.perf_counter() - start:.1f} s')
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
