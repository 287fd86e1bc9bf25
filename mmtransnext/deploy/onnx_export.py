"""ONNX export of TransNeXt models: the backbone, a segmentor up to its logits, a detector's
tensor outputs before post-processing.

The model is exported by ``torch.onnx.export`` (the ``torch.export``-based exporter,
opset 18 or newer) as it is: during an export the compiled window op takes its form in
standard operators (:mod:`mmtransnext.ops.graph_capture`), so nothing has to be switched.
The file is written to a temporary name beside the target and renamed once complete.
"""
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..models import TransNeXt

#: Oldest opset the exporter writes (LayerNormalization and the exporter's own floor).
MIN_OPSET = 18

BACKBONE, SEGMENTOR, DETECTOR = 'backbone', 'segmentor', 'detector'


class SegmentorLogits(nn.Module):
    """An mmseg ``EncoderDecoder`` up to its logits at the input's size.

    Args:
        segmentor (nn.Module): an mmseg ``EncoderDecoder`` (e.g. UperNet).

    Shape:
        - Input: ``(B, 3, H, W)``, normalised as the config's data preprocessor does.
        - Output: ``(B, num_classes, H, W)`` logits; ``argmax(1)`` is the label map.
    """

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x: Tensor) -> Tensor:
        logits = self.segmentor.decode_head(self.segmentor.extract_feat(x))
        return nn.functional.interpolate(logits, size=x.shape[-2:], mode='bilinear',
                                         align_corners=self.segmentor.decode_head.align_corners)


