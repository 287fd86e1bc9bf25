"""Parameters and FLOPs with mmengine's analysis, TransNeXt's own ops counted.

Convention (mmengine's, fvcore's): one fused multiply-add is one flop, so a
``(m, k) @ (k, n)`` matmul counts ``m*k*n``; elementwise work (softmax,
normalisation, GELU...) is not counted. Published "GFLOPs" of vision backbones
(TransNeXt's included) use the same convention.

The default attention path puts its work where mmengine's tracer cannot see it
unaided, so :func:`op_handles` adds:

* ``mmtransnext::sliding_window_logits``: ``q . k`` over each token's window,
  ``B*h*N*L*d`` (``L = ws*ws``);
* ``mmtransnext::sliding_window_aggregate``: weights times window values,
  ``B*h*N*L*d``;
* ``prim::PythonOp._BandedBiasAttention``: the pooled / full attention done in
  bands of rows by a ``torch.autograd.Function``, which the tracer records as
  one opaque node (its matmuls are invisible): ``q @ k^T`` and ``p @ v``,
  ``B*h*N*P*(d + dv)``.

With these the default path counts what the released (reference) path counts
through its ``unfold`` + ``matmul`` formulation (the tests check they agree).

Tracing note: a model with two or more aggregated-attention blocks in a stage
does not trace through the banded ``torch.autograd.Function`` (``torch.jit``
fails inside it with ``RuntimeError: unordered_map::at``; one block per stage
traces, and then shows up as ``prim::PythonOp._BandedBiasAttention``, which the
handle above counts). So while counting, :func:`counting_banded_attention`
swaps in :func:`traceable_banded_attention`: the same forward, band by band,
in plain tensor ops, whose two matmuls mmengine counts itself (the same
``B*h*N*P*(d + dv)``). Before tracing, :func:`prewarm` runs each backbone once
without gradients so that the position bias for that size is cached, as it is
at inference; the counts therefore leave out the bias MLP (``cpb_fc1/fc2`` on
the offset table, a few MFLOPs a block, computed once per input size).
"""
import time
from contextlib import contextmanager
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape
from torch import Tensor, nn

LOGITS_OP = 'mmtransnext::sliding_window_logits'
AGGREGATE_OP = 'mmtransnext::sliding_window_aggregate'
BANDED_OP = 'prim::PythonOp._BandedBiasAttention'


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def sliding_window_logits_flops(inputs: List, outputs: List) -> int:
    """``(B,h,N,d)`` queries against ``L`` window keys each: ``B*h*N*L*d``."""
    query = get_shape(inputs[0])
    logits = get_shape(outputs[0])
    return _prod(logits) * int(query[-1])


def sliding_window_aggregate_flops(inputs: List, outputs: List) -> int:
    """``(B,h,N,L)`` weights times ``L`` window values of ``d``: ``B*h*N*L*d``."""
    weights = get_shape(inputs[0])
    out = get_shape(outputs[0])
    return _prod(out) * int(weights[-1])


def banded_attention_flops(inputs: List, outputs: List) -> int:
    """``softmax(q k^T + bias) v`` of ``(B,h,N,d)`` queries and ``P`` keys:
    ``B*h*N*P*d`` for the logits plus ``B*h*N*P*dv`` for the values."""
    query, key, value = (get_shape(v) for v in inputs[:3])
    batch_heads_tokens = _prod(query[:-1])
    keys = int(key[-2])
    return batch_heads_tokens * keys * (int(query[-1]) + int(value[-1]))


def op_handles() -> Dict[str, Callable]:
    """Flop handles of TransNeXt's ops for :meth:`FlopAnalyzer.set_op_handle`."""
    return {LOGITS_OP: sliding_window_logits_flops,
            AGGREGATE_OP: sliding_window_aggregate_flops,
            BANDED_OP: banded_attention_flops}


def traceable_banded_attention(query: Tensor, key: Tensor, value: Tensor, bias) -> tuple:
    """What :func:`~mmtransnext.ops.banded_attention.banded_bias_attention`
    computes, band by band, in ops ``torch.jit`` traces (used only for counting)."""
    from mmtransnext.ops.banded_attention import _rows_per_band
    batch, heads, _, _ = query.shape
    height, width = bias.layout.query_size
    keys = key.shape[2]
    band = _rows_per_band(batch, heads, width, keys, height)
    key_t = key.transpose(-2, -1)
    outs, lses = [], []
    for start in range(0, height, band):
        stop = min(height, start + band)
        logits = torch.matmul(query[:, :, start * width:stop * width], key_t)
        logits = logits + bias.rows(start, stop).reshape(heads, (stop - start) * width, keys)
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), value))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@contextmanager
def counting_banded_attention():
    """Route the attention modules' banded attention through
    :func:`traceable_banded_attention` inside the block."""
    from mmtransnext.models import attention
    original = attention.banded_bias_attention
    attention.banded_bias_attention = traceable_banded_attention
    try:
        yield
    finally:
        attention.banded_bias_attention = original


