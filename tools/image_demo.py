#!/usr/bin/env python
"""Run a detector or a segmentor from our configs on one image and draw the result.

    python tools/image_demo.py IMAGE CONFIG --checkpoint CKPT --out OUT.png [--score-thr 0.3]

The config decides the task (its default_scope, else its model type): mmdet's
init_detector / inference_detector and DetLocalVisualizer, or mmseg's init_model /
inference_model and SegLocalVisualizer. Without --checkpoint the tool refuses: a model
with random weights draws noise. --random-weights draws it anyway (to check a config).
Released checkpoints of the reference go through tools/convert_checkpoint.py first.
"""
import argparse
import os
import sys
import time


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('image')
    parser.add_argument('config')
    parser.add_argument('--checkpoint', help='converted checkpoint of the whole model')
    parser.add_argument('--random-weights', action='store_true',
                        help='run without a checkpoint (the drawing is noise)')
    parser.add_argument('--out', required=True, help='output image')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections below this score are not drawn')
    parser.add_argument('--opacity', type=float, default=0.5, help='segmentation overlay')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE')
    return parser.parse_args(argv)


def _config_dataset_meta(cfg, task) -> dict:
    """Classes and palette of the config's test dataset (built lazily)."""
    import copy
    if task == 'det':
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    dataset = copy.deepcopy(cfg.test_dataloader.dataset)
    dataset['lazy_init'] = True
    meta = DATASETS.build(dataset).metainfo
    return dict(classes=meta['classes'], palette=meta['palette'])


def run(args):
    import mmcv

    from mmtransnext.tools.common import DET, load_config, task_of
    cfg = load_config(args.config, args.cfg_options)
    backbone = cfg.model.get('backbone')
    if backbone is not None:        # the checkpoint carries every weight
        backbone.pop('init_cfg', None)
        backbone.pop('pretrained', None)
    image = mmcv.imread(args.image, channel_order='rgb')
    if image is None:
        raise SystemExit(f'cannot read an image from {args.image!r}')
    name = f'image_demo_{os.getpid()}_{time.monotonic_ns()}'
    task = task_of(cfg)
    if task == DET:
        from mmdet.apis import inference_detector, init_detector
        from mmdet.visualization import DetLocalVisualizer
        model = init_detector(cfg, args.checkpoint, device=args.device)
        if not args.checkpoint:     # not COCO's classes: the config's
            model.dataset_meta = _config_dataset_meta(cfg, task)
        result = inference_detector(model, args.image)
        visualizer = DetLocalVisualizer(name=name)
        visualizer.dataset_meta = model.dataset_meta
        visualizer.add_datasample('result', image, data_sample=result, draw_gt=False,
                                  show=False, pred_score_thr=args.score_thr,
                                  out_file=args.out)
        kept = int((result.pred_instances.scores >= args.score_thr).sum())
        summary = (f'{len(result.pred_instances)} detections, {kept} drawn '
                   f'(score >= {args.score_thr})')
    else:
        from mmseg.apis import inference_model, init_model
        from mmseg.visualization import SegLocalVisualizer
        model = init_model(cfg, args.checkpoint, device=args.device)
        if not hasattr(model, 'dataset_meta'):      # no checkpoint: the config's classes
            model.dataset_meta = _config_dataset_meta(cfg, task)
        result = inference_model(model, args.image)
        visualizer = SegLocalVisualizer(name=name, alpha=args.opacity)
        visualizer.dataset_meta = dict(classes=model.dataset_meta['classes'],
                                       palette=model.dataset_meta['palette'])
        visualizer.add_datasample('result', image, data_sample=result, draw_gt=False,
                                  show=False, out_file=args.out)
        labels = result.pred_sem_seg.data.unique().tolist()
        classes = model.dataset_meta['classes']
        summary = 'classes present: ' + ', '.join(str(classes[i]) for i in labels)
    return task, summary


def main(argv=None):
    args = parse_args(argv)
    if not args.checkpoint and not args.random_weights:
        raise SystemExit('refusing to run without weights: pass --checkpoint CKPT (a '
                         'converted released checkpoint, see tools/convert_checkpoint.py), '
                         'or --random-weights to draw what an untrained model outputs')
    if args.checkpoint and args.random_weights:
        raise SystemExit('give either --checkpoint or --random-weights, not both')
    task, summary = run(args)
    print(f'{"detector" if task == "det" else "segmentor"}: {summary}')
    print(f'wrote {args.out}' + ('' if args.checkpoint else ' (RANDOM WEIGHTS)'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
