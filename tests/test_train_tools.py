"""tools/train.py, tools/test.py and tools/dist_train.sh on a few demo images.

A shrunk TransNeXt and tiny heads on 128 x 128 demo images keep each run to
seconds: training lowers the loss, test.py reports COCO metrics, an interrupted
run resumes from its saved iteration with the same optimizer state (through
torch.load's default weights_only mode), and two gloo processes train.
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
DEMO_CFG = REPO / 'configs/demo/mask-rcnn_transnext-demo_shapes.py'
SIZE = 128
SMALL_ARCH = dict(
    embed_dims=[16, 32, 64, 128],
    num_heads=[1, 2, 4, 8],
    depths=[1, 1, 1, 1],
    mlp_ratios=[2, 2, 2, 2],
    sr_ratios=[8, 4, 2, 1],
    window_size=[3, 3, 3, None])


def _env():
    # The tools import the same mmtransnext as this process: the checkout's own, or
    # an installed one (tests run from outside the tree).
    import mmtransnext
    package_parent = str(Path(mmtransnext.__file__).resolve().parents[1])
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (package_parent, env.get('PYTHONPATH')) if p)
    env.setdefault('OMP_NUM_THREADS', '1')
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    return env


def _run(cmd, timeout=300, **kwargs):
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f'{cmd} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}')
    return proc


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'_tool_{name}',
                                                  TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Demo data (8 train, 4 val images of 128 px) and a shrunk demo config."""
    from mmengine.config import Config

    from mmtransnext.datasets.demo_data import generate_demo_data

    root = tmp_path_factory.mktemp('tools')
    data = root / 'data'
    generate_demo_data(str(data), num_train=8, num_val=4, size=(SIZE, SIZE),
                       seed=1)
    coco = str(data / 'coco') + '/'

    cfg = Config.fromfile(str(DEMO_CFG))
    for loader in (cfg.train_dataloader, cfg.val_dataloader,
                   cfg.test_dataloader):
        loader.dataset.data_root = coco
        for t in loader.dataset.pipeline:
            if t['type'] == 'Resize':
                t['scale'] = (SIZE, SIZE)
    cfg.train_dataloader.batch_size = 2
    for ev in (cfg.val_evaluator, cfg.test_evaluator):
        ev.ann_file = coco + 'annotations/instances_val.json'
    ch = 32
    m = cfg.model
    m.backbone.arch = SMALL_ARCH
    m.backbone.img_size = m.backbone.pretrain_size = SIZE
    m.neck.in_channels = SMALL_ARCH['embed_dims']
    m.neck.out_channels = ch
    m.rpn_head.in_channels = m.rpn_head.feat_channels = ch
    m.roi_head.bbox_roi_extractor.out_channels = ch
    m.roi_head.mask_roi_extractor.out_channels = ch
    m.roi_head.bbox_head.in_channels = ch
    m.roi_head.bbox_head.fc_out_channels = 64
    m.roi_head.mask_head.update(
        num_convs=1, in_channels=ch, conv_out_channels=ch)
    cfg.optim_wrapper.optimizer.lr = 5e-4
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.3, by_epoch=False, begin=0,
             end=3)
    ]
    cfg.train_cfg.max_iters = 20
    cfg.train_cfg.val_interval = 1000
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 10
    cfg.default_hooks.checkpoint.max_keep_ckpts = -1
    cfg.log_processor.window_size = 1
    path = root / 'tiny_mask_rcnn.py'
    cfg.dump(str(path))
    return dict(root=root, cfg=path)


def _scalars(work_dir):
    """Training losses from MMEngine's scalars.json files, by iteration."""
    losses = {}
    for f in sorted(Path(work_dir).glob('*/vis_data/scalars.json')):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if 'loss' in rec:
                losses[rec['iter']] = rec['loss']
    return losses


