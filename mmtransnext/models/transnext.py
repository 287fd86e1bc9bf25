"""TransNeXt (CVPR 2024) as an MMEngine backbone for dense prediction.

Private building blocks first, the one public registered module last. Parameter
names equal the released checkpoints' so those load unchanged.
"""
import math
from copy import deepcopy
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.model.weight_init import PretrainedInit, trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import reference_requested, use_fused_attention
from ..ops.fused_gated_gelu import gated_gelu, gated_gelu_grad
from ..ops.graph_capture import capturing_graph
from .attention import AggregatedAttention, FullAttention, apply_layer, autocast_weights
from .checkpoint import load_pretrained

# Block norms and stage norms; patch-embedding and pooled-token norms keep 1e-5.
_BLOCK_NORM_EPS = 1e-6

ARCH_SETTINGS = {
    'micro': dict(embed_dims=[48, 96, 192, 384], num_heads=[2, 4, 8, 16],
                  depths=[2, 2, 15, 2], mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1],
                  window_size=[3, 3, 3, None]),
    'tiny': dict(embed_dims=[72, 144, 288, 576], num_heads=[3, 6, 12, 24],
                 depths=[2, 2, 15, 2], mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1],
                 window_size=[3, 3, 3, None]),
    'small': dict(embed_dims=[72, 144, 288, 576], num_heads=[3, 6, 12, 24],
                  depths=[5, 5, 22, 5], mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1],
                  window_size=[3, 3, 3, None]),
    'base': dict(embed_dims=[96, 192, 384, 768], num_heads=[4, 8, 16, 32],
                 depths=[5, 5, 23, 5], mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1],
                 window_size=[3, 3, 3, None]),
}
_ARCH_KEYS = ('embed_dims', 'num_heads', 'depths', 'mlp_ratios', 'sr_ratios', 'window_size')
# What a Pretrained init_cfg entry may say besides its checkpoint (load_pretrained's).
_PRETRAINED_OPTIONS = {'prefix', 'map_location', 'allow_partial'}


def _check_arch(arch: Union[str, dict]) -> dict:
    """An arch name or dict, validated, as a dict of per-stage lists."""
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'unknown TransNeXt arch {arch!r}; choose one of '
                             f'{sorted(ARCH_SETTINGS)} or pass a dict with keys {_ARCH_KEYS}')
        return deepcopy(ARCH_SETTINGS[arch])
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a name or a dict, not {type(arch).__name__}')
    missing = [k for k in _ARCH_KEYS if k not in arch]
    extra = [k for k in arch if k not in _ARCH_KEYS]
    if missing or extra:
        raise ValueError(f'TransNeXt arch dict: missing keys {missing}, unknown keys {extra}')
    arch = {k: list(arch[k]) for k in _ARCH_KEYS}
    stages = len(arch['embed_dims'])
    if stages == 0 or any(len(v) != stages for v in arch.values()):
        raise ValueError(f'TransNeXt arch dict: every key needs one entry per stage, got '
                         f'{ {k: len(v) for k, v in arch.items()} }')
    for key in ('embed_dims', 'num_heads', 'depths', 'sr_ratios'):
        for i, value in enumerate(arch[key]):
            # bool is an int to Python, but True heads or depth is a typo.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'stage {i + 1}: {key} must be a positive int, got {value!r}')
    for i, ratio in enumerate(arch['mlp_ratios']):
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio <= 0:
            raise ValueError(f'stage {i + 1}: mlp_ratios must be a positive number, got {ratio!r}')
    for i, (dim, heads, sr, ws) in enumerate(zip(arch['embed_dims'], arch['num_heads'],
                                                 arch['sr_ratios'], arch['window_size'])):
        if dim % heads:
            raise ValueError(f'stage {i + 1}: {dim} channels do not split into {heads} heads')
        if sr == 1 and ws is not None:
            # A full-attention stage has no window; a size there would be ignored.
            raise ValueError(f'stage {i + 1}: window_size must be None for a full-attention '
                             f'stage (sr_ratio 1), got {ws!r}')
        if sr > 1 and (not isinstance(ws, int) or isinstance(ws, bool) or ws < 1 or ws % 2 == 0):
            raise ValueError(f'stage {i + 1}: aggregated attention needs an odd window_size '
                             f'>= 1, got {ws!r}')
    return arch


