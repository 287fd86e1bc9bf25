"""The benchmark tools (op, backbone, detector, pooled attention) on the CPU at tiny sizes.

Their CUDA runs need a GPU; what is checked here is everything around the timing:
arguments, the child processes per path, which path really ran, the table and its
ratios, failures reported in the table, the synthetic detection batch. Timings are
not asserted (they depend on the machine's load).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))

import benchmark_backbone as bb  # noqa: E402
import benchmark_detector as bd  # noqa: E402
import benchmark_op as bo  # noqa: E402
import benchmark_pooled_attention as bp  # noqa: E402
from mmtransnext.ops import fused_attention  # noqa: E402


def _row(path, time_ms, peak_mb, mode='train', dtype='fp32'):
    return dict(path=path, mode=mode, dtype=dtype, time_ms=time_ms, peak_mb=peak_mb,
                baseline_mb=100.0)


def _op_result(path, mode, dtype, ms, mib):
    return dict(path=path, mode=mode, dtype=dtype, median_s=ms / 1e3, peak_extra_mib=mib)


def test_op_table_per_dtype():
    results = [_op_result(p, m, dt, ms * scale, mib)
               for dt, scale in (('float32', 1.0), ('bfloat16', 0.5))
               for m, ms in (('forward', 4.0), ('forward+backward', 12.0))
               for p, ms, mib in (('reference', ms, 800.0), ('compiled', ms / 8, 100.0))]
    lines = bo.format_table(results).splitlines()
    assert len(lines) == 2 + 4
    cells = [[c.strip() for c in line.split('|')[1:-1]] for line in lines[2:]]
    assert cells[0] == ['float32', 'forward', '4.0', '0.5', '8.0x', '800.0', '100.0', '8.0x']
    assert cells[3][:5] == ['bfloat16', 'forward+backward', '6.0', '0.8', '8.0x']


def test_op_runs_both_paths_on_cpu(capsys):
    """Each (path, mode) in its own process on the CPU, the compiled op really used."""
    assert bo.main(['--shape', '1', '2', '5', '7', '8', '3', '--repeats', '1',
                    '--threads', '1']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'map=5x7 d=8 ws=3' in lines[0]
    assert [line.split('|')[2].strip() for line in lines[3:]] == ['forward', 'forward+backward']


def test_op_profile_names_the_compiled_kernels(capsys):
    assert bo.main(['--shape', '1', '2', '5', '7', '8', '3', '--repeats', '1',
                    '--threads', '1', '--profile', '100']) == 0
    out = capsys.readouterr().out
    profile = out.split('profile of one compiled forward+backward, float32', 1)[1]
    # The compiled op's forward and backward are what the compiled path runs.
    assert 'mmtransnext::sliding_window_logits' in profile
    assert 'mmtransnext::sliding_window_aggregate_backward' in profile


@pytest.mark.parametrize('argv, message', [
    (['--repeats', '0'], '--repeats must be at least 1'),
    (['--profile', '-1'], '--profile must not be negative'),
    (['--dtype', 'float64'], 'invalid choice'),
    (['--device', 'xla'], 'invalid choice'),
])
def test_op_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bo.main(argv)
    assert message in capsys.readouterr().err


def test_backbone_table_ratios():
    rows = [_row('reference', 300.0, 4000.0), _row('default', 100.0, 1000.0),
            _row('swin', 50.0, 800.0),
            dict(path='default', mode='forward', dtype='bf16', error='RuntimeError: boom')]
    lines = bb.format_table(rows).splitlines()
    default = next(line for line in lines if line.startswith('fp32  train    default'))
    # time, peak, above the model; 3x faster and 4x less memory than the reference,
    # 2x Swin-T's time
    assert default.split()[3:] == ['100.0', '1000', '900', '3.00x', '4.00x', '2.00x']
    swin = next(line for line in lines if ' swin ' in line)
    assert swin.split()[-1] == '1.00x'
    assert any(line.split() == ['bf16', 'forward', 'default', 'failed:', 'RuntimeError:', 'boom']
               for line in lines)


def test_backbone_table_without_reference_or_swin():
    line = bb.format_table([_row('default', 100.0, 1000.0)]).splitlines()[-1]
    assert line.split()[-3:] == ['-', '-', '-']


@pytest.mark.parametrize('argv, message', [
    (['--batch', '0'], '--batch must be at least 1'),
    (['--warmup', '-1'], '--warmup must not be negative'),
    (['--dtypes', 'fp16'], 'invalid choice'),
    (['--paths', 'released'], 'invalid choice'),
    (['--profile', '-1'], '--profile must not be negative'),
    (['--paths', 'default', 'default-graphed'], 'default-graphed captures CUDA graphs'),
])
def test_backbone_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bb.parse_args(argv)
    assert message in capsys.readouterr().err


def test_backbone_runs_three_paths_on_cpu(tmp_path, capsys):
    out = tmp_path / 'rows.json'
    bb.main(['--arch', 'micro', '--size', '64', '80', '--img-size', '64', '--modes', 'train',
             '--paths', 'reference', 'default', 'swin', '--warmup', '0', '--repeats', '1',
             '--threads', '1', '--json', str(out)])
    rows = {r['path']: r for r in json.loads(out.read_text())['rows']}
    assert not any('error' in r for r in rows.values()), rows
    assert rows['reference']['compiled'] is False and rows['default']['compiled'] is True
    assert rows['default']['fused'] is False            # the CPU keeps the banded path
    assert rows['swin']['model'] == 'mmdet SwinTransformer'
    assert all(r['time_ms'] > 0 and r['peak_mb'] > 0 for r in rows.values())
    printed = capsys.readouterr().out
    assert 'default path pooled attention, fp32: banded' in printed
    assert printed.count('fp32  train') == 3
    # each path's rows as they come, before the table
    progress = [line.split(':')[0] for line in printed.splitlines()[:3]]
    assert progress == ['reference fp32 train', 'default fp32 train', 'swin fp32 train']
    # Swin-T's line names which Swin it is (the table comes only after every path)
    assert printed.splitlines()[2].endswith(' MB (mmdet SwinTransformer)')


def test_backbone_worker_makes_several_runs():
    """One process per path makes its runs in order (what CUDA runs use), each row
    with its own dtype, mode and time."""
    args = bb.parse_args(['--arch', 'micro', '--size', '48', '64', '--img-size', '64',
                          '--warmup', '0', '--threads', '1'])
    rows = bb.run_path(args, 'default-two-pass', [('fp32', 'train'), ('fp32', 'forward')])
    assert [(r['path'], r['dtype'], r['mode']) for r in rows] == [
        ('default-two-pass', 'fp32', 'train'), ('default-two-pass', 'fp32', 'forward')]
    assert not any('error' in r for r in rows), rows
    assert all(r['time_ms'] > 0 and r['compiled'] for r in rows)
    # the fused kernels, where they run, form key/value gradients in a key-major pass
    assert {r['fused_backward'] for r in rows} == {'two-pass'}
    default = bb.run_path(args, 'default', [('fp32', 'forward')])[0]
    assert (default['fused_backward'], default['fused_bias_tile']) == ('atomic', 'slots')
    taps = bb.run_path(args, 'default-taps', [('fp32', 'forward')])[0]
    assert (taps['fused_backward'], taps['fused_bias_tile']) == ('atomic', 'taps')


def test_backbone_profile_of_a_training_step(capsys):
    """--profile K: the K most expensive operators of one more training step, per path."""
    bb.main(['--arch', 'micro', '--size', '48', '64', '--img-size', '64', '--modes', 'train',
             '--warmup', '0', '--threads', '1', '--profile', '3'])
    printed = capsys.readouterr().out
    sections = printed.split('profile of one training step: ')[1:]
    assert [s.splitlines()[0] for s in sections] == ['reference, fp32', 'default, fp32']
    # each path's profile as soon as the path is done, before the next path runs
    assert printed.index('profile of one training step: reference') < printed.index(
        'default fp32 train:')
    for section in sections:
        rules = [i for i, line in enumerate(section.splitlines()) if line.startswith('-----')]
        assert rules[2] - rules[1] - 1 == 3, section    # rows between header and footer rules
        assert 'Self CPU time total' in section


def test_count_operators_tells_views_apart():
    from mmtransnext.tools.profiling import count_operators
    x = torch.ones(3)
    assert count_operators(lambda: x.add(1).view(3, 1).t()) == dict(operators=1, views=2)


def test_backbone_counts_operators():
    """--count-ops: one more step's operators and views in each run's row."""
    args = bb.parse_args(['--arch', 'micro', '--size', '48', '64', '--img-size', '64',
                          '--warmup', '0', '--threads', '1', '--count-ops', '--worker',
                          '--runs', 'fp32:forward', 'fp32:train'])
    forward, train = bb._worker(args)
    assert 0 < forward['operators'] < train['operators']
    assert forward['views'] > 0 and train['views'] > 0
    # the host's time and waits are CUDA's (tests/test_ops_cuda.py)
    assert not {'host_ms', 'synchronizations'} & (forward.keys() | train.keys())


@pytest.mark.skipif(not fused_attention._TRITON, reason='the CUDA structure needs Triton 3')
def test_count_operators_of_both_structures():
    """``tools/count_operators.py``: the CUDA structure's step (fused kernels told they
    serve, their launches no-ops) is counted on the CPU, with the fused attention's
    autograd node, and dispatches fewer operators than the CPU's own path, whose
    position-bias MLP and unit vectors are operator sequences."""
    import subprocess
    found = {}
    for structure in ('cuda', 'cpu'):
        done = subprocess.run(
            [sys.executable, str(REPO / 'tools' / 'count_operators.py'), '--arch', 'micro',
             '--size', '32', '48', '--batch', '1', '--dtype', 'fp32', '--structure', structure,
             '--top', '40'], capture_output=True, text=True, timeout=600, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = dict(item.split('=', 1) for item in done.stdout.splitlines()[0].split()
                       if '=' in item)
        assert int(summary['operators']) == int(summary['forward']) + int(summary['backward'])
        found[structure] = int(summary['operators']), done.stdout
    assert '_FusedBiasAttentionBackward' in found['cuda'][1]
    assert '_FusedBiasAttentionBackward' not in found['cpu'][1]
    assert found['cuda'][0] < found['cpu'][0]


def test_count_operators_runs_layer_norms_as_cuda_autocast():
    """The CUDA structure's stand-in for CUDA autocast: a layer norm of a bfloat16 input
    gives float32, as under CUDA autocast (CPU autocast's own gives bfloat16), the same
    numbers as the norm of the input cast; outside autocast the plain function."""
    import torch.nn.functional as F
    import count_operators
    norm = count_operators._layer_norm_as_on_cuda(F.layer_norm)
    x, weight = torch.randn(3, 8, dtype=torch.bfloat16), torch.rand(8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert F.layer_norm(x, (8, ), weight).dtype == torch.bfloat16
        got = norm(x, (8, ), weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.layer_norm(x.float(), (8, ), weight))
    assert norm(x, (8, ), weight.bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(
    not hasattr(torch.library, 'register_fake'),
    reason=f'torch {torch.__version__} (< 2.4) splits the training step into frames that '
    'Dynamo recompiles with symbolic sizes, and fails there in the position-bias MLP\'s '
    'matmul(out=) ("Cannot call sizes() on tensor with symbolic sizes")')
def test_backbone_compiled_path(monkeypatch):
    """default-compiled: the model under torch.compile, timed like the others; its step
    is compiled code, so no operator count. Dynamo's 'eager' backend here (Inductor by
    default): what is checked is the tool's path, and torch 2.1's aot_eager wraps its
    backward compiler once more at every graph it compiles, past Python's recursion
    limit in a process that compiles this many."""
    import functools
    torch._dynamo.reset()
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='eager'))
    args = bb.parse_args(['--arch', 'micro', '--size', '48', '64', '--img-size', '64',
                          '--warmup', '1', '--threads', '1', '--count-ops', '--worker',
                          '--path', 'default-compiled', '--runs', 'fp32:forward', 'fp32:train'])
    rows = bb._worker(args)
    assert [(r['dtype'], r['mode']) for r in rows] == [('fp32', 'forward'), ('fp32', 'train')]
    assert all(r['time_ms'] > 0 and r['compiled'] and 'operators' not in r for r in rows)
    assert torch._dynamo.utils.counters['frames']['ok'] > 0    # it did compile


def test_detector_batch_is_annotated():
    data = bd.synthetic_batch(2, (48, 80), 3, num_classes=5)
    assert [tuple(x.shape) for x in data['inputs']] == [(3, 48, 80)] * 2
    for sample in data['data_samples']:
        boxes = sample.gt_instances.bboxes
        assert boxes.shape == (3, 4)
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 48).all()
        masks = sample.gt_instances.masks
        assert masks.masks.shape == (3, 48, 80)
        # each mask fills its box
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
        assert masks.masks.sum(axis=(1, 2)).tolist() == [int(a) for a in areas]
        assert (sample.gt_instances.labels < 5).all()


@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
def test_detector_mixed_precision_needs_cuda(capsys, dtype):
    with pytest.raises(SystemExit):
        bd.parse_args(['--dtypes', 'fp32', dtype])
    assert 'needs CUDA' in capsys.readouterr().err


def test_detector_dtype_that_fails_leaves_the_others(monkeypatch):
    """A dtype whose iteration raises (mmcv 2.1's RoIAlign has no bfloat16 kernel) is a
    row with its error; the process goes on with the next dtype."""
    timed = bd._time
    calls = []

    def first_fails(args, cfg, model, data, dtype):
        calls.append(dtype)
        if len(calls) == 1:
            raise NotImplementedError('"roi_align_forward_cuda_kernel" not implemented for '
                                      "'BFloat16'")
        return timed(args, cfg, model, data, dtype)

    monkeypatch.setattr(bd, '_time', first_fails)
    args = bd.parse_args(['--size', '64', '96', '--batch', '1', '--objects', '2', '--img-size',
                          '64', '--warmup', '0', '--repeats', '1', '--threads', '1',
                          '--dtypes', 'fp32', 'fp32'])
    first, second = bd._worker(args)
    assert first == dict(detector='transnext', dtype='fp32', error=(
        'NotImplementedError: "roi_align_forward_cuda_kernel" not implemented for '
        "'BFloat16'"))
    assert 'error' not in second and second['time_ms'] > 0 and second['loss'] > 0


def test_detector_table():
    rows = [dict(detector='transnext', dtype='fp32', time_ms=150.0, peak_mb=2000.0, loss=5.0),
            dict(detector='swin', dtype='fp32', time_ms=100.0, peak_mb=1500.0, loss=4.0),
            dict(detector='transnext', dtype='bf16', error='OutOfMemoryError: CUDA')]
    lines = bd.format_table(rows).splitlines()
    assert lines[2].split() == ['fp32', 'transnext', '150.0', '2000', '1.50x', '5.000']
    assert lines[4].endswith('failed: OutOfMemoryError: CUDA')


def test_detector_iteration_on_cpu(tmp_path, capsys):
    """Each detector in its own process, one row per dtype run there (two fp32 runs
    here: fp16 and bf16 need CUDA), each with a fresh optimizer."""
    out = tmp_path / 'rows.json'
    bd.main(['--size', '64', '96', '--batch', '1', '--objects', '2', '--img-size', '64',
             '--warmup', '0', '--repeats', '1', '--threads', '1', '--dtypes', 'fp32', 'fp32',
             '--json', str(out)])
    rows = json.loads(out.read_text())['rows']
    assert [r['detector'] for r in rows] == ['transnext', 'swin'] * 2
    # each detector's rows as they come, before the table
    progress = [line.split(':')[0] for line in capsys.readouterr().out.splitlines()[:4]]
    assert progress == ['transnext fp32'] * 2 + ['swin fp32'] * 2
    for row in rows:
        assert 'error' not in row, row
        assert row['dtype'] == 'fp32' and row['loss'] > 0 and row['time_ms'] > 0


def test_pooled_attention_table():
    rows = [dict(path='whole', dtype='fp32', forward_ms=40.0, train_ms=90.0, forward_mb=800.0,
                 train_mb=2000.0),
            dict(path='fused 32x32x8', dtype='fp32', forward_ms=4.0, train_ms=10.0,
                 forward_mb=20.0, train_mb=50.0),
            dict(path='banded', dtype='fp16', error='RuntimeError: unsupported dtype')]
    lines = bp.format_table(rows).splitlines()
    assert lines[3].split() == ['fp32', 'fused', '32x32x8', '4.00', '10.00x', '10.00', '9.00x',
                                '20', '50']
    assert lines[4].endswith('failed: RuntimeError: unsupported dtype')


def test_pooled_attention_shapes_and_cpu_run(capsys):
    args = bp.parse_args(['--stage', '1', '--scale', '20'])
    assert bp.shapes(args) == dict(query=(10, 16), key=(1, 2), heads=3, build_query=(10, 10),
                                   build_key=(1, 1))
    # the fused kernels refuse CPU tensors outside the interpreter: a failed row, exit 1
    with pytest.raises(SystemExit):
        bp.main(['--stage', '3', '--scale', '10', '--repeats', '1', '--warmup', '0'])
    printed = capsys.readouterr().out.splitlines()
    # each row as it is measured (what a run stopped at a time limit keeps), then the table
    progress, lines = printed[:3], printed[3:]
    assert lines[0].startswith('stage 3: 2 x 12 heads, queries 5x8, keys 2x4')
    assert lines[3].split()[:2] == ['fp32', 'whole'] and lines[4].split()[:2] == ['fp32', 'banded']
    assert lines[5].split()[:4] == ['fp32', 'fused', '32x32x8', 'failed:']
    assert 'run on CUDA, or on the CPU under TRITON_INTERPRET=1' in lines[5]
    assert progress[:2] == [lines[3], lines[4]] and progress[2] == lines[5]


def test_pooled_attention_tiles_reach_the_dispatcher(monkeypatch, capsys):
    """Each --tiles configuration is a fused row, launched with those tiles."""
    import torch

    from mmtransnext.ops import fused_attention
    monkeypatch.setitem(fused_attention.LAUNCH, torch.float32,
                        fused_attention.LAUNCH[torch.float32])
    args = bp.parse_args(['--stage', '3', '--scale', '10', '--paths', 'fused',
                          '--tiles', '64x64x4', '16x32x2'])
    assert [bp.path_label('fused', t) for t in bp.fused_runs(args, 'fp32')] == [
        'fused 64x64x4', 'fused 16x32x2']
    # without --tiles: the dispatcher's tiles for the stage's (resized) bias
    default = bp.fused_runs(bp.parse_args(['--stage', '1']), 'bf16')
    assert default == [fused_attention.launch_tiles(torch.bfloat16, resized=True)]
    with pytest.raises(SystemExit):       # CPU tensors outside the interpreter: refused
        bp.main(['--stage', '3', '--scale', '10', '--paths', 'fused', '--repeats', '1',
                 '--tiles', '64x64x4', '16x32x2'])
    # the last configuration is the one the dispatcher now launches with
    assert fused_attention.launch_meta(torch.float32, 24, 24)['BLOCK_M'] == 16
    tiles = dict(BLOCK_M=16, BLOCK_N=32, num_warps=2)
    assert fused_attention.LAUNCH[torch.float32] == (tiles, tiles)
    lines = capsys.readouterr().out.splitlines()[2:]   # after the two rows' progress lines
    assert [line.split()[1:3] for line in lines[3:]] == [['fused', '64x64x4'],
                                                         ['fused', '16x32x2']]
    with pytest.raises(SystemExit):
        bp.parse_args(['--tiles', '24x32x8'])


# The kernels use Triton 3's language; torch 2.1-2.3 bring Triton 2.
needs_triton_3 = pytest.mark.skipif(not fused_attention._TRITON,
                                    reason=f'needs triton >= {fused_attention.MIN_TRITON}')


@needs_triton_3
def test_kernel_resources_table(capsys):
    """The machine code of the launch configuration: one row per kernel (the bias read
    by taps, and by slots), no spills."""
    import kernel_resources
    assert kernel_resources.main(['--arch', '90', '--dtypes', 'bf16']) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith('| sm_90 | bf16 | 32 x 32 x 8 | 4 |')]
    assert [row.split('|')[5].strip() for row in rows] == [
        'forward', 'backward', 'backward_keys', 'backward_atomic', 'forward_slots',
        'backward_slots', 'backward_keys_slots', 'backward_atomic_slots']
    assert all(row.split('|')[7].strip() == '0' for row in rows), rows


@pytest.mark.parametrize('text, launch', [
    ('32x32x8', dict(BLOCK_M=32, BLOCK_N=32, num_warps=8)),
    ('32x16x8:tf32x3', dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, DOT_PRECISION='tf32x3')),
    ('64x32x4:ieee', dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, DOT_PRECISION='ieee')),
    ('32x32x8:tf32', dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, DOT_PRECISION='tf32'))])
def test_tiles_parse_and_label(text, launch):
    from mmtransnext.tools.common import parse_tiles, tiles_label
    assert parse_tiles(text) == launch
    assert tiles_label(launch) == text


@needs_triton_3
def test_kernel_resources_tf32x3_row(capsys):
    """A float32 launch with TF32 products: its own rows, on tensor cores (what each
    kernel spills is held in tests/test_fused_attention.py)."""
    import kernel_resources
    assert kernel_resources.main(['--arch', '90', '--dtypes', 'fp32', '--tiles',
                                  '32x16x8:tf32x3']) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith('| sm_90 | fp32 | 32 x 16 x 8 tf32x3 | 4 |')]
    assert [row.split('|')[5].strip() for row in rows] == [
        'forward', 'backward', 'backward_keys', 'backward_atomic', 'backward_residual',
        'backward_atomic_residual']
    assert all(int(row.split('|')[9]) > 0 for row in rows), rows


@pytest.mark.parametrize('tiles', ['64x64', '48x32x8', '32x32x3', 'axbxc', '32x16x8:bf16x3'])
def test_kernel_resources_bad_tiles(tiles, capsys):
    import kernel_resources
    with pytest.raises(SystemExit):
        kernel_resources.main(['--tiles', tiles])
    assert tiles in capsys.readouterr().err


@pytest.mark.parametrize('size', ['640', '640x', 'x480', '640x0', '640x480x3'])
def test_kernel_resources_bad_variants(size, capsys):
    import kernel_resources
    with pytest.raises(SystemExit):
        kernel_resources.main(['--variants', size])
    assert 'is not WIDTHxHEIGHT' in capsys.readouterr().err
