"""Loading released TransNeXt weights into the backbone: loudly, through mmengine.

Files are read by mmengine's :class:`~mmengine.runner.CheckpointLoader` (local
paths, ``https://`` with its download cache, and every other scheme it knows),
always as weights only. What the file holds is then matched against the model:
a checkpoint that leaves backbone weights missing, mismatched or extra is an
error naming the variant it looks like, unless partial loading is asked for.
"""
import argparse
import os
import re
from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from torch import Tensor, nn

# Containers a checkpoint may wrap its weights in: mmengine/mmdet/mmseg save
# 'state_dict', the ImageNet release saved 'model'.
_CONTAINER_KEYS = ('state_dict', 'model')
# The classifier's head: in a classification checkpoint, not in the backbone.
_HEAD_PREFIX = 'head.'
# How many offending names an error or a warning lists before "and N more".
_NAMES_SHOWN = 5
# torch.load reads this on every call and then loads weights only, even where the
# caller (torch.hub, under mmengine's https:// loader) passes weights_only=False.
_FORCE_WEIGHTS_ONLY = 'TORCH_FORCE_WEIGHTS_ONLY_LOAD'
_FORCE_FULL_UNPICKLING = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'

MapLocation = Union[None, str, torch.device, dict, Callable]


@contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside unpickles weights only.

    mmengine's loaders call ``torch.load`` without choosing (local files: weights
    only by default since torch 2.6) or through ``torch.hub`` with
    ``weights_only=False`` (``http(s)://``); torch's own switch makes both safe. The
    globals a classifier release or an mmengine ``Runner`` checkpoint needs
    (``argparse.Namespace`` arguments, logged history buffers) are allowed.
    A user who set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` keeps that choice.
    """
    from ..engine.checkpoint_compat import allow_mmengine_checkpoints
    allow_mmengine_checkpoints()
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    if not os.environ.get(_FORCE_FULL_UNPICKLING):
        os.environ[_FORCE_WEIGHTS_ONLY] = '1'
    # The classification trainer stores its argparse.Namespace under 'args'
    # (torch.serialization.safe_globals exists from torch 2.5 on).
    scoped_globals = getattr(torch.serialization, 'safe_globals', None)
    try:
        with (scoped_globals([argparse.Namespace]) if scoped_globals else nullcontext()):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def read_checkpoint(path: str, map_location: MapLocation = 'cpu') -> Dict[str, Tensor]:
    """The weights stored at ``path``, unwrapped from their container.

    Args:
        path (str): anything mmengine's ``CheckpointLoader`` reads: a local file,
            ``https://...`` (downloaded once into torch's hub cache,
            ``$TORCH_HOME/hub/checkpoints``), ``open-mmlab://``, ``s3://``...
        map_location (str | torch.device | dict | callable): as ``torch.load``'s.
            Default: ``'cpu'``.

    Returns:
        dict[str, Tensor]: a raw state dict, or the one under ``state_dict`` or
        ``model``.

    Raises:
        FileNotFoundError: a local path with no file.
        ValueError: the file holds no mapping of tensors.
    """
    try:
        with weights_only_loads():
            checkpoint = CheckpointLoader.load_checkpoint(path, map_location=map_location,
                                                          logger='current')
    except FileNotFoundError as exc:
        raise FileNotFoundError(f'TransNeXt checkpoint not found: {path!r}. Download the '
                                'released weights and point init_cfg.checkpoint at the '
                                'file (or at its https:// address).') from exc
    if isinstance(checkpoint, Mapping):
        for container in _CONTAINER_KEYS:
            if isinstance(checkpoint.get(container), Mapping):
                checkpoint = checkpoint[container]
                break
    if not isinstance(checkpoint, Mapping) or not any(
            isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f'{path!r} holds no state dict of tensors')
    return dict(checkpoint)


def _split_backbone(state_dict: Mapping[str, Tensor], prefix: Optional[str]
                    ) -> Tuple[Dict[str, Tensor], List[str]]:
    """The backbone's weights under its own names, and the names left out."""
    if prefix is None:
        prefix = 'backbone.' if any(n.startswith('backbone.') for n in state_dict) else ''
    elif prefix and not prefix.endswith('.'):
        prefix += '.'
    kept, dropped = {}, []
    for name, value in state_dict.items():
        own = name[len(prefix):]
        if name.startswith(prefix) and not own.startswith(_HEAD_PREFIX):
            kept[own] = value
        else:
            dropped.append(name)
    return kept, dropped


def filter_backbone_state_dict(state_dict: Mapping[str, Tensor],
                               prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """Keep what belongs to the backbone, under the backbone's own names.

    Pure and idempotent: a detector's or segmentor's weights give their
    ``backbone.*`` entries with the prefix stripped; a classifier's give
    everything but its ``head.*``; a backbone's own state dict is returned as is.

    Args:
        state_dict (Mapping[str, Tensor]): weights of a backbone, classifier,
            detector or segmentor.
        prefix (str, optional): take the entries under this prefix (as
            mmengine's ``PretrainedInit``), e.g. ``'backbone.'``. Default: None
            (``'backbone.'`` when some entry has it, else none).

    Returns:
        dict[str, Tensor]: a new dict; the input is not modified.
    """
    return _split_backbone(state_dict, prefix)[0]


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


def describe_variant(weights: Mapping[str, Tensor]) -> str:
    """Which TransNeXt variant a backbone state dict's shapes belong to.

    Read from the patch embeddings' widths, the blocks per stage and the heads of
    each stage's first block; named when they equal a released variant's.

    Returns:
        str: e.g. ``'TransNeXt-micro'``, or ``'a custom TransNeXt (embed dims
        [16, 32], depths [1, 1], heads [1, 2])'``, or ``'no TransNeXt backbone'``.
    """
    from .transnext import ARCH_SETTINGS  # the model module imports this one
    dims, depths, heads = [], [], []
    stage = 1
    while f'patch_embed{stage}.proj.weight' in weights:
        dims.append(weights[f'patch_embed{stage}.proj.weight'].shape[0])
        block = re.compile(rf'^block{stage}\.(\d+)\.')
        depths.append(len({m.group(1) for m in map(block.match, weights) if m}))
        temperature = weights.get(f'block{stage}.0.attn.temperature')
        heads.append(temperature.shape[0] if temperature is not None else None)
        stage += 1
    if not dims:
        return 'no TransNeXt backbone (no patch_embed1.proj.weight)'
    for name, arch in ARCH_SETTINGS.items():
        if (arch['embed_dims'], arch['depths'], arch['num_heads']) == (dims, depths, heads):
            return f'TransNeXt-{name}'
    return f'a custom TransNeXt (embed dims {dims}, depths {depths}, heads {heads})'


def _first(names: List[str]) -> str:
    shown = ', '.join(names[:_NAMES_SHOWN])
    return shown + (f' and {len(names) - _NAMES_SHOWN} more' if len(names) > _NAMES_SHOWN
                    else '')


def load_pretrained(model: nn.Module, path: str, prefix: Optional[str] = None,
                    map_location: MapLocation = 'cpu', allow_partial: bool = False
                    ) -> Tuple[List[str], List[str], List[str]]:
    """Load released weights into the backbone ``model``; refuse what does not fit.

    The checkpoint's backbone weights must match the model name for name and
    shape. Entries that are not backbone weights (a classifier's ``head.*``, a
    detector's or segmentor's neck and heads) are dropped with one summary line.

    Args:
        model (nn.Module): the backbone.
        path (str): a local file or an address mmengine's ``CheckpointLoader``
            reads (``https://`` is downloaded once into torch's hub cache).
        prefix (str, optional): take the entries under this prefix, as
            mmengine's ``PretrainedInit`` does (``'backbone.'`` for a whole
            detector). Default: None (``backbone.`` when present).
        map_location (str | torch.device | dict | callable): as ``torch.load``'s.
            Default: ``'cpu'``.
        allow_partial (bool): load the weights that fit and only warn about
            missing, mismatched and extra ones. Default: False.

    Returns:
        tuple[list[str], list[str], list[str]]: as :func:`compare_state_dicts`
        (all empty unless ``allow_partial``).

    Raises:
        ValueError: backbone weights missing, mismatched or extra (without
            ``allow_partial``), or no weight fits at all; the message names the
            variant the checkpoint looks like and the first offending names.
    """
    stored = read_checkpoint(path, map_location)
    weights, dropped = _split_backbone(stored, prefix)
    if prefix is not None and not weights:
        raise ValueError(f'no entry of {path!r} starts with prefix {prefix!r}')
    missing, unexpected, mismatched = compare_state_dicts(model, weights)
    bad_shapes = {line.split(':', 1)[0] for line in mismatched}
    usable = {name: value for name, value in weights.items()
              if name not in bad_shapes and name not in unexpected}
    problems = [(len(names), title, names) for title, names in (
        ('missing in the checkpoint', missing),
        ('shape mismatches (checkpoint vs model)', mismatched),
        ('unexpected backbone weights', unexpected)) if names]
    summary = '; '.join(f'{count} {title}: {_first(names)}' for count, title, names in problems)
    stored_variant = describe_variant(weights)
    model_variant = describe_variant(model.state_dict())
    looks_like = (f'the checkpoint looks like {stored_variant}, the model is {model_variant}'
                  if stored_variant != model_variant else
                  f'the checkpoint has the model\'s variant, {model_variant}')
    if not usable:
        raise ValueError(f'no weight in {path!r} fits the model ({looks_like}): {summary}')
    if problems and not allow_partial:
        raise ValueError(
            f'{path!r} does not fit the backbone ({looks_like}): {summary}. Choose the '
            "matching arch, or load what fits with init_cfg=dict(type='Pretrained', "
            'checkpoint=..., allow_partial=True).')
    model.load_state_dict(usable, strict=False)
    print_log(f'Loaded {len(usable)} backbone tensors from {path}', logger='current')
    if dropped:
        parts = Counter(name.split('.', 1)[0] for name in dropped)
        print_log(f'Dropped {len(dropped)} entries that are not backbone weights: '
                  + ', '.join(f'{part} ({count})' for part, count in sorted(parts.items())),
                  logger='current')
    if problems:
        print_log(f'Partial load ({looks_like}): {summary}', logger='current', level=30)
    return missing, unexpected, mismatched
