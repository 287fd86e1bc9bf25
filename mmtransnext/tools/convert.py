"""Released TransNeXt checkpoints to checkpoints our configs load with ``strict=True``.

The reference release trained each family with a different OpenMMLab generation:

========================  =================================================  ==========================
source                    what the file holds                                weights under
========================  =================================================  ==========================
``imagenet``              the ImageNet-1K classifier (timm-style trainer)    ``model``, with ``head.*``
``mmdet2-mask-rcnn``      Mask R-CNN, mmdet 2.x / mmcv 1.x runner            ``state_dict``
``mmdet3-dino``           DINO, mmdet 3.0 / mmengine runner                  ``state_dict``
``mmseg0-upernet``        UperNet, mmseg 0.x / mmcv 1.x runner               ``state_dict``
``mmseg1-mask2former``    Mask2Former, mmseg 1.0 (mmdet 3.0 head)            ``state_dict``
========================  =================================================  ==========================

What differs from what mmdet 3.3 / mmseg 1.2 and our backbone expect, family by
family (checked against the installed mmdet 3.3.0 / mmseg 1.2.2 modules and the
2.x / 0.x / 3.0 / 1.0 sources; see the per-source notes in :data:`SOURCES`):

* parameter names: no family has a renamed parameter. The backbone's names are
  the released ones (the package was written to load them unchanged);
  Mask R-CNN's FPN / RPN / RoI-head names (``neck.lateral_convs.0.conv``,
  ``rpn_head.rpn_conv``, ``roi_head.bbox_head.shared_fcs.0``,
  ``roi_head.mask_head.convs.0.conv``, ``...conv_logits``) are the same in
  mmdet 2.x and 3.x, UperNet's (``decode_head.psp_modules``, ``bottleneck``,
  ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``,
  ``auxiliary_head.convs``) the same in mmseg 0.x and 1.x, and DINO's and
  Mask2Former's heads were already mmdet 3.0's. The one generic rename is a
  ``module.`` prefix left by a (Distributed)DataParallel wrapper, stripped when
  every name has it.
* weights to drop: the classifier's ``head.*``; position tables, masks and
  scales of the reference backbone (``relative_pos_index{i}``,
  ``relative_coords_table{i}``, ``seq_length_scale``, ``padding_mask``), which
  the released code registers as non-persistent buffers but which a checkpoint
  written by an earlier version of it may hold; ours computes them on the fly.
* around the weights: ``optimizer`` (and ``message_hub``,
  ``param_schedulers``, ``lr_scheduler``, ``scaler``...) dropped; the mmcv 1.x
  ``meta['CLASSES']`` / ``meta['PALETTE']`` become mmengine's
  ``meta['dataset_meta'] = {'classes', 'palette'}`` (what ``init_detector`` and
  ``init_model`` read); the rest of the old ``meta`` (config text, epoch,
  hook messages, versions) is dropped, the versions kept under
  ``meta['converted_from']``.
* normalisation: mmdet 2.x / mmseg 0.x normalised images in the pipeline
  (``img_norm_cfg``), mmdet 3 / mmseg 1 in the model's ``data_preprocessor``;
  that is configuration, not weights, and our configs carry it.
"""
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..models.checkpoint import compare_state_dicts
from ..version import __version__

IMAGENET = 'imagenet'
MASK_RCNN = 'mmdet2-mask-rcnn'
DINO = 'mmdet3-dino'
UPERNET = 'mmseg0-upernet'
MASK2FORMER = 'mmseg1-mask2former'

SOURCES = OrderedDict([
    (IMAGENET, 'ImageNet-1K classifier of the reference release: checkpoint["model"] with '
               'head.*; written as a backbone state dict (load it with init_cfg=dict('
               "type='Pretrained', checkpoint=...))"),
    (MASK_RCNN, 'Mask R-CNN trained with mmdet 2.x: names of FPN, RPN and RoI heads '
                'unchanged in mmdet 3.x'),
    (DINO, 'DINO trained with mmdet 3.0: names unchanged up to mmdet 3.3'),
    (UPERNET, 'UperNet trained with mmseg 0.x: names of UPerHead / FCNHead unchanged in '
              'mmseg 1.x'),
    (MASK2FORMER, "Mask2Former trained with mmseg 1.0 (mmdet 3.0's Mask2FormerHead): "
                  'names unchanged up to mmseg 1.2 / mmdet 3.3'),
])