class _PatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided convolution, then LayerNorm on tokens."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, int, int]:
        x = self.proj(x)
        _, _, height, width = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class _GatedGelu(torch.autograd.Function):
    """``gelu(gate) * value`` in the fused kernels (:mod:`~mmtransnext.ops.fused_gated_gelu`)."""

    @staticmethod
    def forward(ctx, gate, value):
        ctx.save_for_backward(gate, value)
        return gated_gelu(gate, value)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return gated_gelu_grad(*ctx.saved_tensors, grad)


class _ConvolutionalGLU(nn.Module):
    """Gated linear unit whose gate passes through a 3x3 depthwise convolution.

    Its hidden activations are the largest tensors a training step keeps: five of
    ``(B, N, hidden)`` or more per block against one ``(B, N, dim)`` input, with
    ``hidden`` up to ``5.3 * dim``. With ``recompute_hidden`` (the default path's
    training mode) only the input is kept and the hidden part is recomputed in the
    backward pass, which costs one more GLU forward per block and leaves the gradients
    unchanged. The reference path (``MMTRANSNEXT_DISABLE_EXT=1``) keeps the released
    behaviour.
    """

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.dwconv = _DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def autocast_layers(self) -> tuple:
        """The layers whose weights :func:`~.attention.autocast_weights` casts."""
        return self.fc1, self.dwconv.dwconv, self.fc2

    def forward(self, x: Tensor, height: int, width: int, recompute_hidden: bool = False,
                weights: Optional[dict] = None) -> Tensor:
        """Args: x ``(B, height * width, dim)``; ``weights`` the layers' weights cast by
        :func:`~.attention.autocast_weights`, or None. Returns the same shape."""
        if recompute_hidden and torch.is_grad_enabled() and not reference_requested():
            return cp.checkpoint(self._forward, x, height, width, weights, use_reentrant=False)
        return self._forward(x, height, width, weights)

    def _forward(self, x: Tensor, height: int, width: int, weights: Optional[dict]) -> Tensor:
        gate, value = apply_layer(self.fc1, x, weights).chunk(2, dim=-1)
        # The convolved gate is a temporary: held in a name, it would outlive its use and
        # raise an inference's peak by one hidden activation.
        if use_fused_attention(x) and not (capturing_graph() or torch.jit.is_tracing()):
            # one kernel each way, computing self.act's exact GELU
            hidden = _GatedGelu.apply(self.dwconv(gate, height, width, weights), value)
        else:
            hidden = self.act(self.dwconv(gate, height, width, weights)) * value
        return apply_layer(self.fc2, hidden, weights)


class _DepthwiseConv(nn.Module):
    """3x3 depthwise convolution of tokens seen as an ``height x width`` map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int,
                weights: Optional[dict] = None) -> Tensor:
        """Args: x ``(B, height * width, dim)``; ``weights`` as the GLU's. Returns the
        same shape."""
        batch, tokens, channels = x.shape
        if reference_requested():
            # The released layout: a channels-first view with channel stride 1, which
            # the CPU convolution handles about 3x slower than channels-last.
            x = x.transpose(1, 2).reshape(batch, channels, height, width)
            return self.dwconv(x).flatten(2).transpose(1, 2)
        # Tokens already are a channels-last map. One copy packs the gate (a strided
        # half of fc1's output); the output comes back channels-last, so a view.
        x = x.unflatten(1, (height, width)).permute(0, 3, 1, 2)
        x = apply_layer(self.dwconv, x.contiguous(memory_format=torch.channels_last), weights)
        return x.permute(0, 2, 3, 1).reshape(batch, tokens, channels)


class _Block(nn.Module):
    """Pre-norm transformer block: attention, then the convolutional GLU."""

    def __init__(self, attn: nn.Module, dim: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.mlp = _ConvolutionalGLU(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, height: int, width: int,
                recompute_hidden: bool = False) -> Tensor:
        """Args: x ``(B, height * width, dim)``; ``recompute_hidden`` as the GLU's."""
        # Under autocast the projections' weights are cast once for the block.
        weights = autocast_weights(self.attn.autocast_layers() + self.mlp.autocast_layers(), x)
        x = x + self.drop_path(self.attn(self.norm1(x), height, width, weights))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width,
                                           recompute_hidden=recompute_hidden, weights=weights))


