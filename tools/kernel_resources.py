#!/usr/bin/env python
"""Registers and spills of the fused attention kernels, compiled for GPUs without one.

    python tools/kernel_resources.py                          # the launch configuration
    python tools/kernel_resources.py --tiles 64x64x4 32x32x8  # BLOCK_M x BLOCK_N x warps
    python tools/kernel_resources.py --taps 4 1               # resized bias, or not

Triton compiles both kernels ahead of time (head dim 24, every TransNeXt variant) for
each ``--arch``, ``--dtypes`` and ``--taps`` (4: a bias resized on both column axes, as
in detection at 800x1333; 1: not resized, as at the size the bias is built for); the
machine code's registers and local-memory stack per thread (spilled registers live
there) are read with the ``cuobjdump`` Triton ships.
"""
import argparse
import sys

DTYPES = ('fp32', 'fp16', 'bf16')


def _tiles(text):
    from mmtransnext.tools.common import parse_tiles
    return parse_tiles(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90],
                        choices=[80, 86, 89, 90])
    parser.add_argument('--dtypes', nargs='+', default=['bf16', 'fp32'], choices=DTYPES)
    parser.add_argument('--tiles', type=_tiles, nargs='+', default=[None],
                        help='BLOCK_MxBLOCK_NxWARPS (default: the launch configuration)')
    parser.add_argument('--taps', type=int, nargs='+', default=[4], choices=[4, 1],
                        help='bias taps per entry: 4 (resized columns) or 1')
    args = parser.parse_args(argv)
    import torch

    from mmtransnext.ops import fused_attention
    from mmtransnext.tools.common import tiles_label
    if not fused_attention._TRITON:
        parser.error(f'needs Triton >= {".".join(map(str, fused_attention.MIN_TRITON))}')
    dtypes = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)
    print(f'torch {torch.__version__}, head dim 24')
    print('| arch | dtype | tiles (M x N x warps) | taps | kernel | registers | stack bytes | '
          'instructions |')
    print('|---|---|---|---|---|---|---|---|')
    for arch in args.arch:
        for name in args.dtypes:
            for tiles in args.tiles:
                for taps in args.taps:
                    dtype = dtypes[name]
                    used = tiles or fused_attention.launch_tiles(dtype, resized=taps == 4)
                    label = tiles_label(used).replace('x', ' x ')
                    built = fused_attention.compile_for_gpu(arch, dtype, launch=tiles,
                                                            resized=taps == 4)
                    for kernel, cubin in built.items():
                        found = fused_attention.machine_code_resources(cubin)
                        print(f'| sm_{arch} | {name} | {label} | {taps} | {kernel} | '
                              f'{found["registers"]} | {found["stack_bytes"]} | '
                              f'{found["instructions"]} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
