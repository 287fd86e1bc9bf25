"""Let ``torch.load``'s ``weights_only`` mode read MMEngine checkpoints.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: only tensors,
containers of plain Python values, and globals marked safe may be unpickled.
MMEngine 0.10.7 calls ``torch.load(filename, map_location=...)`` without choosing,
and a checkpoint written by its ``Runner`` holds, besides tensors and plain values,

* ``mmengine.logging.HistoryBuffer`` objects (in ``message_hub.log_scalars``),
  whose pickled state names their statistics methods as
  ``getattr(HistoryBuffer, 'mean')`` and so on,
* numpy arrays inside them (``ndarray``, ``dtype`` and the array-rebuild helper),
* numpy scalars (``numpy.float64`` and friends, e.g. logged values).

So ``--resume`` and ``load_from`` fail with "Unsupported global". This module marks
exactly those types as safe with :func:`torch.serialization.add_safe_globals`.
``getattr`` itself is never allowed: the name ``builtins.getattr`` is mapped to
:func:`history_buffer_getattr`, which only returns HistoryBuffer's public
methods and refuses anything else.
Everything else keeps ``torch``'s protection: ``weights_only`` stays on, so a
downloaded checkpoint still cannot run arbitrary code while loading.

Importing the module applies the allowlist once (it is idempotent), so mmdet's
and mmseg's own tools benefit as soon as ``mmtransnext`` is imported (for
instance through a config's ``custom_imports``). Older torches (2.1 to 2.5) load
MMEngine's checkpoints as they are, so nothing is changed there.
"""
from __future__ import annotations

import inspect
import pickle
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch

from ..version import torch_release

__all__ = [
    'mmengine_safe_globals', 'allow_mmengine_checkpoints',
    'history_buffer_getattr', 'torch_loads_weights_only'
]

_SafeGlobal = Union[Callable, Tuple[Callable, str]]
_applied = False

# numpy scalar / array dtypes a log or a meta dict may hold.
_NUMPY_DTYPES = ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16',
                 'uint32', 'uint64', 'float16', 'float32', 'float64',
                 'complex64', 'complex128', 'str', 'bytes')


def _numpy_multiarray_attr(name: str) -> List[_SafeGlobal]:
    """``numpy.(_)core.multiarray.<name>`` under both module paths.

    numpy 2 pickles them as ``numpy._core.multiarray``, numpy 1 as
    ``numpy.core.multiarray``; a checkpoint written under either must load.
    """
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    obj = getattr(multiarray, name)
    return [(obj, f'numpy._core.multiarray.{name}'),
            (obj, f'numpy.core.multiarray.{name}')]


def history_buffer_getattr(obj: Any, name: str) -> Any:
    """The only ``getattr`` a weights-only load may call: a public method
    defined on ``HistoryBuffer`` (how its statistics methods are pickled)."""
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and isinstance(name, str) \
            and not name.startswith('_') \
            and inspect.isfunction(vars(HistoryBuffer).get(name)):
        return vars(HistoryBuffer)[name]
    raise pickle.UnpicklingError(
        f'weights-only load: getattr({obj!r}, {name!r}) is not allowed '
        '(mmtransnext only allows HistoryBuffer statistics methods)')


def mmengine_safe_globals() -> List[_SafeGlobal]:
    """The globals an MMEngine ``Runner`` checkpoint needs, for
    :func:`torch.serialization.add_safe_globals`."""
    from mmengine.logging import HistoryBuffer

    safe: List[_SafeGlobal] = [HistoryBuffer, np.ndarray, np.dtype]
    safe.append((history_buffer_getattr, 'builtins.getattr'))
    safe += _numpy_multiarray_attr('_reconstruct')
    safe += _numpy_multiarray_attr('scalar')
    for name in _NUMPY_DTYPES:
        dtype_cls: Any = type(np.dtype(name))
        # e.g. numpy.dtypes.Float64DType (numpy >= 1.25); on older numpy every
        # dtype is a plain ``numpy.dtype``, already listed.
        if dtype_cls is not np.dtype:
            safe.append(dtype_cls)
    return safe


def torch_loads_weights_only() -> bool:
    """Whether this torch's ``torch.load`` defaults to ``weights_only=True``
    (torch >= 2.6), which is what MMEngine's plain ``torch.load`` calls meet."""
    return (torch_release(torch.__version__) >= (2, 6)
            and hasattr(torch.serialization, 'add_safe_globals'))


def allow_mmengine_checkpoints() -> None:
    """Mark :func:`mmengine_safe_globals` safe for ``weights_only`` loading.

    Only where :func:`torch_loads_weights_only`: before torch 2.6 MMEngine's
    ``torch.load`` unpickles its checkpoints without an allowlist, and the
    torch-wide list of safe globals is left as it is.
    """
    global _applied
    if _applied:
        return
    if torch_loads_weights_only():
        torch.serialization.add_safe_globals(mmengine_safe_globals())
    _applied = True


allow_mmengine_checkpoints()
