"""Library side of the command-line tools in ``tools/``.

* :mod:`.common`: reading a config, telling a detector from a segmentor, building it.
* :mod:`.convert`: released checkpoints of the reference (ImageNet classifier,
  mmdet 2.x Mask R-CNN, mmdet 3.0 DINO, mmseg 0.x UperNet, mmseg 1.0
  Mask2Former) to checkpoints our configs load with ``strict=True``.
* :mod:`.flops`: parameters and FLOPs with mmengine's analysis, the compiled
  sliding-window op and the banded attention counted.
* :mod:`.attention_vis`: the fovea and periphery of a pixel, per stage.

Submodules are imported on use, so ``import mmtransnext`` stays light.
"""
