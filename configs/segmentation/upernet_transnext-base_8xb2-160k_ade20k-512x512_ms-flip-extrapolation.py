# UperNet with TransNeXt-Base, multi-scale + flip test with the position bias
# in extrapolation mode: it is computed from each input's own grid instead of
# being resized from the one built for img_size (which then plays no part).
# Test-only config; same checkpoint as the single-scale one.
# Published: mIoU 53.5-53.7 (ms+flip, interpolation / extrapolation).
_base_ = './upernet_transnext-base_8xb2-160k_ade20k-512x512_ms-flip.py'

model = dict(module=dict(backbone=dict(is_extrapolation=True)))
