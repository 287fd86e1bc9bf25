#!/usr/bin/env python
"""Registers, spills and memory barriers of the fused attention kernels, built for GPUs
without one.

    python tools/kernel_resources.py                          # the launch configuration
    python tools/kernel_resources.py --tiles 64x64x4 32x32x8  # BLOCK_M x BLOCK_N x warps
    python tools/kernel_resources.py --taps 4 1               # resized bias, or not
    python tools/kernel_resources.py --variants               # compilations per kernel

Triton compiles both kernels ahead of time (head dim 24, every TransNeXt variant) for
each ``--arch``, ``--dtypes`` and ``--taps`` (4: a bias resized on both column axes, as
in detection at 800x1333; 1: not resized, as at the size the bias is built for); the
machine code's registers and local-memory stack per thread (spilled registers live
there) are read with the ``cuobjdump`` Triton ships.

``--variants [WxH ...]`` counts instead how many times Triton's JIT would compile each
kernel while a Mask R-CNN (TransNeXt-T, ``img_size=800``) trains on images of those
sizes, resized by the 1x schedule's rule (longer side <= 1333, shorter <= 800, padded
to 32): the backbone runs forward once per size on the CPU with the fused path's
launches recorded, not run, and each launch's arguments are keyed the way Triton keys
its compiled kernels, with its default specialisation of integers (equal to 1,
divisible by 16) and with the kernels' own (``SPATIAL_ARGS`` unspecialised). The
default sizes are common COCO image sizes.
"""
import argparse
import sys

DTYPES = ('fp32', 'fp16', 'bf16')
# Common COCO image sizes (width x height).
COCO_SIZES = ('640x480', '480x640', '640x427', '427x640', '640x426', '640x424', '640x428',
              '640x425', '640x360', '500x375', '375x500', '640x512', '612x612', '640x640',
              '640x478', '640x429', '640x423', '640x383', '333x500', '500x333')
# The integer arguments the fused kernels take after their pointers, in order.
SIZE_ARGS = ('heads', 'tokens', 'keys', 'head_dim', 'value_dim', 'width', 'pool_w', 's_head',
             's_row', 's_pool_row')


def detection_input(size: str) -> tuple:
    """``(height, width)`` of a ``WxH`` image after the Mask R-CNN 1x resize and padding."""
    width, height = (int(side) for side in size.split('x'))
    scale = min(1333 / max(width, height), 800 / min(width, height))
    return tuple(-(-round(side * scale) // 32) * 32 for side in (height, width))


def recorded_launches(sizes, arch: str = 'tiny', img_size: int = 800) -> list:
    """``(size args, meta)`` of every fused launch of a backbone forward at each input size.

    The fused path is forced and replaced by a recorder (it returns zeros), so this
    runs on the CPU without running a kernel.
    """
    import torch

    from mmtransnext.models import TransNeXt, attention
    from mmtransnext.ops import fused_attention
    launches = []

    def record(query, key, value, bias):
        table = bias.kernel_table(query.dtype)
        _, shapes, meta = fused_attention._launch_args(query, key, value, table, bias)
        launches.append((dict(zip(SIZE_ARGS, shapes)), meta))
        return (query.new_zeros(query.shape[:3] + value.shape[3:]),
                query.new_zeros(query.shape[:3]))

    model = TransNeXt(arch=arch, img_size=img_size, pretrain_size=224).eval()
    saved = attention._bias_attention
    attention._bias_attention = lambda query: record
    try:
        with torch.no_grad():
            for height, width in sizes:
                model(torch.zeros(1, 3, height, width))
    finally:
        attention._bias_attention = saved
    return launches


def compiled_variants(kernel, launches, default_specialisation: bool) -> int:
    """How many binaries Triton's JIT keys ``kernel``'s launches to.

    Args:
        default_specialisation (bool): key every integer as Triton does unless told
            otherwise, instead of as the kernel declares (``do_not_specialize``).
    """
    from triton.backends.compiler import BaseBackend
    try:
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # Triton keys its binaries in C++ since 3.5; earlier, elsewhere
        import triton
        raise RuntimeError(f'counting compilations needs Triton >= 3.5 (its '
                           f'native_specialize_impl), not {triton.__version__}') from None
    keys = set()
    for sizes, meta in launches:
        key = [tuple(sorted(meta.items()))]
        for param in kernel.params:
            if param.name in sizes:
                specialise = default_specialisation or not param.do_not_specialize
                key.append(native_specialize_impl(BaseBackend, sizes[param.name], False,
                                                  specialise, True))
        keys.add(tuple(key))
    return len(keys)


def print_variants(sizes) -> None:
    from mmtransnext.ops import fused_attention
    inputs = sorted({detection_input(size) for size in sizes})
    launches = recorded_launches(inputs)
    kernels = fused_attention._kernels()
    print(f'{len(sizes)} image sizes -> {len(inputs)} padded inputs, {len(launches)} fused '
          'launches (TransNeXt-T, img_size 800, float32 meta-parameters)')
    print('| kernel | compilations, Triton default | compilations, as declared |')
    print('|---|---|---|')
    for name in ('pooled_attention_forward', 'pooled_attention_backward',
                 'pooled_attention_backward_keys'):
        kernel = getattr(kernels, name)
        print(f'| {name} | {compiled_variants(kernel, launches, True)} | '
              f'{compiled_variants(kernel, launches, False)} |')


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
    parser.add_argument('--variants', nargs='*', metavar='WxH',
                        help='count compilations over these image sizes (default: common '
                             'COCO sizes) instead')
    args = parser.parse_args(argv)
    for size in args.variants or ():
        if len(size.split('x')) != 2 or not all(p.isdigit() and int(p) > 0
                                                for p in size.split('x')):
            parser.error(f'--variants: {size!r} is not WIDTHxHEIGHT')
    import torch

    from mmtransnext.ops import fused_attention
    from mmtransnext.tools.common import tiles_label
    if not fused_attention._TRITON:
        parser.error(f'needs Triton >= {".".join(map(str, fused_attention.MIN_TRITON))}')
    if args.variants is not None:
        print_variants(args.variants or COCO_SIZES)
        return 0
    dtypes = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)
    print(f'torch {torch.__version__}, head dim 24')
    print('| arch | dtype | tiles (M x N x warps) | taps | kernel | registers | stack bytes | '
          'instructions | tensor-core instructions | GPU-scope memory barriers |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for arch in args.arch:
        for name in args.dtypes:
            for tiles in args.tiles:
                for taps in args.taps:
                    dtype = dtypes[name]
                    used = tiles or fused_attention.launch_tiles(dtype, resized=taps == 4)
                    dims, _, precision = tiles_label(used).partition(':')
                    label = dims.replace('x', ' x ') + (f' {precision}' if precision else '')
                    built = fused_attention.compile_for_gpu(arch, dtype, launch=tiles,
                                                            resized=taps == 4)
                    for kernel, cubin in built.items():
                        found = fused_attention.machine_code_resources(cubin)
                        print(f'| sm_{arch} | {name} | {label} | {taps} | {kernel} | '
                              f'{found["registers"]} | {found["stack_bytes"]} | '
                              f'{found["instructions"]} | {found["tensor_core"]} | '
                              f'{found["memory_barriers"]} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
