"""Sliding-window attention: the local part of TransNeXt's aggregated attention.

Two operators cover it, each with a compiled implementation (``torch.ops.mmtransnext``,
built from ``csrc/`` into ``mmtransnext._C``) and a pure-PyTorch reference that
reproduces the released TransNeXt computation (``F.unfold`` with zero padding):

* :func:`sliding_window_logits` -- ``q . k`` over each token's ``ws x ws`` window plus a
  per-head relative position bias, ``-inf`` where the neighbour is outside the map.
* :func:`sliding_window_aggregate` -- the weighted sum of the window's values.

Layout: ``query``/``key``/``value`` are ``(B, heads, N, d)`` with ``N = height * width``
and token ``n = r * width + c``. Neighbour ``j = ki * ws + kj`` of token ``(r, c)`` is
``(r + ki - ws // 2, c + kj - ws // 2)``, which may lie outside the map.

The compiled kernels never materialise the unfolded ``(B, heads, N, d, ws*ws)`` keys and
values, which is where the reference spends its time and memory. Dispatch between them
follows one rule, :func:`use_compiled_op`. Fake (meta) kernels and autograd formulas are
registered here, so ``torch.compile(fullgraph=True)`` traces through the compiled op.
"""
import importlib
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .graph_capture import (outside_mask, sliding_window_aggregate_decomposed,
                            sliding_window_logits_decomposed)

__all__ = [
    'sliding_window_logits', 'sliding_window_aggregate',
    'sliding_window_logits_reference', 'sliding_window_aggregate_reference',
    'extension_available', 'use_compiled_op', 'reference_requested', 'DISABLE_ENV',
]

#: Set this environment variable to ``1`` to force the pure-PyTorch reference.
DISABLE_ENV = 'MMTRANSNEXT_DISABLE_EXT'

_OP_NAMES = ('sliding_window_logits', 'sliding_window_logits_backward',
             'sliding_window_aggregate', 'sliding_window_aggregate_backward')

# Loading the library runs its TORCH_LIBRARY registrations. A missing or broken build
# must never make `import mmtransnext` fail: remember why and fall back.
_LOAD_ERROR: Optional[str] = None
try:
    importlib.import_module('mmtransnext._C')
except (ImportError, OSError) as exc:  # missing .so, or one built against another torch
    _LOAD_ERROR = f'{type(exc).__name__}: {exc}'

_LOADED = _LOAD_ERROR is None and all(
    hasattr(torch.ops.mmtransnext, name) for name in _OP_NAMES)
if _LOAD_ERROR is None and not _LOADED:
    _LOAD_ERROR = 'mmtransnext._C loaded but did not register the torch.ops.mmtransnext ops'

_WARNED_DEVICES = set()


# --------------------------------------------------------------------------- dispatch
# The dispatch keys the library registers kernels under, per device type: CPU and CUDA
# (csrc/), Meta (the fake kernels below). Any other device type has none. A key cannot
# be guessed from its device type's name ('meta' is Meta, 'privateuseone' PrivateUse1),
# and torch 2.1 has no function that maps one to the other.
_DISPATCH_KEYS = {'cpu': 'CPU', 'cuda': 'CUDA', 'meta': 'Meta'}


