"""Dataset helpers. ``demo_data`` writes the embedded demo dataset; it only needs
numpy and OpenCV, so importing it is cheap."""
from .demo_data import (DET_CLASSES, DET_PALETTE, SEG_CLASSES, SEG_PALETTE,
                        ensure_demo_data, generate_demo_data)

__all__ = [
    'DET_CLASSES', 'DET_PALETTE', 'SEG_CLASSES', 'SEG_PALETTE',
    'ensure_demo_data', 'generate_demo_data'
]