# Renames per source: (pattern, replacement, why). None of the five families
# renamed a parameter between its training stack and ours (see the module
# docstring); the tables stay so that a future one is one line.
RENAMES: Dict[str, List[Tuple[str, str, str]]] = {
    IMAGENET: [],
    MASK_RCNN: [],
    DINO: [],
    UPERNET: [],
    MASK2FORMER: [],
}

# Buffers of the reference backbone that ours computes on the fly.
_REFERENCE_BUFFERS = re.compile(
    r'(^|\.)(relative_pos_index\d*|relative_coords_table\d*|seq_length_scale|padding_mask)$')
# Where the weights are, per source.
_WEIGHTS_KEY = {IMAGENET: 'model', MASK_RCNN: 'state_dict', DINO: 'state_dict',
                UPERNET: 'state_dict', MASK2FORMER: 'state_dict'}
# Old meta entries worth keeping (as provenance).
_VERSION_KEYS = ('mmcv_version', 'mmdet_version', 'mmseg_version', 'mmengine_version',
                 'mmengine', 'torch_version')


@dataclass
class ConversionReport:
    """What a conversion did. ``missing`` / ``unexpected`` / ``mismatched`` are
    filled by :func:`check_against_model` (they need the target model)."""
    source: str
    renamed: List[Tuple[str, str, str]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    dropped_entries: List[str] = field(default_factory=list)
    meta_changes: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    kept: int = 0
    checked: bool = False
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)

    @property
    def loads_strictly(self) -> bool:
        return self.checked and not (self.missing or self.unexpected or self.mismatched)

    def format(self, max_names: int = 20) -> str:
        """The report as text (long name lists shortened to ``max_names``)."""

        def names(items):
            items = list(items)
            shown = items[:max_names]
            extra = len(items) - len(shown)
            return shown + ([f'... and {extra} more'] if extra > 0 else [])

        lines = [f'source: {self.source} ({SOURCES[self.source]})',
                 f'weights kept: {self.kept}']
        lines.append(f'renamed: {len(self.renamed)}')
        if not self.renamed:
            lines.append(f'  (no parameter of {self.source} was renamed between its training '
                         'stack and this one)')
        for line in names(f'  {old} -> {new}  [{why}]' for old, new, why in self.renamed):
            lines.append(line)
        lines.append(f'dropped weights: {len(self.dropped)}')
        lines += names(f'  {name}  [{why}]' for name, why in self.dropped)
        lines.append(f'dropped entries: {", ".join(self.dropped_entries) or "none"}')
        for change in self.meta_changes:
            lines.append(f'meta: {change}')
        for note in self.notes:
            lines.append(f'note: {note}')
        if self.checked:
            lines.append(f'missing keys: {len(self.missing)}')
            lines += names(f'  {name}' for name in self.missing)
            lines.append(f'unexpected keys: {len(self.unexpected)}')
            lines += names(f'  {name}' for name in self.unexpected)
            lines.append(f'shape mismatches: {len(self.mismatched)}')
            lines += names(f'  {line}' for line in self.mismatched)
            lines.append('strict load: ' + ('OK' if self.loads_strictly else 'FAILED'))
        else:
            lines.append('missing keys: not checked (give a config or an arch to check '
                         'against the model)')
        return '\n'.join(lines)


def detect_source(checkpoint: Mapping) -> str:
    """Which released layout ``checkpoint`` (a loaded file) is in.

    Raises:
        ValueError: none of the five.
    """
    if isinstance(checkpoint.get('model'), Mapping) and 'state_dict' not in checkpoint:
        return IMAGENET
    weights = checkpoint.get('state_dict', checkpoint)
    names = [_strip_wrapper_name(n) for n in weights]
    if any(n.startswith('roi_head.') for n in names):
        return MASK_RCNN
    if any(n.startswith('dn_query_generator.') or n.startswith('bbox_head.cls_branches.')
           for n in names):
        return DINO
    if any(n.startswith('decode_head.pixel_decoder.')
           or n.startswith('decode_head.transformer_decoder.') for n in names):
        return MASK2FORMER
    if any(n.startswith('decode_head.') for n in names):
        return UPERNET
    if names and not any(n.startswith('backbone.') for n in names) and any(
            n.startswith('block1.') for n in names):
        return IMAGENET
    raise ValueError('cannot tell which released layout this checkpoint is in (no '
                     "'model' container, no roi_head / DINO / decode_head weights); pass "
                     f'the source explicitly, one of {list(SOURCES)}')


