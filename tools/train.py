#!/usr/bin/env python
"""Train a detector or segmentor (mmdet / mmseg config) with MMEngine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--auto-scale-lr] [--no-validate] [--cfg-options k=v ...]
                          [--launcher {none,pytorch,slurm,mpi}]

``--resume`` with no value continues from the latest checkpoint in the work
dir; with a path, from that checkpoint. Multi-process training goes through
``tools/dist_train.sh`` (torchrun) or ``tools/slurm_train.sh``; on a machine
without CUDA the processes talk over gloo.
"""
import argparse
import os
import os.path as osp
import sys

_REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _import_mmtransnext():
    """Register TransNeXt and make ``torch.load`` read MMEngine checkpoints,
    also when the package is used from a checkout without installing it."""
    try:
        import mmtransnext  # noqa: F401
    except ImportError:
        sys.path.insert(0, _REPO)
        import mmtransnext  # noqa: F401
    import mmtransnext.engine  # noqa: F401


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a detector or segmentor (mmdet / mmseg config)')
    parser.add_argument('config', help='an mmdet or mmseg config')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/CONFIG_NAME)')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the given checkpoint, or, with no value, from the '
        'latest checkpoint in the work dir')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='automatic mixed precision (CUDA only; without a CUDA device it is '
        'ignored with a warning and training runs in float32)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate with the total batch size, following '
        'the config\'s auto_scale_lr.base_batch_size')
    parser.add_argument(
        '--no-validate',
        action='store_true',
        help='skip the validation loop during training')
    return parse_runner_args(parser, argv)


def parse_runner_args(parser, argv=None):
    """Add the options train.py and test.py share, parse, and export LOCAL_RANK."""
    from mmengine.config import DictAction

    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='config entries to change, as dotted.key=value pairs; lists as '
        'key=a,b or key="[a,b]", tuples as key="(a,b)" (quoted, no spaces)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='how the processes were started (none: a single process)')
    # torch.distributed.launch passes --local-rank (or --local_rank); torchrun
    # sets the LOCAL_RANK environment variable instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def setup_cpu_distributed(cfg, launcher):
    """Distributed training without CUDA: gloo, and DDP without device ids.

    MMEngine's pytorch launcher calls ``torch.cuda.set_device``, and its default
    DDP wrapper passes ``device_ids=[LOCAL_RANK]``; neither works on a CPU-only
    machine. So the process group is created here (the Runner then finds it
    and skips its own set-up) and the wrapper gets ``device_ids=None``.
    """
    import torch
    import torch.distributed as dist

    if launcher == 'none' or torch.cuda.is_available():
        return
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    if launcher == 'pytorch' and not dist.is_initialized():
        import datetime
        kwargs = {}
        if dist_cfg.get('timeout') is not None:
            kwargs['timeout'] = datetime.timedelta(
                seconds=dist_cfg['timeout'])
        dist.init_process_group(backend='gloo', **kwargs)
    wrapper = cfg.get('model_wrapper_cfg') or {}
    wrapper = dict(wrapper)
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper['device_ids'] = None
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters',
                       cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def apply_args(cfg, args):
    """Fold the command line into the config (in place)."""
    import torch
    from mmengine.logging import print_log

    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir: command line > config > ./work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        if torch.cuda.is_available():
            optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
            if optim_wrapper == 'AmpOptimWrapper':
                print_log('AMP is already enabled in the config.',
                          logger='current')
            else:
                assert optim_wrapper == 'OptimWrapper', (
                    '--amp is only supported with OptimWrapper, but got '
                    f'{optim_wrapper}.')
                cfg.optim_wrapper.type = 'AmpOptimWrapper'
                cfg.optim_wrapper.loss_scale = 'dynamic'
        else:
            print_log(
                '--amp needs a CUDA device (MMEngine\'s AmpOptimWrapper); '
                'training in float32 on the CPU.',
                logger='current',
                level=30)

    if args.auto_scale_lr:
        if 'auto_scale_lr' in cfg and 'base_batch_size' in cfg.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        else:
            raise RuntimeError('--auto-scale-lr needs "auto_scale_lr" with '
                               '"base_batch_size" in the config')

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None

    cfg.launcher = args.launcher
    setup_cpu_distributed(cfg, args.launcher)
    return cfg


def build_runner(cfg):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def main(argv=None):
    args = parse_args(argv)
    _import_mmtransnext()
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    apply_args(cfg, args)
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
