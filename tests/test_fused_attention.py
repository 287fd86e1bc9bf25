"""The fused attention kernels: their checks under Triton's interpreter, dispatch, errors.

The kernels themselves are checked in ``interpreted_fused_attention.py``, run here
in a child process with ``TRITON_INTERPRET=1`` (Triton must see the variable
before it is first imported, and only those tests may run interpreted).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtransnext.models.position_bias import RowFactoredBias, bias_layout
from mmtransnext.ops import DISABLE_ENV, use_fused_attention
from mmtransnext.ops.fused_attention import fused_bias_attention

TESTS = Path(__file__).resolve().parent


def test_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1')
    done = subprocess.run(
        [sys.executable, '-m', 'pytest', str(TESTS / 'interpreted_fused_attention.py'), '-q',
         '-p', 'no:cacheprovider', '-W', 'ignore::DeprecationWarning'],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert ' passed' in done.stdout.splitlines()[-1], done.stdout[-2000:]


def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    cpu = torch.zeros(1)
    assert not use_fused_attention(cpu)           # the CPU keeps the banded path
    assert not use_fused_attention(cpu.to('meta'))
    if torch.cuda.is_available():
        assert use_fused_attention(cpu.cuda())
        assert not use_fused_attention(cpu.cuda().double())
        monkeypatch.setenv(DISABLE_ENV, '1')
        assert not use_fused_attention(cpu.cuda())


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