@MODELS.register_module()
class TransNeXt(BaseModule):
    """TransNeXt backbone: aggregated attention and convolutional GLU, four stages.

    A re-implementation of `TransNeXt: Robust Foveal Visual Perception for Vision
    Transformers <https://arxiv.org/abs/2311.17132>`_ (CVPR 2024) for dense
    prediction. Every token attends, in one softmax, to the ``ws x ws`` window
    around it and to a pooled summary of the whole map, with a continuous
    position bias; the last stage uses full attention.

    Args:
        arch (str | dict): ``'micro'``, ``'tiny'``, ``'small'``, ``'base'``, or a
            dict with keys ``embed_dims, num_heads, depths, mlp_ratios,
            sr_ratios, window_size``, one entry per stage: positive ints (a
            positive number for ``mlp_ratios``), ``embed_dims`` divisible by
            ``num_heads``; ``window_size`` is odd for an aggregated-attention
            stage and must be ``None`` for a full-attention one (``sr_ratio == 1``).
            Default: ``'tiny'``.
        img_size (int): the input size the position bias is built for in
            interpolation mode (800 for COCO detection, 512 for ADE20K).
            Default: 224.
        pretrain_size (int, optional): the input size of pretraining, which sets
            the unit of relative offsets. Default: None (``img_size``).
        is_extrapolation (bool): build the bias on every input's own grid
            instead of resizing the one built for ``img_size``. Default: False.
        fixed_pool_size (int, optional): pool the periphery to ``S x S`` for any
            input (linear inference mode). Default: None.
        patch_size (int): stride of the first patch embedding (its kernel is
            ``2 * patch_size - 1``). Default: 4.
        in_channels (int): input channels. Default: 3.
        qkv_bias (bool): biases in the query/key/value projections. Default: True.
        drop_path_rate (float): stochastic depth, rising linearly over all blocks
            from 0 to this. Default: 0.
        out_indices (Sequence[int]): stages whose maps are returned, 0-based,
            each once and in increasing order (the order necks list their
            ``in_channels`` in). Default: ``(0, 1, 2, 3)``.
        frozen_stages (int): mmdet's convention (Swin, ResNet): ``k >= 1``
            freezes the first ``k`` stages, each with its patch embedding, blocks
            and norm (``patch_embed1..k``, ``block1..k``, ``norm1..k``); 0
            freezes only the stem, ``patch_embed1``; -1 freezes nothing. Frozen
            parts stay in eval mode without gradients, also after ``train()``.
            Default: -1.
        norm_eval (bool): as mmdet's ResNet: ``train()`` puts every batch-norm
            layer (``_BatchNorm``) back in eval mode, so that training leaves
            its running statistics alone. TransNeXt's own norms are all
            LayerNorm, which keeps no running statistics, so for TransNeXt
            itself this changes nothing; it acts on batch norms a subclass
            adds, and is accepted so that configs written for ResNet-style
            backbones build. Default: False.
        with_cp (bool): recompute each block in the backward pass (activation
            checkpointing) to save memory, when gradients flow. Without it the
            default path still recomputes the convolutional GLU's hidden part, the
            largest activations, at the cost of one more GLU forward. Default: False.
        init_cfg (dict | list[dict], optional): ``dict(type='Pretrained',
            checkpoint=PATH)`` loads released weights (classifier, detector or
            segmentor, or a raw state dict) through mmengine's
            ``CheckpointLoader``: ``PATH`` is a local file or an ``https://``
            address (downloaded once into torch's hub cache); ``prefix`` and
            ``map_location`` mean what they mean in mmengine's
            ``PretrainedInit``. Backbone weights that are missing, mismatched
            or extra are an error naming the variant the file looks like,
            unless ``allow_partial=True``. Other mmengine init configs apply as
            usual. In a list, the ``Pretrained`` entry (at most one) loads the
            same way, after mmengine has applied the other entries, which is
            mmengine's own order: the checkpoint's weights win and the other
            entries reach only what it leaves out (with ``allow_partial``).
            Default: None, which keeps the training-from-scratch
            initialisation.

    Shape:
        - Input: ``(B, in_channels, H, W)``, any ``H, W >= 1``.
        - Output: a tuple, per index in ``out_indices``, of ``(B, C_i, H_i, W_i)``
          with strides ``patch_size * 2**i`` (rounded as the convolutions round).
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 img_size: int = 224,
                 pretrain_size: Optional[int] = None,
                 is_extrapolation: bool = False,
                 fixed_pool_size: Optional[int] = None,
                 patch_size: int = 4,
                 in_channels: int = 3,
                 qkv_bias: bool = True,
                 drop_path_rate: float = 0.,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        settings = _check_arch(arch)
        self.arch_settings = settings
        self.num_stages = len(settings['embed_dims'])
        self.embed_dims = settings['embed_dims']
        out_indices = tuple(out_indices)
        if not out_indices or any(not 0 <= i < self.num_stages for i in out_indices):
            raise ValueError(f'out_indices must name stages 0..{self.num_stages - 1}, '
                             f'got {out_indices}')
        if list(out_indices) != sorted(set(out_indices)):
            # Maps come out in stage order, once each: another order or a repeat
            # would silently pair the maps with the wrong neck in_channels.
            raise ValueError(f'out_indices must be increasing without repeats, got '
                             f'{out_indices}; did you mean {tuple(sorted(set(out_indices)))}?')
        if fixed_pool_size is not None and fixed_pool_size < 1:
            raise ValueError(f'fixed_pool_size must be >= 1, got {fixed_pool_size}')
        if patch_size < 1:
            raise ValueError(f'patch_size must be >= 1, got {patch_size}')
        self.out_indices = out_indices
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.qkv_bias = qkv_bias
        self.img_size = img_size
        self.pretrain_size = pretrain_size or img_size
        self.is_extrapolation = is_extrapolation
        self.fixed_pool_size = fixed_pool_size
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be -1 (none), 0 (the stem) .. '
                             f'{self.num_stages} (every stage), got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp

        rates = torch.linspace(0, drop_path_rate, sum(settings['depths'])).tolist()
        first_block = 0
        channels = in_channels
        for i in range(self.num_stages):
            dim, depth = settings['embed_dims'][i], settings['depths'][i]
            stride = patch_size * 2**i
            if i == 0:
                embed = _PatchEmbed(channels, dim, 2 * patch_size - 1, patch_size)
            else:
                embed = _PatchEmbed(channels, dim, 3, 2)
            blocks = nn.ModuleList(
                _Block(self._attention(i, stride), dim, settings['mlp_ratios'][i],
                       rates[first_block + j]) for j in range(depth))
            setattr(self, f'patch_embed{i + 1}', embed)
            setattr(self, f'block{i + 1}', blocks)
            setattr(self, f'norm{i + 1}', nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS))
            first_block += depth
            channels = dim
        self._init_from_scratch()
        self._freeze_stages()

    def _attention(self, stage: int, stride: int) -> nn.Module:
        """The token mixer of one block of ``stage`` (0-based) at ``stride``."""
        s = self.arch_settings
        dim, heads, sr = s['embed_dims'][stage], s['num_heads'][stage], s['sr_ratios'][stage]
        build = None if self.is_extrapolation else max(self.img_size // stride, 1)
        pretrain = max(self.pretrain_size // stride, 1)
        if sr == 1:
            return FullAttention(dim, heads, build, pretrain, self.qkv_bias)
        if self.is_extrapolation:
            build_pool = None
        elif self.fixed_pool_size is not None:
            build_pool = self.fixed_pool_size
        else:
            build_pool = max(self.img_size // (stride * sr), 1)
        return AggregatedAttention(dim, heads, s['window_size'][stage], sr, build, build_pool,
                                   pretrain, self.fixed_pool_size, self.qkv_bias)

    def _init_from_scratch(self):
        """The released training initialisation (also what an unloaded model has)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0, math.sqrt(2.0 / (fan_out // module.groups)))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (AggregatedAttention, FullAttention)):
                module.reset_attention_parameters()

    def init_weights(self):
        """Load ``init_cfg``'s released checkpoint, or apply another init config.

        A ``Pretrained`` entry, alone or in a list, goes through the strict
        :func:`load_pretrained`; the list's other entries are applied first by
        mmengine (see ``init_cfg`` in the class docstring).

        Raises:
            TypeError: an ``init_cfg`` entry is not a dict.
            ValueError: more than one ``Pretrained`` entry, one without a
                ``checkpoint`` or with keys :func:`load_pretrained` does not
                read, or a checkpoint that does not fit.
        """
        init_cfg = self.init_cfg
        entries = (list(init_cfg) if isinstance(init_cfg, (list, tuple))
                   else [init_cfg] if init_cfg is not None else [])
        for entry in entries:
            if not isinstance(entry, dict):
                raise TypeError(f'init_cfg entries must be dicts, got {type(entry).__name__} '
                                f'{entry!r}')
        pretrained = [e for e in entries if e.get('type') in ('Pretrained', PretrainedInit)]
        if not pretrained:
            super().init_weights()
            return
        if len(pretrained) > 1:
            raise ValueError(f"init_cfg has {len(pretrained)} entries of type 'Pretrained'; "
                             'give one checkpoint')
        options = {k: v for k, v in pretrained[0].items() if k != 'type'}
        checkpoint = options.pop('checkpoint', None)
        if not checkpoint:
            raise ValueError("init_cfg of type 'Pretrained' needs a 'checkpoint' path")
        unknown = sorted(set(options) - _PRETRAINED_OPTIONS)
        if unknown:
            raise ValueError(f"init_cfg of type 'Pretrained': unknown keys {unknown}; "
                             f'TransNeXt reads {sorted(_PRETRAINED_OPTIONS)}')
        others = [e for e in entries if e is not pretrained[0]]
        if others:
            # mmengine's order (its PretrainedInit runs last): the other inits
            # first, so that the checkpoint overwrites what it holds.
            self.init_cfg = others
            try:
                super().init_weights()
            finally:
                self.init_cfg = init_cfg
        load_pretrained(self, checkpoint, **options)
        self._is_init = True

    def _stage_modules(self, stage: int):
        return (getattr(self, f'patch_embed{stage + 1}'), getattr(self, f'block{stage + 1}'),
                getattr(self, f'norm{stage + 1}'))

    def _frozen_modules(self) -> List[nn.Module]:
        """What ``frozen_stages`` freezes (see the class docstring)."""
        if self.frozen_stages == 0:
            return [self.patch_embed1]
        return [module for stage in range(max(self.frozen_stages, 0))
                for module in self._stage_modules(stage)]

    def _freeze_stages(self):
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        """Switch modes, keeping frozen stages (and, with ``norm_eval``, batch norms) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def _check_input(self, x: Tensor):
        if not isinstance(x, Tensor):
            raise TypeError(f'TransNeXt expects a tensor, got {type(x).__name__}')
        if x.dim() != 4:
            raise ValueError(f'TransNeXt expects a 4-D (B, C, H, W) input, got shape '
                             f'{tuple(x.shape)}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'TransNeXt was built for {self.in_channels} input channels, '
                             f'got {x.shape[1]} (shape {tuple(x.shape)})')
        if x.numel() == 0:
            raise ValueError(f'TransNeXt got an empty input of shape {tuple(x.shape)}')
        if not x.is_floating_point():
            raise ValueError(f'TransNeXt expects a floating-point input, got {x.dtype}')

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Args: x ``(B, C, H, W)``. Returns the maps of ``out_indices``."""
        self._check_input(x)
        outs = []
        for stage in range(self.num_stages):
            embed, blocks, norm = self._stage_modules(stage)
            x, height, width = embed(x)
            for block in blocks:
                if self.with_cp and x.requires_grad:
                    x = cp.checkpoint(block, x, height, width, use_reentrant=False)
                else:
                    # Checkpointing the whole block already recomputes the GLU.
                    x = block(x, height, width, recompute_hidden=True)
            x = norm(x)
            # Contiguous NCHW: the transposed view is channels-last in memory, which
            # convolutions pass on to the neck, and mmcv's CPU RoIAlign reads such
            # maps as if they were NCHW (silently wrong RoI features in Mask R-CNN).
            x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width).contiguous()
            if stage in self.out_indices:
                outs.append(x)
        return tuple(outs)


def _released_alias(arch: str):
    """A builder named like the released configs' backbones (``transnext_tiny``...)."""

    def build(pretrained: Optional[str] = None, scales: Optional[int] = None, **kwargs):
        if pretrained is not None:
            if kwargs.get('init_cfg') is not None:
                raise ValueError('give either pretrained or init_cfg, not both')
            kwargs['init_cfg'] = dict(type='Pretrained', checkpoint=pretrained)
        if scales is not None:
            # The released DINO configs ask for `scales` feature levels: the neck
            # adds one below the backbone's last (scales - 1) stages.
            if not 2 <= scales <= 5:
                raise ValueError(f'scales must be 2..5 (feature levels), got {scales}')
            if 'out_indices' in kwargs:
                raise ValueError('give either scales or out_indices, not both')
            kwargs['out_indices'] = tuple(range(5 - scales, 4))
        return TransNeXt(arch=arch, **kwargs)

    build.__name__ = f'transnext_{arch}'
    build.__doc__ = (f'TransNeXt-{arch} under the released configs\' name; accepts their '
                     '``pretrained`` (a checkpoint path) and ``scales`` (DINO feature levels: '
                     'the backbone returns its last ``scales - 1`` stages, so 4 gives '
                     '``out_indices=(1, 2, 3)`` and 5 ``(0, 1, 2, 3)``) besides '
                     "TransNeXt's own arguments.")
    return build


for _arch in ARCH_SETTINGS:
    MODELS.register_module(name=f'transnext_{_arch}', module=_released_alias(_arch))
