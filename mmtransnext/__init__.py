"""mmtransnext: the TransNeXt backbone as an OpenMMLab plugin.

Importing the package registers ``TransNeXt`` (and the released configs' aliases
``transnext_micro`` ... ``transnext_base``) in MMEngine's root ``MODELS`` registry, so
mmdet, mmseg and any other OpenMMLab project build it from a config once
``custom_imports = dict(imports=['mmtransnext'])`` is set. Importing never fails when
the compiled op is missing: the model then falls back to the pure-PyTorch reference.
"""
from .version import __version__
from . import engine  # noqa: F401  (weights-only loading of mmengine checkpoints)
from . import ops  # noqa: F401
from . import models  # noqa: F401
from .models import TransNeXt

__all__ = ['__version__', 'TransNeXt']
