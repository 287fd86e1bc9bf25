#!/usr/bin/env python
"""The end-to-end demo behind ``make demo`` / ``make demo-seg``.

    python tools/run_demo.py det|seg [--work-dir DIR] [--data-root DIR]
                             [--max-iters N] [--skip-train] [--resume]
                             [--cfg-options ...]

1. generates the embedded demo dataset under ``--data-root`` (default
   ``data/demo``) when it is missing (``tools/generate_demo_data.py``;
   deterministic, no download), and points the config's dataloaders and
   evaluators there;
2. trains the demo config from scratch with ``tools/train.py`` (MMEngine's
   logs and progress);
3. evaluates the last checkpoint on the held-out split (the ``val`` images)
   with ``tools/test.py``'s runner (progress bar, COCO / IoU metrics);
4. saves a picture of predictions next to the ground truth,
   ``<work-dir>/demo_predictions.png``, drawn by mmdet's / mmseg's visualizer;
5. ends with one line: ``demo: bbox_mAP=<x> segm_mAP=<y>`` (detection) or
   ``demo-seg: mIoU=<z>`` (segmentation; mIoU in percent, as mmseg reports it).
"""
import argparse
import os
import os.path as osp
import shutil
import subprocess
import sys
import tempfile
import time

# Before torch loads OpenMP: threads that wait sleep instead of spinning. On a
# machine whose cores are shared with other jobs, spinning OpenMP threads slowed
# training down several-fold (7-9 s/iteration instead of 1.5 s, measured on 2
# shared cores); on an idle machine the difference is small.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(HERE)
sys.path.insert(0, HERE)

TASKS = {
    'det':
    dict(
        config='configs/demo/mask-rcnn_transnext-demo_shapes.py',
        work_dir='work_dirs/demo-det',
        tag='demo'),
    'seg':
    dict(
        config='configs/demo/upernet_transnext-demo_shapes.py',
        work_dir='work_dirs/demo-seg',
        tag='demo-seg'),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Generate the demo data, train, evaluate and draw')
    parser.add_argument('task', choices=sorted(TASKS), help='det or seg')
    parser.add_argument('--config', help='override the demo config')
    parser.add_argument('--work-dir', help='override the work dir')
    parser.add_argument(
        '--data-root',
        default='data/demo',
        help='where the demo data lives (generated there when missing); training '
        'and evaluation read it from there (default: data/demo)')
    parser.add_argument(
        '--max-iters',
        type=int,
        help='fit the schedule (loop and learning-rate decay) into N iterations')
    parser.add_argument(
        '--skip-train',
        action='store_true',
        help='evaluate the work dir\'s last checkpoint without training')
    parser.add_argument(
        '--resume',
        action='store_true',
        help='continue an interrupted demo run from its last checkpoint')
    parser.add_argument(
        '--num-vis', type=int, default=8, help='images in the picture')
    parser.add_argument(
        '--score-thr',
        type=float,
        default=0.5,
        help='score threshold of the drawn detections')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        default=[],
        help='passed to train.py and test.py')
    return parser.parse_args(argv)


def last_checkpoint(work_dir):
    """The checkpoint MMEngine's CheckpointHook recorded last."""
    marker = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(marker):
        raise FileNotFoundError(
            f'no checkpoint in {work_dir} (missing {marker}); train first')
    with open(marker) as f:
        path = f.read().strip()
    if not osp.isabs(path) and not osp.exists(path):
        path = osp.join(work_dir, osp.basename(path))
    return path


def schedule_options(config, max_iters):
    """``--cfg-options`` that fit the config's whole schedule into ``max_iters``.

    The loop length and the validation interval change, and each iteration-based
    scheduler that ended with the old schedule ends with the new one (a cosine's
    ``T_max`` with it), so a shorter run still decays its learning rate to the
    end instead of stopping half-way. Warm-ups keep their length.

    Raises:
        ValueError: ``max_iters`` does not reach past a scheduler's start.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    old = cfg.train_cfg.max_iters
    options = [f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters}']
    for i, scheduler in enumerate(cfg.get('param_scheduler') or []):
        if scheduler.get('by_epoch', True) or scheduler.get('end') != old:
            continue
        begin = scheduler.get('begin', 0)
        if max_iters <= begin:
            raise ValueError(f'--max-iters {max_iters} must be above {begin}, where '
                             f'{scheduler["type"]} of {config} begins')
        options.append(f'param_scheduler.{i}.end={max_iters}')
        if 'T_max' in scheduler:
            options.append(f'param_scheduler.{i}.T_max={max_iters - begin}')
    return options


def data_root_options(config, data_root, default_root):
    """``--cfg-options`` that make the config read its data under ``data_root``.

    The demo configs name paths under ``default_root`` (``data/demo/coco/``,
    ``data/demo/ade/``). Each dataloader's ``dataset.data_root`` and each
    evaluator's ``ann_file`` (a COCO metric reads the annotations itself) that
    lies under ``default_root`` moves to the same place under ``data_root``;
    other paths stay. Empty when nothing moves.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(config)

    def moved(path):
        relative = osp.relpath(path, default_root)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            return None     # not under default_root
        new = osp.normpath(osp.join(data_root, relative))
        if new == osp.normpath(path):
            return None
        # Keep a trailing separator: configs build file names as data_root + name.
        return new + '/' if path.endswith('/') else new

    options = []
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = (cfg.get(key) or {}).get('dataset') or {}
        new = moved(dataset['data_root']) if dataset.get('data_root') else None
        if new:
            options.append(f'{key}.dataset.data_root={new}')
    for key in ('val_evaluator', 'test_evaluator'):
        evaluator = cfg.get(key)
        metrics = evaluator if isinstance(evaluator, list) else [evaluator]
        for i, metric in enumerate(metrics):
            if not isinstance(metric, dict) or not metric.get('ann_file'):
                continue
            new = moved(metric['ann_file'])
            if new:
                where = f'{key}.{i}' if isinstance(evaluator, list) else key
                options.append(f'{where}.ann_file={new}')
    return options


