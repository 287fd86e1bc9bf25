"""docs/custom_dataset.md: its two configs, as printed there, train and test on the
demo data laid out as a user's own dataset (a few iterations on the CPU).

The configs are used unchanged except for what makes a CPU run short: smaller
images, two iterations, no worker processes. The backbone starts from a file in
the released ImageNet layout at the configs' checkpoint path, so ``init_cfg``
loading runs as it does for users.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / 'docs' / 'custom_dataset.md'
CONFIGS = {
    'det': REPO / 'configs/custom/mask-rcnn_transnext-tiny_fpn_1x_my-coco.py',
    'seg': REPO / 'configs/custom/upernet_transnext-tiny_8xb2-160k_my-ade-512x512.py',
}
SIZE = 128


def test_the_doc_prints_the_configs_verbatim():
    doc = DOC.read_text()
    blocks = re.findall(r'```python\n(.*?)```', doc, re.S)
    for path in CONFIGS.values():
        assert path.read_text() in blocks, f'{path.name} differs from its copy in {DOC.name}'
        assert str(path.relative_to(REPO)) in doc


@pytest.fixture(scope='module')
def user_dir(tmp_path_factory):
    """A working directory with data/my_coco, data/my_ade and the backbone checkpoint."""
    from mmtransnext import TransNeXt
    from mmtransnext.datasets.demo_data import generate_demo_data
    root = tmp_path_factory.mktemp('user')
    written = generate_demo_data(str(root / 'generated'), num_train=4, num_val=2,
                                 size=(SIZE, SIZE), seed=3)
    (root / 'data').mkdir()
    shutil.move(written['coco'], root / 'data' / 'my_coco')
    shutil.move(written['ade'], root / 'data' / 'my_ade')
    (root / 'checkpoints').mkdir()
    torch.manual_seed(0)
    backbone = TransNeXt(arch='tiny').state_dict()
    torch.save({'model': {**backbone, 'head.weight': torch.zeros(1000, 576),
                          'head.bias': torch.zeros(1000)}},
               root / 'checkpoints' / 'transnext_tiny_224_1k.pth')
    return root, backbone


def _run(cmd, cwd, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='2')
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f'{cmd}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}'
    return proc.stdout + proc.stderr


def _load_runner_checkpoint(path):
    # torch.load's own default, as mmengine calls it: weights only from torch 2.6 on
    # (where mmtransnext allows mmengine's logged types), full unpickling before.
    return torch.load(path, map_location='cpu')


def _initial_lrs(checkpoint):
    state = _load_runner_checkpoint(checkpoint)
    return sorted({group['initial_lr'] for group in state['optimizer']['param_groups']})


def test_mask_rcnn_recipe_trains_and_tests(user_dir):
    root, backbone = user_dir
    work = root / 'work_det'
    # Short side SIZE instead of 800; one epoch of 4 images = 2 iterations.
    shrink = [f'train_dataloader.dataset.pipeline.2.scale=({SIZE},{SIZE})',
              f'test_dataloader.dataset.pipeline.1.scale=({SIZE},{SIZE})',
              f'val_dataloader.dataset.pipeline.1.scale=({SIZE},{SIZE})',
              f'model.backbone.img_size={SIZE}', 'train_cfg.max_epochs=1',
              'train_dataloader.num_workers=0', 'val_dataloader.num_workers=0',
              'test_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
              'val_dataloader.persistent_workers=False',
              'test_dataloader.persistent_workers=False']
    log = _run([sys.executable, REPO / 'tools/train.py', CONFIGS['det'], '--work-dir', work,
                '--auto-scale-lr', '--cfg-options', *shrink], root)
    assert 'Loaded 615 backbone tensors from checkpoints/transnext_tiny_224_1k.pth' in log
    assert 'Dropped 2 entries that are not backbone weights: head (2)' in log
    assert re.search(r'coco/bbox_mAP: -?[\d.]+', log), log[-3000:]
    # lr scaled from the published 16 images per iteration to this run's 2.
    assert _initial_lrs(work / 'epoch_1.pth') == pytest.approx([1e-4 * 2 / 16])
    trained = _load_runner_checkpoint(work / 'epoch_1.pth')
    assert trained['meta']['dataset_meta']['classes'] == ('circle', 'square', 'triangle')
    assert trained['state_dict']['roi_head.bbox_head.fc_cls.weight'].shape[0] == 3 + 1
    assert trained['state_dict']['roi_head.mask_head.conv_logits.weight'].shape[0] == 3
    out = _run([sys.executable, REPO / 'tools/test.py', CONFIGS['det'], work / 'epoch_1.pth',
                '--work-dir', root / 'test_det', '--show-dir', 'pictures', '--cfg-options',
                *shrink], root)
    assert re.search(r'^coco/segm_mAP: -?[\d.]+$', out, re.M), out[-3000:]
    pictures = list((root / 'test_det').glob('*/pictures/*.jpg'))
    assert len(pictures) == 2, list((root / 'test_det').rglob('*'))


def test_upernet_recipe_trains_and_tests(user_dir):
    root, _ = user_dir
    work = root / 'work_seg'
    crop = f'({SIZE},{SIZE})'
    shrink = [f'train_dataloader.dataset.pipeline.2.scale=({2 * SIZE},{SIZE})',
              f'train_dataloader.dataset.pipeline.3.crop_size={crop}',
              f'model.data_preprocessor.size={crop}',
              f'val_dataloader.dataset.pipeline.1.scale=({2 * SIZE},{SIZE})',
              f'test_dataloader.dataset.pipeline.1.scale=({2 * SIZE},{SIZE})',
              f'model.backbone.img_size={SIZE}', 'train_cfg.max_iters=2',
              'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2',
              'train_dataloader.num_workers=0', 'val_dataloader.num_workers=0',
              'test_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
              'val_dataloader.persistent_workers=False',
              'test_dataloader.persistent_workers=False']
    log = _run([sys.executable, REPO / 'tools/train.py', CONFIGS['seg'], '--work-dir', work,
                '--cfg-options', *shrink], root)
    assert 'Loaded 615 backbone tensors' in log
    assert re.search(r'mIoU: [\d.]+', log), log[-3000:]
    trained = _load_runner_checkpoint(work / 'iter_2.pth')
    assert trained['state_dict']['decode_head.conv_seg.weight'].shape[0] == 4
    assert trained['state_dict']['auxiliary_head.conv_seg.weight'].shape[0] == 4
    out = _run([sys.executable, REPO / 'tools/test.py', CONFIGS['seg'], work / 'iter_2.pth',
                '--work-dir', root / 'test_seg', '--show-dir', str(root / 'seg_pictures'),
                '--cfg-options', *shrink], root)
    assert re.search(r'^mIoU: [\d.]+$', out, re.M), out[-3000:]
    pictures = list((root / 'seg_pictures' / 'vis_data' / 'vis_image').glob('*.png'))
    assert len(pictures) == 2, list((root / 'seg_pictures').rglob('*'))
