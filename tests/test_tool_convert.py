"""tools/convert_checkpoint.py: released layouts -> strict loads into our configs' models."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtransnext import TransNeXt
from mmtransnext.tools import convert as cv
from mmtransnext.tools.common import build_model, load_config, task_of

import tool_configs as tc

REPO = Path(__file__).resolve().parents[1]

FAMILIES = {
    # family: (source, builder of the released layout)
    'mask-rcnn': (cv.MASK_RCNN, tc.released_mmdet2),
    'dino': (cv.DINO, lambda s: tc.released_mmengine(s, ('mmdet_version', '3.0.0'))),
    'upernet': (cv.UPERNET, tc.released_mmseg0),
    'mask2former': (cv.MASK2FORMER, lambda s: tc.released_mmengine(s, ('mmseg_version', '1.0.0'))),
}


def _same(a, b):
    """Equal bit for bit; NaN matches NaN (a freshly built DINO's ``level_embed`` is
    uninitialised memory, which can hold NaN)."""
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True,
                                   msg=name)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_dense_conversion_loads_strictly(family, tmp_path):
    source, released_layout = FAMILIES[family]
    cfg = load_config(str(tc.write_config(tmp_path, family)))
    assert task_of(cfg) == ('det' if family in ('mask-rcnn', 'dino') else 'seg')
    trained = build_model(cfg).state_dict()
    released = released_layout(trained)
    path = tmp_path / 'released.pth'
    torch.save(released, path)

    loaded = cv.load_released(str(path))
    assert cv.detect_source(loaded) == source
    converted, report = cv.convert_checkpoint(loaded)
    assert set(converted) == {'meta', 'state_dict'}          # optimizer & co. dropped
    assert 'optimizer' in report.dropped_entries
    assert report.renamed == []                             # no family renamed anything
    assert converted['meta']['dataset_meta']['classes'] == tc.CLASSES
    assert converted['meta']['converted_from']['source'] == source

    fresh = build_model(cfg)
    assert cv.check_against_model(converted['state_dict'], fresh, report), report.format()
    assert report.loads_strictly
    _same(fresh.state_dict(), trained)
    text = report.format()
    assert 'strict load: OK' in text and 'missing keys: 0' in text
    if family == 'mask-rcnn':   # the stored reference tables are dropped and reported
        assert {n for n, _ in report.dropped} == {'backbone.relative_pos_index1',
                                                  'backbone.relative_coords_table1'}
        assert "CLASSES -> dataset_meta['classes']" in report.meta_changes
        assert converted['meta']['converted_from']['mmdet_version'] == '2.28.2'
    if family == 'upernet':
        assert converted['meta']['dataset_meta']['palette'] == tc.PALETTE


def test_imagenet_conversion_and_report():
    model = TransNeXt(arch=tc.SMALL_ARCH)
    released = tc.released_imagenet(model.state_dict())
    assert cv.detect_source(released) == cv.IMAGENET
    converted, report = cv.convert_checkpoint(released)
    assert {n for n, _ in report.dropped} == {'head.weight', 'head.bias'}
    assert set(report.dropped_entries) == {'optimizer', 'epoch', 'lr_scheduler',
                                           'max_accuracy', 'args'}
    fresh = TransNeXt(arch=tc.SMALL_ARCH)
    assert cv.check_against_model(converted['state_dict'], fresh, report)
    _same(fresh.state_dict(), model.state_dict())
    # A model the weights do not fit: reported, not loaded.
    other = TransNeXt(arch=dict(tc.SMALL_ARCH, depths=[1, 1, 2, 1]))
    assert not cv.check_against_model(converted['state_dict'], other, report)
    assert report.missing and report.missing[0].startswith('block3.1.')
    assert 'strict load: FAILED' in report.format()


def test_renames_wrapper_prefix_and_rules():
    weights = {'module.backbone.norm1.weight': torch.ones(2), 'module.neck.x': torch.ones(1)}
    out, renamed = cv.strip_wrapper_prefix(weights)
    assert set(out) == {'backbone.norm1.weight', 'neck.x'} and len(renamed) == 2
    out, renamed = cv.apply_renames(out, [(r'^neck\.x$', 'neck.y', 'test')])
    assert 'neck.y' in out and renamed == [('neck.x', 'neck.y', 'test')]
    with pytest.raises(ValueError, match='collides'):
        cv.apply_renames({'a': 1, 'b': 2}, [('^a$', 'b', 'x')])
    with pytest.raises(ValueError, match='cannot tell'):
        cv.detect_source({'state_dict': {'foo.weight': torch.ones(1)}})


def test_cli_converts_imagenet_and_dense(tmp_path):
    model = TransNeXt(arch=tc.SMALL_ARCH)
    cfg_path = tc.write_config(tmp_path, 'upernet')
    cfg = load_config(str(cfg_path))
    seg = build_model(cfg)
    torch.save(tc.released_mmseg0(seg.state_dict()), tmp_path / 'upernet_old.pth')
    if not tc.NAMESPACE_LOADS:
        torch.save(tc.released_imagenet(model.state_dict()), tmp_path / 'cls_args.pth')
        with pytest.raises(RuntimeError, match='argparse.Namespace'):
            cv.load_released(str(tmp_path / 'cls_args.pth'))
    torch.save(tc.released_imagenet(model.state_dict(), with_args=tc.NAMESPACE_LOADS),
               tmp_path / 'cls.pth')
    run = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'),
         str(tmp_path / 'upernet_old.pth'), str(tmp_path / 'upernet_new.pth'),
         '--config', str(cfg_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'source: mmseg0-upernet' in run.stdout
    assert 'strict load: OK' in run.stdout
    assert 'dropped entries: optimizer' in run.stdout
    new = torch.load(tmp_path / 'upernet_new.pth', weights_only=True)
    fresh = build_model(cfg)
    fresh.load_state_dict(new['state_dict'], strict=True)
    assert new['meta']['dataset_meta']['classes'] == tc.CLASSES
    # The ImageNet file through the library's reader and writer (no subprocess: the
    # CLI path is the same main()).
    from importlib import util
    spec = util.spec_from_file_location('convert_cli', REPO / 'tools' / 'convert_checkpoint.py')
    cli = util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main([str(tmp_path / 'cls.pth'), str(tmp_path / 'cls_new.pth'),
                     '--config', str(cfg_path)])
    assert code == 0
    backbone = torch.load(tmp_path / 'cls_new.pth', weights_only=True)['state_dict']
    TransNeXt(arch=tc.SMALL_ARCH).load_state_dict(backbone, strict=True)
    with pytest.raises(SystemExit, match='exists'):
        cli.main([str(tmp_path / 'cls.pth'), str(tmp_path / 'cls_new.pth')])


def _cli():
    from importlib import util
    spec = util.spec_from_file_location('convert_cli', REPO / 'tools' / 'convert_checkpoint.py')
    cli = util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_writes_nothing_when_the_strict_check_fails(tmp_path, capsys):
    cli = _cli()
    torch.save(tc.released_imagenet(TransNeXt(arch=tc.SMALL_ARCH).state_dict(),
                                    with_args=tc.NAMESPACE_LOADS), tmp_path / 'cls.pth')
    dst = tmp_path / 'out' / 'cls_new.pth'
    # The released layout of the small arch against the micro variant: does not fit.
    assert cli.main([str(tmp_path / 'cls.pth'), str(dst), '--arch', 'micro']) == 1
    out = capsys.readouterr().out
    assert 'strict load: FAILED' in out and 'not written' in out
    assert not dst.exists() and not list(tmp_path.glob('out/.*tmp'))
    # The rerun with the right target needs no --force: nothing was left behind.
    fits = tc.write_config(tmp_path, 'upernet')
    assert cli.main([str(tmp_path / 'cls.pth'), str(dst), '--config', str(fits)]) == 0
    assert dst.is_file() and [p.name for p in dst.parent.iterdir()] == ['cls_new.pth']


def test_cli_reports_a_missing_source_as_missing(tmp_path):
    with pytest.raises(SystemExit) as stop:
        _cli().main([str(tmp_path / 'nope.pth'), str(tmp_path / 'new.pth')])
    message = str(stop.value)
    assert 'nope.pth: no such file' in message and 'trust' not in message
    assert not (tmp_path / 'new.pth').exists()
    # A file that is not a weights-only checkpoint still gets the trust message.
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    with pytest.raises(RuntimeError, match='as weights only'):
        cv.load_released(str(tmp_path / 'text.pth'))