def train(config, work_dir, cfg_options, resume):
    cmd = [
        sys.executable,
        osp.join(HERE, 'train.py'), config, '--work-dir', work_dir,
        '--no-validate'
    ]
    if resume:
        cmd.append('--resume')
    if cfg_options:
        cmd += ['--cfg-options'] + cfg_options
    print('demo: ' + ' '.join(cmd[1:]), flush=True)
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (env.get('PYTHONPATH'), REPO) if p)
    subprocess.run(cmd, check=True, env=env)


def _collate_one(dataset, idx):
    from mmengine.dataset import pseudo_collate
    return pseudo_collate([dataset[idx]])


def draw_predictions(runner, out_file, num, score_thr):
    """A grid of ``num`` held-out images, each as ground truth | prediction."""
    import cv2
    import mmcv
    import numpy as np
    import torch

    model = runner.model
    model.eval()
    dataset = runner.test_dataloader.dataset
    vis = runner.visualizer
    vis.dataset_meta = dataset.metainfo
    step = max(len(dataset) // max(num, 1), 1)
    panels = []
    tmp_dir = tempfile.mkdtemp(prefix='demo_panels_')
    for idx in range(0, len(dataset), step)[:num]:
        with torch.no_grad():
            sample = model.test_step(_collate_one(dataset, idx))[0]
        img = mmcv.imread(sample.img_path, channel_order='rgb')
        kwargs = dict(draw_gt=True, draw_pred=True, show=False)
        if 'pred_instances' in sample:
            kwargs['pred_score_thr'] = score_thr
        # out_file, not get_image(): mmseg's visualizer never sets the
        # combined ground truth | prediction image as its current image
        panel_file = osp.join(tmp_dir, f'{idx:06d}.png')
        vis.add_datasample(osp.basename(sample.img_path), img, sample,
                           out_file=panel_file, **kwargs)
        panels.append(mmcv.imread(panel_file, channel_order='rgb'))
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if not panels:
        return None
    h, w = panels[0].shape[:2]
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    canvas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        canvas[r * h:r * h + p.shape[0], c * w:c * w + p.shape[1]] = p
    header = np.full((28, canvas.shape[1], 3), 255, dtype=np.uint8)
    for c in range(cols):
        for k, text in enumerate(('ground truth', 'prediction')):
            x = c * w + k * (w // 2) + 8
            cv2.putText(header, text, (x, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        (0, 0, 0), 1, cv2.LINE_AA)
    canvas = np.concatenate([header, canvas], axis=0)
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    mmcv.imwrite(canvas[..., ::-1], out_file)  # RGB -> BGR
    return out_file


def evaluate(config, work_dir, checkpoint, cfg_options):
    import test as test_tool
    argv = [config, checkpoint, '--work-dir', work_dir]
    if cfg_options:
        argv += ['--cfg-options'] + cfg_options
    args = test_tool.parse_args(argv)
    runner = test_tool.build_test_runner(args)
    metrics = runner.test()
    return runner, metrics


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    os.chdir(REPO)
    task = TASKS[args.task]
    config = args.config or task['config']
    work_dir = args.work_dir or task['work_dir']

    from train import _import_mmtransnext
    _import_mmtransnext()
    from mmtransnext.datasets.demo_data import DEFAULT_ROOT, ensure_demo_data
    # First, so that the user's own --cfg-options win.
    cfg_options = data_root_options(config, args.data_root, DEFAULT_ROOT)
    cfg_options += args.cfg_options
    if args.max_iters is not None:
        cfg_options += schedule_options(config, args.max_iters)
    ensure_demo_data(args.data_root)

    if not args.skip_train:
        train(config, work_dir, cfg_options, args.resume)
    checkpoint = last_checkpoint(work_dir)
    print(f'demo: evaluating {checkpoint} on the held-out split', flush=True)
    runner, metrics = evaluate(config, work_dir, checkpoint, cfg_options)
    picture = draw_predictions(runner,
                               osp.join(work_dir, 'demo_predictions.png'),
                               args.num_vis, args.score_thr)
    if picture:
        print(f'demo: predictions next to ground truth in {picture}')
    minutes = (time.time() - start) / 60
    print(f'demo: done in {minutes:.1f} min (work dir {work_dir})')
    if args.task == 'det':
        line = (f"{task['tag']}: bbox_mAP={metrics['coco/bbox_mAP']:.3f} "
                f"segm_mAP={metrics['coco/segm_mAP']:.3f}")
    else:
        line = f"{task['tag']}: mIoU={metrics['mIoU']:.2f}"
    print(line, flush=True)
    return metrics


if __name__ == '__main__':
    main()
