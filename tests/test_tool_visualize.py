"""tools/visualize_attention.py and tools/image_demo.py on a generated image."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mmtransnext import TransNeXt
from mmtransnext.tools import attention_vis as av
from mmtransnext.tools.common import build_model, load_config

import tool_configs as tc

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(tc.SMALL_ARCH, depths=[2, 1, 2, 1])


@pytest.fixture(scope='module')
def image_path(tmp_path_factory):
    img = np.full((96, 128, 3), 235, np.uint8)
    cv2.circle(img, (40, 48), 24, (60, 20, 220), -1)
    cv2.rectangle(img, (80, 20), (120, 60), (255, 120, 0), -1)
    path = tmp_path_factory.mktemp('img') / 'shapes.png'
    cv2.imwrite(str(path), img)
    return path


def _is_png(path, min_size=(100, 100)):
    data = Path(path).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    img = cv2.imread(str(path))
    assert img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1]
    return img


def test_capture_fovea_and_periphery(image_path, tmp_path):
    model = TransNeXt(arch=ARCH, img_size=128).eval()
    image = av.load_image(str(image_path))
    assert image.shape == (96, 128, 3) and image[48, 40].tolist() == [220, 20, 60]   # RGB
    records = av.capture_attention(model, av.to_input(image))
    # Stages 1-3 aggregate (stage 4 is full attention); the last block of each.
    assert [(r.stage, r.block) for r in records] == [(0, 1), (1, 0), (2, 1)]
    assert [(r.height, r.width) for r in records] == [(24, 32), (12, 16), (6, 8)]
    assert [r.pool_size for r in records] == [(3, 4), (3, 4), (3, 4)]
    assert all(not block._forward_hooks and not block._forward_pre_hooks
               for block in model.modules())
    # The hooks see what the block's own attention sees.
    x = av.to_input(image)
    tokens = {}
    model.block3[1].norm1.register_forward_hook(lambda m, a, o: tokens.setdefault('x', o))
    with torch.no_grad():
        model(x)
    local, pooled = model.block3[1].attn.attention_maps(tokens['x'], 6, 8)
    assert torch.equal(local[0], records[2].local) and torch.equal(pooled[0], records[2].pooled)

    pixel = (50, 41)
    for record in records:
        token = av.pixel_token(pixel, (96, 128), (record.height, record.width))
        assert record.stride == 4 * 2**record.stage
        assert token == (pixel[0] // record.stride, pixel[1] // record.stride)
        fovea, periphery = av.pixel_weights(record, token)
        assert fovea.shape == (3, 3) and periphery.shape == record.pool_size
        assert abs(fovea.sum() + periphery.sum() - 1) < 1e-5
        # head=K gives head K's own weights (one softmax each); 'mean' their average.
        heads = record.local.shape[0]
        per_head = [av.pixel_weights(record, token, head=h) for h in range(heads)]
        n = token[0] * record.width + token[1]
        for h, (local, pooled) in enumerate(per_head):
            assert np.array_equal(local, record.local[h, n].reshape(3, 3).numpy())
            assert abs(local.sum() + pooled.sum() - 1) < 1e-5
        np.testing.assert_allclose(np.mean([w[0] for w in per_head], 0), fovea, atol=1e-6)
        np.testing.assert_allclose(np.mean([w[1] for w in per_head], 0), periphery, atol=1e-6)
        if heads > 1:   # random heads differ, so a head that is ignored shows
            assert not np.allclose(per_head[0][0], per_head[1][0])
        with pytest.raises(ValueError, match='out of range'):
            av.pixel_weights(record, token, head=heads)
    corner = av.pixel_weights(records[0], (0, 0))[0]
    assert (corner[0] == 0).all() and (corner[:, 0] == 0).all()   # outside the map
    with pytest.raises(ValueError, match='outside'):
        av.pixel_token((96, 0), (96, 128), (24, 32))
    shares = av.draw(image, records, pixel, str(tmp_path / 'att.png'))
    assert set(shares) == {1, 2, 3}
    _is_png(tmp_path / 'att.png')


def test_strides_follow_the_models_patch_size(image_path, tmp_path, monkeypatch):
    """Stage strides are patch_size * 2**stage, in the records and the panel titles."""
    import matplotlib.axes
    model = TransNeXt(arch=ARCH, img_size=128, patch_size=2).eval()
    image = av.load_image(str(image_path))
    records = av.capture_attention(model, av.to_input(image))
    assert [(r.stride, r.height, r.width) for r in records] == [
        (2, 48, 64), (4, 24, 32), (8, 12, 16)]
    pixel = (50, 41)
    for record in records:
        token = av.pixel_token(pixel, (96, 128), (record.height, record.width))
        assert token == (pixel[0] // record.stride, pixel[1] // record.stride)
    titles = []
    set_title = matplotlib.axes.Axes.set_title

    def record_title(ax, text, *args, **kwargs):
        titles.append(text)
        return set_title(ax, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, 'set_title', record_title)
    av.draw(image, records, pixel, str(tmp_path / 'att.png'))
    assert [t.split(')')[0] for t in titles] == [
        'stage 1 (block 2, stride 2', 'stage 2 (block 1, stride 4', 'stage 3 (block 2, stride 8']


def test_visualize_cli(image_path, tmp_path):
    script = str(REPO / 'tools' / 'visualize_attention.py')
    run = subprocess.run([sys.executable, script, str(image_path), '--pixel', '10,10',
                          '--out', str(tmp_path / 'x.png')], capture_output=True, text=True)
    assert run.returncode != 0 and 'refusing' in run.stderr
    assert not (tmp_path / 'x.png').exists()
    # A detector-style checkpoint of the config's whole model: the backbone is taken.
    cfg_path = tc.write_config(tmp_path, 'upernet')
    model = build_model(load_config(str(cfg_path)))
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, tmp_path / 'seg.pth')
    out = tmp_path / 'att.png'
    run = subprocess.run([sys.executable, script, str(image_path), '--config', str(cfg_path),
                          '--checkpoint', str(tmp_path / 'seg.pth'), '--pixel', '50,41',
                          '--out', str(out)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert 'Loaded' in run.stdout       # load_pretrained's report of the backbone weights
    stages = [line.split(':')[0] for line in lines if line.startswith('stage ')]
    assert stages == ['stage 1', 'stage 2', 'stage 3']
    assert lines[-1] == f'wrote {out}'
    _is_png(out)


def test_image_demo(image_path, tmp_path):
    script = str(REPO / 'tools' / 'image_demo.py')
    det_cfg = tc.write_config(tmp_path, 'mask-rcnn')
    run = subprocess.run([sys.executable, script, str(image_path), str(det_cfg),
                          '--out', str(tmp_path / 'x.png')], capture_output=True, text=True)
    assert run.returncode != 0 and 'refusing to run without weights' in run.stderr
    assert not (tmp_path / 'x.png').exists()
    # Detector, through the CLI, with a checkpoint as convert_checkpoint writes it.
    torch.manual_seed(0)
    det = build_model(load_config(str(det_cfg)))
    meta = {'dataset_meta': {'classes': tc.CLASSES}}
    torch.save({'state_dict': det.state_dict(), 'meta': meta}, tmp_path / 'det.pth')
    out = tmp_path / 'det.png'
    run = subprocess.run([sys.executable, script, str(image_path), str(det_cfg),
                          '--checkpoint', str(tmp_path / 'det.pth'), '--score-thr', '0',
                          '--out', str(out)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'detector:' in run.stdout and f'wrote {out}' in run.stdout
    assert _is_png(out, (96, 128)).shape[:2] == (96, 128)
    # Segmentor, in process.
    sys.path.insert(0, str(REPO / 'tools'))
    try:
        import image_demo
    finally:
        sys.path.pop(0)
    seg_cfg = tc.write_config(tmp_path, 'upernet')
    seg = build_model(load_config(str(seg_cfg)))
    meta = {'dataset_meta': {'classes': tc.CLASSES, 'palette': tc.PALETTE}}
    torch.save({'state_dict': seg.state_dict(), 'meta': meta}, tmp_path / 'seg.pth')
    args = image_demo.parse_args([str(image_path), str(seg_cfg), '--checkpoint',
                                  str(tmp_path / 'seg.pth'), '--out', str(tmp_path / 'seg.png')])
    task, summary = image_demo.run(args)
    assert task == 'seg' and summary.startswith('classes present: ')
    assert set(summary.split(': ')[1].split(', ')) <= set(tc.CLASSES)
    _is_png(tmp_path / 'seg.png', (96, 128))
