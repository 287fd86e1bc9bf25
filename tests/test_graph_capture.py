"""Graph capture: torch.compile and torch.export trace the backbone, ONNX export of the
backbone and a segmentor matches PyTorch, bad input to the exporter is refused."""
import importlib.util

import pytest
import torch

import tool_configs as tc
from conftest import REPO
from mmtransnext.deploy import (compare_with_onnxruntime, example_input, export_onnx,
                                export_wrapper, load_weights)
from mmtransnext.models import TransNeXt
from mmtransnext.tools.common import build_model, load_config

ARCH = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1],
            mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1], window_size=[3, 3, 3, None])
# No pooled side of these is 1: Dynamo specialises a size of 1, so a map whose pooled
# grid has a side of 1 takes one more graph (a bounded number, not one per size).
SIZES = [(64, 64), (72, 96), (96, 80)]
ONNX_TOL = 1e-4

# Where the installed torch or the test requirements lack them (torch 2.1-2.4 have no
# torch.export.Dim.DYNAMIC; onnxruntime has no wheels for Python 3.9), with the reason.
needs_export = pytest.mark.skipif(
    not hasattr(getattr(torch.export, 'Dim', None), 'DYNAMIC'),
    reason=f'torch.export.Dim.DYNAMIC is missing from torch {torch.__version__}')
needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ('onnx', 'onnxruntime', 'onnxscript')),
    reason='onnx, onnxruntime and onnxscript are not installed (requirements/tests.txt)')


def small_backbone(**kwargs):
    torch.manual_seed(0)
    return TransNeXt(arch=ARCH, img_size=64, **kwargs)


def loss_and_grads(model, fn, x, weights):
    x = x.clone().requires_grad_()
    outs = fn(x)
    loss = sum((out * w).sum() for out, w in zip(outs, weights))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return [o.detach() for o in outs], x.grad, grads


def assert_grad_close(grad, ref, name):
    """The golden README's per-tensor gradient tolerance."""
    limit = 1e-3 * max(ref.abs().max().item(), 1e-3)
    err = (grad - ref).abs().max().item()
    assert err <= limit, f'{name}: max |g - g_ref| = {err:.3g} > {limit:.3g}'


def test_compile_trains_like_eager_at_three_sizes_with_one_dynamic_graph(attention_path):
    """Forward and gradients equal eager; a third size reuses the dynamic graph."""
    torch._dynamo.reset()
    model = small_backbone().train()
    # aot_eager traces what inductor would compile (Dynamo + AOTAutograd, forward and
    # backward graphs) at a fraction of the compile time on a CPU.
    compiled = torch.compile(model, backend='aot_eager')
    from torch._dynamo.utils import counters
    counters.clear()
    frames = []  # frames compiled so far, after each size
    for i, size in enumerate(SIZES):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            shapes = [o.shape for o in model(x)]
        weights = [torch.randn(s, generator=torch.Generator().manual_seed(10 + j))
                   for j, s in enumerate(shapes)]
        out_e, gx_e, g_e = loss_and_grads(model, model, x, weights)
        out_c, gx_c, g_c = loss_and_grads(model, compiled, x, weights)
        for a, b in zip(out_c, out_e):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert_grad_close(gx_c, gx_e, 'input')
        for name in g_e:
            assert_grad_close(g_c[name], g_e[name], name)
        frames.append(counters['frames']['ok'])
    if hasattr(torch.library, 'register_fake'):
        # From torch 2.4 Dynamo traces the whole model as one graph: the first size
        # compiles static, the second dynamic, the third reuses that.
        assert counters['graph_break'] == {}, dict(counters['graph_break'])
        assert frames == [1, 2, 2], dict(counters['frames'])
    # Older releases break the graph where they cannot trace (the bias layout's
    # dataclass, sets of symbolic sizes) and run those parts eagerly: the same numbers
    # (checked above), but each new size recompiles some frames (torch 2.1.2: 136
    # frames after two sizes, 155 after three).


@needs_export
def test_export_keeps_the_compiled_op_and_equals_eager():
    model = small_backbone().eval()
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(model, (torch.randn(1, 3, 64, 64), ),
                                  dynamic_shapes=({2: dim, 3: dim}, ))
    # The attention core runs with autocast off: a submodule of the exported graph.
    targets = {str(node.target) for module in program.graph_module.modules()
               if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes}
    assert 'mmtransnext.sliding_window_logits.default' in targets
    assert 'mmtransnext.sliding_window_aggregate.default' in targets
    for size in SIZES[:2]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
        for got, ref in zip(program.module()(x), expected):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@needs_export