def test_train_lowers_loss_and_test_reports_coco(tiny):
    work = tiny['root'] / 'train'
    # two images in every batch: the loss must fall as the model fits them
    _run([
        sys.executable, TOOLS / 'train.py', tiny['cfg'], '--work-dir', work,
        '--no-validate', '--amp',  # --amp: only a warning on the CPU
        '--cfg-options', 'train_dataloader.dataset.indices=2'
    ])
    losses = _scalars(work)
    assert sorted(losses) == list(range(1, 21))
    first = sum(losses[i] for i in range(1, 5)) / 4
    last = sum(losses[i] for i in range(17, 21)) / 4
    assert last < 0.75 * first, losses
    ckpt = work / 'iter_20.pth'
    assert ckpt.is_file()

    out = tiny['root'] / 'preds.pkl'
    proc = _run([
        sys.executable, TOOLS / 'test.py', tiny['cfg'], ckpt, '--work-dir',
        tiny['root'] / 'test', '--out', out
    ])
    metrics = dict(
        re.findall(r'^(coco/\w+): (-?[\d.]+)$', proc.stdout, re.M))
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP'):
        assert key in metrics, proc.stdout[-3000:]
        assert -1 <= float(metrics[key]) <= 1
    assert 'task/s' in proc.stdout  # the progress bar
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 4 and 'pred_instances' in preds[0]


@pytest.mark.skipif(
    not hasattr(torch.library, 'register_fake'),
    reason=f'torch {torch.__version__} (< 2.4): its Dynamo fails inside mmengine\'s data '
    'preprocessor (stack_batch asserts on a list of tensors) before any TransNeXt code; '
    'seen on torch 2.1.2')
def test_compile_config_trains(tiny):
    """mmengine's ``compile`` setting (the config's ``compile=True``, here with the
    aot_eager backend: Dynamo and AOTAutograd as inductor would see them, without
    inductor's CPU code generation time) compiles the detector's train_step and trains."""
    work = tiny['root'] / 'compiled'
    _run([
        sys.executable, TOOLS / 'train.py', tiny['cfg'], '--work-dir', work, '--no-validate',
        '--cfg-options', 'compile.backend=aot_eager', 'train_cfg.max_iters=3',
        'train_dataloader.dataset.indices=2', 'default_hooks.checkpoint.interval=3'
    ], timeout=900)
    losses = _scalars(work)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    log = next(work.glob('*/*.log')).read_text()
    assert "compile = dict(backend='aot_eager')" in log, log[:3000]
    assert 'Model has been "compiled"' in log  # mmengine's Runner wrapped train_step


def test_resume_continues_iteration_and_optimizer_state(tiny):
    """Kill a run mid-way, resume it; the Runner starts from the saved
    iteration with the saved optimizer state (loaded with weights_only)."""
    from mmengine.config import Config
    from mmengine.hooks import Hook

    import mmtransnext.engine  # noqa: F401  (weights_only allowlist)

    work = tiny['root'] / 'resume'
    cmd = [
        sys.executable, TOOLS / 'train.py', tiny['cfg'], '--work-dir', work,
        '--no-validate', '--cfg-options', 'train_cfg.max_iters=1000',
        'default_hooks.checkpoint.interval=3'
    ]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = work / 'last_checkpoint'
    deadline = time.time() + 240
    try:
        while not marker.exists() and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)  # the interruption
        proc.wait()
    assert marker.exists(), 'no checkpoint before the deadline'
    saved_path = marker.read_text().strip()
    # weights_only is torch's default here; no weights_only=False anywhere
    saved = torch.load(saved_path, map_location='cpu')
    start = saved['meta']['iter']
    assert start % 3 == 0 and start > 0

    train_tool = _load_tool('train')
    args = train_tool.parse_args([
        str(tiny['cfg']), '--work-dir',
        str(work), '--resume', '--no-validate', '--cfg-options',
        f'train_cfg.max_iters={start + 2}', 'default_hooks.checkpoint.interval=1'
    ])
    cfg = Config.fromfile(args.config)
    train_tool.apply_args(cfg, args)
    seen = {}

    class Capture(Hook):
        def before_train(self, runner):
            seen['iter'] = runner.iter
            seen['optim'] = copy.deepcopy(runner.optim_wrapper.state_dict())

    runner = train_tool.build_runner(cfg)
    runner.register_hook(Capture(), priority='VERY_HIGH')
    runner.train()

    assert seen['iter'] == start
    got, want = seen['optim'], saved['optimizer']
    assert got['param_groups'][0]['lr'] == want['param_groups'][0]['lr']
    assert set(got['state']) == set(want['state']) and want['state']
    for k, st in want['state'].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(got['state'][k][name]),
                               torch.as_tensor(value)), (k, name)
    final = torch.load(work / f'iter_{start + 2}.pth', map_location='cpu')
    assert final['meta']['iter'] == start + 2
    step = next(iter(final['optimizer']['state'].values()))['step']
    assert int(step) == start + 2  # AdamW kept counting, did not restart


