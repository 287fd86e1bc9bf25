"""Every mmtransnext op called with each kind of bad argument.

One catalogue serves two callers:

* ``tests/test_ops_bad_input.py`` calls the public functions in-process, and runs this
  file as a child process for the raw ``torch.ops.mmtransnext.*`` calls first, so an
  op that crashes the interpreter (instead of raising) is reported with its signal;
* ``tools/device_check.sh`` runs it the same way on a GPU machine.

Usage:
    python tests/bad_op_calls.py [--device cpu|cuda] [--kind raw|public]

Prints one line per call, ``ok <id>`` or ``FAIL <id>: <why>``, flushed before the next
call (so after a crash the last line names the call that killed the process), and
exits 1 when any call did not raise the expected Python exception. Before the op
calls it raises one plain ATen error (a matmul of mismatched shapes), so a crash log
tells whether every C++ exception kills the process or only the ones thrown in
``mmtransnext._C``. ``faulthandler`` prints the Python stack on a fatal signal.
"""
import argparse
import faulthandler
import os
import re
import sys
from typing import Callable, List, NamedTuple

import torch

try:  # the installed package (editable or a wheel) that the tests run against
    import mmtransnext.ops as ops
except ImportError:  # the script run from a checkout where nothing is installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mmtransnext.ops as ops

# Geometry of the valid sliding-window inputs.
B, HEADS, H, W, D, WS = 2, 3, 4, 5, 6, 3
N, L = H * W, WS * WS


class BadCall(NamedTuple):
    """One call that must raise.

    Attributes:
        name (str): ``<op>-<what is wrong>``, unique.
        kind (str): ``'raw'`` for ``torch.ops.mmtransnext.*`` (RuntimeError from a
            ``TORCH_CHECK``), ``'public'`` for the Python functions (ValueError).
        call (Callable): takes the device string, makes the inputs and calls the op.
        pattern (str): regular expression the exception message must contain.
        devices (tuple): device types the call applies to.
    """
    name: str
    kind: str
    call: Callable
    pattern: str
    devices: tuple = ('cpu', 'cuda')


def _rand(*shape, dtype=torch.float32, device='cpu'):
    gen = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(device)


def _window(device, dtype=torch.float32):
    """Valid query, key, bias, weights, value and output gradients on ``device``."""
    return dict(q=_rand(B, HEADS, N, D, dtype=dtype, device=device),
                k=_rand(B, HEADS, N, D, dtype=dtype, device=device),
                bias=_rand(HEADS, L, dtype=dtype, device=device),
                w=_rand(B, HEADS, N, L, dtype=dtype, device=device),
                v=_rand(B, HEADS, N, D, dtype=dtype, device=device),
                g_logits=_rand(B, HEADS, N, L, dtype=dtype, device=device))


def _other_device(device):
    return 'cpu' if device == 'cuda' else 'meta'


# Band geometry: logits (1, 2, M=R*W, P=Hp*Wp), by_rows (heads, rows, Hp, Uw), taps (W, Wp, 4).
_BH, _BR, _BW, _BHP, _BWP, _BUW, _ROWS = 2, 2, 3, 2, 2, 5, 4


def _band(device='cpu'):
    m, p = _BR * _BW, _BHP * _BWP
    gen = torch.Generator().manual_seed(0)
    return dict(logits=_rand(1, _BH, m, p, device=device),
                by_rows=_rand(_BH, _ROWS, _BHP, _BUW, device=device),
                col_index=torch.randint(0, _BUW, (_BW, _BWP, 4), generator=gen).to(device),
                col_weight=_rand(_BW, _BWP, 4, device=device),
                stats=_rand(1, _BH, m, device=device),
                grad_bias=_rand(_BH, m, p, device=device))


