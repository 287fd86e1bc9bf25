#!/usr/bin/env python
"""The ATen operators one step of the backbone dispatches, by where they come from.

On a GPU the bfloat16 training step of TransNeXt-T waits on the host issuing operators
(``docs/benchmarks.md``), so their number is what a change to the step's structure is
held to. ``--structure cuda`` counts, on any machine, the operators of the path that
CUDA tensors take: the fused kernels' rule (:func:`mmtransnext.ops.use_fused_attention`)
is told they serve, and their Triton launches, which are not ATen operators, do
nothing (their outputs are left unset: the count does not depend on values). CPU
autocast stands in for CUDA's under ``--dtype bf16``, with layer norms in float32 as
CUDA's autocast runs them (the CPU's keeps their input's dtype); the two still cast a
few operators differently, so the figure approaches, not equals, what
``tools/benchmark_backbone.py --device cuda --count-ops`` counts on a GPU (within 1%
for TransNeXt-T, ``docs/benchmarks.md``). ``--structure cpu`` counts the CPU's own path
(as ``benchmark_backbone.py --count-ops`` does).

Operators are counted as ``count_operators`` counts them (views apart), split into the
forward, by the model's source line, and the backward, by the autograd node running.

    python tools/count_operators.py --arch tiny --size 64 96 --batch 2 --dtype bf16
"""
import argparse
import collections
import os
import sys
import traceback


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', type=int, nargs=2, default=[64, 96], metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--img-size', type=int, default=224,
                        help="the backbone's img_size (800 for detection, as in "
                        "benchmark_backbone.py)")
    parser.add_argument('--dtype', default='bf16', choices=['fp32', 'bf16'],
                        help='fp32, or bf16 autocast')
    parser.add_argument('--mode', default='train', choices=['train', 'forward'])
    parser.add_argument('--structure', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--top', type=int, default=15, help='rows of each breakdown')
    parser.add_argument('--json', action='store_true', help='one JSON line, no tables')
    return parser.parse_args(argv)


class _NoLaunch:
    """A Triton kernel whose launches do nothing: ``kernel[grid](*args)``."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def take_cuda_structure():
    """Point the model's fused-kernel rules at True and make every Triton launch a no-op."""
    import importlib
    import pkgutil

    import torch

    import mmtransnext.ops
    from mmtransnext.models import attention, position_bias, transnext
    for module in pkgutil.iter_modules(mmtransnext.ops.__path__):
        if not module.name.endswith('_kernels'):
            continue
        kernels = importlib.import_module(f'mmtransnext.ops.{module.name}')
        for name in dir(kernels):
            if hasattr(getattr(kernels, name), 'fn'):   # a triton.jit function
                setattr(kernels, name, _NoLaunch())
    for module in (attention, position_bias, transnext):
        module.use_fused_attention = lambda tensor: True
    # Operators the MLP would run in chunks run in CUDA's chunks.
    chunks = position_bias._MLP_CHUNK_ELEMENTS
    chunks['cpu'] = chunks['cuda']
    # The dtype CUDA autocast gives the core: the autocast dtype, also on the CPU here.
    core_dtype = attention.core_dtype
    attention.core_dtype = lambda device, autocast, dtypes: core_dtype('cuda', autocast, dtypes)
    torch.nn.functional.layer_norm = _layer_norm_as_on_cuda(torch.nn.functional.layer_norm)


def _layer_norm_as_on_cuda(layer_norm):
    """``layer_norm`` as CUDA autocast runs it: its 16-bit tensors cast to float32 and a
    float32 output. CPU autocast runs it in its input's dtype, so a bfloat16 residual
    stream would stay bfloat16 and the projections after each norm would cast nothing."""
    import torch

    from mmtransnext.models.attention import _active_autocast_dtype

    def to_float32(tensor):
        low = tensor is not None and tensor.dtype in (torch.float16, torch.bfloat16)
        return tensor.float() if low else tensor

    def run(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        if _active_autocast_dtype('cpu') is None:
            return layer_norm(input, normalized_shape, weight, bias, eps)
        with torch.autocast('cpu', enabled=False):
            return layer_norm(to_float32(input), normalized_shape, to_float32(weight),
                              to_float32(bias), eps)
    return run


def count(step, package: str) -> dict:
    """Operators of one ``step()``: forward ones by the last two source lines in
    ``package`` (a directory) they come from, backward ones by the autograd node running."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):

        def __init__(self):
            super().__init__()
            self.forward = collections.Counter()
            self.backward = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                node = torch._C._current_autograd_node()
                if node is not None:
                    self.backward[node.name()] += 1
                else:
                    frames = [frame for frame in traceback.extract_stack()
                              if frame.filename.startswith(package + os.sep)]
                    self.forward[' < '.join(
                        f'{os.path.relpath(frame.filename, os.path.dirname(package))}:'
                        f'{frame.lineno}' for frame in frames[-2:]) or '(outside)'] += 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    with counter:
        step()
    return dict(forward=counter.forward, backward=counter.backward)


def main(argv=None):
    args = parse_args(argv)
    if args.structure == 'cuda':
        # Kernels would be defined for the GPU otherwise; they never launch here.
        os.environ.setdefault('TRITON_INTERPRET', '1')
    import torch
    import mmtransnext
    from mmtransnext.models import TransNeXt
    if args.structure == 'cuda':
        take_cuda_structure()
    torch.manual_seed(0)
    model = TransNeXt(arch=args.arch, img_size=args.img_size, pretrain_size=224)
    model.train(args.mode == 'train')
    x = torch.randn(args.batch, 3, *args.size)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.dtype == 'bf16')

    def step():
        if args.mode == 'forward':
            with torch.no_grad(), autocast:
                model(x)
            return
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = sum(out.float().mean() for out in model(x))
        loss.backward()

    step()   # caches (layouts, column taps) are filled in the first step
    found = count(step, os.path.dirname(os.path.abspath(mmtransnext.__file__)))
    forward, backward = sum(found['forward'].values()), sum(found['backward'].values())
    summary = dict(arch=args.arch, size=args.size, batch=args.batch, dtype=args.dtype,
                   mode=args.mode, structure=args.structure, operators=forward + backward,
                   forward=forward, backward=backward, torch=torch.__version__)
    if args.json:
        import json
        print(json.dumps(summary))
        return summary
    print(' '.join(f'{key}={value}' for key, value in summary.items()))
    for part in ('forward', 'backward'):
        print(f'\n{part}: {sum(found[part].values())} operators, the most frequent sources')
        for where, number in found[part].most_common(args.top):
            print(f'{number:6d}  {where}')
    return summary


if __name__ == '__main__':
    sys.exit(main() and 0)
