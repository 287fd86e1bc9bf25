"""Bad arguments to every op raise a Python exception naming the problem, never crash.

The calls are catalogued in ``tests/bad_op_calls.py``. The raw compiled ops
(``torch.ops.mmtransnext.*``) are called in a child process first, per device type: a
``TORCH_CHECK`` that kills the interpreter instead of raising then fails one test with
the signal and the child's output (its last ``call`` line names the op), and the
in-process raw calls of that device are failed without being made, so the run goes on.
The public functions validate in Python before any C++ runs, so they are called here.
"""
import os
import signal
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

import bad_op_calls
import mmtransnext.ops as ops

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bad_op_calls.py')

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='no CUDA device'))]


@lru_cache(maxsize=None)
def _child_run(device):
    """Run the raw-op calls of one device type in a fresh interpreter, once."""
    return subprocess.run([sys.executable, SCRIPT, '--device', device, '--kind', 'raw'],
                          capture_output=True, text=True, timeout=600)


def _crash_report(device):
    """None when the child exited normally, else what killed it and its output."""
    proc = _child_run(device)
    if proc.returncode >= 0:
        return None
    sig = signal.Signals(-proc.returncode).name
    return (f'the raw-op calls on {device} killed the interpreter with {sig}; output:\n'
            f'{proc.stdout}\n{proc.stderr}')


def _needs_compiled(device):
    if not ops.extension_available(device):
        pytest.fail(f'mmtransnext._C has no {device} kernels: build it (`make ext`, '
                    'FORCE_CUDA=1 for CUDA)')


@pytest.mark.parametrize('device', DEVICES)
def test_raw_ops_in_child_process(device):
    _needs_compiled(device)
    crash = _crash_report(device)
    assert crash is None, crash
    proc = _child_run(device)
    assert proc.returncode == 0, f'some raw-op calls did not raise as expected:\n{proc.stdout}'
    assert 'plain ATen error raises RuntimeError: True' in proc.stdout
    expected = bad_op_calls.cases('raw', device)
    assert proc.stdout.count('\nok ') == len(expected) > 0, proc.stdout


def _ids(kind, device):
    return [pytest.param(c, id=c.name) for c in bad_op_calls.cases(kind, device)]


@pytest.mark.parametrize('case', _ids('raw', 'cpu'))
def test_raw_op_raises_cpu(case):
    _needs_compiled('cpu')
    crash = _crash_report('cpu')
    if crash is not None:
        pytest.fail(f'not called in-process: {crash.splitlines()[0]}')
    assert bad_op_calls.check(case, 'cpu') == ''


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
@pytest.mark.parametrize('case', _ids('raw', 'cuda'))
def test_raw_op_raises_cuda(case):
    _needs_compiled('cuda')
    crash = _crash_report('cuda')
    if crash is not None:
        pytest.fail(f'not called in-process: {crash.splitlines()[0]}')
    assert bad_op_calls.check(case, 'cuda') == ''


@pytest.mark.parametrize('case', _ids('public', 'cpu'))
def test_public_function_raises_cpu(case, monkeypatch):
    monkeypatch.delenv(ops.DISABLE_ENV, raising=False)
    assert bad_op_calls.check(case, 'cpu') == ''


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
@pytest.mark.parametrize('case', _ids('public', 'cuda'))
def test_public_function_raises_cuda(case, monkeypatch):
    monkeypatch.delenv(ops.DISABLE_ENV, raising=False)
    assert bad_op_calls.check(case, 'cuda') == ''


def test_catalogue_covers_every_op():
    # Every registered op of the library has at least one bad call.
    names = {c.name.split('-')[0] for c in bad_op_calls.CASES if c.kind == 'raw'}
    registered = {'sliding_window_logits', 'sliding_window_logits_backward',
                  'sliding_window_aggregate', 'sliding_window_aggregate_backward',
                  'bias_softmax_', 'softmax_backward_', 'bias_rows_backward'}
    assert names == registered
