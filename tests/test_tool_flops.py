"""tools/get_flops.py: the compiled op and the banded attention are counted."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtransnext import TransNeXt
from mmtransnext.models.attention import AggregatedAttention
from mmtransnext.ops import DISABLE_ENV
from mmtransnext.tools import flops as fl
from mmtransnext.tools.common import load_config

import tool_configs as tc

REPO = Path(__file__).resolve().parents[1]
# Two blocks in stage 1: the case the banded autograd.Function does not trace.
ARCH = dict(tc.SMALL_ARCH, depths=[2, 1, 1, 1])
SIZE = (64, 96)


def _window_macs(model, size):
    """2 * B*h*N*L*d per aggregated-attention block (logits + aggregation)."""
    total, height, width = 0, size[0], size[1]
    for stage in range(model.num_stages):
        conv = getattr(model, f'patch_embed{stage + 1}').proj
        height = (height + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        width = (width + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        for block in getattr(model, f'block{stage + 1}'):
            if isinstance(block.attn, AggregatedAttention):
                a = block.attn
                total += 2 * a.num_heads * height * width * a.local_len * a.head_dim
    return total


def test_compiled_op_counted_and_paths_agree(monkeypatch):
    model = TransNeXt(arch=ARCH, img_size=64).eval()
    image = (torch.randn(1, 3, *SIZE), )
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    default, unsupported = fl.count_flops(model, image)
    assert not any(k.startswith('mmtransnext::') or 'PythonOp' in k for k in unsupported)
    without, unsupported = fl.count_flops(model, image, handles=False)
    assert fl.LOGITS_OP in unsupported and fl.AGGREGATE_OP in unsupported
    assert default - without == _window_macs(model, SIZE)
    # The released formulation (unfold + matmul, whole bias) counts the same
    # matmuls, plus the bias MLP it evaluates on every forward.
    monkeypatch.setenv(DISABLE_ENV, '1')
    analyzer = fl.analyze(model, image)
    cpb = sum(v for k, v in analyzer.by_module().items() if k.split('.')[-1] in
              ('cpb_fc1', 'cpb_fc2'))
    assert cpb > 0
    assert abs(analyzer.total() - cpb - default) <= 0.01 * default


def test_banded_function_handle():
    """One block a stage traces through the autograd.Function: the handle counts it
    as the plain-op version's matmuls are counted."""
    model = TransNeXt(arch=tc.SMALL_ARCH, img_size=64).eval()
    image = (torch.randn(1, 3, 64, 64), )
    swapped, _ = fl.count_flops(model, image)
    traced, unsupported = fl.count_flops(model, image, swap_banded=False)
    assert fl.BANDED_OP not in unsupported
    assert traced == swapped
    _, unsupported = fl.count_flops(model, image, handles=False, swap_banded=False)
    assert unsupported[fl.BANDED_OP] == 4     # three aggregated stages + the full one


def test_backbone_params_match_published():
    # The spec's counts include the 1000-class head: C4 * 1000 + 1000.
    assert fl.backbone_complexity('micro', (32, 32))['params'] == 12_809_304 - (384 * 1000 + 1000)


def test_whole_model_and_cli(tmp_path):
    cfg_path = tc.write_config(tmp_path, 'mask-rcnn')
    cfg = load_config(str(cfg_path))
    cfg.model.test_cfg.rpn.update(nms_pre=100, max_per_img=20)   # keep the RoI heads small
    result = fl.model_complexity(cfg, (96, 128))
    assert result['input'] == (96, 128)     # pad_size_divisor 32
    assert result['flops'] > result['backbone_flops'] > 0
    assert result['params'] > result['backbone_params']
    seg = tc.write_config(tmp_path, 'upernet')
    out = tmp_path / 'table.md'
    run = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'get_flops.py'), '--archs', 'micro',
         '--sizes', '64x64', '--configs', str(seg), '--model-flops', '--model-size', '64x64',
         '--out', str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert '| backbone | params | FLOPs 64x64 |' in run.stdout
    assert '| micro    | 12.42M |' in run.stdout
    assert 'small_upernet' in run.stdout and out.read_text().startswith('Backbone')
