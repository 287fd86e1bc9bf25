#!/usr/bin/env python
"""Convert a released TransNeXt checkpoint into one our configs load with strict=True.

    python tools/convert_checkpoint.py SRC DST [--source auto|imagenet|mmdet2-mask-rcnn|
        mmdet3-dino|mmseg0-upernet|mmseg1-mask2former] [--config CFG | --arch tiny]

Prints a report of renamed, dropped and (with --config / --arch) missing keys. With a
config or an arch the result is first loaded strictly; if that fails nothing is written
and the exit status is 1. DST appears only when complete (written beside it, then renamed).
The conversion itself lives in mmtransnext.tools.convert.
"""
import argparse
import os
import sys
import tempfile

import torch


def parse_args(argv=None):
    from mmengine.config import DictAction

    from mmtransnext.tools.convert import SOURCES
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='released checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--source', default='auto', choices=['auto', *SOURCES],
                        help='layout of SRC (default: detected)')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--config', help='our config; the converted weights are loaded '
                        'strictly into its model (its backbone for an ImageNet checkpoint)')
    target.add_argument('--arch', help='for an ImageNet checkpoint: check against '
                        'TransNeXt(arch=ARCH)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config settings (as in mmengine tools)')
    parser.add_argument('--force', action='store_true', help='overwrite DST')
    return parser.parse_args(argv)


def _target_model(args, source):
    from mmtransnext.tools.convert import IMAGENET
    if args.arch:
        if source != IMAGENET:
            raise SystemExit('--arch checks ImageNet checkpoints; give --config for '
                             f'a {source} checkpoint')
        from mmtransnext import TransNeXt
        return TransNeXt(arch=args.arch)
    if not args.config:
        return None
    from mmtransnext.tools.common import build_model, load_config
    cfg = load_config(args.config, args.cfg_options)
    if source == IMAGENET:
        from mmengine.registry import MODELS

        import mmtransnext  # noqa: F401
        backbone = dict(cfg.model.backbone)
        backbone.pop('init_cfg', None)
        backbone.pop('pretrained', None)
        backbone['type'] = backbone['type'].split('.')[-1]
        return MODELS.build(backbone)
    return build_model(cfg)


def write_atomically(checkpoint: dict, dst: str):
    """Save to a temporary file beside ``dst``, renamed onto it once complete."""
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(dst)}.', suffix='.tmp',
                                   dir=folder)
    os.close(handle)
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    args = parse_args(argv)
    from mmtransnext.tools.convert import (check_against_model, convert_checkpoint,
                                           load_released)
    if os.path.exists(args.dst) and not args.force:
        raise SystemExit(f'{args.dst} exists; pass --force to overwrite it')
    try:
        released = load_released(args.src)
    except FileNotFoundError:
        raise SystemExit(f'{args.src}: no such file (the released checkpoint to '
                         'convert)') from None
    converted, report = convert_checkpoint(
        released, None if args.source == 'auto' else args.source)
    model = _target_model(args, report.source)
    ok = model is None or check_against_model(converted['state_dict'], model, report)
    print(report.format())
    if not ok:
        print(f'{args.dst} not written: the converted weights do not load strictly '
              f'into {args.config or "TransNeXt-" + args.arch} (see above)')
        return 1
    write_atomically(converted, args.dst)
    print(f'{args.src} -> {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
