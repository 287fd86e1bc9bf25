#!/usr/bin/env python
"""Export a TransNeXt backbone, segmentor or detector of our configs to ONNX.

    python tools/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--target backbone|segmentor|detector]
        [--size H,W] [--dynamic] [--opset 18] [--fixed-pool-size S] [--check [--check-size H,W]]

The target defaults to the config's task (segmentor for mmseg, detector for mmdet):
a segmentor exports up to its logits at the input size, a detector its tensors before
post-processing (neck maps, RPN scores and deltas; see DetectorTensors). The input is
the normalised image, as the config's data preprocessor makes it. --dynamic keeps
height and width symbolic for a backbone (one file for every size; segmentors and
detectors are refused: their heads fix sizes while traced); without it the size is fixed
and the position bias folds to constants. --check runs ONNX Runtime (CPU) against
PyTorch at --size and at --check-size and fails above 1e-4 (relative to the largest
output). The file is written under a temporary name and renamed when complete.
"""
import argparse
import sys

TOLERANCE = 1e-4


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', help='whole-model checkpoint (or backbone weights)')
    parser.add_argument('out', help='the .onnx file to write')
    parser.add_argument('--target', choices=['backbone', 'segmentor', 'detector'],
                        help="what to export (default: the config's task)")
    parser.add_argument('--size', default='512,512', help='input H,W (default 512,512)')
    parser.add_argument('--dynamic', action='store_true',
                        help='symbolic height and width (backbones in interpolation mode)')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset (>= 18)')
    parser.add_argument('--fixed-pool-size', type=int,
                        help='pool the periphery to SxS (linear-cost inference mode)')
    parser.add_argument('--check', action='store_true',
                        help='compare ONNX Runtime with PyTorch after the export')
    parser.add_argument('--check-size', help='a second H,W for --check (needs --dynamic)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmtransnext.deploy import (compare_with_onnxruntime, example_input, export_onnx,
                                    export_wrapper, find_backbone, load_weights)
    from mmtransnext.tools.common import DET, build_model, load_config, parse_pair, task_of
    size = parse_pair(args.size, '--size')
    check_sizes = [size]
    if args.check_size:
        if not args.dynamic:
            raise SystemExit('--check-size needs --dynamic (a fixed-size file takes one size)')
        check_sizes.append(parse_pair(args.check_size, '--check-size'))
    cfg = load_config(args.config, args.cfg_options)
    if args.fixed_pool_size is not None:
        if args.fixed_pool_size < 1:
            raise SystemExit(f'--fixed-pool-size must be >= 1, got {args.fixed_pool_size}')
        cfg.model.backbone.fixed_pool_size = args.fixed_pool_size
    target = args.target or ('detector' if task_of(cfg) == DET else 'segmentor')
    try:
        model = build_model(cfg)
        find_backbone(model)
        weights_of = model.backbone if target == 'backbone' else model
        load_weights(weights_of, args.checkpoint, target)
        module = export_wrapper(model, target).eval()
        outputs = export_onnx(module, example_input(*size), args.out, opset=args.opset,
                              dynamic=args.dynamic)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f'export_onnx: {exc}') from None
    print(f'wrote {args.out}: {target}, input (1, 3, {"H, W" if args.dynamic else size}), '
          f'opset {args.opset}, outputs {outputs}')
    if args.check:
        results = compare_with_onnxruntime(module, args.out,
                                           [example_input(*s, seed=i)
                                            for i, s in enumerate(check_sizes)])
        failed = False
        for r in results:
            ok = r['max_abs'] <= TOLERANCE * max(r['scale'], 1.0)
            failed |= not ok
            print(f"check {r['size'][0]}x{r['size'][1]}: max |ORT - PyTorch| = "
                  f"{r['max_abs']:.3g} (largest output {r['scale']:.3g}) "
                  f"{'ok' if ok else 'FAILED'}")
        if failed:
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
