"""The CUDA kernels compile (sm_80 and sm_90 objects), checked on machines without a GPU.

Runs ``tools/compile_cuda.py``, which needs ``nvcc``; skipped where it is missing. Where
a ``cuobjdump`` is found (Triton ships one) it also reads the machine code: no kernel
spills, and the window kernels' vector versions (what TransNeXt's head dims take) and
the bias-gradient sums hold no subroutine (a runtime division's routine).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import compile_cuda  # noqa: E402


def test_cuda_sources_compile(tmp_path):
    if shutil.which('nvcc') is None:
        pytest.skip('nvcc not found: the CUDA toolkit is not on PATH, so the .cu kernels '
                    'cannot be compiled here')
    read_machine_code = compile_cuda._cuobjdump() is not None
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'compile_cuda.py'), '--out-dir',
         str(tmp_path)] + (['--resources'] if read_machine_code else []),
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f'nvcc failed:\n{proc.stdout}\n{proc.stderr}'
    objects = list(tmp_path.glob('*.o'))
    assert objects and all(o.stat().st_size > 0 for o in objects), proc.stdout
    if not read_machine_code:
        return
    rows = re.findall(r'^\| `for_each_element<(\w+)<(\w+)(?:, (\d+))?>>` \| (sm_\d+) \| '
                      r'(\d+) \| (\d+) \| (\d+) \| (\d+) \|', proc.stdout, re.M)
    assert {(arch, functor) for functor, _, _, arch, *_ in rows} == {
        (arch, functor) for arch in ('sm_80', 'sm_90')
        for functor in ('DotElement', 'AxpyElement', 'BackElement', 'BiasPartial')}
    for functor, dtype, vec, arch, registers, stack, _, subroutines in rows:
        name = f'{functor}<{dtype}, {vec}> on {arch}'
        assert int(stack) == 0, f'{name} spills ({stack} bytes of stack)'
        if functor == 'BiasPartial' or int(vec) > 1:
            assert int(subroutines) == 0, f'{name} has {subroutines} subroutines (divisions?)'