def _strip_wrapper_name(name: str) -> str:
    return name[len('module.'):] if name.startswith('module.') else name


def strip_wrapper_prefix(state_dict: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], list]:
    """Drop a DataParallel ``module.`` prefix when every name has it.

    Returns:
        tuple: the new dict and ``(old, new, why)`` for every renamed entry.
    """
    if state_dict and all(name.startswith('module.') for name in state_dict):
        renamed = [(name, _strip_wrapper_name(name), 'DataParallel wrapper prefix')
                   for name in state_dict]
        return {_strip_wrapper_name(n): v for n, v in state_dict.items()}, renamed
    return dict(state_dict), []


def apply_renames(state_dict: Mapping[str, Tensor], rules: List[Tuple[str, str, str]]
                  ) -> Tuple[Dict[str, Tensor], list]:
    """Rename entries by ``(pattern, replacement, why)`` rules, first match wins."""
    out, renamed = OrderedDict(), []
    compiled = [(re.compile(p), r, why) for p, r, why in rules]
    for name, value in state_dict.items():
        new = name
        for pattern, repl, why in compiled:
            if pattern.search(name):
                new = pattern.sub(repl, name)
                renamed.append((name, new, why))
                break
        if new in out:
            raise ValueError(f'renaming {name!r} to {new!r} collides with another entry')
        out[new] = value
    return out, renamed


def drop_reference_buffers(state_dict: Mapping[str, Tensor], backbone_prefix: str = ''
                           ) -> Tuple[Dict[str, Tensor], list]:
    """Remove the reference backbone's stored position tables, masks and scales."""
    kept, dropped = OrderedDict(), []
    for name, value in state_dict.items():
        if name.startswith(backbone_prefix) and _REFERENCE_BUFFERS.search(name):
            dropped.append((name, 'reference position table / mask, computed on the fly'))
        else:
            kept[name] = value
    return kept, dropped


def convert_imagenet(state_dict: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], list, list]:
    """Classifier weights to the backbone's: ``head.*`` and stored tables dropped.

    Returns:
        tuple: ``(backbone state dict, renamed, dropped)``.
    """
    weights, renamed = strip_wrapper_prefix(state_dict)
    weights, more = apply_renames(weights, RENAMES[IMAGENET])
    renamed += more
    dropped = [(name, 'ImageNet classification head') for name in weights
               if name.startswith('head.')]
    weights = OrderedDict((n, v) for n, v in weights.items() if not n.startswith('head.'))
    weights, more = drop_reference_buffers(weights)
    return weights, renamed, dropped + more


def convert_dense(state_dict: Mapping[str, Tensor], source: str
                  ) -> Tuple[Dict[str, Tensor], list, list]:
    """A whole detector's / segmentor's weights to ours.

    Returns:
        tuple: ``(state dict, renamed, dropped)``.
    """
    if source not in RENAMES or source == IMAGENET:
        raise ValueError(f'not a dense source: {source!r}')
    weights, renamed = strip_wrapper_prefix(state_dict)
    weights, more = apply_renames(weights, RENAMES[source])
    weights, dropped = drop_reference_buffers(weights, 'backbone.')
    return weights, renamed + more, dropped


