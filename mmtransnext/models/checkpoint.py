"""Loading released TransNeXt weights into the backbone, with a full report."""
import os
from typing import Dict, List, Mapping, Tuple

import torch
from mmengine.logging import MMLogger, print_log
from torch import Tensor, nn

# Containers a checkpoint may wrap its weights in: mmengine/mmdet/mmseg save
# 'state_dict', the ImageNet release saved 'model'.
_CONTAINER_KEYS = ('state_dict', 'model')


def filter_backbone_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Keep what belongs to the backbone, under the backbone's own names.

    Pure and idempotent: a detector's or segmentor's weights give their
    ``backbone.*`` entries with the prefix stripped; a classifier's give
    everything but its ``head.*``; a backbone's own state dict is returned as is.

    Args:
        state_dict (Mapping[str, Tensor]): weights of a backbone, classifier,
            detector or segmentor.

    Returns:
        dict[str, Tensor]: a new dict; the input is not modified.
    """
    prefix = 'backbone.'
    if any(name.startswith(prefix) for name in state_dict):
        state_dict = {name[len(prefix):]: value for name, value in state_dict.items()
                      if name.startswith(prefix)}
    return {name: value for name, value in state_dict.items() if not name.startswith('head.')}


def read_checkpoint(path: str) -> Dict[str, Tensor]:
    """The weights stored at ``path`` (a raw state dict, or one under a container key).

    Loaded with ``weights_only=True``: a checkpoint is data, never code.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file holds no mapping of tensors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'TransNeXt checkpoint not found: {path!r}. Download the '
                                'released weights and point init_cfg.checkpoint at the file.')
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(checkpoint, Mapping):
        for container in _CONTAINER_KEYS:
            if isinstance(checkpoint.get(container), Mapping):
                checkpoint = checkpoint[container]
                break
    if not isinstance(checkpoint, Mapping) or not any(
            isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f'{path!r} holds no state dict of tensors')
    return dict(checkpoint)


def compare_state_dicts(model: nn.Module, weights: Mapping[str, Tensor]
                        ) -> Tuple[List[str], List[str], List[str]]:
    """Names the model lacks, names it has no weight for, and shape mismatches.

    Returns:
        tuple[list[str], list[str], list[str]]: missing, unexpected, and
        ``'name: checkpoint (..) vs model (..)'`` lines for mismatched shapes.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    mismatched = sorted(f'{name}: checkpoint {tuple(weights[name].shape)} vs model '
                        f'{tuple(own[name].shape)}' for name in set(own) & set(weights)
                        if weights[name].shape != own[name].shape)
    return missing, unexpected, mismatched


def load_pretrained(model: nn.Module, path: str) -> Tuple[List[str], List[str], List[str]]:
    """Load released weights into ``model``, reporting every name that did not fit.

    Entries whose name and shape match are loaded; every missing, unexpected or
    mismatched name is logged as a warning. A checkpoint that shares no entry
    with the model is an error, not a silent no-op.

    Args:
        model (nn.Module): the backbone.
        path (str): a local checkpoint file.

    Returns:
        tuple[list[str], list[str], list[str]]: as :func:`compare_state_dicts`.

    Raises:
        ValueError: no entry of the checkpoint fits the model.
    """
    weights = filter_backbone_state_dict(read_checkpoint(path))
    missing, unexpected, mismatched = compare_state_dicts(model, weights)
    bad_shapes = {line.split(':', 1)[0] for line in mismatched}
    usable = {name: value for name, value in weights.items()
              if name not in bad_shapes and name not in unexpected}
    if not usable:
        raise ValueError(f'no weight in {path!r} fits the model: {len(unexpected)} unexpected, '
                         f'{len(mismatched)} mismatched, {len(missing)} missing names')
    model.load_state_dict(usable, strict=False)
    logger = MMLogger.get_current_instance()
    print_log(f'Loaded {len(usable)} tensors from {path}', logger=logger)
    for title, names in (('missing in the checkpoint', missing),
                         ('unexpected in the checkpoint', unexpected),
                         ('shape mismatch (not loaded)', mismatched)):
        if names:
            print_log(f'{len(names)} {title}: ' + ', '.join(names), logger=logger,
                      level=30)
    return missing, unexpected, mismatched