def test_weights_only_allowlist_applied_only_where_torch_needs_it():
    """torch >= 2.6 loads weights-only by default, and MMEngine's types are on its
    allowlist; older torches load whole pickles and their allowlist is untouched."""
    import io

    from mmengine.logging import HistoryBuffer

    from mmtransnext.engine import torch_loads_weights_only

    buf = io.BytesIO()
    torch.save({'x': argparse.Namespace()}, buf)  # a class no allowlist names
    buf.seek(0)
    try:
        torch.load(buf)
        default_is_weights_only = False
    except pickle.UnpicklingError:
        default_is_weights_only = True
    assert torch_loads_weights_only() == default_is_weights_only
    get_safe_globals = getattr(torch.serialization, 'get_safe_globals', None)
    allowed = get_safe_globals() if get_safe_globals else []
    assert (HistoryBuffer in allowed) == torch_loads_weights_only()


def test_weights_only_allowlist_stays_narrow():
    """The allowlist opens MMEngine's types, not arbitrary calls."""
    import io

    from mmtransnext.engine import torch_loads_weights_only
    if not torch_loads_weights_only():
        pytest.skip(f'torch {torch.__version__} does not load weights-only by '
                    'default, so mmtransnext installs no allowlist there')

    import numpy as np
    from mmengine.logging import HistoryBuffer

    from mmtransnext.engine import history_buffer_getattr

    def load(reduce_value):
        class Obj:
            def __reduce__(self):
                return reduce_value

        buf = io.BytesIO()
        torch.save({'x': Obj()}, buf)
        buf.seek(0)
        return torch.load(buf)

    # what MMEngine's checkpoints need
    assert load((getattr, (HistoryBuffer, 'mean')))['x'] is HistoryBuffer.mean
    # getattr on allowed globals, but not a HistoryBuffer statistics method
    for target in ((np.ndarray, 'tofile'), (HistoryBuffer, '__init__'),
                   (HistoryBuffer, '__class__'), (np.ndarray, '__new__')):
        with pytest.raises(pickle.UnpicklingError):
            load((getattr, target))
    with pytest.raises(pickle.UnpicklingError):
        load((os.system, ('true', )))
    with pytest.raises(pickle.UnpicklingError):
        history_buffer_getattr(os, 'system')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_gloo_training(tiny):
    work = tiny['root'] / 'dist'
    env = _env()
    env['PORT'] = str(_free_port())
    env['PYTHON'] = sys.executable
    proc = subprocess.run(
        [
            'bash',
            str(TOOLS / 'dist_train.sh'),
            str(tiny['cfg']), '2', '--work-dir',
            str(work), '--no-validate', '--cfg-options',
            'train_cfg.max_iters=3', 'default_hooks.checkpoint.interval=3'
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / 'iter_3.pth').is_file()
    log = next(work.glob('*/*.log')).read_text()
    assert 'Distributed training: True' in log
    assert re.search(r'GPU number: 2\b', log)  # MMEngine's name for world size
    assert "'backend': 'gloo'" in log
    assert sorted(_scalars(work)) == [1, 2, 3]


@pytest.mark.parametrize('config', [
    DEMO_CFG, REPO / 'configs/demo/upernet_transnext-demo_shapes.py'
])
def test_demo_max_iters_fits_the_whole_schedule(config):
    """run_demo.py --max-iters N shortens the schedule, not just the loop."""
    from mmengine.config import Config, DictAction
    run_demo = _load_tool('run_demo')
    cfg = Config.fromfile(config)
    warmup_end = cfg.param_scheduler[0].end
    parser = argparse.ArgumentParser()
    parser.add_argument('--opts', nargs='+', action=DictAction)
    options = run_demo.schedule_options(str(config), 300)
    cfg.merge_from_dict(parser.parse_args(['--opts', *options]).opts)
    assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == 300
    warmup, cosine = cfg.param_scheduler
    assert warmup.end == warmup_end                       # warm-up keeps its length
    assert cosine.begin == warmup_end and cosine.end == 300
    assert cosine.T_max == 300 - warmup_end
    with pytest.raises(ValueError, match='must be above'):
        run_demo.schedule_options(str(config), warmup_end)
