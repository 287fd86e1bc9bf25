from .checkpoint import filter_backbone_state_dict, load_pretrained
from .transnext import ARCH_SETTINGS, TransNeXt

__all__ = ['ARCH_SETTINGS', 'TransNeXt', 'filter_backbone_state_dict', 'load_pretrained']
