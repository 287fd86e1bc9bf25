"""The fovea and the periphery of one pixel, per aggregated-attention stage.

Aggregated attention gives every token one softmax over two sets of keys: its
``ws x ws`` window (the fovea, fine-grained) and the pooled map (the
periphery, coarse). For a chosen pixel this module captures, in the *last*
block of every aggregated-attention stage, the weights of the pixel's token
over both sets (:meth:`AggregatedAttention.attention_maps` on the block's
``norm1`` output, taken with forward hooks) and draws them over the image.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

# ImageNet mean / std in RGB, as the configs' data preprocessors use (0-255 scale).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


@dataclass
class StageAttention:
    """What one stage's last aggregated-attention block gives every token.

    Attributes:
        stage (int): 0-based stage.
        block (int): index of the block in the stage (the last one).
        stride (int): the stage's stride in image pixels, ``patch_size * 2**stage``.
        height, width (int): the stage's token map.
        window_size (int): ``ws``.
        pool_size (tuple[int, int]): ``(Hp, Wp)``.
        local (Tensor): ``(heads, N, ws*ws)`` window weights.
        pooled (Tensor): ``(heads, N, Hp*Wp)`` pooled weights.
    """
    stage: int
    block: int
    stride: int
    height: int
    width: int
    window_size: int
    pool_size: Tuple[int, int]
    local: Tensor
    pooled: Tensor


def load_image(path: str) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB."""
    import mmcv
    image = mmcv.imread(path, channel_order='rgb')
    if image is None:
        raise FileNotFoundError(f'cannot read an image from {path!r}')
    return image


def to_input(image: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 RGB to a normalised ``(1, 3, H, W)`` float tensor."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def capture_attention(model: nn.Module, image: Tensor) -> List[StageAttention]:
    """Run ``model`` (a TransNeXt) on ``image`` and capture, for the last block of
    every aggregated-attention stage, the weights of all tokens.

    Forward hooks take each such block's ``norm1`` output and map size, then
    call its ``attn.attention_maps``; the hooks are removed afterwards.
    """
    from mmtransnext.models.attention import AggregatedAttention
    records, handles = [], []
    for stage in range(model.num_stages):
        blocks = getattr(model, f'block{stage + 1}')
        if not len(blocks) or not isinstance(blocks[-1].attn, AggregatedAttention):
            continue
        index, block = len(blocks) - 1, blocks[-1]
        state = {}

        def grab_size(module, args, state=state):
            state['size'] = (int(args[1]), int(args[2]))

        def grab_maps(module, args, output, state=state, stage=stage, index=index,
                      block=block):
            height, width = state['size']
            local, pooled = block.attn.attention_maps(output, height, width)
            records.append(StageAttention(stage, index, model.patch_size * 2**stage,
                                          height, width, block.attn.window_size,
                                          block.attn.pool_size(height, width),
                                          local[0].float(), pooled[0].float()))

        handles.append(block.register_forward_pre_hook(grab_size))
        handles.append(block.norm1.register_forward_hook(grab_maps))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return records


def pixel_token(pixel: Sequence[int], image_size: Tuple[int, int],
                map_size: Tuple[int, int]) -> Tuple[int, int]:
    """The token of a stage's map that covers image pixel ``(y, x)`` (the stage's
    stride, ``patch_size * 2**stage``, with the convolutions' rounding taken into
    account: the map's size relative to the image's decides)."""
    (y, x), (img_h, img_w), (height, width) = pixel, image_size, map_size
    if not (0 <= y < img_h and 0 <= x < img_w):
        raise ValueError(f'pixel {(y, x)} is outside the {img_h}x{img_w} image')
    return min(y * height // img_h, height - 1), min(x * width // img_w, width - 1)


def pixel_weights(record: StageAttention, token: Tuple[int, int],
                  head: Union[str, int] = 'mean') -> Tuple[np.ndarray, np.ndarray]:
    """The fovea ``(ws, ws)`` and periphery ``(Hp, Wp)`` weights of one token
    (averaged over heads, or of one head); together they sum to 1."""
    n = token[0] * record.width + token[1]
    local, pooled = record.local[:, n], record.pooled[:, n]
    if head == 'mean':
        local, pooled = local.mean(0), pooled.mean(0)
    else:
        if not 0 <= int(head) < local.shape[0]:
            raise ValueError(f'head {head} out of range: stage {record.stage + 1} has '
                             f'{local.shape[0]} heads')
        local, pooled = local[int(head)], pooled[int(head)]
    ws = record.window_size
    return local.reshape(ws, ws).numpy(), pooled.reshape(record.pool_size).numpy()


def draw(image: np.ndarray, records: Sequence[StageAttention], pixel: Sequence[int],
         out_path: str, head: Union[str, int] = 'mean', title: Optional[str] = None) -> dict:
    """One panel per stage: the periphery (pooled weights drawn back over the
    image) and the fovea (the ``ws x ws`` window weights, a grid of the stage's
    token cells around the pixel), saved to ``out_path``.

    Returns:
        dict: per stage (1-based) the fovea and periphery shares of the weight.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors
    from matplotlib.patches import Rectangle

    if not records:
        raise ValueError('the model has no aggregated-attention stage to draw')
    img_h, img_w = image.shape[:2]
    y, x = pixel
    fig, axes = plt.subplots(1, len(records), figsize=(4.2 * len(records), 5.0), squeeze=False)
    shares = {}
    for ax, record in zip(axes[0], records):
        token = pixel_token(pixel, (img_h, img_w), (record.height, record.width))
        fovea, periphery = pixel_weights(record, token, head)
        shares[record.stage + 1] = dict(fovea=float(fovea.sum()),
                                        periphery=float(periphery.sum()))
        ax.imshow(image, alpha=0.55)
        # Periphery: each pooled cell covers a block of the map; stretch to the image.
        ax.imshow(periphery, cmap='viridis', alpha=0.55, extent=(0, img_w, img_h, 0),
                  interpolation='bilinear')
        # Fovea: the window's token cells, in image pixels.
        cell_h, cell_w = img_h / record.height, img_w / record.width
        half = record.window_size // 2
        norm = colors.Normalize(vmin=0, vmax=max(float(fovea.max()), 1e-12))
        for i in range(record.window_size):
            for j in range(record.window_size):
                r, c = token[0] + i - half, token[1] + j - half
                if not (0 <= r < record.height and 0 <= c < record.width):
                    continue
                ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h,
                                       facecolor=cm.Reds(norm(fovea[i, j])), alpha=0.85,
                                       edgecolor='white', linewidth=0.8))
        ax.plot([x], [y], marker='+', color='cyan', markersize=10, mew=2)
        ax.set_title(f'stage {record.stage + 1} (block {record.block + 1}, '
                     f'stride {record.stride})\n'
                     f'fovea {record.window_size}x{record.window_size}: '
                     f'{shares[record.stage + 1]["fovea"]:.0%}, periphery '
                     f'{record.pool_size[0]}x{record.pool_size[1]}: '
                     f'{shares[record.stage + 1]["periphery"]:.0%}', fontsize=9)
        ax.set_xlim(0, img_w)
        ax.set_ylim(img_h, 0)
        ax.axis('off')
    fig.suptitle(title or f'pixel (y={y}, x={x}), heads: {head}', fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return shares
