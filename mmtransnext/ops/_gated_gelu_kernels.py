"""Triton kernels of :mod:`mmtransnext.ops.fused_gated_gelu`.

Imported only on first use, like :mod:`._fused_attention_kernels` (``TRITON_INTERPRET``
is read when the kernels are defined). ``GATE`` and ``VALUE`` are ``rows`` rows of
``channels`` values, each row ``s_gate`` and ``s_value`` apart (the value is half of a
wider projection), channels contiguous; ``OUT`` and the gradients are contiguous. The
GELU is the exact one, ``x * Phi(x)``, in float32.
"""
import triton
import triton.language as tl

#: Sizes and strides that change with the input's size: unspecialised, so that new
#: image sizes reuse the binaries (see ``_fused_attention_kernels.SPATIAL_ARGS``).
SIZE_ARGS = ('rows', 's_gate', 's_value')

SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_TAU = tl.constexpr(0.3989422804014327)   # 1 / sqrt(2 pi)


@triton.jit
def _tile(GATE, VALUE, rows, channels, s_gate, s_value, BLOCK_R: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """A tile's gate and value in float32, the gate's normal CDF, the tile's place in a
    contiguous ``(rows, channels)`` tensor and its mask."""
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (row < rows)[:, None] & (channel < channels)[None, :]
    gate = tl.load(GATE + row[:, None] * s_gate + channel[None, :], mask=ok,
                   other=0.0).to(tl.float32)
    value = tl.load(VALUE + row[:, None] * s_value + channel[None, :], mask=ok,
                    other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(gate * SQRT_HALF))
    return gate, value, cdf, row[:, None] * channels + channel[None, :], ok


@triton.jit(do_not_specialize=SIZE_ARGS)
def gated_gelu_forward(GATE, VALUE, OUT, rows, channels, s_gate, s_value,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``OUT = gelu(GATE) * VALUE``; grid ``(cdiv(rows, BLOCK_R), cdiv(channels, BLOCK_C))``."""
    gate, value, cdf, place, ok = _tile(GATE, VALUE, rows, channels, s_gate, s_value, BLOCK_R,
                                        BLOCK_C)
    tl.store(OUT + place, (gate * cdf * value).to(OUT.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=SIZE_ARGS)
def gated_gelu_backward(GATE, VALUE, GRAD, GRAD_GATE, GRAD_VALUE, rows, channels, s_gate,
                        s_value, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """From ``GRAD`` (contiguous): ``GRAD_VALUE = GRAD * gelu(GATE)`` and ``GRAD_GATE =
    GRAD * VALUE * (Phi + GATE * phi)(GATE)``; same grid."""
    gate, value, cdf, place, ok = _tile(GATE, VALUE, rows, channels, s_gate, s_value, BLOCK_R,
                                        BLOCK_C)
    grad = tl.load(GRAD + place, mask=ok, other=0.0).to(tl.float32)
    density = tl.exp(-0.5 * gate * gate) * INV_SQRT_TAU
    tl.store(GRAD_VALUE + place, (grad * gate * cdf).to(GRAD_VALUE.dtype.element_ty), mask=ok)
    tl.store(GRAD_GATE + place, (grad * value * (cdf + gate * density)).to(
        GRAD_GATE.dtype.element_ty), mask=ok)
