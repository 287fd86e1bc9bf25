"""Command-line options of tools/train.py, tools/test.py, tools/run_demo.py and the
Slurm launchers."""
import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
DET_CFG = REPO / 'configs/demo/mask-rcnn_transnext-demo_shapes.py'
SEG_CFG = REPO / 'configs/demo/upernet_transnext-demo_shapes.py'


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_test_tool_show_options_reach_both_visualization_hooks():
    from mmengine.config import Config
    tool = _load_tool('test')
    args = tool.parse_args([str(DET_CFG), 'ckpt.pth', '--show', '--wait-time', '0.5',
                            '--show-dir', 'pictures'])
    assert args.show and args.wait_time == 0.5 and args.show_dir == 'pictures'
    det = Config.fromfile(str(DET_CFG))
    tool.enable_visualization(det, args.show_dir, args.show, args.wait_time)
    hook = det.default_hooks.visualization
    assert (hook.draw, hook.show, hook.wait_time, hook.test_out_dir) == (
        True, True, 0.5, 'pictures')
    seg = Config.fromfile(str(SEG_CFG))
    tool.enable_visualization(seg, 'pictures')
    hook = seg.default_hooks.visualization
    assert hook.draw and not hook.get('show', False)
    assert seg.visualizer.save_dir == 'pictures'
    # --show alone draws without saving anywhere new.
    det = Config.fromfile(str(DET_CFG))
    tool.enable_visualization(det, None, True, 3.0)
    assert det.default_hooks.visualization.get('test_out_dir') is None
    assert det.default_hooks.visualization.wait_time == 3.0


def test_test_tool_help_names_only_its_own_flags():
    help_text = subprocess.run(
        [sys.executable, str(TOOLS / 'test.py'), '--help'], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, 'PYTHONPATH': str(REPO)}).stdout
    for flag in ('--show ', '--wait-time', '--show-dir', '--out', '--work-dir'):
        assert flag in help_text, flag
    for flag in ('--resume', '--amp'):     # training options, not test.py's
        assert flag not in help_text, flag


def _help(tool, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(['--help'])
    return capsys.readouterr().out


@pytest.mark.parametrize('name', ['train', 'test'])
def test_usage_block_names_every_flag(name, capsys):
    """The docstring's usage lines list every option --help shows."""
    tool = _load_tool(name)
    usage = tool.__doc__.split('\n\n')[1]
    flags = set(re.findall(r'(--[\w-]+)', _help(tool, capsys)))
    flags -= {'--help', '--local_rank', '--local-rank'}   # launchers pass the rank
    assert flags and not {f for f in flags if f not in usage}


def test_amp_is_cuda_only_as_its_help_says(capsys, monkeypatch):
    from mmengine.config import Config
    tool = _load_tool('train')
    amp_help = re.search(r'\n\s+--amp\s+(.*?)\n\s+--', _help(tool, capsys), re.S).group(1)
    assert 'CUDA only' in amp_help and 'NPU' not in amp_help
    args = tool.parse_args([str(DET_CFG), '--amp'])
    for cuda in (True, False):
        monkeypatch.setattr('torch.cuda.is_available', lambda: cuda)
        cfg = Config.fromfile(str(DET_CFG))
        tool.apply_args(cfg, args)
        assert cfg.optim_wrapper.type == ('AmpOptimWrapper' if cuda else 'OptimWrapper')


@pytest.mark.parametrize('config, subdir', [(DET_CFG, 'coco'), (SEG_CFG, 'ade')])
def test_run_demo_data_root_moves_every_data_path(config, subdir, tmp_path):
    from mmengine.config import Config, DictAction
    run_demo = _load_tool('run_demo')
    root = tmp_path / 'elsewhere'
    options = run_demo.data_root_options(str(config), str(root), 'data/demo')
    parser = argparse.ArgumentParser()
    parser.add_argument('--opts', nargs='+', action=DictAction)
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(parser.parse_args(['--opts', *options]).opts)
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[key].dataset.data_root == f'{root / subdir}/', key
    for key in ('val_evaluator', 'test_evaluator'):   # COCO metrics read annotations too
        if 'ann_file' in cfg[key]:
            assert cfg[key].ann_file == str(root / subdir / 'annotations/instances_val.json')
    assert run_demo.data_root_options(str(config), 'data/demo/', 'data/demo') == []


def test_run_demo_data_root_reaches_training_and_evaluation(tmp_path, monkeypatch):
    import mmtransnext.datasets.demo_data as demo_data
    run_demo = _load_tool('run_demo')
    calls = {}
    monkeypatch.setattr(demo_data, 'ensure_demo_data', lambda root: calls.setdefault('data', root))
    monkeypatch.setattr(run_demo, 'train', lambda config, work_dir, options, resume:
                        calls.setdefault('train', options))
    monkeypatch.setattr(run_demo, 'last_checkpoint', lambda work_dir: 'last.pth')
    monkeypatch.setattr(run_demo, 'evaluate', lambda config, work_dir, checkpoint, options:
                        (calls.setdefault('test', options), {'mIoU': 50.0}))
    monkeypatch.setattr(run_demo, 'draw_predictions', lambda *args: None)
    monkeypatch.chdir(tmp_path)     # main() changes into the repository; restored after
    root = tmp_path / 'data'
    run_demo.main(['seg', '--data-root', str(root), '--work-dir', str(tmp_path / 'work'),
                   '--cfg-options', 'val_dataloader.dataset.data_root=mine'])
    assert calls['data'] == str(root) and calls['train'] == calls['test']
    moved = f'val_dataloader.dataset.data_root={root / "ade"}/'
    assert f'train_dataloader.dataset.data_root={root / "ade"}/' in calls['train']
    # The user's own --cfg-options come later, so they win.
    assert calls['train'].index(moved) < calls['train'].index(
        'val_dataloader.dataset.data_root=mine')


@pytest.fixture
def fake_srun(tmp_path):
    """A directory with an ``srun`` that writes its arguments, one per line."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    record = tmp_path / 'srun_args'
    srun = bin_dir / 'srun'
    srun.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    srun.chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
               GPUS='2', GPUS_PER_NODE='2', PYTHON='python-of-the-job')
    return env, record


@pytest.mark.parametrize('script, args, tool_args', [
    ('slurm_test.sh', ['cfg.py', 'ckpt.pth', '--out', 'r.pkl'],
     ['cfg.py', 'ckpt.pth', '--out', 'r.pkl']),
    ('slurm_train.sh', ['cfg.py', 'work', '--amp'], ['cfg.py', '--work-dir=work', '--amp']),
])
def test_slurm_scripts_share_one_srun_command(fake_srun, script, args, tool_args):
    env, record = fake_srun
    subprocess.run(['bash', str(TOOLS / script), 'gpu', 'job1', *args], env=env, check=True,
                   timeout=60)
    tool = 'test.py' if script == 'slurm_test.sh' else 'train.py'
    assert record.read_text().splitlines() == [
        '-p', 'gpu', '--job-name=job1', '--gres=gpu:2', '--ntasks=2', '--ntasks-per-node=2',
        '--cpus-per-task=5', '--kill-on-bad-exit=1', 'python-of-the-job', '-u',
        str(TOOLS / tool), *tool_args, '--launcher', 'slurm']


@pytest.mark.parametrize('script', ['slurm_test.sh', 'slurm_train.sh'])
def test_slurm_scripts_print_their_usage(fake_srun, script):
    env, record = fake_srun
    run = subprocess.run(['bash', str(TOOLS / script), 'gpu', 'job1', 'cfg.py'], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and 'usage:' in run.stderr and not record.exists()