def prewarm(model: nn.Module, image: Tensor) -> int:
    """Run every TransNeXt inside ``model`` once on ``image`` without gradients, so
    its position bias for that size is cached before tracing (see the module
    note). Returns how many backbones ran."""
    from mmtransnext.models import TransNeXt
    found = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TransNeXt):
                module(image)
                found += 1
    return found


def analyze(model: nn.Module, inputs: Tuple, handles: bool = True,
            swap_banded: bool = True) -> FlopAnalyzer:
    """mmengine's FlopAnalyzer of ``model(*inputs)``, traced (totals ready).

    Args:
        model (nn.Module): what to trace.
        inputs (tuple): its inputs; ``inputs[0]`` is the image batch (the
            backbones are pre-run on it).
        handles (bool): add :func:`op_handles` (False shows what mmengine alone
            would count).
        swap_banded (bool): trace :func:`traceable_banded_attention` instead of
            the autograd.Function (see the module note).
    """
    prewarm(model, inputs[0])
    analyzer = FlopAnalyzer(model, inputs)
    for name, handle in (op_handles().items() if handles else ()):
        analyzer.set_op_handle(name, handle)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad():
        if swap_banded:
            with counting_banded_attention():
                analyzer.total()
        else:
            analyzer.total()
    return analyzer


def count_flops(model: nn.Module, inputs: Tuple, **kwargs) -> Tuple[int, Counter]:
    """Total flops of ``model(*inputs)`` and the ops left uncounted (name: calls);
    keyword arguments as :func:`analyze`."""
    analyzer = analyze(model, inputs, **kwargs)
    return analyzer.total(), Counter(analyzer.unsupported_ops())


def count_params(model: nn.Module) -> int:
    return parameter_count(model)['']


def backbone_complexity(arch, image_size: Tuple[int, int], **kwargs) -> dict:
    """Params and flops of ``TransNeXt(arch, **kwargs)`` on one ``image_size`` image."""
    from mmtransnext import TransNeXt
    model = TransNeXt(arch=arch, img_size=kwargs.pop('img_size', max(image_size)),
                      **kwargs).eval()
    start = time.perf_counter()
    flops, unsupported = count_flops(model, (torch.zeros(1, 3, *image_size), ))
    return dict(params=count_params(model), flops=flops, unsupported=unsupported,
                seconds=time.perf_counter() - start)


class _TensorMode(nn.Module):
    """``model(inputs, data_samples, mode='tensor')`` as a one-input module to trace."""

    def __init__(self, model: nn.Module, data_samples: list):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def _padded(size: Tuple[int, int], model: nn.Module) -> Tuple[int, int]:
    divisor = getattr(getattr(model, 'data_preprocessor', None), 'pad_size_divisor', 1) or 1
    return tuple(-(-s // divisor) * divisor for s in size)


def _data_samples(task: str, image_size, padded) -> list:
    meta = dict(img_shape=tuple(image_size), ori_shape=tuple(image_size),
                pad_shape=tuple(padded), batch_input_shape=tuple(padded),
                scale_factor=(1.0, 1.0), img_id=0)
    if task == 'det':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    from mmseg.structures import SegDataSample
    return [SegDataSample(metainfo=meta)]


def model_complexity(cfg, image_size: Optional[Tuple[int, int]] = None,
                     count: bool = True) -> dict:
    """Params (and, with ``count``, flops) of a config's whole model and its backbone.

    The input is one ``image_size`` image padded as the model's data preprocessor
    pads (``pad_size_divisor``), run in ``mode='tensor'``; a two-stage detector's
    RoI heads see the proposals its RPN keeps (up to the test config's
    ``max_per_img``), so their share depends on the weights.
    """
    from .common import build_model, task_of
    model = build_model(cfg).eval()
    # A test-time-augmentation wrapper (multi-scale + flip configs) holds the model.
    model = getattr(model, 'module', model)
    result = dict(params=count_params(model),
                  backbone_params=count_params(model.backbone))
    if not count:
        return result
    padded = _padded(image_size, model)
    task = task_of(cfg)
    wrapped = _TensorMode(model, _data_samples(task, image_size, padded))
    start = time.perf_counter()
    flops, unsupported = count_flops(wrapped, (torch.zeros(1, 3, *padded), ))
    backbone_flops, _ = count_flops(model.backbone, (torch.zeros(1, 3, *padded), ))
    result.update(flops=flops, backbone_flops=backbone_flops, unsupported=unsupported,
                  input=padded, seconds=time.perf_counter() - start)
    return result


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: '| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |'  # noqa
    return '\n'.join([line(cells[0]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
                     + [line(r) for r in cells[1:]])


def millions(n: int) -> str:
    return f'{n / 1e6:.2f}M'


def giga(n: float) -> str:
    return f'{n / 1e9:.1f}G'
