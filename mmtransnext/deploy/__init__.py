"""Deployment of TransNeXt models: ONNX export and its parity checks
(``tools/export_onnx.py``, ``tools/onnx_detection_parity.py``)."""
from .onnx_export import (BACKBONE, DETECTOR, MIN_OPSET, SEGMENTOR, DetectorTensors,
                          SegmentorLogits, compare_with_onnxruntime, example_input, export_onnx,
                          export_wrapper, find_backbone, load_weights)
from .onnx_detection import match_detections, onnx_two_stage_predict, summarise

__all__ = ['BACKBONE', 'DETECTOR', 'MIN_OPSET', 'SEGMENTOR', 'DetectorTensors',
           'SegmentorLogits', 'compare_with_onnxruntime', 'example_input', 'export_onnx',
           'export_wrapper', 'find_backbone', 'load_weights', 'match_detections',
           'onnx_two_stage_predict', 'summarise']
