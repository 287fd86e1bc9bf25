"""mmtransnext: the TransNeXt backbone as an OpenMMLab plugin.

Importing the package registers ``TransNeXt`` (and the released configs' aliases
``transnext_micro`` ... ``transnext_base``) in MMEngine's root ``MODELS`` registry, so
mmdet, mmseg and any other OpenMMLab project build it from a config once
``custom_imports = dict(imports=['mmtransnext'])`` is set. Importing never fails when
the compiled op is missing: the model then falls back to the pure-PyTorch reference.
A torch outside the supported range (:data:`version.SUPPORTED_TORCH`) gets a warning.
"""
import os
import warnings

import torch

from .version import __version__, unsupported_torch_message

_UNSUPPORTED_TORCH = unsupported_torch_message(torch.__version__)
if _UNSUPPORTED_TORCH is not None:
    warnings.warn(f'{_UNSUPPORTED_TORCH}: expect build or runtime errors.', UserWarning)

from . import engine  # noqa: E402,F401  (weights-only loading of mmengine checkpoints)
from . import ops  # noqa: E402,F401
from . import models  # noqa: E402,F401
from .models import TransNeXt  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config_path(name: str) -> str:
    """Absolute path of one of the shipped configs.

    An installed package carries the configs in ``mmtransnext/.mim/configs`` (as
    OpenMMLab packages ship theirs); a source checkout reads ``configs/`` beside the
    package. Pass the result to ``mmengine.Config.fromfile`` or to mmdet's and mmseg's
    ``tools/train.py``; relative ``_base_`` files resolve within the same tree.

    Args:
        name (str): Path below ``configs/``, e.g.
            ``'detection/mask-rcnn_transnext-tiny_fpn_1x_coco.py'``.

    Returns:
        str: The config file's absolute path.

    Raises:
        FileNotFoundError: If no shipped config has that name.
    """
    for root in (os.path.join(_HERE, '.mim', 'configs'),
                 os.path.join(os.path.dirname(_HERE), 'configs')):
        if os.path.isdir(root):
            path = os.path.join(root, name)
            if os.path.isfile(path):
                return path
            raise FileNotFoundError(f'mmtransnext ships no config {name!r} (looked in {root})')
    raise FileNotFoundError('mmtransnext: no configs directory next to the package; '
                            'reinstall it (`pip install --no-build-isolation .`)')


__all__ = ['__version__', 'TransNeXt', 'get_config_path']