def _catalogue() -> List[BadCall]:
    mm = torch.ops.mmtransnext if hasattr(torch.ops, 'mmtransnext') else None
    cases = []

    def add(name, kind, call, pattern, devices=('cpu', 'cuda')):
        cases.append(BadCall(name, kind, call, pattern, devices))

    # The two public functions and their references take the same arguments; every kind
    # of bad argument is checked on all four (the shape kinds on each op's own tensors),
    # then on the raw compiled ops. Per op: its tensor arguments (keys of _window), the
    # one given a wrong dtype or device or passed as a list, the one missing a dim,
    # tensors for a window of 4 x 4 taps, a token count off the map, and its shape kinds.
    specs = {
        'logits': dict(
            tensors=dict(query='q', key='k', bias='bias'), other='key', primary='query',
            taps16=dict(bias=lambda x, d: _rand(HEADS, 16, device=d)),
            bad_tokens=dict(height=5),
            shapes=dict(key_shape=(dict(key=lambda x, d: x['k'][..., :4]), 'key'),
                        bias_shape=(dict(bias=lambda x, d: x['bias'][:, :4]), 'bias'))),
        'aggregate': dict(
            tensors=dict(weights='w', value='v'), other='weights', primary='value',
            taps16=dict(weights=lambda x, d: _rand(B, HEADS, N, 16, device=d)),
            bad_tokens=dict(width=4),
            shapes=dict(weights_shape=(dict(weights=lambda x, d: x['w'][..., :4]),
                                       'weights'))),
    }
    public = [('logits', ops.sliding_window_logits), ('aggregate', ops.sliding_window_aggregate),
              ('logits_reference', ops.sliding_window_logits_reference),
              ('aggregate_reference', ops.sliding_window_aggregate_reference)]
    for label, fn in public:
        spec = specs[label.split('_')[0]]
        tensors, other, primary = spec['tensors'], spec['other'], spec['primary']

        def call_with(fn=fn, tensors=tensors, **over):
            def run(dev):
                x = _window(dev)
                args = dict({arg: x[key] for arg, key in tensors.items()}, height=H, width=W,
                            window_size=WS)
                args.update({k: v(x, dev) if callable(v) else v for k, v in over.items()})
                return fn(**args)
            return run

        def converted(names, convert, tensors=tensors):
            """Overrides: the tensor arguments ``names``, converted."""
            return {arg: (lambda x, d, key=tensors[arg]: convert(x[key], d)) for arg in names}

        add(f'{label}-even_window', 'public', call_with(window_size=4, **spec['taps16']), 'odd')
        add(f'{label}-zero_window', 'public', call_with(window_size=0), 'odd')
        add(f'{label}-float_window', 'public', call_with(window_size=3.0), 'odd')
        add(f'{label}-negative_height', 'public', call_with(height=-4, width=-5), 'positive')
        add(f'{label}-float_height', 'public', call_with(height=4.0), 'height')
        add(f'{label}-bad_tokens', 'public', call_with(**spec['bad_tokens']), r'height\*width')
        for kind, (over, pattern) in spec['shapes'].items():
            add(f'{label}-{kind}', 'public', call_with(**over), pattern)
        add(f'{label}-mixed_dtype', 'public',
            call_with(**converted([other], lambda t, d: t.double())), 'dtype')
        add(f'{label}-int_dtype', 'public',
            call_with(**converted(tensors, lambda t, d: t.int())), 'floating-point')
        add(f'{label}-float8_dtype', 'public',
            call_with(**converted(tensors, lambda t, d: t.to(torch.float8_e4m3fn))),
            'unsupported dtype')
        add(f'{label}-mixed_device', 'public',
            call_with(**converted([other], lambda t, d: t.to(_other_device(d)))), 'device')
        add(f'{label}-not_4d', 'public', call_with(**converted([primary], lambda t, d: t[0])),
            '4-D')
        add(f'{label}-not_tensor', 'public',
            call_with(**converted([other], lambda t, d: t.tolist())), 'torch.Tensor')

    if mm is None or not hasattr(mm, 'sliding_window_logits'):
        return cases

    # Raw compiled ops: RuntimeError from the dispatcher-level TORCH_CHECKs.
    def raw(name, make, pattern, devices=('cpu', 'cuda')):
        add(name, 'raw', make, pattern, devices)

    raw('sliding_window_logits-even_window',
        lambda d: mm.sliding_window_logits(_window(d)['q'], _window(d)['k'],
                                           _rand(HEADS, 16, device=d), H, W, 4), 'odd')
    raw('sliding_window_logits-zero_height',
        lambda d: mm.sliding_window_logits(_window(d)['q'], _window(d)['k'],
                                           _window(d)['bias'], 0, W, WS), 'positive')
    raw('sliding_window_logits-bad_tokens',
        lambda d: mm.sliding_window_logits(_window(d)['q'], _window(d)['k'],
                                           _window(d)['bias'], 5, 5, WS), r'height\*width')
    raw('sliding_window_logits-key_shape',
        lambda d: mm.sliding_window_logits(_window(d)['q'], _window(d)['k'][..., :4],
                                           _window(d)['bias'], H, W, WS), 'key')
    raw('sliding_window_logits-bias_shape',
        lambda d: mm.sliding_window_logits(_window(d)['q'], _window(d)['k'],
                                           _window(d)['bias'][:, :4], H, W, WS), 'bias')
    raw('sliding_window_logits-mixed_dtype',
        lambda d: mm.sliding_window_logits(_window(d)['q'], _window(d)['k'].double(),
                                           _window(d)['bias'], H, W, WS), 'dtype')
    raw('sliding_window_logits-int_dtype',
        lambda d: mm.sliding_window_logits(*(_window(d)[n].int() for n in ('q', 'k', 'bias')),
                                           H, W, WS), 'unsupported dtype')
    raw('sliding_window_logits-not_4d',
        lambda d: mm.sliding_window_logits(_window(d)['q'][0], _window(d)['k'][0],
                                           _window(d)['bias'], H, W, WS), '4-D')
    raw('sliding_window_logits-mixed_device',
        lambda d: mm.sliding_window_logits(_window(d)['q'], _window('cpu')['k'],
                                           _window(d)['bias'], H, W, WS), 'is on',
        devices=('cuda',))
    raw('sliding_window_logits_backward-grad_shape',
        lambda d: mm.sliding_window_logits_backward(_window(d)['g_logits'][..., :4],
                                                    _window(d)['q'], _window(d)['k'], H, W, WS),
        'grad_out')
    raw('sliding_window_logits_backward-grad_dtype',
        lambda d: mm.sliding_window_logits_backward(_window(d)['g_logits'].double(),
                                                    _window(d)['q'], _window(d)['k'], H, W, WS),
        'grad_out')
    raw('sliding_window_logits_backward-even_window',
        lambda d: mm.sliding_window_logits_backward(_window(d)['g_logits'], _window(d)['q'],
                                                    _window(d)['k'], H, W, 2), 'odd')
    raw('sliding_window_aggregate-zero_window',
        lambda d: mm.sliding_window_aggregate(_window(d)['w'], _window(d)['v'], H, W, 0), 'odd')
    raw('sliding_window_aggregate-bad_tokens',
        lambda d: mm.sliding_window_aggregate(_window(d)['w'], _window(d)['v'], H, 4, WS),
        r'height\*width')
    raw('sliding_window_aggregate-weights_shape',
        lambda d: mm.sliding_window_aggregate(_window(d)['w'][..., :4], _window(d)['v'],
                                              H, W, WS), 'weights')
    raw('sliding_window_aggregate-not_4d',
        lambda d: mm.sliding_window_aggregate(_window(d)['w'], _window(d)['v'][0], H, W, WS),
        '4-D')
    raw('sliding_window_aggregate-int_dtype',
        lambda d: mm.sliding_window_aggregate(_window(d)['w'].int(), _window(d)['v'].int(),
                                              H, W, WS), 'unsupported dtype')
    raw('sliding_window_aggregate-mixed_device',
        lambda d: mm.sliding_window_aggregate(_window('cpu')['w'], _window(d)['v'], H, W, WS),
        'is on', devices=('cuda',))
    raw('sliding_window_aggregate_backward-grad_shape',
        lambda d: mm.sliding_window_aggregate_backward(_window(d)['v'][:1], _window(d)['w'],
                                                       _window(d)['v'], H, W, WS), 'grad_out')
    raw('sliding_window_aggregate_backward-grad_dtype',
        lambda d: mm.sliding_window_aggregate_backward(_window(d)['v'].half(), _window(d)['w'],
                                                       _window(d)['v'], H, W, WS), 'grad_out')

    if not hasattr(mm, 'bias_softmax_'):
        return cases
    # Band kernels: CPU only (the model calls them for CPU tensors alone).
    cpu = ('cpu',)

    def softmax(**over):
        def run(d):
            x = _band(d)
            args = dict(logits=x['logits'], by_rows=x['by_rows'], col_index=x['col_index'],
                        col_weight=x['col_weight'], row_start=0, row_shift=None)
            args.update({k: v(x) if callable(v) else v for k, v in over.items()})
            return mm.bias_softmax_(*args.values())
        return run

    raw('bias_softmax_-not_4d', softmax(logits=lambda x: x['logits'][0]), 'logits must be 4-D',
        cpu)
    raw('bias_softmax_-by_rows_not_4d', softmax(by_rows=lambda x: x['by_rows'][0]),
        'by_rows must be 4-D', cpu)
    raw('bias_softmax_-half_dtype', softmax(logits=lambda x: x['logits'].half()),
        'unsupported dtype', cpu)
    raw('bias_softmax_-not_contiguous',
        softmax(logits=lambda x: x['logits'].transpose(2, 3).contiguous().transpose(2, 3)),
        'contiguous', cpu)
    raw('bias_softmax_-index_dtype', softmax(col_index=lambda x: x['col_index'].int()),
        'int64', cpu)
    raw('bias_softmax_-weight_dtype', softmax(col_weight=lambda x: x['col_weight'].double()),
        'col_weight has dtype', cpu)
    raw('bias_softmax_-weight_shape', softmax(col_index=lambda x: x['col_index'][:, :-1]),
        'col_weight has shape', cpu)
    raw('bias_softmax_-index_range', softmax(col_index=lambda x: x['col_index'] + _BUW),
        r'is outside \[0, Uw', cpu)
    raw('bias_softmax_-heads', softmax(by_rows=lambda x: x['by_rows'][:1]), 'by_rows has 1 heads',
        cpu)
    raw('bias_softmax_-keys', softmax(by_rows=lambda x: x['by_rows'][:, :, :1]), r'Hp\*Wp',
        cpu)
    raw('bias_softmax_-key_columns', softmax(col_index=lambda x: x['col_index'][:, :-1],
                                             col_weight=lambda x: x['col_weight'][:, :-1]),
        'keys but by_rows gives Hp', cpu)
    raw('bias_softmax_-rows', softmax(logits=lambda x: x['logits'][:, :, :-1].contiguous()),
        'not a multiple of W', cpu)
    raw('bias_softmax_-row_start', softmax(row_start=_ROWS), 'runs past H', cpu)
    raw('bias_softmax_-negative_row_start', softmax(row_start=-1), 'row_start=-1', cpu)
    raw('bias_softmax_-row_shift_shape', softmax(row_shift=lambda x: x['stats'][..., :2]),
        'row_shift must have shape', cpu)

    def softmax_backward(**over):
        def run(d):
            x = _band(d)
            args = dict(grad=x['logits'], probs=x['logits'].clone(), shift=x['stats'],
                        grad_lse=x['stats'].clone())
            args.update({k: v(x) if callable(v) else v for k, v in over.items()})
            return mm.softmax_backward_(*args.values())
        return run

    raw('softmax_backward_-probs_shape',
        softmax_backward(probs=lambda x: x['logits'][..., :2].contiguous()), 'probs has shape',
        cpu)
    raw('softmax_backward_-probs_dtype',
        softmax_backward(probs=lambda x: x['logits'].double()), 'probs has dtype', cpu)
    raw('softmax_backward_-shift_shape', softmax_backward(shift=lambda x: x['stats'][0]),
        'shift must be 3-D', cpu)
    raw('softmax_backward_-grad_lse_shape',
        softmax_backward(grad_lse=lambda x: x['stats'][..., :2]), 'grad_lse must have shape',
        cpu)
    raw('softmax_backward_-not_contiguous',
        softmax_backward(grad=lambda x: x['logits'].transpose(2, 3).contiguous().transpose(2, 3)),
        'contiguous', cpu)
    raw('softmax_backward_-half_dtype',
        softmax_backward(grad=lambda x: x['logits'].half(), probs=lambda x: x['logits'].half()),
        'unsupported dtype', cpu)

    def rows_backward(**over):
        def run(d):
            x = _band(d)
            args = dict(grad_bias=x['grad_bias'], col_index=x['col_index'],
                        col_weight=x['col_weight'], uw=_BUW)
            args.update({k: v(x) if callable(v) else v for k, v in over.items()})
            return mm.bias_rows_backward(*args.values())
        return run

    raw('bias_rows_backward-zero_uw', rows_backward(uw=0), 'uw', cpu)
    raw('bias_rows_backward-rows', rows_backward(grad_bias=lambda x: x['grad_bias'][:, :5]),
        'not a multiple of W=', cpu)
    raw('bias_rows_backward-columns',
        rows_backward(grad_bias=lambda x: x['grad_bias'][..., :-1]), 'not a multiple of Wp',
        cpu)
    raw('bias_rows_backward-not_3d', rows_backward(grad_bias=lambda x: x['grad_bias'][0]),
        'grad_bias must be 3-D', cpu)
    raw('bias_rows_backward-index_dtype', rows_backward(col_index=lambda x: x['col_index'].int()),
        'col_index must be int64', cpu)
    raw('bias_rows_backward-index_range', rows_backward(uw=1), r'is outside \[0, Uw', cpu)
    return cases


