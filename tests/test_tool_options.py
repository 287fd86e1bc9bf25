"""Command-line options of tools/test.py and the Slurm launchers."""
import importlib.util
import os
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