def test_export_traces_the_released_structure_where_fused_kernels_serve(monkeypatch):
    """An export needs one whole graph: where the fused kernels serve the attention core
    (CUDA; here by the rule patched), torch.compile runs the core outside its graphs
    (tests/interpreted_fused_attention.py), but torch.export traces the released structure."""
    from mmtransnext.models import attention as attention_module
    model = small_backbone().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    with monkeypatch.context() as patched:
        patched.setattr(attention_module, 'use_fused_attention', lambda tensor: True)
        program = torch.export.export(model, (x, ))
    for got, ref in zip(program.module()(x), expected):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@needs_export
@needs_onnx
@pytest.mark.parametrize('mode', ['interpolation', 'extrapolation'])
def test_onnx_backbone_matches_pytorch(tmp_path, mode):
    """Default path, no setting: the window op exports in standard operators.

    Interpolation: one dynamic file at two sizes. Extrapolation builds the bias on
    each input's own grid, so its file has a fixed size: two sizes, two files.
    """
    model = small_backbone(is_extrapolation=mode == 'extrapolation').eval()
    dynamic = mode == 'interpolation'
    files = {}
    for size in SIZES[:2]:
        if dynamic and files:
            files[size] = files[SIZES[0]]
            continue
        files[size] = tmp_path / f'backbone_{size[0]}x{size[1]}.onnx'
        export_onnx(model, example_input(*size), str(files[size]), dynamic=dynamic)
    for i, size in enumerate(SIZES[:2]):
        result, = compare_with_onnxruntime(model, str(files[size]), [example_input(*size,
                                                                                   seed=i)])
        assert result['max_abs'] <= ONNX_TOL, result
    import onnx
    graph = onnx.load(str(files[SIZES[0]]))
    domains = {node.domain for node in graph.graph.node}
    domains |= {node.domain for function in graph.functions for node in function.node}
    assert domains <= {'', 'ai.onnx'}, domains      # standard operators only


@needs_onnx
def test_torchscript_onnx_exporter_matches_pytorch(tmp_path):
    """torch.onnx.export(dynamo=False), which traces sizes as tensors: one file with
    dynamic height and width equals PyTorch at two sizes."""
    model = small_backbone().eval()
    path = tmp_path / 'backbone.onnx'
    torch.onnx.export(model, (example_input(*SIZES[1]), ), str(path), dynamo=False,
                      opset_version=18, input_names=['x'],
                      dynamic_axes={'x': {2: 'height', 3: 'width'}})
    for i, size in enumerate(SIZES[:2]):
        result, = compare_with_onnxruntime(model, str(path), [example_input(*size, seed=i)])
        assert result['max_abs'] <= ONNX_TOL, result


@needs_export
@needs_onnx
def test_onnx_segmentor_logits_match_pytorch(tmp_path):
    cfg = load_config(str(tc.write_config(tmp_path, 'upernet')))
    segmentor = build_model(cfg).eval()
    module = export_wrapper(segmentor, 'segmentor')
    # One fixed-size file per input size: a dynamic segmentor file is refused, since
    # mmseg's head fixes sizes while traced (its logits were wrong at a second size).
    with pytest.raises(ValueError, match='backbone only'):
        export_onnx(module, example_input(64, 64), str(tmp_path / 'dynamic.onnx'), dynamic=True)
    assert not list(tmp_path.glob('*.onnx'))
    for size, seed in (((64, 64), 0), ((72, 96), 1)):
        out = tmp_path / f'upernet_{size[0]}x{size[1]}.onnx'
        export_onnx(module, example_input(*size, seed=seed), str(out))
        result, = compare_with_onnxruntime(module, str(out), [example_input(*size, seed=seed)])
        assert result['size'] == size
        assert result['max_abs'] <= ONNX_TOL, result


@needs_export
@needs_onnx
def test_too_old_opset_is_refused_and_leaves_no_file(tmp_path):
    out = tmp_path / 'backbone.onnx'
    with pytest.raises(ValueError, match='opset 17 is too old'):
        export_onnx(small_backbone(), example_input(64, 64), str(out), opset=17)
    assert list(tmp_path.iterdir()) == []


@needs_export
@needs_onnx
def test_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = load_config(str(tc.write_config(tmp_path, 'upernet')))
    segmentor = build_model(cfg)
    other = TransNeXt(arch='micro')
    path = tmp_path / 'micro.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in other.state_dict().items()}},
               path)
    with pytest.raises(ValueError, match='does not match .* shape mismatch: backbone'):
        load_weights(segmentor, str(path), 'segmentor')


def test_models_without_a_transnext_backbone_are_refused():
    with pytest.raises(ValueError, match='Linear is not a TransNeXt model'):
        export_wrapper(torch.nn.Linear(2, 2), 'backbone')


