#!/usr/bin/env python
"""Draw where one pixel looks: the fovea and periphery of TransNeXt's aggregated attention.

    python tools/visualize_attention.py IMAGE --arch tiny --checkpoint CKPT \
        --pixel Y,X --out OUT.png [--head mean|K] [--img-size 224]

One panel per aggregated-attention stage (the last block of each): the window weights
(fovea) as a grid of the stage's token cells around the pixel, the pooled weights
(periphery) drawn back over the image. CKPT may be a classifier, detector or segmentor
checkpoint (its backbone is taken). Without --checkpoint the tool refuses, unless
--random-weights asks for the picture of an untrained model.
"""
import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('image')
    parser.add_argument('--arch', default='tiny',
                        help="micro, tiny, small, base (default: tiny)")
    parser.add_argument('--config', help="take the backbone from this config's "
                        'model.backbone instead of --arch')
    parser.add_argument('--checkpoint', help='weights (classifier, detector, segmentor)')
    parser.add_argument('--random-weights', action='store_true',
                        help='draw an untrained model (no --checkpoint)')
    parser.add_argument('--pixel', required=True, help='Y,X in image pixels')
    parser.add_argument('--out', required=True, help='output image (.png)')
    parser.add_argument('--head', default='mean', help="'mean' over heads or a head index")
    parser.add_argument('--img-size', type=int, default=224,
                        help='size the position bias is built for (224 for ImageNet '
                        'weights; a config sets its own)')
    return parser.parse_args(argv)


def build_backbone(args):
    from mmengine.registry import MODELS

    from mmtransnext import TransNeXt
    if args.config:
        from mmtransnext.tools.common import load_config
        backbone = dict(load_config(args.config).model.backbone)
        backbone.pop('init_cfg', None)
        backbone.pop('pretrained', None)
        backbone['type'] = backbone['type'].split('.')[-1]
        model = MODELS.build(backbone)
    else:
        model = TransNeXt(arch=args.arch, img_size=args.img_size, pretrain_size=224)
    if args.checkpoint:
        from mmtransnext.models.checkpoint import load_pretrained
        try:
            load_pretrained(model, args.checkpoint)
        except ValueError as error:     # names the variant the file looks like
            raise SystemExit(str(error)) from None
    return model.eval()


def main(argv=None):
    args = parse_args(argv)
    if not args.checkpoint and not args.random_weights:
        raise SystemExit('refusing to draw the attention of random weights: pass '
                         '--checkpoint CKPT (released classifier, detector or segmentor '
                         'weights), or --random-weights to see an untrained model')
    from mmtransnext.tools import attention_vis as av
    from mmtransnext.tools.common import parse_pair
    pixel = tuple(parse_pair(args.pixel, '--pixel'))
    head = args.head if args.head == 'mean' else int(args.head)
    image = av.load_image(args.image)
    model = build_backbone(args)
    records = av.capture_attention(model, av.to_input(image))
    title = (f'{args.config or "TransNeXt-" + args.arch}, pixel (y={pixel[0]}, x={pixel[1]}), '
             f'heads: {head}' + ('' if args.checkpoint else ', RANDOM WEIGHTS'))
    shares = av.draw(image, records, pixel, args.out, head=head, title=title)
    for stage, share in shares.items():
        print(f'stage {stage}: fovea {share["fovea"]:.3f}, periphery {share["periphery"]:.3f}')
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