CASES = _catalogue()


def cases(kind: str, device: str) -> List[BadCall]:
    """The calls of one kind (``'raw'`` or ``'public'``) that apply to a device type."""
    return [c for c in CASES if c.kind == kind and device in c.devices]


def check(case: BadCall, device: str) -> str:
    """Make the call; '' when it raised the expected exception, else why not."""
    expected = RuntimeError if case.kind == 'raw' else ValueError
    try:
        case.call(device)
    except expected as exc:
        if re.search(case.pattern, str(exc)) is None:
            return f'{type(exc).__name__} without /{case.pattern}/ in its message: {exc}'
        return ''
    except Exception as exc:  # noqa: BLE001 - any other Python exception is a wrong answer
        return f'raised {type(exc).__name__} instead of {expected.__name__}: {exc}'
    return f'returned without raising (expected {expected.__name__} /{case.pattern}/)'


def plain_aten_error_raises() -> bool:
    """Whether a C++ exception thrown inside ATen itself reaches Python."""
    try:
        torch.ones(2, 3) @ torch.ones(2, 3)
    except RuntimeError:
        return True
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--kind', default='raw', choices=('raw', 'public'))
    args = parser.parse_args(argv)
    faulthandler.enable()
    print(f'plain ATen error raises RuntimeError: {plain_aten_error_raises()}', flush=True)
    selected = cases(args.kind, args.device)
    if not selected:
        print(f'FAIL no {args.kind} calls for {args.device}: mmtransnext._C is not loaded '
              f'({ops.sliding_window._LOAD_ERROR})', flush=True)
        return 1
    failed = 0
    for case in selected:
        print(f'call {case.name}', flush=True)  # the last line before a crash names it
        why = check(case, args.device)
        failed += bool(why)
        print(f'FAIL {case.name}: {why}' if why else f'ok {case.name}', flush=True)
    print(f'bad_op_calls: {len(selected) - failed} of {len(selected)} raised as expected',
          flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