@needs_export
@needs_onnx
def test_export_tool_writes_and_checks_a_detector(tmp_path, capsys):
    """Config + checkpoint in, .onnx out, ORT checked (random weights: shapes and numbers)."""
    spec = importlib.util.spec_from_file_location('export_onnx', REPO / 'tools' / 'export_onnx.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = tc.write_config(tmp_path, 'mask-rcnn')
    detector = build_model(load_config(str(config)))
    checkpoint = tmp_path / 'detector.pth'
    torch.save({'state_dict': detector.state_dict()}, checkpoint)
    out = tmp_path / 'detector.onnx'
    assert tool.main([str(config), str(checkpoint), str(out), '--size', '96,128',
                      '--check']) == 0
    printed = capsys.readouterr().out
    assert 'detector' in printed and 'ok' in printed and out.exists()
    with pytest.raises(SystemExit, match='opset 11 is too old'):
        tool.main([str(config), str(checkpoint), str(tmp_path / 'old.onnx'), '--opset', '11'])
    assert not (tmp_path / 'old.onnx').exists()


class _TorchSession:
    """ONNX Runtime's session interface over the exported module itself, so that the
    post-processing split can be compared with ``test_step`` exactly (ONNX Runtime's
    own tensors are checked against PyTorch in the export tests above)."""

    def __init__(self, module, size):
        self.module, self.size = module.eval(), size

    def get_inputs(self):
        return [type('Input', (), dict(name='input', shape=[1, 3, *self.size]))]

    def run(self, names, feed):
        with torch.no_grad():
            return [t.numpy() for t in self.module(torch.from_numpy(feed['input']))]


def _detector_batch(size, seed=0):
    from mmdet.structures import DetDataSample
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    meta = dict(img_shape=size, ori_shape=size, pad_shape=size, scale_factor=(1.0, 1.0),
                batch_input_shape=size)
    return dict(inputs=[image], data_samples=[DetDataSample(metainfo=meta)])


def test_onnx_detection_split_equals_test_step(tmp_path):
    """RPN and RoI head run on the exported tensors give test_step's detections."""
    from mmengine.registry import init_default_scope
    from mmtransnext.deploy import match_detections, onnx_two_stage_predict
    init_default_scope('mmdet')
    detector = build_model(load_config(str(tc.write_config(tmp_path, 'mask-rcnn')))).eval()
    torch.manual_seed(0)
    detector.init_weights()
    detector.roi_head.test_cfg.score_thr = 0.0  # random weights: keep every detection
    session = _TorchSession(export_wrapper(detector, 'detector'), (96, 128))
    reference = detector.test_step(_detector_batch((96, 128)))[0].pred_instances
    got = onnx_two_stage_predict(detector, session, _detector_batch((96, 128)))[0]
    assert len(reference) > 0 and 'masks' in got.pred_instances
    for key in ('bboxes', 'scores', 'labels', 'masks'):
        torch.testing.assert_close(got.pred_instances[key], reference[key], rtol=0, atol=0)
    exact = match_detections(detector.test_step(_detector_batch((96, 128)))[0], got, 0.0)
    assert exact['labels_equal'] and exact['min_iou'] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r'exported for \(96, 128\)'):
        onnx_two_stage_predict(detector, session, _detector_batch((64, 64)))


def test_detection_matching_finds_label_and_overlap_changes():
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    from mmtransnext.deploy import match_detections, summarise

    def sample(boxes, scores, labels):
        out = DetDataSample()
        out.pred_instances = InstanceData(bboxes=torch.tensor(boxes, dtype=torch.float32),
                                          scores=torch.tensor(scores),
                                          labels=torch.tensor(labels))
        return out

    ref = sample([[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 5, 5]], [0.9, 0.8, 0.1], [0, 1, 2])
    # Near-equal scores in swapped order, one box moved by a tenth of a pixel.
    same = sample([[20, 20, 40, 40], [0, 0, 10, 10.1]], [0.81, 0.79], [1, 0])
    result = match_detections(ref, same, score_thr=0.3)
    assert result['count'] == 2 and result['labels_equal']
    assert result['min_iou'] == pytest.approx(100 / 101)
    assert result['max_score_diff'] == pytest.approx(0.11)
    relabelled = match_detections(ref, sample([[0, 0, 10, 10], [20, 20, 40, 40]],
                                              [0.9, 0.8], [0, 2]), score_thr=0.3)
    assert not relabelled['labels_equal']
    worst = summarise([result, relabelled])
    assert worst['images'] == 2 and worst['detections'] == 4 and not worst['labels_equal']