def _plain(value):
    """Meta values as plain Python (tuples, lists, str, numbers) for weights-only loading."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, 'tolist'):
        return value.tolist()
    return value


def convert_meta(meta: Optional[Mapping], source: str, report: ConversionReport) -> dict:
    """mmcv 1.x / mmengine meta to what mmdet 3 / mmseg 1 read, plus provenance."""
    meta = dict(meta or {})
    new = {}
    dataset_meta = dict(meta.get('dataset_meta') or {})
    if 'CLASSES' in meta and 'classes' not in dataset_meta:
        dataset_meta['classes'] = tuple(_plain(meta['CLASSES']))
        report.meta_changes.append("CLASSES -> dataset_meta['classes']")
    if meta.get('PALETTE') is not None and 'palette' not in dataset_meta:
        dataset_meta['palette'] = [list(c) for c in _plain(meta['PALETTE'])]
        report.meta_changes.append("PALETTE -> dataset_meta['palette']")
    if dataset_meta:
        new['dataset_meta'] = {k: _plain(v) if k != 'classes' else tuple(_plain(v))
                               for k, v in dataset_meta.items()}
    provenance = {'source': source}
    provenance.update({k: str(meta[k]) for k in _VERSION_KEYS if k in meta})
    new['converted_from'] = provenance
    new['mmtransnext_version'] = __version__
    dropped = sorted(k for k in meta if k not in ('dataset_meta', 'CLASSES', 'PALETTE')
                     and k not in _VERSION_KEYS)
    if dropped:
        report.meta_changes.append('dropped ' + ', '.join(dropped))
    return new


def convert_checkpoint(checkpoint: Mapping, source: Optional[str] = None
                       ) -> Tuple[dict, ConversionReport]:
    """A loaded released checkpoint to one our configs load.

    Args:
        checkpoint (Mapping): what ``torch.load`` gave for the released file.
        source (str, optional): one of :data:`SOURCES`; detected when None.

    Returns:
        tuple[dict, ConversionReport]: ``{'meta': ..., 'state_dict': ...}`` and
        the report (call :func:`check_against_model` to add missing keys).
    """
    source = source or detect_source(checkpoint)
    if source not in SOURCES:
        raise ValueError(f'unknown source {source!r}; choose one of {list(SOURCES)}')
    report = ConversionReport(source)
    container = _WEIGHTS_KEY[source]
    if isinstance(checkpoint.get(container), Mapping):
        weights = checkpoint[container]
        others = [k for k in checkpoint if k not in (container, 'meta')]
    elif any(isinstance(v, Tensor) for v in checkpoint.values()):
        weights = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
        others = [k for k, v in checkpoint.items() if not isinstance(v, Tensor) and k != 'meta']
        report.notes.append(f"no '{container}' entry: the file is a bare state dict")
    else:
        raise ValueError(f"{source} checkpoint without a '{container}' entry of weights "
                         f'(top-level entries: {sorted(checkpoint)})')
    report.dropped_entries = sorted(others)
    if source == IMAGENET:
        state_dict, renamed, dropped = convert_imagenet(weights)
    else:
        state_dict, renamed, dropped = convert_dense(weights, source)
    if not RENAMES[source]:
        report.notes.append(f'{SOURCES[source]}')
    report.renamed, report.dropped, report.kept = renamed, dropped, len(state_dict)
    meta = convert_meta(checkpoint.get('meta') if isinstance(checkpoint.get('meta'), Mapping)
                        else None, source, report)
    return {'meta': meta, 'state_dict': state_dict}, report


def check_against_model(state_dict: Mapping[str, Tensor], model: nn.Module,
                        report: ConversionReport) -> bool:
    """Fill the report's missing / unexpected / mismatched names; load strictly if none.

    Returns:
        bool: True if ``model.load_state_dict(state_dict, strict=True)`` succeeded.
    """
    missing, unexpected, mismatched = compare_state_dicts(model, state_dict)
    report.checked = True
    report.missing, report.unexpected, report.mismatched = missing, unexpected, mismatched
    if missing or unexpected or mismatched:
        return False
    model.load_state_dict(state_dict, strict=True)
    return True


def load_released(path: str) -> dict:
    """``torch.load`` a released file, weights only (mmengine's own types allowed).

    Raises:
        FileNotFoundError: nothing at ``path``.
        RuntimeError: the file is not a checkpoint that loads as weights only.
    """
    from ..models.checkpoint import weights_only_loads
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path!r}: no such file')
    try:
        with weights_only_loads():
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # pickle errors come as several types
        raise RuntimeError(
            f'could not read {path!r} as weights only ({exc}). If you trust the file, '
            'load and re-save its weights yourself: this tool never unpickles code.') from exc
