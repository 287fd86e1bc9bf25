"""The convolutional GLU's gate, ``gelu(gate) * value``, in one Triton kernel each way,
for CUDA.

Each block's GLU multiplies the GELU of its convolved gate by the value half of its
first projection, and a training step runs that twice (the GLU's hidden part is
recomputed in the backward pass). As PyTorch operators that is two operators and two
passes over the hidden activations forward and three backward; on a GPU, where the
training step waits on the host issuing operators (``docs/benchmarks.md``), one launch
each way does the same, in float32, reading the value where the projection left it.
The model's rule (``mmtransnext.models.transnext``) uses them where
:func:`~mmtransnext.ops.fused_attention.use_fused_attention` picks the fused kernels.
"""
import torch
from torch import Tensor

from .fused_attention import _DTYPES, _on_device, compile_kernel

__all__ = ['gated_gelu', 'gated_gelu_grad', 'compile_for_gpu']

# Rows and channels a program takes, and its warps: on 4 warps the backward (the GELU's
# derivative in float32) spilled 40-104 bytes on sm_80/sm_90; on 8 it takes about 150
# registers and spills none.
LAUNCH = dict(BLOCK_R=64, BLOCK_C=64, num_warps=8)


def _kernels():
    from . import _gated_gelu_kernels
    return _gated_gelu_kernels


def _row_stride(name: str, tensor: Tensor, shape) -> int:
    """The stride between the rows of a ``(..., C)`` tensor whose channels are
    contiguous and whose leading dims collapse into rows of one stride (rows may lie
    apart: the value half of a projection)."""
    if tensor.shape != shape:
        raise ValueError(f'gated gelu: {name} of shape {tuple(tensor.shape)}, expected '
                         f'{tuple(shape)}')
    row_stride = expected = tensor.stride(-2)
    packed = tensor.stride(-1) == 1
    for size, stride in zip(reversed(shape[:-1]), reversed(tensor.stride()[:-1])):
        packed &= size == 1 or stride == expected
        expected *= size
    if not packed:
        raise ValueError(f'gated gelu: {name} of strides {tensor.stride()}: needs '
                         'contiguous channels and rows of one stride')
    return row_stride


def _launch(gate: Tensor, value: Tensor) -> tuple:
    """Grid, the size and stride arguments and the meta-parameters; arguments checked."""
    if gate.dim() < 2 or gate.dtype not in _DTYPES or value.dtype != gate.dtype:
        raise ValueError(f'gated gelu: gate and value must be float32, float16 or bfloat16 '
                         f'tensors of one dtype with at least 2 dims, got {tuple(gate.shape)} '
                         f'{gate.dtype} and {tuple(value.shape)} {value.dtype}')
    channels = gate.shape[-1]
    rows = gate.numel() // max(channels, 1)
    s_gate, s_value = (_row_stride('gate', gate, gate.shape),
                       _row_stride('value', value, gate.shape))
    grid = (-(-rows // LAUNCH['BLOCK_R']), -(-channels // LAUNCH['BLOCK_C']))
    return grid, (rows, channels, s_gate, s_value), dict(LAUNCH)


def gated_gelu(gate: Tensor, value: Tensor) -> Tensor:
    """``gelu(gate) * value`` (the exact GELU), computed in float32.

    Args:
        gate (Tensor): ``(..., C)``.
        value (Tensor): ``gate``'s shape and dtype; its rows may lie apart (the value
            half of the GLU's first projection), its channels contiguous.

    Returns:
        Tensor: contiguous, ``gate``'s shape and dtype.
    """
    grid, sizes, meta = _launch(gate, value)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    with _on_device(gate):
        _kernels().gated_gelu_forward[grid](gate, value, out, *sizes, **meta)
    return out


def gated_gelu_grad(gate: Tensor, value: Tensor, grad: Tensor) -> tuple:
    """The gradients of :func:`gated_gelu`'s gate and value for its output's ``grad``.

    Returns:
        tuple[Tensor, Tensor]: contiguous, ``gate``'s shape and dtype.
    """
    grid, sizes, meta = _launch(gate, value)
    if grad.shape != gate.shape:
        raise ValueError(f'gated gelu: grad of shape {tuple(grad.shape)}, expected '
                         f'{tuple(gate.shape)}')
    grad = grad.to(gate.dtype).contiguous()
    grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grad_value = torch.empty_like(grad_gate)
    with _on_device(gate):
        _kernels().gated_gelu_backward[grid](gate, value, grad, grad_gate, grad_value, *sizes,
                                             **meta)
    return grad_gate, grad_value


def compile_for_gpu(arch: int, dtype: torch.dtype) -> dict:
    """Both kernels compiled ahead of time for a GPU architecture, without one.

    Args:
        arch (int): compute capability as an integer, e.g. 80 (A100) or 90 (H100).
        dtype (torch.dtype): the gate's and value's dtype.

    Returns:
        dict[str, bytes]: cubins, ``forward`` and ``backward``.
    """
    meta = dict(LAUNCH)
    warps = meta.pop('num_warps')
    pointers = dict(GATE='io', VALUE='io', OUT='io', GRAD='io', GRAD_GATE='io',
                    GRAD_VALUE='io')
    kernels = _kernels()
    return {name: compile_kernel(kernel, meta, pointers, dtype, arch, warps)
            for name, kernel in (('forward', kernels.gated_gelu_forward),
                                 ('backward', kernels.gated_gelu_backward))}
