"""The demo data generator writes datasets that mmdet and mmseg read unchanged."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from mmtransnext.datasets import demo_data
from mmtransnext.datasets.demo_data import (DET_CLASSES, SEG_CLASSES,
                                            ensure_demo_data,
                                            generate_demo_data, is_complete)

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, SIZE = 6, 3, (96, 128)


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    generate_demo_data(str(root), num_train=N_TRAIN, num_val=N_VAL, size=SIZE,
                       seed=3)
    return root


def _digest(root: Path):
    h = hashlib.sha256()
    for p in sorted(root.rglob('*')):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_determinism(demo_root, tmp_path):
    coco, ade = demo_root / 'coco', demo_root / 'ade'
    assert len(list((coco / 'train').glob('*.jpg'))) == N_TRAIN
    assert len(list((coco / 'val').glob('*.jpg'))) == N_VAL
    for split, n in (('training', N_TRAIN), ('validation', N_VAL)):
        assert len(list((ade / 'images' / split).glob('*.jpg'))) == n
        assert len(list((ade / 'annotations' / split).glob('*.png'))) == n
    assert is_complete(str(demo_root), num_train=N_TRAIN, num_val=N_VAL,
                       size=SIZE, seed=3)
    assert not is_complete(str(demo_root), num_train=N_TRAIN + 1,
                           num_val=N_VAL, size=SIZE, seed=3)
    # the same settings give the same bytes
    again = tmp_path / 'again'
    generate_demo_data(str(again), num_train=N_TRAIN, num_val=N_VAL,
                       size=SIZE, seed=3)
    assert _digest(again) == _digest(demo_root)
    # a different seed gives different images
    other = tmp_path / 'other'
    generate_demo_data(str(other), num_train=2, num_val=1, size=SIZE, seed=4,
                       formats=('coco', ))
    a = (demo_root / 'coco' / 'train' / '000000.jpg').read_bytes()
    assert (other / 'coco' / 'train' / '000000.jpg').read_bytes() != a


def test_ensure_regenerates_only_when_needed(tmp_path):
    calls = []
    settings = dict(num_train=2, num_val=1, size=(64, 64), seed=0)
    ensure_demo_data(str(tmp_path), logger=calls.append, **settings)
    ensure_demo_data(str(tmp_path), logger=calls.append, **settings)
    assert len(calls) == 1
    stamp = tmp_path / demo_data.STAMP_NAME
    stamp.write_text('{"version": -1}')  # stale or interrupted generation
    ensure_demo_data(str(tmp_path), logger=calls.append, **settings)
    assert len(calls) == 2 and is_complete(str(tmp_path), **settings)


def test_coco_json(demo_root):
    ann = json.loads(
        (demo_root / 'coco' / 'annotations' / 'instances_train.json')
        .read_text())
    assert [c['name'] for c in ann['categories']] == list(DET_CLASSES)
    assert [c['id'] for c in ann['categories']] == [1, 2, 3]
    assert len(ann['images']) == N_TRAIN
    assert all(im['height'] == SIZE[0] and im['width'] == SIZE[1]
               for im in ann['images'])
    assert ann['annotations'], 'no objects at all'
    for a in ann['annotations']:
        x, y, w, h = a['bbox']
        poly = np.asarray(a['segmentation'][0]).reshape(-1, 2)
        assert len(poly) >= 3 and a['iscrowd'] == 0
        assert np.allclose(poly.min(0), [x, y], atol=0.02)
        assert np.allclose(poly.max(0), [x + w, y + h], atol=0.03)
        assert 0 <= x and x + w <= SIZE[1] and 0 <= y and y + h <= SIZE[0]
        assert 0 < a['area'] <= w * h + 1e-3


def test_mmdet_coco_dataset_reads_it(demo_root):
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.transforms import LoadAnnotations
    from mmcv.transforms import LoadImageFromFile

    ann = json.loads(
        (demo_root / 'coco' / 'annotations' / 'instances_val.json')
        .read_text())
    ds = CocoDataset(
        data_root=str(demo_root / 'coco'),
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        metainfo=dict(classes=DET_CLASSES),
        pipeline=[
            LoadImageFromFile(),
            LoadAnnotations(with_bbox=True, with_mask=True)
        ])
    assert len(ds) == N_VAL
    assert ds.metainfo['classes'] == DET_CLASSES
    assert ds.cat_ids == [1, 2, 3]
    n_objects = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item['img'].shape == (*SIZE, 3)
        masks = item['gt_masks'].to_ndarray()
        labels = item['gt_bboxes_labels']
        assert masks.shape == (len(labels), *SIZE)
        assert len(labels) >= 1 and set(labels.tolist()) <= {0, 1, 2}
        assert (masks.sum((1, 2)) > 0).all()
        n_objects += len(labels)
    assert n_objects == len(ann['annotations'])


def test_mmseg_dataset_reads_it_and_agrees_with_coco(demo_root):
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.transforms import LoadAnnotations as DetLoadAnn
    from mmseg.datasets import BaseSegDataset
    from mmseg.datasets.transforms import LoadAnnotations

    ds = BaseSegDataset(
        data_root=str(demo_root / 'ade'),
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        metainfo=dict(classes=SEG_CLASSES),
        pipeline=[LoadImageFromFile(), LoadAnnotations()])
    assert len(ds) == N_VAL
    assert ds.metainfo['classes'] == SEG_CLASSES
    det = CocoDataset(
        data_root=str(demo_root / 'coco'),
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        metainfo=dict(classes=DET_CLASSES),
        pipeline=[LoadImageFromFile(),
                  DetLoadAnn(with_bbox=True, with_mask=True)])
    for i in range(len(ds)):
        seg = ds[i]['gt_seg_map']
        assert seg.shape == SIZE
        # reduce_zero_label: 1..4 -> 0..3; nothing is unlabelled
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        assert (seg == 0).any()
        inst = det[i]
        masks = inst['gt_masks'].to_ndarray().astype(bool)
        for mask, label in zip(masks, inst['gt_bboxes_labels']):
            # the same shape, same class, in both formats
            agree = (seg[mask] == label + 1).mean()
            assert agree > 0.97, (i, label, agree)
        assert ((seg > 0) == masks.any(0)).mean() > 0.98


def test_demo_configs_build_the_datasets(demo_root):
    """The demo configs' own dataset settings read the generated folders."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    det_cfg = Config.fromfile(
        str(REPO / 'configs/demo/mask-rcnn_transnext-demo_shapes.py'))
    seg_cfg = Config.fromfile(
        str(REPO / 'configs/demo/upernet_transnext-demo_shapes.py'))
    import mmdet.datasets  # noqa: F401  (registers)
    import mmseg.datasets  # noqa: F401
    from mmdet.registry import DATASETS as DET_DATASETS
    from mmseg.registry import DATASETS as SEG_DATASETS

    for cfg, registry, scope, root, n in (
        (det_cfg, DET_DATASETS, 'mmdet', demo_root / 'coco', N_TRAIN),
        (seg_cfg, SEG_DATASETS, 'mmseg', demo_root / 'ade', N_TRAIN),
    ):
        dcfg = cfg.train_dataloader.dataset.copy()
        dcfg['data_root'] = str(root)
        with DefaultScope.overwrite_default_scope(scope):
            ds = registry.build(dcfg)
            assert len(ds) == n
            item = ds[0]
        assert 'inputs' in item and 'data_samples' in item
        assert item['inputs'].shape[-2:] == (192, 256)  # Resize to 256 wide
