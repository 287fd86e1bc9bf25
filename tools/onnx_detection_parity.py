#!/usr/bin/env python
"""A two-stage detector's detections through its ONNX file against PyTorch's.

    python tools/onnx_detection_parity.py CONFIG CHECKPOINT [--score-thr 0.3] [--num N]
        [--min-iou 0.99] [--keep-onnx FILE]

Exports the detector's tensors (backbone, neck and RPN head, tools/export_onnx.py's
detector target) at the padded size of the test set's first image, then runs every
test image (or the first --num) twice: ``model.test_step`` in PyTorch, and ONNX Runtime
for the exported part followed by mmdet's post-processing (RPN proposals, RoI head).
Each PyTorch detection scoring at least --score-thr must find an ONNX detection of the
same label with box IoU >= --min-iou; exit status 1 otherwise. Every test image must
pad to the exported size (e.g. a fixed-size test pipeline).
"""
import argparse
import os
import sys
import tempfile


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--score-thr', type=float, default=0.3)
    parser.add_argument('--min-iou', type=float, default=0.99)
    parser.add_argument('--num', type=int, help='first N test images (default: all)')
    parser.add_argument('--keep-onnx', help='write the exported file here')
    args = parser.parse_args(argv)

    import onnxruntime
    import torch
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    from mmtransnext.deploy import (export_onnx, export_wrapper, load_weights,
                                    match_detections, onnx_two_stage_predict, summarise)
    from mmtransnext.tools.common import DET, build_model, load_config, task_of
    cfg = load_config(args.config)
    if task_of(cfg) != DET:
        raise SystemExit(f'onnx_detection_parity: {args.config} is not an mmdet config')
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = build_model(cfg)
    try:
        load_weights(model, args.checkpoint, 'detector')
        module = export_wrapper(model, 'detector')
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f'onnx_detection_parity: {exc}') from None
    model.eval()
    from mmdet.registry import DATASETS
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    indices = range(len(dataset) if args.num is None else min(args.num, len(dataset)))
    first = model.data_preprocessor(pseudo_collate([dataset[0]]), False)['inputs']
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep_onnx or os.path.join(tmp, 'detector.onnx')
        export_onnx(module.eval(), first, path)
        session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
        matches = []
        for idx in indices:
            batch = pseudo_collate([dataset[idx]])
            with torch.no_grad():
                reference = model.test_step(batch)[0]
            candidate = onnx_two_stage_predict(model, session, batch)[0]
            matches.append(match_detections(reference, candidate, args.score_thr))
    result = summarise(matches)
    ok = result['labels_equal'] and result['min_iou'] >= args.min_iou
    print(f"{result['images']} images, {result['detections']} detections scoring >= "
          f"{args.score_thr}: labels {'equal' if result['labels_equal'] else 'DIFFER'}, "
          f"smallest box IoU {result['min_iou']:.6f}, largest score difference "
          f"{result['max_score_diff']:.2e} ({'ok' if ok else 'FAILED'}, IoU limit {args.min_iou})")
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