def extension_available(device) -> bool:
    """Whether compiled kernels of the op exist for a device type.

    Args:
        device (str | torch.device): A device or device type, e.g. ``'cpu'``,
            ``'cuda:0'`` or ``torch.device('cuda')``.

    Returns:
        bool: True if ``mmtransnext._C`` is loaded and registered kernels for that
        device type: CPU ones, CUDA ones in builds made with CUDA, and Meta ones (the
        fake kernels, which give meta tensors their output shapes). False for any
        other device type.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _LOADED and _KERNELS.get(device_type, False)


def reference_requested() -> bool:
    """Whether ``MMTRANSNEXT_DISABLE_EXT=1`` asks for the released computation.

    The reference path then runs everywhere: the op's pure-PyTorch reference, and the
    model's released step-by-step forward (no fused or memory-saving variants), so it
    can serve as the baseline of tests and benchmarks.
    """
    return os.environ.get(DISABLE_ENV, '0') == '1'


def use_compiled_op(tensor: torch.Tensor) -> bool:
    """The one dispatch rule between the compiled op and the reference.

    The compiled op is used when it is available for ``tensor``'s device type and the
    environment variable ``MMTRANSNEXT_DISABLE_EXT`` is not ``1``. When it is missing
    for that device type (and not disabled on purpose), one ``UserWarning`` per device
    type says why, and the reference is used.

    Args:
        tensor (torch.Tensor): Any input of the op; only its device matters.

    Returns:
        bool: True to call ``torch.ops.mmtransnext``, False for the reference.
    """
    if reference_requested():
        return False
    device_type = tensor.device.type
    if extension_available(device_type):
        return True
    if device_type not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(device_type)
        if _LOAD_ERROR is not None:
            why = f'mmtransnext._C could not be loaded ({_LOAD_ERROR})'
        else:
            why = ('mmtransnext._C has CPU kernels, and CUDA ones only when built where '
                   'a GPU and CUDA_HOME are present (or with FORCE_CUDA=1)')
        warnings.warn(
            f'mmtransnext: compiled sliding-window attention op unavailable for device '
            f"type '{device_type}': {why}. Falling back to the pure-PyTorch reference, "
            'which is much slower and uses far more memory. Rebuild with '
            '`pip install --no-build-isolation -e .` (or set '
            f'{DISABLE_ENV}=1 to choose the reference on purpose and silence this).',
            UserWarning, stacklevel=3)
    return False


# ------------------------------------------------------------------------- validation
# The kernels' dtypes (csrc/sliding_window.cpp, supported_dtype).
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SIZE_TYPES = (int, torch.SymInt)


def _check_window(height: int, width: int, window_size: int) -> None:
    if not isinstance(window_size, int) or window_size <= 0 or window_size % 2 == 0:
        raise ValueError(
            f'window_size must be an odd positive int, got {window_size!r}')
    # Symbolic sizes (torch.SymInt) arrive while torch.compile / torch.export trace, and
    # 0-dim tensors under torch.jit.trace (the FLOP counter).
    if not torch.jit.is_tracing() and not (isinstance(height, _SIZE_TYPES)
                                           and isinstance(width, _SIZE_TYPES)):
        raise ValueError(f'height and width must be ints, got {height!r} and {width!r}')
    if height <= 0 or width <= 0:
        raise ValueError(f'height and width must be positive, got {height}x{width}')


def _check_tensors(named: dict, first: str) -> None:
    ref = named[first]
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f'{name} must be a torch.Tensor, got {type(t).__name__}')
        if t.dtype != ref.dtype:
            raise ValueError(f'{name} has dtype {t.dtype} but {first} has {ref.dtype}; '
                             'all inputs must share one dtype')
        if t.device != ref.device:
            raise ValueError(f'{name} is on {t.device} but {first} is on {ref.device}; '
                             'all inputs must be on one device')
    if not ref.is_floating_point():
        raise ValueError(f'{first} must be a floating-point tensor, got {ref.dtype}')
    if ref.dtype not in _KERNEL_DTYPES:
        raise ValueError(f'unsupported dtype {ref.dtype} for {first} (supported: float32, '
                         'float64, float16, bfloat16)')


def _check_tokens(x: torch.Tensor, name: str, height: int, width: int) -> None:
    if x.dim() != 4:
        raise ValueError(f'{name} must be 4-D (B, heads, N, d), got shape {tuple(x.shape)}')
    if x.shape[2] != height * width:
        raise ValueError(f'{name} has N={x.shape[2]} tokens but height*width = '
                         f'{height}*{width} = {height * width}')


def _check_logits_args(query, key, bias, height, width, window_size):
    _check_window(height, width, window_size)
    _check_tensors({'query': query, 'key': key, 'bias': bias}, 'query')
    _check_tokens(query, 'query', height, width)
    if key.shape != query.shape:
        raise ValueError(f'key must have the shape of query {tuple(query.shape)}, '
                         f'got {tuple(key.shape)}')
    expected = (query.shape[1], window_size * window_size)
    if tuple(bias.shape) != expected:
        raise ValueError(f'bias must have shape (heads, window_size**2) = {expected}, '
                         f'got {tuple(bias.shape)}')


def _check_aggregate_args(weights, value, height, width, window_size):
    _check_window(height, width, window_size)
    _check_tensors({'value': value, 'weights': weights}, 'value')
    _check_tokens(value, 'value', height, width)
    expected = (*value.shape[:3], window_size * window_size)
    if tuple(weights.shape) != expected:
        raise ValueError(f'weights must have shape (B, heads, N, window_size**2) = '
                         f'{expected}, got {tuple(weights.shape)}')


# -------------------------------------------------------------------------- reference
def _unfold_tokens(x: torch.Tensor, height: int, width: int,
                   window_size: int) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, N, d, L): each token's window, zero outside the map."""
    B, h, N, d = x.shape
    grid = x.transpose(-1, -2).reshape(B, h * d, height, width)
    cols = F.unfold(grid, kernel_size=window_size, padding=window_size // 2)
    return cols.reshape(B, h, d, window_size * window_size, N).permute(0, 1, 4, 2, 3)


def sliding_window_logits_reference(query: torch.Tensor, key: torch.Tensor,
                                    bias: torch.Tensor, height: int, width: int,
                                    window_size: int) -> torch.Tensor:
    """Pure-PyTorch sliding-window logits, as computed by the released TransNeXt.

    Keys are gathered with ``F.unfold`` (zero padding), so this materialises a
    ``(B, heads, N, d, window_size**2)`` tensor: correct everywhere, but slow and
    memory-hungry at detection resolutions.

    Args:
        query (torch.Tensor): ``(B, heads, N, d)``, ``N = height * width``.
        key (torch.Tensor): ``(B, heads, N, d)``.
        bias (torch.Tensor): ``(heads, window_size**2)`` relative position bias.
        height (int): Feature map height.
        width (int): Feature map width.
        window_size (int): Odd window side ``ws``.

    Returns:
        torch.Tensor: ``(B, heads, N, ws*ws)`` logits, ``-inf`` where the neighbour is
        outside the map.
    """
    _check_logits_args(query, key, bias, height, width, window_size)
    k_local = _unfold_tokens(key, height, width, window_size)
    logits = (query.unsqueeze(-2) @ k_local).squeeze(-2) + bias.unsqueeze(1)
    return logits.masked_fill(outside_mask(query, height, width, window_size), float('-inf'))


def sliding_window_aggregate_reference(weights: torch.Tensor, value: torch.Tensor,
                                       height: int, width: int,
                                       window_size: int) -> torch.Tensor:
    """Pure-PyTorch sliding-window aggregation, as computed by the released TransNeXt.

    Values are gathered with ``F.unfold`` (zero padding): weights of neighbours outside
    the map multiply zeros, so they do not contribute and get zero gradient (as long as
    they are finite, e.g. softmax outputs).

    Args:
        weights (torch.Tensor): ``(B, heads, N, window_size**2)``.
        value (torch.Tensor): ``(B, heads, N, d)``, ``N = height * width``.
        height (int): Feature map height.
        width (int): Feature map width.
        window_size (int): Odd window side ``ws``.

    Returns:
        torch.Tensor: ``(B, heads, N, d)``.
    """
    _check_aggregate_args(weights, value, height, width, window_size)
    v_local = _unfold_tokens(value, height, width, window_size)
    return (weights.unsqueeze(-2) @ v_local.transpose(-1, -2)).squeeze(-2)


# --------------------------------------------------------------------- public entries
def sliding_window_logits(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor,
                          height: int, width: int, window_size: int) -> torch.Tensor:
    """Sliding-window attention logits ``q . k + bias`` over each token's window.

    ``out[b, t, n, j] = sum_c query[b, t, n, c] * key[b, t, nbr_j(n), c] + bias[t, j]``
    where neighbour ``j`` is inside the map, ``-inf`` where it is outside. Gradients
    flow to query, key and bias (none from the ``-inf`` entries). Uses the compiled op
    when :func:`use_compiled_op` says so, else
    :func:`sliding_window_logits_reference`; during an ONNX export, its form in
    standard operators (:mod:`mmtransnext.ops.graph_capture`).

    Args:
        query (torch.Tensor): ``(B, heads, N, d)``, ``N = height * width``, row-major.
        key (torch.Tensor): ``(B, heads, N, d)``.
        bias (torch.Tensor): ``(heads, window_size**2)``, same dtype as query.
        height (int): Feature map height.
        width (int): Feature map width.
        window_size (int): Odd, positive window side ``ws``.

    Returns:
        torch.Tensor: ``(B, heads, N, window_size**2)`` in query's dtype.

    Raises:
        ValueError: On an even or non-positive window, ``N != height * width``, shape
            mismatches, or mixed dtypes/devices.
    """
    _check_logits_args(query, key, bias, height, width, window_size)
    if torch.onnx.is_in_onnx_export():    # ONNX has no node for the compiled op
        return sliding_window_logits_decomposed(query, key, bias, height, width, window_size)
    if use_compiled_op(query):
        return torch.ops.mmtransnext.sliding_window_logits(query, key, bias, height, width,
                                                           window_size)
    return sliding_window_logits_reference(query, key, bias, height, width, window_size)


def sliding_window_aggregate(weights: torch.Tensor, value: torch.Tensor, height: int,
                             width: int, window_size: int) -> torch.Tensor:
    """Weighted sum of each token's window of values.

    ``out[b, t, n, :] = sum_j weights[b, t, n, j] * value[b, t, nbr_j(n), :]`` over the
    neighbours inside the map; weights of outside neighbours are ignored and get zero
    gradient. Gradients flow to weights and value. Uses the compiled op when
    :func:`use_compiled_op` says so, else :func:`sliding_window_aggregate_reference`;
    during an ONNX export, its form in standard operators.

    Args:
        weights (torch.Tensor): ``(B, heads, N, window_size**2)``, e.g. softmax output.
        value (torch.Tensor): ``(B, heads, N, d)``, ``N = height * width``.
        height (int): Feature map height.
        width (int): Feature map width.
        window_size (int): Odd, positive window side ``ws``.

    Returns:
        torch.Tensor: ``(B, heads, N, d)`` in value's dtype.

    Raises:
        ValueError: On an even or non-positive window, ``N != height * width``, shape
            mismatches, or mixed dtypes/devices.
    """
    _check_aggregate_args(weights, value, height, width, window_size)
    if torch.onnx.is_in_onnx_export():
        return sliding_window_aggregate_decomposed(weights, value, height, width, window_size)
    if use_compiled_op(value):
        return torch.ops.mmtransnext.sliding_window_aggregate(weights, value, height, width,
                                                              window_size)
    return sliding_window_aggregate_reference(weights, value, height, width, window_size)


# ------------------------------------------------- fake kernels and autograd (compiled)
# torch >= 2.4 has torch.library.register_fake and register_autograd. Older torches of
# the supported range (2.1 to 2.3) get the same kernels and formulas the way they allow:
# the fake kernels as Meta kernels, the autograd formulas as an autograd.Function
# registered as the ops' Autograd kernel. Either way torch.ops.mmtransnext.* is
# differentiable and traceable by torch.compile, so use_compiled_op stays the one rule.
_HAS_REGISTER_FAKE = hasattr(torch.library, 'register_fake')
_HAS_REGISTER_AUTOGRAD = hasattr(torch.library, 'register_autograd')
# Registrations made from Python live as long as this Library object.
_PY_LIBRARY = None


def _logits_fake(query, key, bias, height, width, window_size):
    B, h, N, _ = query.shape
    return query.new_empty((B, h, N, window_size * window_size))


def _logits_backward_fake(grad_out, query, key, height, width, window_size):
    return (torch.empty_like(query, memory_format=torch.contiguous_format),
            torch.empty_like(key, memory_format=torch.contiguous_format),
            query.new_empty((query.shape[1], window_size * window_size)))


def _aggregate_fake(weights, value, height, width, window_size):
    return torch.empty_like(value, memory_format=torch.contiguous_format)


def _aggregate_backward_fake(grad_out, weights, value, height, width, window_size):
    return (torch.empty_like(weights, memory_format=torch.contiguous_format),
            torch.empty_like(value, memory_format=torch.contiguous_format))


# Band kernels of banded bias attention (ops/banded_attention.py checks for them).
def _bias_softmax_fake(logits, by_rows, col_index, col_weight, row_start, row_shift):
    return logits.new_empty(logits.shape[:3]), logits.new_empty(logits.shape[:3])


def _softmax_backward_fake(grad, probs, shift, grad_lse):
    return None


def _bias_rows_backward_fake(grad_bias, col_index, col_weight, uw):
    heads, rows, keys = grad_bias.shape
    width, pool_w = col_index.shape[:2]
    return grad_bias.new_empty((heads, rows // width, keys // pool_w, uw))


def _logits_setup(ctx, inputs, output):
    query, key, _bias, height, width, window_size = inputs
    ctx.save_for_backward(query, key)
    ctx.geometry = (height, width, window_size)


def _logits_backward(ctx, grad):
    query, key = ctx.saved_tensors
    grad_query, grad_key, grad_bias = torch.ops.mmtransnext.sliding_window_logits_backward(
        grad, query, key, *ctx.geometry)
    return grad_query, grad_key, grad_bias, None, None, None


def _aggregate_setup(ctx, inputs, output):
    weights, value, height, width, window_size = inputs
    ctx.save_for_backward(weights, value)
    ctx.geometry = (height, width, window_size)


def _aggregate_backward(ctx, grad):
    weights, value = ctx.saved_tensors
    grad_weights, grad_value = torch.ops.mmtransnext.sliding_window_aggregate_backward(
        grad, weights, value, *ctx.geometry)
    return grad_weights, grad_value, None, None, None


def _below_autograd(op_name: str):
    """A forward that runs ``op_name``'s CPU/CUDA/Meta kernel, skipping its Autograd one."""
    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(torch.ops.mmtransnext, op_name)(*args)
    return staticmethod(forward)


class _LogitsFunction(torch.autograd.Function):
    """Autograd of ``sliding_window_logits`` on torches without ``register_autograd``."""
    forward = _below_autograd('sliding_window_logits')
    setup_context = staticmethod(_logits_setup)
    backward = staticmethod(_logits_backward)


class _AggregateFunction(torch.autograd.Function):
    """Autograd of ``sliding_window_aggregate`` on torches without ``register_autograd``."""
    forward = _below_autograd('sliding_window_aggregate')
    setup_context = staticmethod(_aggregate_setup)
    backward = staticmethod(_aggregate_backward)


def _register_python_side() -> None:
    global _PY_LIBRARY
    fakes = {'sliding_window_logits': _logits_fake,
             'sliding_window_logits_backward': _logits_backward_fake,
             'sliding_window_aggregate': _aggregate_fake,
             'sliding_window_aggregate_backward': _aggregate_backward_fake}
    band = {'bias_softmax_': _bias_softmax_fake,
            'softmax_backward_': _softmax_backward_fake,
            'bias_rows_backward': _bias_rows_backward_fake}
    # A build older than the band kernels lacks those ops, which is not an error.
    if all(hasattr(torch.ops.mmtransnext, name) for name in band):
        fakes.update(band)
    if not (_HAS_REGISTER_FAKE and _HAS_REGISTER_AUTOGRAD):
        _PY_LIBRARY = torch.library.Library('mmtransnext', 'IMPL')

    for name, fake in fakes.items():
        if _HAS_REGISTER_FAKE:
            torch.library.register_fake('mmtransnext::' + name)(fake)
        else:
            _PY_LIBRARY.impl(name, fake, 'Meta')

    if _HAS_REGISTER_AUTOGRAD:
        torch.library.register_autograd('mmtransnext::sliding_window_logits',
                                        _logits_backward, setup_context=_logits_setup)
        torch.library.register_autograd('mmtransnext::sliding_window_aggregate',
                                        _aggregate_backward, setup_context=_aggregate_setup)
    else:
        _PY_LIBRARY.impl('sliding_window_logits', _LogitsFunction.apply, 'Autograd')
        _PY_LIBRARY.impl('sliding_window_aggregate', _AggregateFunction.apply, 'Autograd')


if _LOADED:
    _register_python_side()

# Registrations happen when the library loads (and just above), so availability is fixed
# from here on; a plain dict keeps `use_compiled_op` traceable by torch.compile.
_KERNELS = {device_type: _LOADED and all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f'mmtransnext::{name}', key)
    for name in _OP_NAMES) for device_type, key in _DISPATCH_KEYS.items()}


def _constant_while_compiling(fn):
    """``fn``, read once per compiled graph by ``torch.compile`` before torch 2.4.

    Those releases cannot trace ``os.environ.get`` (they refuse to inline
    ``Mapping.get``), which would break the graph at :func:`use_compiled_op`; there the
    environment variable is read when a graph is compiled, and a change takes effect
    at the next one. Their Dynamo stores the result as a global of the calling module
    named after the function, so the wrapper gets a name no module defines: under its
    own name it would replace ``reference_requested`` there with a bool.
    """
    def constant():
        return fn()

    constant.__name__ = constant.__qualname__ = f'_mmtransnext_{fn.__name__}_when_compiled'
    constant.__doc__ = fn.__doc__
    return torch._dynamo.assume_constant_result(constant)


if not _HAS_REGISTER_FAKE:
    reference_requested = _constant_while_compiling(reference_requested)
