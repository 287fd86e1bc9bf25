"""The supported torch range, how the package reaches its configs once installed.

The op itself is tested on every torch of the range by ``tests/test_ops.py`` (run there
with ``make test-compat TORCH=...``); these tests cover what decides per torch version.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmtransnext
from mmtransnext import version

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('torch_version,supported', [
    ('2.0.1', False), ('2.1.0', True), ('2.1.2+cu121', True), ('2.5.1+cpu', True),
    ('2.13.0', True), ('2.13.1+cu130', True), ('2.14.0', False), ('3.0.0a0+git1', False)])
def test_supported_range(torch_version, supported):
    message = version.unsupported_torch_message(torch_version)
    assert (message is None) == supported
    if not supported:
        assert 'torch 2.1 to 2.13' in message and torch_version in message


def test_cxx_standard_follows_torch_headers():
    assert version.cxx_standard('2.1.2+cu121') == 'c++17'
    assert version.cxx_standard('2.12.1') == 'c++17'
    assert version.cxx_standard('2.13.0') == 'c++20'


def test_unreadable_torch_version_is_an_error():
    with pytest.raises(ValueError, match='torch version'):
        version.torch_release('nightly')


def test_installed_torch_is_in_range():
    assert version.unsupported_torch_message(torch.__version__) is None


def _python_with_torch_version(fake_version, code, cwd=REPO):
    """Run ``code`` in a fresh Python whose torch reports ``fake_version``, importing the
    same mmtransnext as this process (an installed one, or this checkout's)."""
    prelude = f'import torch; torch.__version__ = {fake_version!r}\n'
    env = dict(os.environ, PYTHONPATH=str(Path(mmtransnext.__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, '-c', prelude + code], capture_output=True,
                          text=True, timeout=300, cwd=str(cwd), env=env)


@pytest.mark.parametrize('fake_version', ['2.0.1', '2.14.0'])
def test_import_warns_outside_range(fake_version, tmp_path):
    proc = _python_with_torch_version(fake_version, (
        'import warnings\n'
        'with warnings.catch_warnings(record=True) as caught:\n'
        '    warnings.simplefilter("always")\n'
        '    import mmtransnext\n'
        'print("|".join(str(w.message) for w in caught))\n'), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f'supports torch 2.1 to 2.13; the installed torch {fake_version}' in proc.stdout


def test_setup_refuses_older_torch():
    proc = _python_with_torch_version(
        '2.0.1', 'import runpy, sys; sys.argv = ["setup.py", "--version"]; '
        'runpy.run_path("setup.py", run_name="__main__")')
    assert proc.returncode != 0
    assert 'supports torch 2.1 to 2.13; the installed torch 2.0.1 is older' in proc.stderr


def test_setup_warns_on_newer_torch():
    proc = _python_with_torch_version(
        '2.14.0', 'import runpy, sys; sys.argv = ["setup.py", "--version"]; '
        'runpy.run_path("setup.py", run_name="__main__")')
    assert proc.returncode == 0, proc.stderr
    assert 'the installed torch 2.14.0 is newer than that range' in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == version.__version__


def test_shipped_configs_are_found_and_parse():
    from mmengine.config import Config

    path = mmtransnext.get_config_path('detection/mask-rcnn_transnext-tiny_fpn_1x_coco.py')
    installed = Path(mmtransnext.__file__).parent / '.mim' / 'configs'
    # An installed package reads its own copy, a checkout reads configs/.
    assert Path(path).is_relative_to(installed if installed.is_dir() else REPO / 'configs')
    cfg = Config.fromfile(path)
    assert cfg.model.backbone.type == 'TransNeXt'
    assert 'mmtransnext' in cfg.custom_imports['imports']


def test_unknown_config_name_is_an_error():
    with pytest.raises(FileNotFoundError, match='no config'):
        mmtransnext.get_config_path('detection/no-such-config.py')
