"""A two-stage mmdet detector whose tensors come from its ONNX file.

:class:`~mmtransnext.deploy.onnx_export.DetectorTensors` exports backbone, neck and
RPN head; post-processing stays in mmdet. :func:`onnx_two_stage_predict` is that
split run end to end: ONNX Runtime for the exported part, then mmdet's
``rpn_head.predict_by_feat`` and ``roi_head.predict``, as ``TwoStageDetector.predict``
runs them. :func:`match_detections` compares its detections with PyTorch's.
"""
from typing import Dict, List

import torch


def onnx_two_stage_predict(detector, session, data_batch: dict) -> list:
    """``detector.test_step(data_batch)`` with backbone + neck + RPN head in ONNX Runtime.

    Args:
        detector: an mmdet two-stage detector (Mask R-CNN), in eval mode.
        session (onnxruntime.InferenceSession): its :class:`DetectorTensors` export, at
            the padded input size of ``data_batch``'s images.
        data_batch (dict): what the test dataloader yields (``inputs``, ``data_samples``).

    Returns:
        list[DetDataSample]: with ``pred_instances`` (and masks for Mask R-CNN),
        rescaled to the original images as ``test_step`` does.
    """
    if getattr(detector, 'rpn_head', None) is None or getattr(detector, 'roi_head', None) is None:
        raise ValueError(f'{type(detector).__name__} is not a two-stage detector: only the '
                         'RPN + RoI-head split of DetectorTensors is run here')
    data = detector.data_preprocessor(data_batch, False)
    inputs, samples = data['inputs'], data['data_samples']
    name = session.get_inputs()[0].name
    expected = tuple(session.get_inputs()[0].shape[-2:])
    if tuple(inputs.shape[-2:]) != expected:
        raise ValueError(f'the batch is {tuple(inputs.shape[-2:])} after preprocessing, '
                         f'the ONNX file was exported for {expected}')
    outputs = [torch.from_numpy(o) for o in session.run(None, {name: inputs.numpy()})]
    if len(outputs) % 3:
        raise ValueError(f'{len(outputs)} outputs: expected the neck maps, then the RPN '
                         'scores and deltas of each level')
    levels = len(outputs) // 3
    feats, scores, deltas = (outputs[:levels], outputs[levels:2 * levels],
                             outputs[2 * levels:])
    with torch.no_grad():
        proposals = detector.rpn_head.predict_by_feat(
            scores, deltas, batch_img_metas=[s.metainfo for s in samples], rescale=False)
        results = detector.roi_head.predict(tuple(feats), proposals, samples, rescale=True)
    return detector.add_pred_to_datasample(samples, results)


def match_detections(reference, candidate, score_thr: float = 0.3) -> Dict[str, float]:
    """Compare the top detections of one image (``pred_instances`` of two samples).

    Each detection of ``reference`` scoring at least ``score_thr`` is paired with the
    ``candidate`` detection of the same label that overlaps it most (near-equal scores
    may swap places, so the pairing does not follow score order).

    Returns:
        dict: ``count`` (detections compared), ``labels_equal`` (every one found a
        candidate of its label), ``min_iou`` over the pairs (1.0 when nothing was
        compared) and ``max_score_diff`` between paired scores.
    """
    from mmdet.structures.bbox import bbox_overlaps
    ref, cand = (sample.pred_instances.detach() for sample in (reference, candidate))
    top = (ref.scores >= score_thr).nonzero().flatten().tolist()
    found, ious, score_diffs = True, [], []
    for i in top:
        same = (cand.labels == ref.labels[i]).nonzero().flatten()
        if len(same) == 0:
            found = False
            ious.append(0.0)
            continue
        overlap = bbox_overlaps(ref.bboxes[i].expand(len(same), 4), cand.bboxes[same],
                                is_aligned=True)
        best = int(overlap.argmax())
        ious.append(float(overlap[best]))
        score_diffs.append(float((ref.scores[i] - cand.scores[same[best]]).abs()))
    return dict(count=len(top), labels_equal=found, min_iou=min(ious, default=1.0),
                max_score_diff=max(score_diffs, default=0.0))


def summarise(matches: List[Dict[str, float]]) -> Dict[str, float]:
    """The worst of :func:`match_detections` over images."""
    return dict(images=len(matches), detections=sum(m['count'] for m in matches),
                labels_equal=all(m['labels_equal'] for m in matches),
                min_iou=min((m['min_iou'] for m in matches), default=1.0),
                max_score_diff=max((m['max_score_diff'] for m in matches), default=0.0))
