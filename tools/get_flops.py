#!/usr/bin/env python
"""Parameters and FLOPs of TransNeXt backbones and of our configs' whole models.

    python tools/get_flops.py                         # backbones at 224x224 and 512x512,
                                                      # whole-model params of every config
    python tools/get_flops.py --sizes 224x224 512x512 800x1333 --model-flops
    python tools/get_flops.py --configs configs/detection/mask-rcnn_transnext-tiny_fpn_1x_coco.py \
        --model-flops --model-size 800x1333

mmengine's FlopAnalyzer, one fused multiply-add = one flop; the compiled sliding-window
op and the banded attention are counted (see mmtransnext/tools/flops.py). Output is a
Markdown table.
"""
import argparse
import glob
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ('configs/detection/*.py', 'configs/segmentation/*.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', nargs='+', default=['micro', 'tiny', 'small', 'base'],
                        help='backbone variants (default: all four)')
    parser.add_argument('--sizes', nargs='+', default=['224x224', '512x512'],
                        help='input sizes HxW of the backbone table '
                        '(default: 224x224 512x512; add 800x1333, slow on a CPU)')
    parser.add_argument('--configs', nargs='*', default=None,
                        help='configs of whole models (default: configs/detection and '
                        'configs/segmentation); give none to skip them')
    parser.add_argument('--model-flops', action='store_true',
                        help='also count the whole models\' FLOPs (slow on a CPU)')
    parser.add_argument('--model-size', default=None,
                        help='input HxW for the whole models (default: 800x1333 for '
                        'detectors, 512x512 for segmentors)')
    parser.add_argument('--out', help='also write the tables to this file')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmtransnext.tools import flops as fl
    from mmtransnext.tools.common import load_config, parse_pair, task_of
    sizes = [tuple(parse_pair(s, '--sizes')) for s in args.sizes]
    start = time.perf_counter()
    text = []

    rows = []
    for arch in args.archs:
        row = [arch]
        for size in sizes:
            result = fl.backbone_complexity(arch, size)
            if len(row) == 1:
                row.append(fl.millions(result['params']))
            row.append(fl.giga(result['flops']))
            print(f'# backbone {arch} {size[0]}x{size[1]}: {result["flops"]:,} flops '
                  f'({result["seconds"]:.1f} s)', file=sys.stderr)
        rows.append(row)
    header = ['backbone', 'params'] + [f'FLOPs {h}x{w}' for h, w in sizes]
    text += ['Backbone (no neck or head; FLOPs = multiply-adds, mmengine convention)', '',
             fl.format_table(header, rows), '']

    configs = args.configs
    if configs is None:
        configs = sorted(p for pattern in DEFAULT_CONFIGS
                         for p in glob.glob(os.path.join(REPO, pattern)))
    if configs:
        model_size = tuple(parse_pair(args.model_size, '--model-size')) \
            if args.model_size else None
        rows = []
        for path in configs:
            cfg = load_config(path)
            size = model_size or ((800, 1333) if task_of(cfg) == 'det' else (512, 512))
            result = fl.model_complexity(cfg, size, count=args.model_flops)
            row = [os.path.splitext(os.path.basename(path))[0], fl.millions(result['params']),
                   fl.millions(result['backbone_params'])]
            if args.model_flops:
                row += [f'{result["input"][0]}x{result["input"][1]}', fl.giga(result['flops']),
                        fl.giga(result['backbone_flops'])]
                print(f'# {row[0]}: {result["flops"]:,} flops ({result["seconds"]:.1f} s)',
                      file=sys.stderr)
            rows.append(row)
        header = ['config', 'params', 'backbone params']
        if args.model_flops:
            header += ['input (padded)', 'FLOPs', 'backbone FLOPs']
        text += ['Whole models', '', fl.format_table(header, rows), '']
    text.append(f'({time.perf_counter() - start:.0f} s)')
    print('\n'.join(text))
    if args.out:
        with open(args.out, 'w') as f:
            f.write('\n'.join(text) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
