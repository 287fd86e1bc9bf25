"""Shared fixtures: the golden files of the released reference, and the two paths."""
import os
from pathlib import Path

import pytest
import torch

from mmtransnext.ops import DISABLE_ENV, extension_available

REPO = Path(__file__).resolve().parents[1]
# The released model's own outputs, shipped with the repository (tests/data/README.md).
GOLDEN = REPO / 'tests' / 'data'
ARCH_KEYS = ('embed_dims', 'num_heads', 'depths', 'mlp_ratios', 'sr_ratios', 'window_size')

# Under pytest-xdist (`make test` runs two workers) the cores are shared among the workers.
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


def _load_golden(name):
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f'golden file {path} is missing: the equality checks against the '
                    'released model cannot run (restore tests/data from git)')
    return torch.load(path, weights_only=True)


@pytest.fixture(scope='session')
def dense_golden():
    """The reference's dense outputs and gradients (see tests/data/README.md)."""
    return _load_golden('transnext_dense_golden.pt')


@pytest.fixture(scope='session')
def cls_golden():
    """The reference classifier's logits, fixed_pool_size None and 3."""
    return _load_golden('transnext_cls_golden.pt')


@pytest.fixture(scope='session')
def official_keys():
    import json
    path = GOLDEN / 'official_state_dict_keys.json'
    if not path.exists():
        pytest.fail(f'{path} is missing (restore tests/data from git)')
    return json.loads(path.read_text())


def golden_arch(golden):
    """TransNeXt keyword arguments of a golden file's model."""
    arch = golden['arch']
    return dict(arch={k: arch[k] for k in ARCH_KEYS}, img_size=arch['img_size'],
                pretrain_size=arch['pretrain_size'], patch_size=arch['patch_size'],
                qkv_bias=arch['qkv_bias'])


@pytest.fixture(params=['compiled', 'reference'])
def attention_path(request, monkeypatch):
    """Run a test on the default (compiled op) path and on the released reference path."""
    if request.param == 'compiled':
        if not extension_available('cpu'):
            pytest.fail('mmtransnext._C is not built for the CPU: run `make ext`')
        monkeypatch.delenv(DISABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(DISABLE_ENV, '1')
    return request.param
