#!/usr/bin/env python
"""Write the embedded demo dataset (shapes on varied backgrounds).

    python tools/generate_demo_data.py [--root data/demo] [--num-train 600]
                                       [--num-val 100] [--size 256 256]
                                       [--seed 0] [--force]

Writes COCO instances (``<root>/coco``) and ADE20K-style folders
(``<root>/ade``); see ``mmtransnext/datasets/demo_data.py``. Deterministic: the
same arguments give the same files. Without ``--force`` an existing, complete
dataset made with the same arguments is kept.
"""
import argparse
import os.path as osp
import sys
import time


def _load_generator():
    """The generator module alone: it needs only numpy and OpenCV."""
    import importlib.util
    path = osp.join(
        osp.dirname(osp.dirname(osp.abspath(__file__))), 'mmtransnext',
        'datasets', 'demo_data.py')
    try:
        from mmtransnext.datasets import demo_data
        return demo_data
    except ImportError:
        spec = importlib.util.spec_from_file_location('demo_data', path)
        module = importlib.util.module_from_spec(spec)
        sys.modules['demo_data'] = module
        spec.loader.exec_module(module)
        return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default='data/demo', help='output folder')
    parser.add_argument('--num-train', type=int, default=600)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument(
        '--size', type=int, nargs=2, default=(256, 256), metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--force', action='store_true', help='regenerate even if present')
    args = parser.parse_args(argv)

    demo_data = _load_generator()
    settings = dict(
        num_train=args.num_train,
        num_val=args.num_val,
        size=tuple(args.size),
        seed=args.seed)
    if not args.force and demo_data.is_complete(args.root, **settings):
        print(f'{args.root}: demo data already complete; --force regenerates')
        return
    start = time.time()
    out = demo_data.generate_demo_data(args.root, **settings)
    print(f'wrote {args.num_train} train + {args.num_val} val images '
          f'({", ".join(f"{k}: {v}" for k, v in out.items())}) '
          f'in {time.time() - start:.1f}s')


if __name__ == '__main__':
    main()
