"""Compiled ops of mmtransnext, with pure-PyTorch fallbacks.

Importing never fails: when ``mmtransnext._C`` is missing the public functions use the
references (and warn once per device type).
"""
from .sliding_window import (DISABLE_ENV, extension_available, sliding_window_aggregate,
                             sliding_window_aggregate_reference, sliding_window_logits,
                             sliding_window_logits_reference, reference_requested,
                             use_compiled_op)
from .fused_attention import fused_bias_attention, use_fused_attention

__all__ = [
    'sliding_window_logits', 'sliding_window_aggregate',
    'sliding_window_logits_reference', 'sliding_window_aggregate_reference',
    'extension_available', 'use_compiled_op', 'reference_requested', 'DISABLE_ENV',
    'use_fused_attention', 'fused_bias_attention',
]
