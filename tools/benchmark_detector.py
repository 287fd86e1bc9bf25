"""One Mask R-CNN training iteration: TransNeXt-T against Swin-T, what a user would see.

Both detectors come from their configs (``configs/detection/mask-rcnn_transnext-tiny_
fpn_1x_coco.py`` and mmdet's ``swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``): the
same heads, the same data preprocessor, each with its own AdamW settings. An
iteration is MMEngine's ``model.train_step``: preprocessing (normalise, pad to 32),
forward, losses, backward and the optimizer step, on a synthetic batch (random
pixels, a few boxes with box-shaped masks per image), the same for both detectors.
Each detector runs in its own process, its dtypes one after the other (a fresh
optimizer each); time is the median after warm-up (CUDA: synchronised), memory the
peak ``torch.cuda.max_memory_allocated`` of that dtype's iterations (the CPU: peak
RSS, where only fp32 runs).

dtypes: ``fp32``; ``fp16``, mixed precision as mmdet's ``--amp`` runs it
(``AmpOptimWrapper``, float16 autocast, dynamic loss scale); ``bf16``, the same in
bfloat16 without loss scaling. mmcv 2.1's ``RoIAlign`` has no bfloat16 CUDA kernel, so
``bf16`` fails in Mask R-CNN's RoI heads whatever the backbone (an H100 run, 2026-11-27);
a dtype that fails is reported as such and the others still run.

Needs mmdet and mmcv (with its ops). Example::

    python tools/benchmark_detector.py --device cuda --batch 2 --dtypes fp32 fp16
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each detector's config lies: this repository, or mmdet's installed configs.
CONFIGS = {
    'transnext': (None, 'configs/detection/mask-rcnn_transnext-tiny_fpn_1x_coco.py'),
    'swin': ('mmdet', 'swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'),
}
DTYPES = ('fp32', 'fp16', 'bf16')
# The autocast dtype each mixed-precision run gives AmpOptimWrapper.
AMP_DTYPES = {'fp16': 'float16', 'bf16': 'bfloat16'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--detectors', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument('--size', type=int, nargs=2, default=[800, 1333], metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=2, help='images per iteration')
    parser.add_argument('--objects', type=int, default=4, help='objects per image')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--dtypes', nargs='+', default=['fp32'], choices=DTYPES,
                        help='fp32, and/or fp16 / bf16 mixed precision (AmpOptimWrapper; '
                        'CUDA only)')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--img-size', type=int, default=800,
                        help="TransNeXt's img_size, the grid its position bias is built on "
                        '(800 in the config)')
    parser.add_argument('--json', help='also write the results to this file')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--detector', default='transnext', choices=list(CONFIGS),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ('batch', 'objects', 'repeats', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    if args.warmup < 0:
        parser.error('--warmup must not be negative')
    if min(args.size) < 32:
        parser.error(f'--size must be at least 32 per side, got {args.size}')
    if args.device == 'cpu' and set(args.dtypes) & set(AMP_DTYPES):
        parser.error('fp16 and bf16 run through AmpOptimWrapper, which needs CUDA; '
                     'use --dtypes fp32')
    return args


def config_path(detector: str) -> str:
    """The config file of a detector (mmdet's configs ship inside its package)."""
    package, relative = CONFIGS[detector]
    if package is None:
        return os.path.join(REPO, relative)
    import importlib
    root = os.path.dirname(importlib.import_module(package).__file__)
    path = os.path.join(root, '.mim', 'configs', relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{package} has no config {relative} (looked in {path})')
    return path


def synthetic_batch(batch: int, size, objects: int, num_classes: int, seed: int = 0) -> dict:
    """What a data loader hands ``train_step``: uint8 images and annotated samples.

    Args:
        batch (int): images.
        size (tuple[int, int]): ``(H, W)`` of every image.
        objects (int): boxes per image, each with a mask filling it.
        num_classes (int): labels are drawn below this.
        seed (int): the generator's seed. Default: 0.

    Returns:
        dict: ``inputs`` (list of ``(3, H, W)`` uint8) and ``data_samples`` (list of
        ``DetDataSample`` with ``gt_instances`` bboxes, labels and ``BitmapMasks``).
    """
    import numpy as np
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    gen = torch.Generator().manual_seed(seed)
    height, width = size
    inputs, samples = [], []
    for index in range(batch):
        inputs.append(torch.randint(0, 256, (3, height, width), generator=gen,
                                    dtype=torch.uint8))
        # Boxes of at least a sixteenth of each side, inside the image.
        low = torch.rand(objects, 2, generator=gen) * torch.tensor([width, height]) * 0.75
        extent = (0.0625 + 0.1875 * torch.rand(objects, 2, generator=gen)) * torch.tensor(
            [width, height])
        boxes = torch.cat([low, low + extent], dim=1).floor()
        masks = np.zeros((objects, height, width), dtype=np.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        sample = DetDataSample(metainfo=dict(img_id=index, img_shape=(height, width),
                                             ori_shape=(height, width),
                                             scale_factor=(1.0, 1.0), flip=False))
        sample.gt_instances = InstanceData(
            bboxes=boxes, labels=torch.randint(0, num_classes, (objects, ), generator=gen),
            masks=BitmapMasks(masks, height, width))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(args) -> list:
    """Time ``train_step`` of one detector in each of ``--dtypes`` in this process."""
    import torch

    from mmtransnext.tools.common import build_model, load_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = {'model.backbone.img_size': args.img_size} if args.detector == 'transnext' else {}
    cfg = load_config(config_path(args.detector), options)
    model = build_model(cfg).to(torch.device(args.device)).train()
    data = synthetic_batch(args.batch, args.size, args.objects,
                           cfg.model.roi_head.bbox_head.num_classes)
    rows = []
    for dtype in args.dtypes:
        try:
            rows.append(_time(args, cfg, model, data, dtype))
        except (RuntimeError, NotImplementedError) as exc:  # e.g. an mmcv op without the dtype
            rows.append(dict(detector=args.detector, dtype=dtype,
                             error=f'{type(exc).__name__}: {str(exc).splitlines()[0][:160]}'))
    return rows


def _time(args, cfg, model, data, dtype: str) -> dict:
    """Median ``train_step`` time and peak memory of ``model`` in ``dtype``."""
    import torch
    from mmengine.optim import build_optim_wrapper

    optim_cfg = cfg.optim_wrapper.copy()
    if dtype in AMP_DTYPES:
        optim_cfg.update(type='AmpOptimWrapper', dtype=AMP_DTYPES[dtype],
                         loss_scale='dynamic' if dtype == 'fp16' else 1.0)
    model.zero_grad(set_to_none=True)
    optim_wrapper = build_optim_wrapper(model, optim_cfg)
    cuda = args.device == 'cuda'
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.warmup + args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        log_vars = model.train_step(data, optim_wrapper)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(float(log_vars['loss']))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
    return dict(detector=args.detector, dtype=dtype, time_ms=statistics.median(
        times[args.warmup:]), peak_mb=peak, loss=losses[-1],
                device_name=torch.cuda.get_device_name() if cuda else 'cpu')


def run_detector(args, detector: str) -> list:
    """One detector in a child process, a row per dtype; failures come back as ``error``."""
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--detector', detector,
           '--dtypes', *args.dtypes, '--device', args.device, '--size', *map(str, args.size),
           '--batch', str(args.batch), '--objects', str(args.objects), '--threads',
           str(args.threads), '--repeats', str(args.repeats), '--warmup', str(args.warmup)]
    cmd += ['--img-size', str(args.img_size)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072')
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ['(no output)']
        return [dict(detector=detector, dtype=dtype, error=lines[-1][:200])
                for dtype in args.dtypes]
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows) -> str:
    """One line per run; ``vs Swin-T`` is this detector's time over Swin-T's (lower is better).

    Args:
        rows (list[dict]): ``detector``, ``dtype`` and either ``time_ms``, ``peak_mb``,
            ``loss`` or ``error``.
    """
    header = (f'{"dtype":5} {"detector":10} {"iteration ms":>12} {"peak MB":>9} '
              f'{"vs Swin-T":>9} {"loss":>8}')
    lines = [header, '-' * len(header)]
    swin = {r['dtype']: r for r in rows if r['detector'] == 'swin' and 'error' not in r}
    for row in rows:
        lead = f'{row["dtype"]:5} {row["detector"]:10}'
        if 'error' in row:
            lines.append(f'{lead} failed: {row["error"]}')
            continue
        base = swin.get(row['dtype'])
        ratio = f'{row["time_ms"] / base["time_ms"]:.2f}x' if base else '-'
        lines.append(f'{lead} {row["time_ms"]:12.1f} {row["peak_mb"]:9.0f} {ratio:>9} '
                     f'{row["loss"]:8.3f}')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    by_detector = {}
    for detector in args.detectors:
        by_detector[detector] = run_detector(args, detector)
        # Each row as it comes, so that a run stopped at a time limit keeps them.
        for row in by_detector[detector]:
            print(f'{detector} {row["dtype"]}: ' + (
                f'failed: {row["error"]}' if 'error' in row else
                f'{row["time_ms"]:.1f} ms, peak {row["peak_mb"]:.0f} MB'), flush=True)
    rows = [by_detector[detector][index] for index in range(len(args.dtypes))
            for detector in args.detectors]
    where = next((r['device_name'] for r in rows if 'device_name' in r), args.device)
    print(f'Mask R-CNN train_step, {args.batch} images of {args.size[0]}x{args.size[1]} '
          f'({args.objects} objects each) on {where}, median of {args.repeats} after '
          f'{args.warmup} warm-up')
    print(format_table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    if any('error' in r for r in rows):
        sys.exit(1)


if __name__ == '__main__':
    main()
