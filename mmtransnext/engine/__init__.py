"""Runtime glue for MMEngine.

Importing this package

* lets ``torch.load``'s default ``weights_only`` mode read MMEngine's own
  checkpoints (see :mod:`.checkpoint_compat`), so ``--resume`` and
  ``load_from`` work on torch >= 2.6 without turning ``weights_only`` off;
* registers :class:`TestProgressBarHook` in MMEngine's root ``HOOKS``.
"""
from .checkpoint_compat import (allow_mmengine_checkpoints,
                                history_buffer_getattr, mmengine_safe_globals,
                                torch_loads_weights_only)
from .hooks import TestProgressBarHook

__all__ = [
    'allow_mmengine_checkpoints', 'history_buffer_getattr',
    'mmengine_safe_globals', 'torch_loads_weights_only', 'TestProgressBarHook'
]