class DetectorTensors(nn.Module):
    """An mmdet detector's tensors before post-processing.

    The feature maps of backbone + neck, and for a two-stage detector (Mask R-CNN) its
    RPN head's per-level objectness scores and box deltas. Post-processing stays in
    mmdet: anchors, box decoding and NMS of the proposals
    (``rpn_head.predict_by_feat``), then the RoI head on the feature maps
    (``roi_head.predict``), for DINO the transformer and its head
    (``forward_transformer`` and ``bbox_head.predict``).

    Args:
        detector (nn.Module): an mmdet detector with ``extract_feat``.

    Shape:
        - Input: ``(B, 3, H, W)``, normalised and padded as the config's data
          preprocessor does.
        - Output: the neck's maps, then (two-stage) the RPN scores of each level,
          then the RPN box deltas of each level.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        feats = tuple(self.detector.extract_feat(x))
        rpn_head = getattr(self.detector, 'rpn_head', None)
        if rpn_head is None:
            return feats
        scores, deltas = rpn_head(feats)
        return feats + tuple(scores) + tuple(deltas)


def find_backbone(model: nn.Module) -> TransNeXt:
    """The model's TransNeXt backbone.

    Raises:
        ValueError: the model has none (only TransNeXt models export here).
    """
    backbone = model if isinstance(model, TransNeXt) else getattr(model, 'backbone', None)
    if not isinstance(backbone, TransNeXt):
        found = type(backbone).__name__ if backbone is not None else 'no backbone'
        raise ValueError(f'{type(model).__name__} is not a TransNeXt model ({found}); '
                         'this exporter handles TransNeXt backbones and the mmdet / mmseg '
                         'models built on them')
    return backbone


def export_wrapper(model: nn.Module, target: str) -> nn.Module:
    """The module whose forward becomes the ONNX graph.

    Args:
        model (nn.Module): a ``TransNeXt``, an mmseg ``EncoderDecoder`` or an mmdet
            detector built on one.
        target (str): ``'backbone'``, ``'segmentor'`` or ``'detector'``.

    Raises:
        ValueError: an unknown target, or a model that does not fit it (a Mask2Former
            head, whose forward needs per-image metadata, is not exported).
    """
    find_backbone(model)
    if target == BACKBONE:
        return model if isinstance(model, TransNeXt) else model.backbone
    if target == SEGMENTOR:
        head = getattr(model, 'decode_head', None)
        if head is None or not hasattr(model, 'extract_feat'):
            raise ValueError(f'{type(model).__name__} is not an mmseg segmentor with a '
                             'decode_head')
        if type(head).__name__ == 'Mask2FormerHead':
            raise ValueError('Mask2Former is not supported: its head needs per-image '
                             'metadata in forward; export --target backbone instead')
        return SegmentorLogits(model)
    if target == DETECTOR:
        if not hasattr(model, 'extract_feat') or hasattr(model, 'decode_head'):
            raise ValueError(f'{type(model).__name__} is not an mmdet detector')
        return DetectorTensors(model)
    raise ValueError(f'unknown target {target!r}; choose {BACKBONE}, {SEGMENTOR} or {DETECTOR}')


def load_weights(model: nn.Module, checkpoint: str, target: str) -> None:
    """Load a checkpoint into ``model`` and refuse one that does not fit it.

    A whole-model checkpoint (mmengine's ``state_dict`` or a raw state dict) fills a
    detector or segmentor; for ``target='backbone'`` its ``backbone.*`` entries (or a
    backbone-only state dict) fill the backbone.

    Raises:
        FileNotFoundError: no such file.
        ValueError: names or shapes that do not match the config's model.
    """
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if isinstance(model, TransNeXt) and any(k.startswith('backbone.') for k in state):
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        def some(names):
            return ', '.join(names[:5]) + (f' (+{len(names) - 5} more)' if len(names) > 5 else '')
        details = [f'{label}: {some(names)}' for label, names in
                   (('missing', missing), ('unexpected', unexpected),
                    ('shape mismatch', mismatched)) if names]
        raise ValueError(f'checkpoint {checkpoint!r} does not match the config\'s '
                         f'{type(model).__name__} (target {target}): ' + '; '.join(details))
    model.load_state_dict(state, strict=True)


def export_onnx(module: nn.Module, example: Tensor, out_file: str, opset: int = MIN_OPSET,
                dynamic: bool = False) -> List[str]:
    """Export ``module`` (in eval mode) to ``out_file``; never leaves a partial file.

    Args:
        module (nn.Module): from :func:`export_wrapper`.
        example (Tensor): ``(B, 3, H, W)`` example input.
        out_file (str): the ``.onnx`` file to write (replaced if present).
        opset (int): ONNX opset, at least :data:`MIN_OPSET`. Default: 18.
        dynamic (bool): height and width symbolic, so one file serves every input
            size; else they are fixed and the position bias folds to constants.
            Default: False.

    Returns:
        list[str]: the names of the graph's outputs.

    Raises:
        ValueError: an opset older than :data:`MIN_OPSET`, or ``dynamic`` for a
            segmentor or detector.
    """
    if dynamic and not isinstance(module, TransNeXt):
        # mmseg's and mmdet's heads take some sizes as Python ints while traced: a
        # dynamic file of a UperNet gave logits 2.3 off at a second size. Refused rather
        # than silently wrong.
        raise ValueError(
            'dynamic height and width are exported for the TransNeXt backbone only; the '
            f'heads of {type(module).__name__} fix sizes in the traced graph. Export one '
            'file per input size (a fixed --size) instead.')
    if opset < MIN_OPSET:
        raise ValueError(f'opset {opset} is too old: the exporter writes opset {MIN_OPSET} '
                         'or newer (LayerNormalization is an opset-17 operator, and '
                         f'torch.onnx.export with dynamo=True starts at {MIN_OPSET})')
    module = module.eval()
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        dynamic_shapes = ({2: dim, 3: dim}, )
    directory = os.path.dirname(os.path.abspath(out_file))
    os.makedirs(directory, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=directory, prefix='.export-', suffix='.onnx')
    os.close(handle)
    try:
        with torch.no_grad():
            program = torch.onnx.export(module, (example, ), dynamo=True, opset_version=opset,
                                        input_names=['input'], dynamic_shapes=dynamic_shapes,
                                        verbose=False)
        program.save(partial)
        outputs = [value.name for value in program.model.graph.outputs]
        os.replace(partial, out_file)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return outputs


def compare_with_onnxruntime(module: nn.Module, onnx_file: str,
                             inputs: Sequence[Tensor]) -> List[Dict[str, float]]:
    """ONNX Runtime (CPU) against PyTorch on each input.

    Returns:
        list[dict]: per input, ``max_abs`` (largest difference over all outputs) and
        ``scale`` (largest PyTorch magnitude), for a tolerance check by the caller.
    """
    import onnxruntime
    session = onnxruntime.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    results = []
    for x in inputs:
        with torch.no_grad():
            expected = module.eval()(x)
        expected = (expected, ) if isinstance(expected, Tensor) else tuple(expected)
        got = session.run(None, {name: x.numpy()})
        if len(got) != len(expected):
            raise RuntimeError(f'{onnx_file} has {len(got)} outputs, PyTorch {len(expected)}')
        max_abs = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))
        scale = max(float(e.abs().max()) for e in expected)
        results.append(dict(size=tuple(x.shape[-2:]), max_abs=max_abs, scale=scale))
    return results


def example_input(height: int, width: int, batch: int = 1,
                  seed: Optional[int] = 0) -> Tensor:
    """A normalised-image-like input ``(batch, 3, height, width)``, reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)
