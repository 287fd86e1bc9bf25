"""The fused attention kernels: checks under Triton's interpreter, GPU builds, dispatch, errors.

The kernels' numbers are checked in ``interpreted_fused_attention.py``, run here
in a child process with ``TRITON_INTERPRET=1`` (Triton must see the variable
before it is first imported, and only those tests may run interpreted). Whether
they compile for the GPU is checked here without one: Triton compiles them ahead
of time to sm_80 and sm_90 machine code with the ``ptxas`` it ships.
"""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtransnext.models.position_bias import RowFactoredBias, bias_layout
from mmtransnext.ops import DISABLE_ENV, use_fused_attention
from mmtransnext.ops import fused_attention
from mmtransnext.ops.fused_attention import fused_bias_attention

TESTS = Path(__file__).resolve().parent

# torch 2.1-2.3 CUDA wheels bring Triton 2, whose language the kernels do not use; there
# the banded path serves CUDA too (tested in test_dispatch_needs_triton_3 below).
needs_triton_3 = pytest.mark.skipif(not fused_attention._TRITON,
                                    reason=f'needs triton >= {fused_attention.MIN_TRITON}')


@needs_triton_3
def test_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1')
    done = subprocess.run(
        [sys.executable, '-m', 'pytest', str(TESTS / 'interpreted_fused_attention.py'), '-q',
         '-p', 'no:cacheprovider', '-W', 'ignore::DeprecationWarning'],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert ' passed' in done.stdout.splitlines()[-1], done.stdout[-2000:]


# Pointer arguments and their element types; the others are int32 sizes and strides.
_FORWARD_POINTERS = dict(Q='io', K='io', V='io', BY_ROWS='io', COL_INDEX='i32',
                         COL_WEIGHT='fp32', OUT='io', LSE='fp32')
_BACKWARD_POINTERS = dict(Q='io', K='io', V='io', GRAD_OUT='io', LSE='fp32', SHIFT='fp32',
                          GRAD_LSE='fp32', BY_ROWS='io', COL_INDEX='i32', COL_WEIGHT='fp32',
                          GRAD_Q='io', GRAD_K='fp32', GRAD_V='fp32', GRAD_BY_ROWS='fp32')


# Each arch and each kind of matmul once (float32 FMA, bfloat16 tensor cores);
# uncached, the float32 backward alone takes tens of seconds to build.
@needs_triton_3
@pytest.mark.parametrize('arch, dtype', [(90, 'fp32'), (80, 'bf16')])
def test_kernels_compile_for_gpus(arch, dtype):
    """Both kernels as launched for head dim 24, built to cubins."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from mmtransnext.ops import _fused_attention_kernels as kernels
    meta = dict(BLOCK_M=64, BLOCK_N=64, D_PAD=32, DV_PAD=32,
                DOT_PRECISION='ieee' if dtype == 'fp32' else 'tf32')
    for kernel, pointers, extra in (
            (kernels.pooled_attention_forward, _FORWARD_POINTERS, {}),
            (kernels.pooled_attention_backward, _BACKWARD_POINTERS,
             dict(BIAS_GRAD=True, ROW_RESIDUAL=dtype == 'fp32'))):
        constants = dict(meta, **extra)
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constants:
                signature[name] = 'constexpr'
            elif name in pointers:
                signature[name] = '*' + (dtype if pointers[name] == 'io' else pointers[name])
            else:
                signature[name] = 'i32'
        built = compile(ASTSource(kernel, signature, constants),
                        target=GPUTarget('cuda', arch, 32))
        assert len(built.asm['cubin']) > 0


def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    cpu = torch.zeros(1)
    assert not use_fused_attention(cpu)           # the CPU keeps the banded path
    assert not use_fused_attention(cpu.to('meta'))
    if torch.cuda.is_available():
        for low in (torch.float16, torch.bfloat16):
            assert use_fused_attention(cpu.cuda().to(low)) is fused_attention._TRITON
        assert not use_fused_attention(cpu.cuda())            # float32: measured slower
        assert not use_fused_attention(cpu.cuda().double())
        monkeypatch.setenv(DISABLE_ENV, '1')
        assert not use_fused_attention(cpu.cuda().half())


@pytest.mark.parametrize('bad, message', [
    (dict(query=torch.zeros(1, 3, 36, 24)), 'laid out for 5x7 queries'),
    (dict(key=torch.zeros(1, 3, 6, 16)), 'shapes do not match'),
    (dict(value=torch.zeros(1, 2, 6, 24)), 'shapes do not match'),
    (dict(query=torch.zeros(1, 3, 35, 24, dtype=torch.float64)), 'float64 takes the banded'),
    (dict(query=torch.zeros(3, 35, 24)), 'must be a 4-D tensor'),
    ({}, 'run on CUDA, or on the CPU under TRITON_INTERPRET=1'),
])
def test_bad_input_raises_named_error(bad, message):
    layout = bias_layout((5, 7), (2, 3), (5, 7), (5, 7), (2, 3), torch.device('cpu'))
    bias = RowFactoredBias(torch.zeros(3, *layout.coords.shape[:2]), layout)
    args = dict(query=torch.zeros(1, 3, 35, 24), key=torch.zeros(1, 3, 6, 24),
                value=torch.zeros(1, 3, 6, 24))
    args.update(bad)
    if args['query'].dtype == torch.float64:
        args = {k: v.double() for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        fused_bias_attention(**args, bias=bias)



def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(fused_attention, '_TRITON', False)
    layout = bias_layout((5, 7), (2, 3), (5, 7), (5, 7), (2, 3), torch.device('cpu'))
    bias = RowFactoredBias(torch.zeros(3, *layout.coords.shape[:2]), layout)
    with pytest.raises(ValueError, match=r'needs Triton >= 3\.0, which is not installed; '
                       r'.*run on CUDA, or on the CPU under TRITON_INTERPRET=1'):
        fused_bias_attention(torch.zeros(1, 3, 35, 24), torch.zeros(1, 3, 6, 24),
                             torch.zeros(1, 3, 6, 24), bias=bias)


def test_dispatch_needs_triton_3(monkeypatch):
    """Triton 2 (torch < 2.4 wheels) or none keeps CUDA tensors on the banded path."""
    for version, usable in (('2.1.0', False), ('3.0.0', True), ('3.9.0', True)):
        monkeypatch.setattr(fused_attention.importlib.metadata, 'version', lambda name: version)
        monkeypatch.setattr(fused_attention.importlib.util, 'find_spec', lambda name: object())
        assert fused_attention._triton_usable() is usable, version
    monkeypatch.setattr(fused_attention.importlib.util, 'find_spec', lambda name: None)
    assert fused_attention._triton_usable() is False
