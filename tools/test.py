#!/usr/bin/env python
"""Evaluate a checkpoint on a config's test split (mmdet / mmseg config).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
                         [--show-dir DIR] [--show [--wait-time S]]
                         [--no-progress] [--cfg-options k=v ...]
                         [--launcher {none,pytorch,slurm,mpi}]

Shows a progress bar over the test set, then the metrics (COCO bbox / segm mAP
for a detector, mIoU for a segmentor).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from train import (_import_mmtransnext, parse_runner_args,  # noqa: E402
                   setup_cpu_distributed)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a detector or segmentor')
    parser.add_argument('config', help='the config of the model to evaluate')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='dump the predictions to a pickle file (.pkl)')
    parser.add_argument(
        '--show-dir',
        help='save a picture of each prediction: a detector writes them to '
        'WORK_DIR/TIMESTAMP/SHOW_DIR/ (named as the images), a segmentor to '
        'SHOW_DIR/vis_data/vis_image/ (test_<image name>_<iteration>.png)')
    parser.add_argument(
        '--show',
        action='store_true',
        help='show each prediction in a window (needs a display)')
    parser.add_argument(
        '--wait-time',
        type=float,
        default=2,
        help='seconds each picture stays up with --show (default: 2)')
    parser.add_argument(
        '--no-progress', action='store_true', help='no progress bar')
    return parse_runner_args(parser, argv)


def enable_visualization(cfg, show_dir=None, show=False, wait_time=2.):
    """Turn on the visualization hook so each test image is drawn.

    Args:
        cfg (Config): an mmdet or mmseg config (changed in place).
        show_dir (str, optional): where pictures are saved (see ``--show-dir``).
        show (bool): show each picture in a window. Default: False.
        wait_time (float): seconds a shown picture stays up. Default: 2.
    """
    hooks = cfg.get('default_hooks', {})
    vis = hooks.get('visualization') if hooks else None
    if vis is None:
        raise RuntimeError(
            '--show / --show-dir need a "visualization" entry in default_hooks '
            '(DetVisualizationHook or SegVisualizationHook)')
    vis['draw'] = True
    if show:
        vis['show'] = True
        vis['wait_time'] = wait_time
    if 'Det' not in str(vis.get('type', '')):
        vis['interval'] = 1        # mmseg's hook draws every interval-th image
    if show_dir:
        if 'Det' in str(vis.get('type', '')):
            vis['test_out_dir'] = show_dir
        else:  # mmseg's hook writes where the visualizer's save_dir points
            cfg.visualizer['save_dir'] = show_dir


def add_dump_metric(runner, out):
    """Append a metric that pickles the raw predictions to ``out``."""
    assert out.endswith(('.pkl', '.pickle')), '--out must be a .pkl file'
    try:  # mmdet turns DetDataSamples into plain dicts first
        from mmdet.evaluation import DumpDetResults
        scope = runner.cfg.get('default_scope', None)
        if scope != 'mmdet':
            raise ImportError
        metric = DumpDetResults(out_file_path=out)
    except ImportError:
        from mmengine.evaluator import DumpResults
        metric = DumpResults(out_file_path=out)
    runner.test_evaluator.metrics.append(metric)


def build_test_runner(args):
    """The Runner that tests ``args.checkpoint`` (progress bar and ``--out``
    included); ``runner.test()`` then evaluates."""
    _import_mmtransnext()
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from mmtransnext.engine import TestProgressBarHook

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.show or args.show_dir:
        enable_visualization(cfg, args.show_dir, args.show, args.wait_time)
    setup_cpu_distributed(cfg, args.launcher)

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    if not args.no_progress:
        runner.register_hook(TestProgressBarHook(), priority='VERY_LOW')
    if args.out is not None:
        add_dump_metric(runner, args.out)
    return runner


def main(argv=None):
    args = parse_args(argv)
    runner = build_test_runner(args)
    metrics = runner.test()
    if runner.rank == 0:
        print('\n' + '\n'.join(f'{k}: {v}' for k, v in metrics.items()))
    return metrics


if __name__ == '__main__':
    main()
