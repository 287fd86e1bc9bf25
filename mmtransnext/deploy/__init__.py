"""Deployment of TransNeXt models: ONNX export and its parity check (``tools/export_onnx.py``)."""
from .onnx_export import (BACKBONE, DETECTOR, MIN_OPSET, SEGMENTOR, DetectorTensors,
                          SegmentorLogits, compare_with_onnxruntime, example_input, export_onnx,
                          export_wrapper, find_backbone, load_weights)

__all__ = ['BACKBONE', 'DETECTOR', 'MIN_OPSET', 'SEGMENTOR', 'DetectorTensors',
           'SegmentorLogits', 'compare_with_onnxruntime', 'example_input', 'export_onnx',
           'export_wrapper', 'find_backbone', 'load_weights']
