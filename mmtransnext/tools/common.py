"""What the tools share: configs, task detection, building a model from a config."""
from typing import Optional, Sequence

from mmengine.config import Config
from torch import nn

DET, SEG = 'det', 'seg'
# Top-level model types of mmseg (everything else in our configs is an mmdet detector).
_SEG_MODEL_TYPES = ('EncoderDecoder', 'CascadeEncoderDecoder', 'SegTTAModel',
                    'DepthEstimator', 'MultimodalEncoderDecoder')


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """A config file with ``--cfg-options`` merged; ``mmtransnext`` is imported."""
    import mmtransnext  # noqa: F401  (registers TransNeXt whatever custom_imports says)
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def task_of(cfg: Config) -> str:
    """``'det'`` for an mmdet config, ``'seg'`` for an mmseg one.

    Decided by ``default_scope`` when the config sets it (the mmdet / mmseg
    runtime bases do), else by the model type.

    Raises:
        ValueError: the config names another scope.
    """
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        return DET
    if scope == 'mmseg':
        return SEG
    if scope is not None:
        raise ValueError(f"config scope {scope!r} is neither 'mmdet' nor 'mmseg'")
    model_type = str(cfg.model.get('type', '')).split('.')[-1]
    return SEG if model_type in _SEG_MODEL_TYPES else DET


def build_model(cfg: Config, with_init_cfg: bool = False) -> nn.Module:
    """The config's whole model, built in its scope (weights not initialised).

    Args:
        cfg (Config): an mmdet or mmseg config.
        with_init_cfg (bool): keep the backbone's ``init_cfg`` (a pretrained
            checkpoint path). Default False: the path need not exist to build.
    """
    import copy

    from mmengine.registry import init_default_scope
    model_cfg = copy.deepcopy(cfg.model)   # some detectors write into their sub-configs
    if not with_init_cfg and 'backbone' in model_cfg:
        model_cfg.backbone = dict(model_cfg.backbone)
        model_cfg.backbone.pop('init_cfg', None)
        model_cfg.backbone.pop('pretrained', None)
    if task_of(cfg) == DET:
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        init_default_scope('mmdet')
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        init_default_scope('mmseg')
    return MODELS.build(model_cfg)


def parse_pair(text: str, name: str) -> Sequence[int]:
    """``'Y,X'`` (or ``'H,W'``, or one number for both) as two ints."""
    try:
        values = [int(v) for v in text.replace('x', ',').split(',') if v.strip()]
    except ValueError:
        raise ValueError(f'{name}: expected two integers like 512,512, got {text!r}') from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ValueError(f'{name}: expected two integers like 512,512, got {text!r}')
    return values


def parse_tiles(text: str) -> dict:
    """``'BLOCK_MxBLOCK_NxWARPS[:PRECISION]'`` (e.g. ``'32x32x8'``, ``'32x16x8:tf32x3'``)
    as a fused-kernel launch config; ``PRECISION`` is that of float32 dots (``ieee``,
    ``tf32x3`` or ``tf32``, see :data:`mmtransnext.ops.fused_attention.LAUNCH`; ``tf32``,
    one TF32 product a dot, is for timing: its logits err by about 0.03, beyond
    float32's tolerances).

    Raises:
        argparse.ArgumentTypeError: not three integers, block sizes that are not powers
            of two of at least 16 (``tl.dot``'s smallest), an unusual warp count or
            an unknown precision.
    """
    import argparse
    tiles, _, precision = text.partition(':')
    if precision and precision not in ('ieee', 'tf32x3', 'tf32'):
        raise argparse.ArgumentTypeError(f'{text!r}: the float32 dot precision is ieee, '
                                         'tf32x3 or tf32')
    try:
        block_m, block_n, warps = (int(part) for part in tiles.split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: expected BLOCK_MxBLOCK_NxWARPS, '
                                         'e.g. 32x32x8') from None
    for value in (block_m, block_n):
        if value < 16 or value & (value - 1):
            raise argparse.ArgumentTypeError(f'{text!r}: block sizes are powers of two >= 16')
    if warps not in (1, 2, 4, 8, 16):
        raise argparse.ArgumentTypeError(f'{text!r}: warps is 1, 2, 4, 8 or 16')
    launch = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dict(launch, DOT_PRECISION=precision) if precision else launch


def tiles_label(launch: dict) -> str:
    """The inverse of :func:`parse_tiles`."""
    label = f'{launch["BLOCK_M"]}x{launch["BLOCK_N"]}x{launch["num_warps"]}'
    return f'{label}:{launch["DOT_PRECISION"]}' if 'DOT_PRECISION' in launch else label
